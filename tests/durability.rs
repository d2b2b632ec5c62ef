//! Durability end to end, with real processes: power loss (SIGKILL of ckpt and its whole job
//! at random instants, many inside a save), corrupt and hostile checkpoints through `ckpt run`
//! and `ckpt verify`, a full / read-only / vanished file system, two supervisors on one
//! directory, retention with corrupt newer checkpoints and `--keep-every` milestones,
//! owner-only permissions, and symlinks planted in the checkpoint directory.
//! The protocol and the figures: docs/commit-protocol.md.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt::demo::TrainState;
use ckpt::store::{Algo, Manifest, Stage, Store, MANIFEST_NAME};
use common::*;

const DIM: usize = 8;
const SEED: u64 = 42;

fn trainer_args(steps: u64, dim: usize, step_ms: u64, digest: Option<&Path>) -> Vec<String> {
    let mut v = vec![
        "--steps".into(),
        steps.to_string(),
        "--dim".into(),
        dim.to_string(),
        "--seed".into(),
        SEED.to_string(),
        "--step-ms".into(),
        step_ms.to_string(),
    ];
    if let Some(d) = digest {
        v.push("--digest-file".into());
        v.push(d.display().to_string());
    }
    v
}

/// Publishes a trainer checkpoint at `step` through the library (as the job would).
fn plant(dir: &Path, step: u64) -> u64 {
    let store = Store::new(dir);
    store.create().unwrap();
    let mut s = TrainState::new(DIM, SEED);
    while s.step < step {
        s.step();
    }
    let mut st = Stage::new(&store, Algo::Crc32c).unwrap();
    st.write_file("state.postcard", &postcard::to_stdvec(&s).unwrap())
        .unwrap();
    st.commit(Some(step), "test", Default::default())
        .unwrap()
        .seq
}

fn ck(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("ckpt-{seq:012}"))
}

/// Encodes a manifest JSON value with a valid trailer (so only its content is hostile).
fn encode_json(v: &serde_json::Value) -> Vec<u8> {
    let json = serde_json::to_vec(v).unwrap();
    let mut out = json.clone();
    out.extend_from_slice(format!("\ncrc32c:{:08x}\n", crc32c::crc32c(&json)).as_bytes());
    out
}

fn manifest_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path.join(MANIFEST_NAME)).unwrap();
    let m = Manifest::decode(&bytes).unwrap();
    serde_json::to_value(&m).unwrap()
}

fn rewrite_manifest(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v = manifest_json(path);
    f(&mut v);
    let p = path.join(MANIFEST_NAME);
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, encode_json(&v)).unwrap();
}

/// `ckpt run` of the trainer on `dir` to completion (`--every off`: no new saves).
fn run_trainer(dir: &Path, extra: &[&str], steps: u64) -> std::process::Output {
    let digest = dir.with_extension("digest");
    let _ = std::fs::remove_file(&digest);
    let mut c = ckpt();
    c.arg("run")
        .arg("--dir")
        .arg(dir)
        .args([
            "--every",
            "off",
            "--backoff",
            "10ms..20ms",
            "--max-failures",
            "2",
        ])
        .args(extra)
        .arg("--")
        .arg(test_bin("trainer"))
        .args(trainer_args(steps, DIM, 0, Some(&digest)));
    let out = output_deadline(&mut c, Duration::from_secs(60));
    assert_no_survivors(dir);
    out
}

fn quarantined(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("quarantine"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".reason.txt"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

type Damage = fn(&Path, &Path);

/// Every way the newest checkpoint (`ckpt-3`, at `p`) is damaged or made hostile. The second
/// argument is a scratch directory outside the checkpoint directory.
fn damages() -> Vec<(&'static str, Damage)> {
    fn state(p: &Path) -> PathBuf {
        p.join("state.postcard")
    }
    vec![
        ("flipped byte", |p, _| {
            let mut b = std::fs::read(state(p)).unwrap();
            let i = b.len() / 2;
            b[i] ^= 0x01;
            std::fs::write(state(p), b).unwrap();
        }),
        ("truncated file", |p, _| {
            let b = std::fs::read(state(p)).unwrap();
            std::fs::write(state(p), &b[..b.len() - 3]).unwrap();
        }),
        ("file grown", |p, _| {
            let mut b = std::fs::read(state(p)).unwrap();
            b.push(0);
            std::fs::write(state(p), b).unwrap();
        }),
        ("missing file", |p, _| {
            std::fs::remove_file(state(p)).unwrap()
        }),
        ("missing manifest", |p, _| {
            std::fs::remove_file(p.join(MANIFEST_NAME)).unwrap()
        }),
        ("empty manifest", |p, _| {
            std::fs::write(p.join(MANIFEST_NAME), b"").unwrap()
        }),
        ("truncated manifest", |p, _| {
            let b = std::fs::read(p.join(MANIFEST_NAME)).unwrap();
            std::fs::write(p.join(MANIFEST_NAME), &b[..b.len() / 2]).unwrap();
        }),
        ("garbage manifest", |p, _| {
            let b: Vec<u8> = (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            std::fs::write(p.join(MANIFEST_NAME), b).unwrap();
        }),
        ("manifest over the size limit", |p, _| {
            let mut b = vec![b' '; 5 << 20];
            b.extend_from_slice(&std::fs::read(p.join(MANIFEST_NAME)).unwrap());
            std::fs::write(p.join(MANIFEST_NAME), b).unwrap();
        }),
        ("huge file length", |p, _| {
            rewrite_manifest(p, |v| v["files"][0]["size"] = u64::MAX.into())
        }),
        ("too many files", |p, _| {
            rewrite_manifest(p, |v| {
                let files: Vec<serde_json::Value> = (0..100_001)
                    .map(|i| serde_json::json!({"name": format!("f{i}"), "size": 0, "sum": 0}))
                    .collect();
                v["files"] = files.into();
            })
        }),
        ("`../` file name", |p, _| {
            // A tempting target: a valid state file one level up.
            std::fs::copy(state(p), p.parent().unwrap().join("state.postcard")).unwrap();
            rewrite_manifest(p, |v| v["files"][0]["name"] = "../state.postcard".into())
        }),
        ("absolute file name", |p, scratch| {
            let target = scratch.join("abs-state.postcard");
            std::fs::copy(state(p), &target).unwrap();
            rewrite_manifest(p, |v| {
                v["files"][0]["name"] = target.display().to_string().into()
            })
        }),
        ("duplicate file name", |p, _| {
            rewrite_manifest(p, |v| {
                let f = v["files"][0].clone();
                v["files"].as_array_mut().unwrap().push(f);
            })
        }),
        ("unknown format version", |p, _| {
            rewrite_manifest(p, |v| v["version"] = 99.into())
        }),
        ("foreign format", |p, _| {
            rewrite_manifest(p, |v| v["format"] = "zip".into())
        }),
        ("sequence number mismatch", |p, _| {
            rewrite_manifest(p, |v| v["seq"] = 2.into())
        }),
        ("deeply nested metadata", |p, _| {
            // Valid trailer around JSON nested 100k deep: must be refused, not overflow.
            let json = format!(
                "{{\"format\":\"ckpt\",\"version\":1,\"meta\":{}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            let mut b = json.clone().into_bytes();
            b.extend_from_slice(
                format!("\ncrc32c:{:08x}\n", crc32c::crc32c(json.as_bytes())).as_bytes(),
            );
            std::fs::write(p.join(MANIFEST_NAME), b).unwrap();
        }),
        ("state file is a symlink", |p, scratch| {
            let target = scratch.join("linked-state");
            std::fs::rename(state(p), &target).unwrap();
            symlink(&target, state(p)).unwrap();
        }),
        ("manifest is a symlink", |p, scratch| {
            let target = scratch.join("linked-manifest");
            std::fs::rename(p.join(MANIFEST_NAME), &target).unwrap();
            symlink(&target, p.join(MANIFEST_NAME)).unwrap();
        }),
        ("checkpoint directory is a symlink", |p, scratch| {
            let target = scratch.join("linked-ckpt");
            std::fs::rename(p, &target).unwrap();
            symlink(&target, p).unwrap();
        }),
        ("checkpoint is a regular file", |p, _| {
            std::fs::remove_dir_all(p).unwrap();
            std::fs::write(p, b"not a checkpoint").unwrap();
        }),
    ]
}

/// Checkpoints at steps 10, 20, 30 in a new directory, the newest (`ckpt-3`) damaged: the
/// temporary directory, the checkpoint directory, the scratch directory the damage may use
/// (outside the checkpoint directory) and what the scratch directory holds after it.
#[allow(clippy::type_complexity)]
fn damaged_newest(
    damage: Damage,
) -> (tempfile::TempDir, PathBuf, PathBuf, Vec<(String, u64, u32)>) {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    for step in [10, 20, 30] {
        plant(&dir, step);
    }
    damage(&ck(&dir, 3), &scratch);
    let before = snapshot(&scratch);
    (tmp, dir, scratch, before)
}

/// Each damage of the newest checkpoint: `ckpt verify` names it and exits 65; `ckpt run`
/// warns naming it, moves it aside (not deleted), resumes from the next newest, and the
/// job's final digest equals an uninterrupted run's.
#[test]
fn corrupt_newest_is_set_aside_and_the_job_resumes_from_the_next() {
    let steps = 40;
    let want = reference(steps, DIM);
    let cases = damages();
    let t0 = Instant::now();
    for (name, damage) in &cases {
        let (_tmp, dir, scratch, scratch_before) = damaged_newest(*damage);

        let v = output_deadline(
            ckpt().args(["verify", "--dir"]).arg(&dir),
            Duration::from_secs(30),
        );
        let vout = text(&v.stdout);
        assert_eq!(v.status.code(), Some(65), "{name}: verify: {vout}");
        assert!(
            vout.lines()
                .any(|l| l.starts_with("INVALID") && l.contains(" 3 ")),
            "{name}: verify does not name checkpoint 3:\n{vout}"
        );
        let v2 = output_deadline(
            ckpt().args(["verify", "--dir"]).arg(&dir).arg("2"),
            Duration::from_secs(30),
        );
        assert_eq!(v2.status.code(), Some(0), "{name}: verify 2");

        let out = run_trainer(&dir, &[], steps);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: ckpt run:\n{err}");
        assert!(
            err.contains("warning") && err.contains("ckpt-000000000003"),
            "{name}: no warning naming the bad checkpoint:\n{err}"
        );
        let q = quarantined(&dir);
        assert!(
            q.len() == 1 && q[0].starts_with("ckpt-000000000003."),
            "{name}: quarantine holds {q:?}"
        );
        let launch = events(&dir, "launch");
        assert_eq!(
            launch[0]["restore_seq"], 2,
            "{name}: resumed from the wrong checkpoint: {launch:?}"
        );
        let got = std::fs::read_to_string(dir.with_extension("digest")).unwrap();
        assert_eq!(got.trim(), want, "{name}: digest");
        // Nothing outside the directory was touched through a link or a hostile name.
        assert_eq!(
            snapshot(&scratch),
            scratch_before,
            "{name}: scratch changed"
        );
        // The remaining checkpoints all verify.
        let v = output_deadline(
            ckpt().args(["verify", "--dir"]).arg(&dir),
            Duration::from_secs(30),
        );
        assert_eq!(v.status.code(), Some(0), "{name}: {}", text(&v.stdout));
    }
    eprintln!(
        "corruption: {} damage cases of the newest checkpoint detected, set aside and resumed past in {:.1}s",
        cases.len(),
        t0.elapsed().as_secs_f64()
    );
}

/// The same damages under `ckpt run --restore-check client` (one read of a checkpoint per
/// resume): the supervisor checks only the manifest and sizes, so a damaged byte is found by
/// the job's client as it reads; the client reports it, the supervisor verifies, sets the
/// checkpoint aside, stops the job and relaunches it from the next one (not counted as a
/// failure: `--max-failures 2` would otherwise not matter, so the relaunch is checked in the
/// events). Every other damage is still caught before the launch. Either way the job ends
/// with the uninterrupted digest and nothing outside the directory is touched.
#[test]
fn under_restore_check_client_damage_is_found_by_the_job_set_aside_and_resumed_past() {
    let steps = 40;
    let want = reference(steps, DIM);
    let cases = damages();
    let mut found_by_client = Vec::new();
    for (name, damage) in &cases {
        let (_tmp, dir, scratch, scratch_before) = damaged_newest(*damage);
        let out = run_trainer(&dir, &["--restore-check", "client"], steps);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: ckpt run:\n{err}");
        let q = quarantined(&dir);
        assert!(
            q.len() == 1 && q[0].starts_with("ckpt-000000000003."),
            "{name}: quarantine holds {q:?}\n{err}"
        );
        let launch = events(&dir, "launch");
        assert_eq!(
            launch.last().unwrap()["restore_seq"],
            2,
            "{name}: resumed from the wrong checkpoint: {launch:?}"
        );
        assert!(
            launch.iter().all(|l| l["restore_check"] == "client"),
            "{name}: {launch:?}"
        );
        let rejected = events(&dir, "restore_rejected");
        if launch[0]["restore_seq"] == 3 {
            // Launched from the damaged one: only the client's read can have caught it.
            assert_eq!(launch.len(), 2, "{name}: {launch:?}\n{err}");
            assert_eq!(rejected.len(), 1, "{name}: {err}");
            assert_eq!(rejected[0]["seq"], 3, "{name}: {rejected:?}");
            let restart = events(&dir, "restart");
            assert_eq!(restart[0]["restore_rejected"], true, "{name}: {restart:?}");
            assert!(
                err.contains("restore_rejected") || err.contains("set aside"),
                "{name}: {err}"
            );
            found_by_client.push(*name);
        } else {
            assert!(rejected.is_empty(), "{name}: {rejected:?}");
        }
        let got = std::fs::read_to_string(dir.with_extension("digest")).unwrap();
        assert_eq!(got.trim(), want, "{name}: digest");
        assert_eq!(
            snapshot(&scratch),
            scratch_before,
            "{name}: scratch changed"
        );
    }
    // A flipped byte keeps every size: nothing but the client's checksum sees it.
    assert_eq!(found_by_client, vec!["flipped byte"], "found by the client");
    eprintln!(
        "restore-check client: {} damage cases set aside and resumed past; found by the job's client: {found_by_client:?}",
        cases.len()
    );
}

/// A `restore_failed` report is taken only when it names its real sender and the checkpoint
/// the launch restores (else logged and ignored), and even then it only makes the supervisor
/// verify: a false one from outside the job (this test process) sets nothing aside
/// (`restore_failed_but_verifies`). Under the default check the job is told
/// `CKPT_RESTORE_CHECK=full`.
#[test]
fn a_false_or_forged_restore_failed_report_sets_nothing_aside_and_the_default_check_is_full() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    for step in [10, 20] {
        plant(&dir, step);
    }
    let seen = tmp.path().join("seen");
    for (check, want) in [(Some("client"), "client"), (None, "full")] {
        let _ = std::fs::remove_file(&seen);
        let mut c = ckpt();
        c.args(["run", "--dir"])
            .arg(&dir)
            .args(["--every", "off", "--again"]);
        if let Some(v) = check {
            c.args(["--restore-check", v]);
        }
        c.args(["--", "sh", "-c"])
            .arg(format!(
                "echo \"$CKPT_RESTORE_SEQ $CKPT_RESTORE_CHECK\" > {}; exec sleep 60",
                seen.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut sup = c.spawn_guarded();
        let err = read_stderr(&mut sup);
        wait_until(Duration::from_secs(20), "the job's environment", || {
            std::fs::read_to_string(&seen).is_ok_and(|s| s.ends_with('\n'))
        });
        assert_eq!(
            std::fs::read_to_string(&seen).unwrap().trim(),
            format!("2 {want}")
        );
        if check.is_some() {
            let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
            for (pid, seq) in [(std::process::id(), 2u64), (1, 2), (std::process::id(), 1)] {
                let msg = serde_json::json!({
                    "type": "restore_failed", "v": 1, "pid": pid, "seq": seq,
                    "error": "forged",
                });
                sock.send_to(msg.to_string().as_bytes(), dir.join(".ckpt/sock"))
                    .unwrap();
            }
            wait_until(Duration::from_secs(20), "the three reports handled", || {
                events(&dir, "restore_failed_ignored").len() >= 2
                    && !events(&dir, "restore_failed_but_verifies").is_empty()
            });
            let ignored = events(&dir, "restore_failed_ignored");
            let why: Vec<&str> = ignored.iter().filter_map(|e| e["why"].as_str()).collect();
            assert!(
                why.iter().any(|w| w.contains("but was sent by pid"))
                    && why
                        .iter()
                        .any(|w| w.contains("does not restore checkpoint 1")),
                "{ignored:?}"
            );
            let verified = events(&dir, "restore_failed_but_verifies");
            assert_eq!(verified[0]["seq"], 2, "{verified:?}");
            assert!(events(&dir, "restore_rejected").is_empty());
        }
        if check.is_none() {
            // A forged `restore_verified` (auto): from outside the job's tree, or naming
            // another pid, it is ignored and nothing is recorded.
            let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
            for pid in [std::process::id(), 1] {
                let msg =
                    serde_json::json!({"type": "restore_verified", "v": 1, "pid": pid, "seq": 2});
                sock.send_to(msg.to_string().as_bytes(), dir.join(".ckpt/sock"))
                    .unwrap();
            }
            wait_until(
                Duration::from_secs(20),
                "the two forged vouches handled",
                || events(&dir, "restore_verified_ignored").len() >= 2,
            );
            let why: Vec<String> = events(&dir, "restore_verified_ignored")
                .iter()
                .map(|e| e["why"].as_str().unwrap_or_default().to_string())
                .collect();
            assert!(
                why.iter().any(|w| w.contains("not a process of the job"))
                    && why.iter().any(|w| w.contains("but was sent by pid")),
                "{why:?}"
            );
            assert!(!dir.join(".ckpt/restore-check.json").exists());
        }
        signal(sup.id(), libc::SIGTERM);
        let status = wait_deadline(&mut sup, Duration::from_secs(30));
        let err = err.join().unwrap();
        assert_eq!(status.code(), Some(75), "{err}");
        assert_no_survivors(&dir);
        assert!(quarantined(&dir).is_empty(), "{err}");
        assert_eq!(checkpoints(&dir), vec![1, 2], "{err}");
    }
}

/// The default `--restore-check auto`: a resume is verified in full until the job's client
/// shows (`restore_verified`) that it read every file of its restore checkpoint through its
/// verifying reads; from then on the same command's resumes are read once (the launch's
/// `restore_check` is `client`), across `ckpt run`s (the record in `.ckpt`). A job that reads
/// `$CKPT_RESTORE` itself (a shell job) is never given the light check; another command is
/// not vouched for by this one's record; damage found by the client on a light-checked
/// resume is set aside and resumed past with the uninterrupted digest.
#[test]
fn auto_reads_once_after_the_rust_client_verified_a_restore_and_a_shell_job_stays_full() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    for step in [10, 20] {
        plant(&dir, step);
    }
    let record = dir.join(".ckpt/restore-check.json");
    let checks = |dir: &Path| -> Vec<serde_json::Value> {
        events(dir, "launch")
            .iter()
            .map(|l| l["restore_check"].clone())
            .collect()
    };
    // 1: the first resume is verified in full; the trainer's client vouches for it.
    let out = run_trainer(&dir, &[], 30);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(checks(&dir), vec![serde_json::json!("full")], "{err}");
    let v = events(&dir, "restore_verified");
    assert_eq!(v.len(), 1, "{err}");
    assert_eq!(v[0]["seq"], 2, "{v:?}");
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(
        (rec["seq"].as_u64(), rec["ranks"].as_u64()),
        (Some(2), Some(1)),
        "{rec}"
    );
    assert!(
        err.contains("from now on a resume of this command reads its checkpoint once"),
        "{err}"
    );
    // 2: the next `ckpt run` of the same command (the same arguments) reads once.
    let out = run_trainer(&dir, &["--again"], 30);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(checks(&dir).last().unwrap(), "client", "{err}");
    assert_eq!(
        events(&dir, "launch").last().unwrap()["restore_check_mode"],
        "auto"
    );
    assert_eq!(
        std::fs::read_to_string(dir.with_extension("digest"))
            .unwrap()
            .trim(),
        reference(30, DIM)
    );
    // 3: a byte flipped in the newest checkpoint (every size intact): the light-checked
    // launch's client finds it, the supervisor sets it aside and resumes from the one before.
    let newest = *checkpoints(&dir).last().unwrap();
    let f = ck(&dir, newest).join("state.postcard");
    let mut b = std::fs::read(&f).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x04;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&f, b).unwrap();
    let out = run_trainer(&dir, &["--again"], 30);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let rejected = events(&dir, "restore_rejected");
    assert_eq!(rejected.len(), 1, "{err}");
    assert_eq!(rejected[0]["seq"], newest, "{rejected:?}");
    assert!(quarantined(&dir)[0].starts_with(&format!("ckpt-{newest:012}.")));
    assert_eq!(
        std::fs::read_to_string(dir.with_extension("digest"))
            .unwrap()
            .trim(),
        reference(30, DIM),
        "{err}"
    );
    assert!(
        record.exists(),
        "the client did its job: the record stays\n{err}"
    );
    // 4: another command in the same directory (a shell job reading $CKPT_RESTORE itself)
    // is verified in full, twice: nothing it does vouches for it.
    for _ in 0..2 {
        let mut c = ckpt();
        c.args(["run", "--every", "off", "--again", "--dir"])
            .arg(&dir)
            .args([
                "--",
                "sh",
                "-c",
                "cat \"$CKPT_RESTORE/state.postcard\" > /dev/null",
            ]);
        let out = output_deadline(&mut c, Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(
            checks(&dir).last().unwrap(),
            "full",
            "{}",
            text(&out.stderr)
        );
    }
    assert_no_survivors(&dir);
}

/// Under `--restore-check client` a checkpoint is launched after the light check once: a job
/// that fails on it without reporting (here a job with no client, which fails when handed
/// the damaged checkpoint) is relaunched only after the supervisor verified it in full, which
/// sets it aside; the next launch restores the one before.
#[test]
fn under_restore_check_client_a_relaunch_from_the_same_checkpoint_verifies_it_first() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    for step in [10, 20, 30] {
        plant(&dir, step);
    }
    let state = ck(&dir, 3).join("state.postcard");
    let mut b = std::fs::read(&state).unwrap();
    b[0] ^= 0x40;
    std::fs::write(&state, b).unwrap();
    let out = output_deadline(
        ckpt().args(["run", "--dir"]).arg(&dir).args([
            "--every",
            "off",
            "--backoff",
            "10ms..20ms",
            "--restore-check",
            "client",
            "--",
            "sh",
            "-c",
            "test \"$CKPT_RESTORE_SEQ\" != 3",
        ]),
        Duration::from_secs(60),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let seqs: Vec<u64> = events(&dir, "launch")
        .iter()
        .map(|l| l["restore_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 2], "{err}");
    let q = quarantined(&dir);
    assert!(
        q.len() == 1 && q[0].starts_with("ckpt-000000000003.checksum-mismatch."),
        "{q:?}\n{err}"
    );
    assert!(events(&dir, "restore_rejected").is_empty(), "{err}");
    assert_no_survivors(&dir);
}

/// (path, size, mode) of everything under `p`, without following links.
fn snapshot(p: &Path) -> Vec<(String, u64, u32)> {
    let mut v = Vec::new();
    fn rec(root: &Path, p: &Path, v: &mut Vec<(String, u64, u32)>) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                v.push((
                    e.path().strip_prefix(root).unwrap().display().to_string(),
                    m.len(),
                    m.permissions().mode(),
                ));
                if m.is_dir() {
                    rec(root, &e.path(), v);
                }
            }
        }
    }
    rec(p, p, &mut v);
    v.sort();
    v
}

#[test]
fn two_newest_corrupt_resume_from_the_third() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    for step in [10, 20, 30, 35] {
        plant(&dir, step);
    }
    std::fs::write(ck(&dir, 4).join("state.postcard"), b"junk").unwrap();
    std::fs::remove_file(ck(&dir, 3).join(MANIFEST_NAME)).unwrap();
    let v = output_deadline(
        ckpt().args(["verify", "--dir"]).arg(&dir),
        Duration::from_secs(30),
    );
    let vout = text(&v.stdout);
    assert_eq!(v.status.code(), Some(65));
    assert!(
        vout.contains("ckpt-000000000003") && vout.contains("ckpt-000000000004"),
        "{vout}"
    );
    let out = run_trainer(&dir, &[], 40);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(events(&dir, "launch")[0]["restore_seq"], 2);
    assert_eq!(quarantined(&dir).len(), 2);
    let got = std::fs::read_to_string(dir.with_extension("digest")).unwrap();
    assert_eq!(got.trim(), reference(40, DIM));
}

/// None verifies: ckpt says so (exit 65) and does not start from scratch; `--allow-fresh`
/// does, and the bad ones stay in quarantine.
#[test]
fn none_verifies_refuses_fresh_start_unless_allowed() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    for step in [10, 20] {
        plant(&dir, step);
    }
    for seq in [1, 2] {
        std::fs::write(ck(&dir, seq).join("state.postcard"), b"x").unwrap();
    }
    let out = run_trainer(&dir, &[], 30);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(
        err.contains("--allow-fresh") && err.contains("verifies"),
        "{err}"
    );
    assert!(events(&dir, "launch").is_empty(), "the job was started");
    assert_eq!(quarantined(&dir).len(), 2);
    let out = run_trainer(&dir, &["--allow-fresh"], 30);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(events(&dir, "launch")[0]["restore_seq"].is_null());
    assert_eq!(quarantined(&dir).len(), 2, "quarantine kept");
    let got = std::fs::read_to_string(dir.with_extension("digest")).unwrap();
    assert_eq!(got.trim(), reference(30, DIM));
}

// ---------------------------------------------------------------------------------------
// Power loss.

/// Kills ckpt and every process of its job at once (SIGKILL), then waits until all are gone.
fn power_off(sup: &mut std::process::Child, dir: &Path) {
    unsafe { libc::kill(-(sup.id() as i32), libc::SIGKILL) };
    for p in job_processes(dir) {
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let _ = sup.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = job_processes(dir);
        if left.is_empty() {
            break;
        }
        for p in &left {
            unsafe { libc::kill(*p, libc::SIGKILL) };
        }
        assert!(
            Instant::now() < deadline,
            "survivors after SIGKILL: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// SIGKILL of ckpt and its whole job at random instants (many inside a save); ckpt run again
/// with the same arguments, repeatedly; each job's final digest equals an uninterrupted
/// run's, and no kill ever produced a checkpoint that does not verify.
/// `CKPT_POWERLOSS_ITERS` sets the number of kills (default 300); `CKPT_TEST_SEED` replays.
#[test]
fn power_loss_at_random_instants() {
    let iters: usize = std::env::var("CKPT_POWERLOSS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed = seed("power_loss_at_random_instants");
    let mut rng = fastrand::Rng::with_seed(seed);
    let (steps, dim) = (300u64, 3000usize);
    let want = reference(steps, dim);
    let tmp = tempdir();
    let t0 = Instant::now();
    let (mut kills, mut in_save, mut epochs, mut finished_before_kill) = (0, 0, 0, 0);
    let epoch_dir = |n: usize| tmp.path().join(format!("ck{n}"));
    let mut dir = epoch_dir(0);
    let mut runs_this_epoch = 0;
    let cmd = |dir: &Path| {
        let mut c = ckpt();
        c.arg("run")
            .arg("--dir")
            .arg(dir)
            .args([
                "--every",
                "25ms",
                "--keep",
                "2",
                "--backoff",
                "5ms..10ms",
                "-q",
            ])
            .arg("--")
            .arg(test_bin("trainer"))
            .args(trainer_args(
                steps,
                dim,
                1,
                Some(&dir.with_extension("digest")),
            ));
        c.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        c
    };
    let finish = |dir: &Path, epochs: &mut usize| {
        let out = output_deadline(cmd(dir).stdout(Stdio::piped()), Duration::from_secs(120));
        assert_eq!(
            out.status.code(),
            Some(0),
            "seed {seed}: final run failed:\n{}",
            text(&out.stderr)
        );
        assert_no_survivors(dir);
        let got = std::fs::read_to_string(dir.with_extension("digest")).unwrap();
        assert_eq!(got.trim(), want, "seed {seed}: digest after power losses");
        assert!(
            quarantined(dir).is_empty(),
            "seed {seed}: a kill left a bad checkpoint"
        );
        *epochs += 1;
    };
    while kills < iters {
        let mut sup = cmd(&dir).spawn_guarded();
        // Startup takes some ms; the job saves every 25 ms or so.
        let delay = Duration::from_micros(rng.u64(0..120_000));
        let until = Instant::now() + delay;
        let mut exited = None;
        while Instant::now() < until {
            if let Some(st) = sup.try_wait().unwrap() {
                exited = Some(st);
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        if let Some(st) = exited {
            let mut err = String::new();
            use std::io::Read;
            let _ = sup.stderr.take().unwrap().read_to_string(&mut err);
            assert_eq!(
                st.code(),
                Some(0),
                "seed {seed}: ckpt run ended early: {err}"
            );
            let _ = sup.wait();
            finished_before_kill += 1;
        } else {
            power_off(&mut sup, &dir);
            kills += 1;
            runs_this_epoch += 1;
            let staging = std::fs::read_dir(dir.join(".ckpt/staging"))
                .map(|rd| rd.count())
                .unwrap_or(0);
            if staging > 0 {
                in_save += 1;
            }
        }
        if dir.join(".ckpt/finished").exists() || runs_this_epoch >= 60 {
            finish(&dir, &mut epochs);
            dir = epoch_dir(epochs);
            runs_this_epoch = 0;
        }
    }
    if runs_this_epoch > 0 {
        finish(&dir, &mut epochs);
    }
    eprintln!(
        "power loss: seed {seed}: {kills} SIGKILLs of ckpt and its job ({in_save} inside a save, staging left behind), {epochs} jobs run to the end with the uninterrupted digest, {finished_before_kill} runs ended before their kill, in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// Faults of the environment.

fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root (to mount a tmpfs) and CI is set"
    );
    eprintln!("{test}: SKIPPED: not root, cannot mount a small tmpfs");
    false
}

/// A small tmpfs mounted at a directory; unmounted on drop.
struct Mount(PathBuf);
impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs at {}", at.display());
        Mount(at.to_path_buf())
    }
    fn remount(&self, opt: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn spawn_saver(dir: &Path, progress: &Path, sizes: &str, every: &str, steps: u64) -> Running {
    ckpt()
        .arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--every", every, "--keep", "1", "--backoff", "10ms..20ms"])
        .arg("--")
        .arg(test_bin("saver"))
        .args([
            "--sizes",
            sizes,
            "--steps",
            &steps.to_string(),
            "--step-ms",
            "5",
        ])
        .arg("--progress")
        .arg(progress)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_guarded()
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn finish_saver(mut sup: Running, dir: &Path) -> String {
    let st = wait_deadline(&mut sup, Duration::from_secs(60));
    let mut err = String::new();
    use std::io::Read;
    let _ = sup.stderr.take().unwrap().read_to_string(&mut err);
    assert_eq!(st.code(), Some(0), "{err}");
    assert_no_survivors(dir);
    err
}

/// After a failed save: the job keeps running, the previous checkpoint verifies, staging is
/// empty.
fn after_failure(dir: &Path, progress: &Path, failed_at: usize, prev: u64) {
    assert!(
        Store::new(dir).verify(prev).is_ok(),
        "previous checkpoint {prev} damaged by the failed save"
    );
    // Freed by the failed save itself (a later attempt may briefly have its own staging).
    wait_until(
        Duration::from_secs(2),
        "staging freed after the failed save",
        || {
            std::fs::read_dir(dir.join(".ckpt/staging"))
                .map(|rd| rd.count() == 0)
                .unwrap_or(true)
        },
    );
    wait_until(
        Duration::from_secs(10),
        "the job goes on after the failed save",
        || {
            lines(progress)[failed_at + 1..]
                .iter()
                .any(|l| l.starts_with("step "))
        },
    );
}

#[test]
fn disk_full_save_fails_cleanly_and_the_job_goes_on() {
    if !root_or_skip("disk_full") {
        return;
    }
    let tmp = tempdir();
    let dir = tmp.path().join("small");
    let mnt = Mount::tmpfs(&dir, "2m");
    let progress = tmp.path().join("progress");
    let sup = spawn_saver(&dir, &progress, "300000,3000000,300000", "700ms", 600);
    wait_until(Duration::from_secs(20), "a failed save", || {
        lines(&progress).iter().any(|l| l.starts_with("failed"))
    });
    let l = lines(&progress);
    let at = l.iter().position(|l| l.starts_with("failed")).unwrap();
    assert!(
        l[..at]
            .iter()
            .any(|l| l == "saved 1 300008" || l.starts_with("saved 1 ")),
        "{l:?}"
    );
    assert!(
        l[at].contains("file system is full") && l[at].contains(&dir.display().to_string()),
        "the message must say what filled up: {}",
        l[at]
    );
    after_failure(&dir, &progress, at, 1);
    wait_until(Duration::from_secs(20), "a save after the failure", || {
        lines(&progress)[at..]
            .iter()
            .any(|l| l.starts_with("saved "))
    });
    let err = finish_saver(sup, &dir);
    assert!(
        err.contains("could not save") && err.contains("full"),
        "supervisor not told:\n{err}"
    );
    drop(mnt);
}

/// A directory that became read-only under a running job (immutable attribute: root cannot
/// write there either): the save fails cleanly, the job goes on, saves resume once writable.
#[test]
fn read_only_directory_save_fails_cleanly() {
    if !root_or_skip("read_only_directory") {
        return;
    }
    let tmp = tempdir();
    let dir = tmp.path().join("ro");
    let progress = tmp.path().join("progress");
    let sup = spawn_saver(&dir, &progress, "1000", "200ms", 300);
    wait_until(Duration::from_secs(20), "a first save", || {
        lines(&progress).iter().any(|l| l.starts_with("saved"))
    });
    let staging = dir.join(".ckpt/staging");
    let chattr = |flag: &str| {
        let st = Command::new("chattr")
            .arg(flag)
            .arg(&staging)
            .status()
            .unwrap();
        assert!(st.success(), "chattr {flag}");
    };
    chattr("+i");
    struct Undo(PathBuf);
    impl Drop for Undo {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let undo = Undo(staging.clone());
    let first_saved = lines(&progress)
        .iter()
        .filter(|l| l.starts_with("saved"))
        .count();
    wait_until(Duration::from_secs(20), "a failed save", || {
        lines(&progress).iter().any(|l| l.starts_with("failed"))
    });
    let l = lines(&progress);
    let at = l.iter().position(|l| l.starts_with("failed")).unwrap();
    assert!(
        l[at].contains("permission denied") && l[at].contains(&staging.display().to_string()),
        "{}",
        l[at]
    );
    let prev = Store::new(&dir).list().unwrap().last().unwrap().0;
    after_failure(&dir, &progress, at, prev);
    chattr("-i");
    drop(undo);
    wait_until(
        Duration::from_secs(20),
        "a save once writable again",
        || {
            lines(&progress)
                .iter()
                .filter(|l| l.starts_with("saved"))
                .count()
                > first_saved
        },
    );
    finish_saver(sup, &dir);
}

/// A read-only file system: `ckpt run` says so at once (exit 73) and starts nothing.
#[test]
fn read_only_file_system_is_refused_naming_it() {
    if !root_or_skip("read_only_fs") {
        return;
    }
    let tmp = tempdir();
    let dir = tmp.path().join("rofs");
    let mnt = Mount::tmpfs(&dir, "4m");
    plant(&dir, 10);
    mnt.remount("ro");
    let out = run_trainer(&dir, &[], 20);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{err}");
    assert!(err.contains("read-only"), "{err}");
    assert!(events(&dir, "launch").is_empty());
    drop(mnt);
}

#[test]
fn vanished_directory_save_fails_cleanly() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let progress = tmp.path().join("progress");
    // Long enough to outlast the failed saves' backoff (the interval doubles per failure).
    let sup = spawn_saver(&dir, &progress, "1000", "200ms", 3000);
    wait_until(Duration::from_secs(20), "a first save", || {
        lines(&progress).iter().any(|l| l.starts_with("saved"))
    });
    let gone = tmp.path().join("gone");
    std::fs::rename(&dir, &gone).unwrap();
    wait_until(Duration::from_secs(20), "a failed save", || {
        lines(&progress).iter().any(|l| l.starts_with("failed"))
    });
    let l = lines(&progress);
    let at = l.iter().position(|l| l.starts_with("failed")).unwrap();
    assert!(l[at].contains("vanished"), "{}", l[at]);
    assert!(
        !dir.exists(),
        "the directory was re-created behind the supervisor's back"
    );
    wait_until(Duration::from_secs(10), "the job goes on", || {
        lines(&progress)[at + 1..]
            .iter()
            .any(|l| l.starts_with("step "))
    });
    std::fs::rename(&gone, &dir).unwrap();
    let n = l.iter().filter(|l| l.starts_with("saved")).count();
    wait_until(Duration::from_secs(20), "a save once it is back", || {
        lines(&progress)
            .iter()
            .filter(|l| l.starts_with("saved"))
            .count()
            > n
    });
    finish_saver(sup, &dir);
}

/// The second `ckpt run` on a directory refuses at once naming the holder; once the holder
/// is killed (no cleanup), the directory is free.
#[test]
fn second_supervisor_is_refused_naming_the_holder() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let progress = tmp.path().join("progress");
    let mut first = spawn_saver(&dir, &progress, "100", "1h", 100_000);
    wait_until(Duration::from_secs(20), "the first job runs", || {
        lines(&progress).iter().any(|l| l.starts_with("start"))
    });
    let t = Instant::now();
    let out = output_deadline(
        ckpt()
            .arg("run")
            .arg("--dir")
            .arg(&dir)
            .arg("--")
            .arg(test_bin("trainer"))
            .args(trainer_args(10, DIM, 0, None)),
        Duration::from_secs(10),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{err}");
    assert!(
        err.contains(&format!("pid {}", first.id())),
        "holder not named: {err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "not refused at once");
    // SIGKILL the holder and its job: the kernel drops the lock.
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    let _ = first.wait();
    for p in job_processes(&dir) {
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    assert_no_survivors(&dir);
    let out = run_trainer(&dir, &[], 10);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------
// Retention.

/// Retention never deletes the newest checkpoint that verifies, also with newer corrupt ones.
#[test]
fn retention_keeps_newest_verified_with_newer_corrupt() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    for step in [5, 10, 15, 20] {
        plant(&dir, step);
    }
    std::fs::write(ck(&dir, 3).join("state.postcard"), b"bad").unwrap();
    std::fs::remove_file(ck(&dir, 4).join("state.postcard")).unwrap();
    let store = Store::new(&dir);
    let good = store.latest_verified(false, |_| {}).unwrap().unwrap().seq;
    assert_eq!(good, 2);
    for keep in [1, 2] {
        store.prune(keep, None, &[good]).unwrap();
        assert!(
            store.verify(2).is_ok(),
            "keep {keep}: newest verified pruned"
        );
    }
    // Through ckpt run with --keep 1 and saves: the newest verified is always there.
    let out = {
        let digest = dir.with_extension("digest");
        let mut c = ckpt();
        c.arg("run")
            .arg("--dir")
            .arg(&dir)
            .args(["--every", "30ms", "--keep", "1"])
            .arg("--")
            .arg(test_bin("trainer"))
            .args(trainer_args(60, DIM, 2, Some(&digest)));
        output_deadline(&mut c, Duration::from_secs(60))
    };
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(events(&dir, "launch")[0]["restore_seq"], 2);
    let left = checkpoints(&dir);
    assert!(!left.is_empty());
    assert!(store.verify(*left.last().unwrap()).is_ok());
    assert_eq!(quarantined(&dir).len(), 2);
}

/// `--keep-every 1h` keeps the oldest checkpoint of each hour as a milestone.
#[test]
fn keep_every_keeps_milestones() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let hour = 3_600_000u64;
    let now = ckpt::store::manifest::now_ms();
    // Ages in minutes, oldest first: two per hour bucket, roughly.
    let ages = [300u64, 290, 240, 200, 180, 130];
    let mut created = Vec::new();
    for (i, age) in ages.iter().enumerate() {
        let seq = plant(&dir, 5 * (i as u64 + 1));
        let t = now - age * 60_000;
        rewrite_manifest(&ck(&dir, seq), |v| v["created_ms"] = t.into());
        created.push((seq, t));
    }
    let mut want_kept: Vec<u64> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (seq, t) in &created {
        if seen.insert(t / hour) {
            want_kept.push(*seq);
        }
    }
    let digest = dir.with_extension("digest");
    let mut c = ckpt();
    c.arg("run")
        .arg("--dir")
        .arg(&dir)
        .args(["--every", "30ms", "--keep", "1", "--keep-every", "1h"])
        .arg("--")
        .arg(test_bin("trainer"))
        .args(trainer_args(60, DIM, 2, Some(&digest)));
    let out = output_deadline(&mut c, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!events(&dir, "pruned").is_empty(), "nothing was pruned");
    let left = checkpoints(&dir);
    let planted_left: Vec<u64> = left
        .iter()
        .copied()
        .filter(|s| *s <= ages.len() as u64)
        .collect();
    assert_eq!(
        planted_left, want_kept,
        "milestones kept (all left: {left:?})"
    );
    assert!(
        *left.last().unwrap() > ages.len() as u64,
        "newest not kept: {left:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Permissions and planted symlinks.

#[test]
fn directories_and_files_are_owner_only() {
    let tmp = tempdir();
    let dir = tmp.path().join("new").join("ck");
    // A corrupt newest, so quarantine/ and its note exist too.
    let out = {
        let digest = tmp.path().join("digest");
        let mut c = ckpt();
        c.arg("run")
            .arg("--dir")
            .arg(&dir)
            .args(["--every", "20ms", "--keep", "2"])
            .arg("--")
            .arg(test_bin("trainer"))
            .args(trainer_args(40, DIM, 2, Some(&digest)));
        output_deadline(&mut c, Duration::from_secs(60))
    };
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let newest = *checkpoints(&dir).last().unwrap();
    std::fs::write(ck(&dir, newest).join("state.postcard"), b"bad").unwrap();
    std::fs::set_permissions(
        ck(&dir, newest).join("state.postcard"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = run_trainer(&dir, &["--again"], 40);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(quarantined(&dir).len(), 1);
    let mut bad = Vec::new();
    let top = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    if top != 0o700 {
        bad.push(format!("{} {top:o}", dir.display()));
    }
    for (path, _, mode) in snapshot(&dir) {
        let m = mode & 0o777;
        let kind = mode & libc::S_IFMT;
        let ok = match kind {
            libc::S_IFDIR => m == 0o700,
            libc::S_IFREG => m & 0o077 == 0,
            libc::S_IFSOCK => true,
            _ => false,
        };
        if !ok {
            bad.push(format!("{path} {m:o} (type {kind:o})"));
        }
    }
    assert!(bad.is_empty(), "not owner-only: {bad:#?}");
}

/// Symlinks planted where ckpt's own directories or files belong are never followed: ckpt
/// refuses (naming the link) or treats it as corrupt, and the link's target is untouched.
#[test]
fn planted_symlinks_are_never_followed() {
    let cases: [(&str, bool); 7] = [
        (".ckpt/trash", true),
        (".ckpt/staging", true),
        ("quarantine", true),
        (".ckpt/lock", true),
        (".ckpt/events.jsonl", false),
        (".ckpt/status.json", false),
        (".ckpt/restore-check.json", false),
    ];
    for (planted, refuse) in cases {
        let tmp = tempdir();
        let dir = tmp.path().join("ck");
        plant(&dir, 10);
        plant(&dir, 20);
        // A corrupt newest, so that quarantine is exercised too.
        std::fs::write(ck(&dir, 2).join("state.postcard"), b"bad").unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("precious"), b"keep me").unwrap();
        std::fs::create_dir(victim.join("ckpt-000000000001.1.1")).unwrap();
        let target = if planted.ends_with(".jsonl")
            || planted.ends_with(".json")
            || planted.ends_with("lock")
        {
            victim.join("precious")
        } else {
            victim.clone()
        };
        let link = dir.join(planted);
        if link.is_dir() {
            std::fs::remove_dir(&link).unwrap();
        } else {
            let _ = std::fs::remove_file(&link);
        }
        symlink(&target, &link).unwrap();
        let before = snapshot(&victim);
        let out = run_trainer(&dir, &[], 30);
        let err = text(&out.stderr);
        if refuse {
            assert_ne!(out.status.code(), Some(0), "{planted}: not refused:\n{err}");
            assert!(
                err.contains(planted.rsplit('/').next().unwrap()),
                "{planted}: link not named:\n{err}"
            );
        } else {
            assert_eq!(out.status.code(), Some(0), "{planted}:\n{err}");
        }
        if planted.ends_with("restore-check.json") {
            // Not read through the link: a warning, and the resume verified in full.
            assert!(err.contains("restore-check.json"), "{err}");
            assert_eq!(events(&dir, "launch")[0]["restore_check"], "full", "{err}");
        }
        assert_eq!(
            snapshot(&victim),
            before,
            "{planted}: the link's target was changed"
        );
        assert_eq!(std::fs::read(victim.join("precious")).unwrap(), b"keep me");
    }
}
