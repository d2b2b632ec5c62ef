//! Property tests of every parser of bytes that come from disk or a socket: the manifest
//! (`Manifest::decode`, `check_name`, `parse_seq`) and the job protocol (`Message::parse`).
//! Untrusted bytes never panic, never allocate beyond the limits, and every accepted manifest
//! is safe (names relative, bounded, unique); a hostile checkpoint directory never makes
//! verification panic or block. The same parsers are fuzzed by `fuzz/`.
//! `PROPTEST_CASES` raises the number of cases (default 256 per property).

use ckpt::protocol::{Message, MAX_MESSAGE_BYTES};
use ckpt::store::manifest::{check_name, limits};
use ckpt::store::{parse_seq, Algo, FileEntry, Manifest};
use proptest::prelude::*;

fn name_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_.-]{1,12}(/[a-z0-9_.-]{1,12}){0,3}",
        // Hostile shapes.
        Just("../x".to_string()),
        Just("/etc/passwd".to_string()),
        Just("a//b".to_string()),
        Just("a/./b".to_string()),
        Just("MANIFEST.ckpt".to_string()),
        ".{0,40}",
    ]
}

fn manifest_strategy() -> impl Strategy<Value = Manifest> {
    (
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        "[ -~]{0,20}",
        prop_oneof![Just(Algo::Crc32c), Just(Algo::Crc32)],
        proptest::collection::btree_map(
            "[a-z0-9_-]{1,10}(/[a-z0-9_-]{1,10}){0,2}",
            (any::<u64>(), any::<u32>()),
            0..8,
        ),
        any::<u64>(),
    )
        .prop_map(|(seq, step, writer, algo, files, created)| {
            let files = files
                .into_iter()
                .map(|(name, (size, sum))| FileEntry { name, size, sum })
                .collect();
            let mut m = Manifest::new(seq, step, &writer, algo, files);
            m.created_ms = created;
            m
        })
}

fn accepted_is_safe(m: &Manifest) {
    assert!(m.files.len() <= limits::FILES);
    let mut seen = std::collections::HashSet::new();
    for f in &m.files {
        assert!(
            check_name(&f.name).is_ok(),
            "unsafe name {:?} accepted",
            f.name
        );
        assert!(!f.name.starts_with('/'));
        assert!(!f
            .name
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty()));
        assert!(seen.insert(f.name.clone()), "duplicate accepted");
    }
}

proptest! {
    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(m) = Manifest::decode(&bytes) {
            accepted_is_safe(&m);
        }
    }

    #[test]
    fn encode_decode_round_trip(m in manifest_strategy()) {
        let bytes = m.encode();
        prop_assert_eq!(Manifest::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn any_mutation_is_rejected_or_harmless(
        m in manifest_strategy(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = m.encode();
        for (i, b) in &edits {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        if let Ok(d) = Manifest::decode(&bytes) {
            // Only an edit the checksum cannot see (none for 1-3 bytes, in practice) or one
            // that restored the original bytes may decode; either way it is safe.
            accepted_is_safe(&d);
        }
    }

    #[test]
    fn truncation_is_rejected(m in manifest_strategy(), cut in any::<prop::sample::Index>()) {
        let bytes = m.encode();
        let n = cut.index(bytes.len());
        prop_assert!(Manifest::decode(&bytes[..n]).is_err());
    }

    #[test]
    fn hostile_entries_with_a_valid_trailer_are_refused_or_safe(
        names in proptest::collection::vec(name_strategy(), 0..6),
        sizes in proptest::collection::vec(any::<u64>(), 6),
        version in any::<u64>(),
    ) {
        // A valid checksum around arbitrary content: only the content checks stand between
        // it and the reader.
        let files: Vec<_> = names.iter().zip(&sizes)
            .map(|(n, s)| serde_json::json!({"name": n, "size": s, "sum": 0}))
            .collect();
        let v = serde_json::json!({
            "format": "ckpt", "version": version, "seq": 1, "created_ms": 0,
            "writer": "x", "checksum": "crc32c", "files": files,
        });
        let json = serde_json::to_vec(&v).unwrap();
        let mut bytes = json.clone();
        bytes.extend_from_slice(format!("\ncrc32c:{:08x}\n", crc32c::crc32c(&json)).as_bytes());
        if let Ok(m) = Manifest::decode(&bytes) {
            prop_assert_eq!(version, 1);
            accepted_is_safe(&m);
        }
    }

    #[test]
    fn check_name_accepts_only_safe_relative_paths(name in name_strategy()) {
        if check_name(&name).is_ok() {
            prop_assert!(!name.is_empty() && name.len() <= limits::NAME_BYTES);
            prop_assert!(!name.starts_with('/') && !name.contains('\0'));
            prop_assert!(!name.split('/').any(|c| c == ".." || c == "." || c.is_empty()));
            prop_assert!(name.split('/').count() <= limits::NAME_DEPTH);
        }
    }

    #[test]
    fn parse_seq_only_accepts_its_own_format(s in "(ckpt-)?[0-9a-z.]{0,24}") {
        if let Some(n) = parse_seq(&s, false) {
            prop_assert_eq!(format!("ckpt-{n:012}").len() >= 17, true);
            prop_assert!(s.starts_with("ckpt-") && s[5..].bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn message_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Message::parse(&bytes);
    }

    #[test]
    fn message_parse_json_shapes(v in prop_oneof![
        Just(serde_json::json!({"type": "hello"})),
        (any::<u32>(), any::<i32>()).prop_map(|(p, s)| serde_json::json!({"type": "hello", "v": 1, "pid": p, "signal": s, "client": "x"})),
        (any::<u32>(), any::<u64>()).prop_map(|(p, s)| serde_json::json!({"type": "progress", "v": 1, "pid": p, "step": s})),
        any::<i64>().prop_map(|n| serde_json::json!({"type": "committed", "v": n, "seq": n})),
        ".{0,30}".prop_map(|s| serde_json::json!({"type": s})),
    ]) {
        let _ = Message::parse(&serde_json::to_vec(&v).unwrap());
    }
}

/// What a planted entry in a checkpoint directory is.
#[derive(Debug, Clone, Copy)]
enum Planted {
    File,
    Fifo,
    SymlinkOut,
    Dir,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The `checkpoint_dir` fuzz target on stable Rust, with planted entries: a checkpoint
    /// directory whose manifest (valid trailer, arbitrary names) lists files that are regular
    /// files, FIFOs, symlinks out of the directory or directories. Verification never panics,
    /// never hangs on a FIFO, and accepts only what it can read as regular files inside.
    #[test]
    fn verifying_a_hostile_checkpoint_dir_never_panics_nor_blocks(
        names in proptest::collection::vec(name_strategy(), 1..5),
        kinds in proptest::collection::vec(prop_oneof![
            Just(Planted::File), Just(Planted::Fifo), Just(Planted::SymlinkOut), Just(Planted::Dir)
        ], 5),
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("ckpt-000000000001");
        std::fs::create_dir(&ck).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, &data).unwrap();
        let mut files = Vec::new();
        for (n, k) in names.iter().zip(&kinds) {
            if check_name(n).is_err() {
                continue;
            }
            let p = ck.join(n);
            if std::fs::create_dir_all(p.parent().unwrap()).is_err() || p.exists() {
                continue;
            }
            match k {
                Planted::File => std::fs::write(&p, &data).unwrap(),
                Planted::Fifo => {
                    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
                    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
                }
                Planted::SymlinkOut => std::os::unix::fs::symlink(&outside, &p).unwrap(),
                Planted::Dir => std::fs::create_dir(&p).unwrap(),
            }
            files.push(FileEntry { name: n.clone(), size: data.len() as u64, sum: Algo::Crc32c.checksum(&data) });
        }
        let mut names_seen = std::collections::HashSet::new();
        files.retain(|f| names_seen.insert(f.name.clone()));
        let m = Manifest::new(1, None, "prop", Algo::Crc32c, files.clone());
        std::fs::write(ck.join("MANIFEST.ckpt"), m.encode()).unwrap();
        let t = std::time::Instant::now();
        let r = ckpt::store::scan::verify_path(&ck, Some(1));
        prop_assert!(t.elapsed() < std::time::Duration::from_secs(5));
        if r.is_ok() {
            // Accepted: every listed file is a regular file inside the directory.
            for f in &files {
                let md = std::fs::symlink_metadata(ck.join(&f.name)).unwrap();
                prop_assert!(md.is_file(), "{} accepted as {:?}", f.name, md.file_type());
            }
        }
    }
}

#[test]
fn oversized_inputs_are_refused_before_parsing() {
    let big = vec![b'{'; limits::MANIFEST_BYTES as usize + 1];
    assert!(Manifest::decode(&big).is_err());
    assert!(Message::parse(&vec![b' '; MAX_MESSAGE_BYTES + 1]).is_err());
}
