//! The shared checkpoint test vectors (`tests/vectors/`, described in its README): the Rust
//! reader must reach exactly the outcomes listed in `tests/vectors/expected.json`, which every
//! client (the Python one too, in `python/tests/test_vectors.py`) is tested against.

use std::path::PathBuf;

use ckpt::store::manifest::Algo;
use ckpt::store::scan::verify_path;
use ckpt::store::Store;
use serde_json::Value;

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn expected() -> Value {
    let p = vectors().join("expected.json");
    serde_json::from_slice(&std::fs::read(&p).expect("read expected.json"))
        .expect("parse expected.json")
}

#[test]
fn checksum_check_values() {
    let e = expected();
    let want = &e["checksums"]["123456789"];
    assert_eq!(
        format!("{:08x}", Algo::Crc32c.checksum(b"123456789")),
        want["crc32c"].as_str().unwrap()
    );
    assert_eq!(
        format!("{:08x}", Algo::Crc32.checksum(b"123456789")),
        want["crc32"].as_str().unwrap()
    );
}

#[test]
fn every_checkpoint_vector_verifies_as_expected() {
    let e = expected();
    let cases = e["checkpoints"].as_object().unwrap();
    assert!(cases.len() >= 17, "expected.json lists too few vectors");
    for (name, want) in cases {
        let got = verify_path(&vectors().join(name), None);
        if want["ok"] == Value::Bool(true) {
            let m = got.unwrap_or_else(|e| panic!("vector {name} must verify, got: {e}"));
            assert_eq!(m.seq, want["seq"].as_u64().unwrap(), "{name}: seq");
            assert_eq!(m.step, want["step"].as_u64(), "{name}: step");
            // Absent in expected.json: a single-process checkpoint (no world_size).
            assert_eq!(
                m.world_size.map(u64::from),
                want["world_size"].as_u64(),
                "{name}: world_size"
            );
            assert_eq!(
                m.checksum.name(),
                want["checksum"].as_str().unwrap(),
                "{name}: checksum"
            );
            let files = want["files"].as_object().unwrap();
            assert_eq!(m.files.len(), files.len(), "{name}: file count");
            for f in &m.files {
                let w = &files[&f.name];
                assert_eq!(
                    f.size,
                    w["size"].as_u64().unwrap(),
                    "{name}/{}: size",
                    f.name
                );
                assert_eq!(
                    f.sum as u64,
                    w["sum"].as_u64().unwrap(),
                    "{name}/{}: sum",
                    f.name
                );
            }
        } else {
            let err = match got {
                Ok(_) => panic!("vector {name} must fail verification"),
                Err(e) => e,
            };
            assert_eq!(err.slug(), want["error"].as_str().unwrap(), "{name}: {err}");
            // The message names the cause (the field), where expected.json says what.
            if let Some(m) = want["mentions"].as_str() {
                assert!(
                    err.to_string().contains(m),
                    "{name}: {err} (expected {m:?})"
                );
            }
        }
    }
}

#[test]
fn store_vector_picks_the_newest_checkpoint_that_verifies() {
    let e = expected();
    for (name, want) in e["stores"].as_object().unwrap() {
        let store = Store::new(vectors().join(name));
        for (seq, outcome) in want["each"].as_object().unwrap() {
            let seq: u64 = seq.parse().unwrap();
            match (store.verify(seq), outcome.as_str().unwrap()) {
                (Ok(_), "ok") => {}
                (Err(e), slug) => assert_eq!(e.slug(), slug, "{name}/{seq}: {e}"),
                (Ok(_), slug) => panic!("{name}/{seq} verified but should fail with {slug}"),
            }
        }
        let mut bad = Vec::new();
        // Read-only: quarantine=false never moves anything in the source tree.
        let found = store
            .latest_verified(false, |b| {
                bad.push(Value::from(vec![
                    Value::from(b.seq),
                    Value::from(b.reason.slug()),
                ]))
            })
            .unwrap()
            .expect("a checkpoint verifies");
        assert_eq!(
            found.seq,
            want["latest"].as_u64().unwrap(),
            "{name}: latest"
        );
        assert_eq!(
            found.manifest.step,
            want["latest_step"].as_u64(),
            "{name}: latest step"
        );
        assert_eq!(
            Value::Array(bad),
            want["bad"],
            "{name}: the bad ones, newest first"
        );
    }
}
