//! The direct restores (`pod::read_direct`, issue 19): reader threads reading
//! `DIRECT_PIECE`-byte pieces k, k + readers, ... with `O_DIRECT`, consumed in order (copied
//! into the destination and checksummed in steps). Exact at sizes of several pieces around the
//! piece size and not multiples of a page, into fresh memory and into the job's own buffer,
//! with one and two readers, and with one or two threads copying and checksumming the pieces
//! (run M: each serving its own readers, the pieces' checksums combined in file order;
//! streaming stores or run J's plain copy); damage in any piece (a flipped bit, a file cut at or inside a
//! piece, a file grown by a byte) is refused, past the page cache; on ramfs (no `O_DIRECT`,
//! as root) the same restores fall back to the page cache. No timing here
//! (docs/benchmarks.md).

mod common;

use std::path::Path;
use std::time::Duration;

use ckpt::pod::{CHUNK, DIRECT_PIECE};
use ckpt::Checkpointer;
use common::*;

fn open(dir: &Path) -> Checkpointer {
    for k in ["CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE", "CKPT_SIGNAL"] {
        assert!(
            std::env::var_os(k).is_none(),
            "run the tests without {k} set"
        );
    }
    Checkpointer::open(dir).expect("open")
}

/// Writes `file` back and drops it from the page cache (retried while a read-ahead holds
/// pages), so that the restore reads past the cache.
fn uncache(file: &Path) {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    f.sync_all().unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let cached_at = |off: usize| {
        let mut page = [0u8; 4096];
        let iov = libc::iovec {
            iov_base: page.as_mut_ptr().cast(),
            iov_len: page.len().min(len - off),
        };
        // SAFETY: one iovec over a live local buffer.
        unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, off as i64, libc::RWF_NOWAIT) > 0 }
    };
    wait_until(
        Duration::from_secs(30),
        "the file to leave the page cache",
        || {
            // SAFETY: a hint on an open descriptor.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            !cached_at(0) && !cached_at((len / 2) & !4095)
        },
    );
}

/// Saves `data` as member "blob" of a fresh checkpoint in `dir`; returns its path.
fn save_blob(dir: &Path, data: &[u8]) -> std::path::PathBuf {
    let mut ck = open(dir);
    let saved = ck
        .save_with(None, |st| st.write_large("blob", data).map(|_| ()))
        .unwrap();
    saved.path.join("blob")
}

/// Both restore kinds of "blob": into fresh memory (`read_file`) and into a buffer the job
/// owns (`read_into`, a `Vec` as glibc places it: 16 bytes past a page).
fn restore_both(ck: &Checkpointer, len: usize) -> [ckpt::Result<Vec<u8>>; 2] {
    let fresh = ck.read_file("blob");
    let mut into = vec![0xA5u8; len];
    let owned = ck.read_into("blob", &mut into).map(|()| into);
    [fresh, owned]
}

fn direct_restores_are_exact_and_refuse_damage_in_any_piece(
    readers: usize,
    workers: usize,
    streaming: bool,
) {
    ckpt::pod::set_direct_io(true);
    ckpt::pod::set_direct_readers(readers);
    ckpt::pod::set_direct_workers(workers, streaming);
    let seed = seed("direct-read");
    let mut rng = fastrand::Rng::with_seed(seed);
    let before = ckpt::pod::direct_reads();
    let mut expect_direct = 0;
    for len in [
        CHUNK,
        2 * CHUNK - 1,
        3 * CHUNK + 4096 + 5,
        5 * DIRECT_PIECE + 1,
        5 * DIRECT_PIECE - 4096 + 3,
    ] {
        let tmp = tempdir();
        let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let file = save_blob(tmp.path(), &data);
        let ck = open(tmp.path());
        uncache(&file);
        let check_refused = |what: &str, pred: &dyn Fn(&ckpt::Error) -> bool| {
            for (kind, r) in ["fresh", "into"].iter().zip(restore_both(&ck, len)) {
                let err = r.expect_err(what);
                assert!(pred(&err), "{len} bytes, {kind}, {what}: {err}");
                uncache(&file);
            }
        };
        for (kind, r) in ["fresh", "into"].iter().zip(restore_both(&ck, len)) {
            assert!(r.unwrap() == data, "{len} bytes, {kind}");
            uncache(&file);
        }
        expect_direct += 2;
        let pieces = len.div_ceil(DIRECT_PIECE);
        // A flipped bit in every piece in turn (the readers alternate pieces), and in the
        // first and last byte.
        let mut spots: Vec<usize> = (0..pieces)
            .map(|k| (k * DIRECT_PIECE + rng.usize(..DIRECT_PIECE)).min(len - 1))
            .collect();
        spots.extend([0, len - 1]);
        for at in spots {
            let mut bad = data.clone();
            bad[at] ^= 0x10;
            std::fs::write(&file, &bad).unwrap();
            uncache(&file);
            check_refused(&format!("bit {at}"), &|e| {
                e.to_string().contains("checksum")
            });
            expect_direct += 2;
        }
        // Cut at a piece boundary, inside the second and the last piece, and grown by a byte.
        for cut in [DIRECT_PIECE, DIRECT_PIECE + 4096 + 3, len - 1, len + 1] {
            let mut v = data.clone();
            v.resize(cut, 7);
            std::fs::write(&file, &v).unwrap();
            uncache(&file);
            check_refused(&format!("cut to {cut}"), &|e| {
                matches!(e, ckpt::Error::Invalid { .. })
            });
        }
        std::fs::write(&file, &data).unwrap();
        uncache(&file);
        for (kind, r) in ["fresh", "into"].iter().zip(restore_both(&ck, len)) {
            assert!(r.unwrap() == data, "{len} bytes again, {kind}");
            uncache(&file);
        }
    }
    assert!(
        ckpt::pod::direct_reads() - before >= expect_direct,
        "not every restore went past the page cache ({} of at least {expect_direct})",
        ckpt::pod::direct_reads() - before
    );
}

#[test]
fn direct_restores_with_two_readers_are_exact_and_refuse_damage_in_any_piece() {
    direct_restores_are_exact_and_refuse_damage_in_any_piece(2, 2, true);
}

#[test]
fn direct_restores_with_one_reader_are_exact_and_refuse_damage_in_any_piece() {
    direct_restores_are_exact_and_refuse_damage_in_any_piece(1, 0, true);
}

/// Run J's consumer (the caller's thread copies every piece, plain copy), still selectable.
#[test]
fn direct_restores_with_one_copying_thread_are_exact_and_refuse_damage_in_any_piece() {
    direct_restores_are_exact_and_refuse_damage_in_any_piece(2, 1, false);
}

/// Four readers served by two copying threads (two readers each).
#[test]
fn direct_restores_with_four_readers_two_copiers_are_exact_and_refuse_damage_in_any_piece() {
    direct_restores_are_exact_and_refuse_damage_in_any_piece(4, 2, true);
}

/// On a file system that refuses `O_DIRECT` (ramfs; mounted here, so only as root) the
/// restores read through the page cache: exact, damage refused, no direct read counted.
#[test]
fn restores_on_a_file_system_without_o_direct_fall_back_to_the_page_cache() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting ramfs needs root");
        return;
    }
    ckpt::pod::set_direct_io(true);
    let tmp = tempdir();
    let mnt = tmp.path().join("ramfs");
    std::fs::create_dir(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&mnt)
        .status()
        .expect("run mount");
    assert!(st.success(), "mount -t ramfs failed");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _umount = Umount(mnt.clone());
    // ramfs really refuses O_DIRECT (else this test would prove nothing).
    let probe = mnt.join("probe");
    std::fs::write(&probe, b"x").unwrap();
    {
        use std::os::unix::fs::OpenOptionsExt;
        let r = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe);
        assert!(r.is_err(), "ramfs accepted O_DIRECT");
    }
    let mut rng = fastrand::Rng::with_seed(seed("direct-read-ramfs"));
    let len = 3 * DIRECT_PIECE + 4096 + 7;
    let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
    let d = mnt.join("ck");
    let file = save_blob(&d, &data);
    let ck = open(&d);
    let before = ckpt::pod::direct_reads();
    for (kind, r) in ["fresh", "into"].iter().zip(restore_both(&ck, len)) {
        assert!(r.unwrap() == data, "{kind}");
    }
    let mut bad = data.clone();
    bad[2 * DIRECT_PIECE + 9] ^= 1;
    std::fs::write(&file, &bad).unwrap();
    for (kind, r) in ["fresh", "into"].iter().zip(restore_both(&ck, len)) {
        let err = r.unwrap_err();
        assert!(err.to_string().contains("checksum"), "{kind}: {err}");
    }
    assert_eq!(ckpt::pod::direct_reads(), before, "a direct read on ramfs");
}

/// Run M's A/B recipe (`docs/benchmarks.md`: `readab ... --variants into-runj,into-direct,dd-direct`)
/// runs as written, at a small size: every variant restores exactly (readab asserts it) and
/// the JSON has the ratios to `dd iflag=direct`. Root only (readab drops the page cache).
#[test]
fn readab_ab_of_run_m_runs_and_reports_ratios_to_dd_direct() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: readab drops the page cache (root)");
        return;
    }
    let tmp = tempdir();
    let out = output_deadline(
        std::process::Command::new(test_bin("readab"))
            .arg("--dir")
            .arg(tmp.path().join("ck"))
            .args([
                "--mib",
                "16",
                "--rounds",
                "2",
                "--settle-ms",
                "0",
                "--seed",
                "7",
            ])
            .args(["--variants", "into-runj,into-direct,into-nt1,dd-direct"]),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    for k in ["into-runj", "into-direct", "into-nt1"] {
        let r = &v["ratio_to_dd_direct"][k];
        assert!(r["median"].as_f64().is_some_and(|x| x > 0.0), "{k}: {line}");
        assert!(r["min"].as_f64() <= r["max"].as_f64(), "{k}: {line}");
    }
}
