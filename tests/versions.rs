//! Versions and experiments (docs/versions.md): tags and retention, branching a new run from
//! another run's checkpoint while that run goes on, rollback, export/import, show, diff, gc,
//! and the refusals for unknown references and sources that do not verify.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

fn ok(cmd: &mut Command) -> String {
    let out = output_deadline(cmd, T);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn json(cmd: &mut Command) -> Value {
    serde_json::from_str(&ok(cmd.arg("--json"))).expect("JSON output")
}

/// Runs `cmd` expecting exit `code`; returns stderr.
fn fails(cmd: &mut Command, code: i32) -> String {
    let out = output_deadline(cmd, T);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

fn save(dir: &Path, src: &Path, step: u64) {
    ok(ckpt()
        .args(["save", "--dir"])
        .arg(dir)
        .args(["--step", &step.to_string()])
        .arg(src));
}

/// A directory with `n` checkpoints made by `ckpt save` (steps 10, 20, ...), files
/// `data/a.txt` and `data/nested/w.bin` changing each time.
fn saved_dir(root: &Path, n: u64) -> std::path::PathBuf {
    let dir = root.join("ck");
    let src = root.join("data");
    std::fs::create_dir_all(src.join("nested")).unwrap();
    for i in 1..=n {
        std::fs::write(src.join("a.txt"), format!("version {i}\n")).unwrap();
        std::fs::write(src.join("nested/w.bin"), vec![i as u8; 4096]).unwrap();
        save(&dir, &src, i * 10);
    }
    dir
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn tags_resolve_survive_retention_and_unknown_refs_are_refused() {
    let tmp = tempdir();
    let dir = saved_dir(tmp.path(), 4);
    let d = |c: &mut Command| {
        c.arg("--dir").arg(&dir);
    };
    let mut c = ckpt();
    c.args(["tag", "2", "base"]);
    d(&mut c);
    assert!(ok(&mut c).contains("tagged checkpoint 2 as base"));
    let mut c = ckpt();
    c.args(["tag", "latest~1", "best"]);
    d(&mut c);
    ok(&mut c);
    // Names, ids, latest and latest~N everywhere a checkpoint is named.
    let mut c = ckpt();
    c.args(["show", "best"]);
    d(&mut c);
    let v = json(&mut c);
    assert_eq!(v["seq"], 3);
    assert_eq!(v["step"], 30);
    assert_eq!(v["tags"], serde_json::json!(["best"]));
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    let mut c = ckpt();
    c.args(["verify", "base", "latest", "latest~3"]);
    d(&mut c);
    ok(&mut c);
    let mut c = ckpt();
    c.args(["list"]);
    d(&mut c);
    let l = json(&mut c);
    assert_eq!(l[1]["tags"], serde_json::json!(["base"]));
    let mut c = ckpt();
    c.arg("list");
    d(&mut c);
    assert!(ok(&mut c).lines().any(|l| l.contains(" base")));

    // Refusals: unknown id and name (65, naming what exists), bad names (64), taken names.
    let mut c = ckpt();
    c.args(["tag", "99", "x"]);
    d(&mut c);
    let e = fails(&mut c, 65);
    assert!(
        e.contains("no checkpoint 99") && e.contains("1, 2, 3, 4") && e.contains("base=2"),
        "{e}"
    );
    let mut c = ckpt();
    c.args(["show", "nope"]);
    d(&mut c);
    let e = fails(&mut c, 65);
    assert!(e.contains("no checkpoint or tag \"nope\""), "{e}");
    let mut c = ckpt();
    c.args(["show", "latest~9"]);
    d(&mut c);
    fails(&mut c, 65);
    for bad in ["123", "latest", "a/b", ".x"] {
        let mut c = ckpt();
        c.args(["tag", "1", bad]);
        d(&mut c);
        let e = fails(&mut c, 64);
        assert!(e.contains("cannot be a tag name"), "{e}");
    }
    let mut c = ckpt();
    c.args(["tag", "4", "base"]);
    d(&mut c);
    assert!(fails(&mut c, 64).contains("--force"));
    let mut c = ckpt();
    c.args(["untag", "nope"]);
    d(&mut c);
    assert!(fails(&mut c, 64).contains("base=2"));

    // The supervisor's retention (--keep 1) never removes a tagged checkpoint.
    let progress = tmp.path().join("progress");
    let run_dir = tmp.path().join("run");
    let out = output_deadline(
        ckpt()
            .args(["run", "--dir"])
            .arg(&run_dir)
            .args(["--every", "30ms", "--keep", "100", "--"])
            .arg(test_bin("brancher"))
            .args(["--steps", "40", "--step-ms", "2", "--progress"])
            .arg(&progress),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = checkpoints(&run_dir)[0];
    ok(ckpt()
        .args(["tag", "--dir"])
        .arg(&run_dir)
        .arg(first.to_string())
        .arg("epoch-1"));
    let out = output_deadline(
        ckpt()
            .args(["run", "--again", "--dir"])
            .arg(&run_dir)
            .args(["--every", "30ms", "--keep", "1", "--"])
            .arg(test_bin("brancher"))
            .args(["--steps", "200", "--step-ms", "2", "--progress"])
            .arg(&progress),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!events(&run_dir, "pruned").is_empty(), "retention ran");
    let left = checkpoints(&run_dir);
    assert!(
        left.contains(&first),
        "tagged checkpoint {first} survived: {left:?}"
    );
    assert_eq!(
        left.len(),
        2,
        "only the tagged and the newest remain: {left:?}"
    );
    // gc with --keep also spares it; untag makes it prunable again.
    ok(ckpt().args(["untag", "--dir"]).arg(&run_dir).arg("epoch-1"));
    let v = json(
        ckpt()
            .args(["gc", "--dry-run", "--keep", "1", "--dir"])
            .arg(&run_dir),
    );
    assert_eq!(v["retention"][0]["seq"], first);
    assert_eq!(checkpoints(&run_dir), left, "dry run removes nothing");
    assert_no_survivors(&run_dir);
}

#[test]
fn branch_sees_parent_state_and_new_settings_while_parent_keeps_going() {
    let tmp = tempdir();
    let parent = tmp.path().join("base");
    let pprog = tmp.path().join("parent.progress");
    let mut sup = ckpt()
        .args(["run", "--dir"])
        .arg(&parent)
        .args(["--every", "60ms", "--keep", "3", "--"])
        .arg(test_bin("brancher"))
        .args([
            "--lr",
            "1",
            "--steps",
            "1000000",
            "--step-ms",
            "2",
            "--progress",
        ])
        .arg(&pprog)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_guarded();
    wait_until(T, "two parent checkpoints", || {
        checkpoints(&parent).len() >= 2
    });
    // Tag the base state: the parent's retention (--keep 3) must not take it while we branch.
    ok(ckpt()
        .args(["tag", "--dir"])
        .arg(&parent)
        .args(["latest", "base"]));
    let base = json(ckpt().args(["show", "--dir"]).arg(&parent).arg("base"));
    let (base_seq, base_step) = (
        base["seq"].as_u64().unwrap(),
        base["step"].as_u64().unwrap(),
    );

    // A rollback is refused while the supervisor holds the directory.
    let e = fails(
        ckpt().args(["rollback", "--dir"]).arg(&parent).arg("base"),
        73,
    );
    assert!(e.contains("in use"), "{e}");

    let branch = tmp.path().join("lr-5");
    let bprog = tmp.path().join("branch.progress");
    let out = output_deadline(
        ckpt()
            .args(["run", "--dir"])
            .arg(&branch)
            .arg("--from")
            .arg(format!("{}:base", parent.display()))
            .args(["--every", "40ms", "--keep", "100", "--"])
            .arg(test_bin("brancher"))
            .args([
                "--lr",
                "5",
                "--steps",
                &(base_step + 60).to_string(),
                "--progress",
            ])
            .arg(&bprog),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("branched from checkpoint"), "{err}");
    let l = lines(&bprog);
    // The branch starts from the parent's state (value == step at lr 1) with its new lr.
    assert_eq!(
        l[0],
        format!("start branch {base_step} 5 {base_step} Branch"),
        "{l:?}"
    );
    assert_eq!(
        l.last().unwrap(),
        &format!("done {} {}", base_step + 60, base_step + 60 * 5)
    );
    // Its first checkpoint records the parent.
    let first = json(ckpt().args(["show", "--dir"]).arg(&branch).arg("1"));
    assert_eq!(first["parent"]["seq"], base_seq);
    assert_eq!(first["parent"]["step"], base_step);
    assert_eq!(
        first["parent"]["dir"].as_str().unwrap(),
        std::path::absolute(&parent).unwrap().to_str().unwrap()
    );
    assert_eq!(first["step"], base_step);

    // The parent kept going, unaffected: newer checkpoints, the base still verifies.
    wait_until(T, "parent checkpoints after the branch", || {
        checkpoints(&parent)
            .last()
            .is_some_and(|s| *s > base_seq + 2)
    });
    ok(ckpt().args(["verify", "--dir"]).arg(&parent).arg("base"));
    assert!(lines(&pprog)[0].starts_with("start fresh 0 1 0"));
    // `diff` across directories: same file, different content.
    let v = json(
        ckpt()
            .arg("diff")
            .arg(format!("{}:base", parent.display()))
            .arg(format!("{}:latest", branch.display())),
    );
    assert_eq!(v["changed"], 1, "{v}");

    // Stop the parent: checkpoint and exit 75.
    signal(sup.id(), libc::SIGTERM);
    let st = wait_deadline(&mut sup, T);
    assert_eq!(st.code(), Some(75));
    assert_no_survivors(&parent);

    // Later launches of the branch are ordinary resumes; --from only seeds the first one.
    let out = output_deadline(
        ckpt()
            .args(["run", "--again", "--dir"])
            .arg(&branch)
            .arg("--from")
            .arg(format!("{}:base", parent.display()))
            .args(["--every", "40ms", "--"])
            .arg(test_bin("brancher"))
            .args([
                "--lr",
                "7",
                "--steps",
                &(base_step + 70).to_string(),
                "--progress",
            ])
            .arg(&bprog),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let l = lines(&bprog);
    let resumed = l.iter().rev().find(|s| s.starts_with("start")).unwrap();
    // A resume keeps the state's lr (5), not the new --lr 7.
    let f: Vec<&str> = resumed.split(' ').collect();
    assert_eq!((f[1], f[3], f[5]), ("resume", "5", "Resume"), "{resumed}");
    assert_no_survivors(&branch);
}

#[test]
fn from_source_that_does_not_verify_or_does_not_exist_is_refused() {
    let tmp = tempdir();
    let src = saved_dir(tmp.path(), 2);
    let newdir = tmp.path().join("new");
    let e = fails(
        ckpt()
            .args(["run", "--dir"])
            .arg(&newdir)
            .arg("--from")
            .arg(format!("{}:nope", src.display()))
            .args(["--", "true"]),
        65,
    );
    assert!(e.contains("no checkpoint or tag \"nope\""), "{e}");
    // Flip a byte of the newest checkpoint.
    let victim = src.join("ckpt-000000000002/data/nested/w.bin");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&victim, &bytes).unwrap();
    let e = fails(
        ckpt()
            .args(["run", "--dir"])
            .arg(&newdir)
            .arg("--from")
            .arg(&src)
            .args(["--", "true"]),
        65,
    );
    assert!(e.contains("refusing to branch"), "{e}");
    assert!(e.contains("checksum"), "{e}");
    assert!(checkpoints(&newdir).is_empty(), "nothing published");
    assert_eq!(std::fs::read(&victim).unwrap(), bytes, "source untouched");
    assert_eq!(checkpoints(&src), vec![1, 2], "source untouched");
    // An older one that verifies can be chosen explicitly.
    let out = output_deadline(
        ckpt()
            .args(["run", "--dir"])
            .arg(&newdir)
            .arg("--from")
            .arg(format!("{}:1", src.display()))
            .args([
                "--",
                "sh",
                "-c",
                "test \"$CKPT_START\" = branch && test \"$CKPT_RESTORE_STEP\" = 10",
            ]),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn export_import_round_trip_verifies() {
    let tmp = tempdir();
    let dir = saved_dir(tmp.path(), 3);
    ok(ckpt().args(["tag", "--dir"]).arg(&dir).args(["2", "v2"]));
    let to = tmp.path().join("out/v2");
    let v = json(
        ckpt()
            .args(["export", "--dir"])
            .arg(&dir)
            .args(["v2", "--to"])
            .arg(&to),
    );
    assert_eq!(v["seq"], 2);
    assert!(to.join("MANIFEST.ckpt").is_file());
    assert_eq!(
        std::fs::read(to.join("data/nested/w.bin")).unwrap(),
        vec![2u8; 4096]
    );
    // Exporting over an existing path is refused.
    let e = fails(
        ckpt()
            .args(["export", "--dir"])
            .arg(&dir)
            .args(["v2", "--to"])
            .arg(&to),
        64,
    );
    assert!(e.contains("already exists"), "{e}");
    // Import into another directory and into the same one: new sequence numbers, verified.
    let other = tmp.path().join("other");
    let v = json(ckpt().args(["import", "--dir"]).arg(&other).arg(&to));
    assert_eq!(v["seq"], 1);
    assert_eq!(v["step"], 20);
    let v = json(
        ckpt()
            .args(["import", "--link", "--dir"])
            .arg(&dir)
            .arg(&to),
    );
    assert_eq!(v["seq"], 4);
    ok(ckpt().args(["verify", "--dir"]).arg(&dir));
    let d = json(
        ckpt()
            .args(["diff", "--dir"])
            .arg(&dir)
            .args(["v2", "latest"]),
    );
    assert_eq!(
        (d["changed"].clone(), d["same"].clone()),
        (0.into(), 2.into()),
        "{d}"
    );
    let d = json(ckpt().args(["diff", "--dir"]).arg(&dir).args(["1", "v2"]));
    assert_eq!(d["changed"], 2, "{d}");
    let shown = json(ckpt().args(["show", "--dir"]).arg(&other).arg("latest"));
    assert_eq!(
        shown["meta"]["imported_from"]["path"].as_str().unwrap(),
        to.to_str().unwrap()
    );
    // A damaged export is refused and nothing is published.
    // (A new file: the old one's inode is shared with the `--link` import above.)
    std::fs::remove_file(to.join("data/a.txt")).unwrap();
    std::fs::write(to.join("data/a.txt"), "tampered\n").unwrap();
    let third = tmp.path().join("third");
    let e = fails(ckpt().args(["import", "--dir"]).arg(&third).arg(&to), 65);
    assert!(e.contains("is invalid") && e.contains("data/a.txt"), "{e}");
    ok(ckpt().args(["verify", "--dir"]).arg(&dir));
    assert!(checkpoints(&third).is_empty());
}

#[test]
fn rollback_sets_newer_aside_and_run_from_latest_n_resumes_there() {
    let tmp = tempdir();
    let dir = tmp.path().join("run");
    let prog = tmp.path().join("progress");
    let out = output_deadline(
        ckpt()
            .args(["run", "--dir"])
            .arg(&dir)
            .args(["--every", "30ms", "--keep", "100", "--"])
            .arg(test_bin("brancher"))
            .args(["--steps", "120", "--step-ms", "3", "--progress"])
            .arg(&prog),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = checkpoints(&dir);
    assert!(before.len() >= 4, "{before:?}");
    let n = before.len();
    let target = json(ckpt().args(["show", "--dir"]).arg(&dir).arg("latest~2"));
    let tstep = target["step"].as_u64().unwrap();
    let out = output_deadline(
        ckpt()
            .args(["run", "--dir"])
            .arg(&dir)
            .args(["--from", "latest~2", "--every", "off", "--"])
            .arg(test_bin("brancher"))
            .args(["--steps", "130", "--step-ms", "1", "--progress"])
            .arg(&prog),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let l = lines(&prog);
    let start = l.iter().rev().find(|s| s.starts_with("start")).unwrap();
    assert!(
        start.starts_with(&format!("start resume {tstep} ")),
        "{start}: {l:?}"
    );
    assert_eq!(checkpoints(&dir), before[..n - 2].to_vec());
    let aside: Vec<String> = std::fs::read_dir(dir.join("rolled-back"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(aside.len(), 2, "{aside:?}");
    // Sequence numbers keep growing past the rolled-back ones.
    let src = tmp.path().join("f");
    std::fs::write(&src, "x").unwrap();
    save(&dir, &src, 1);
    assert_eq!(*checkpoints(&dir).last().unwrap(), before[n - 1] + 1);
    // `ckpt rollback` does the same by hand.
    let v = json(
        ckpt()
            .args(["rollback", "--dir"])
            .arg(&dir)
            .arg(before[0].to_string()),
    );
    assert_eq!(v["seq"], before[0]);
    assert_eq!(checkpoints(&dir), vec![before[0]]);
    let e = fails(ckpt().args(["rollback", "--dir"]).arg(&dir).arg("nope"), 65);
    assert!(e.contains("no checkpoint or tag"), "{e}");
    assert_no_survivors(&dir);
}

#[test]
fn gc_reports_and_removes_old_leftovers() {
    let tmp = tempdir();
    let dir = saved_dir(tmp.path(), 3);
    std::fs::create_dir_all(dir.join("quarantine/ckpt-000000000009.checksum-mismatch.x.1"))
        .unwrap();
    // A staging directory of a writer that is gone (no such pid), and one of ours (alive).
    std::fs::create_dir_all(dir.join(".ckpt/staging/abc.999999999")).unwrap();
    let mine = dir.join(format!(".ckpt/staging/abc.{}", std::process::id()));
    std::fs::create_dir_all(&mine).unwrap();
    // Younger than a day: nothing to remove.
    let v = json(
        ckpt()
            .args(["gc", "--dry-run", "--older-than", "1d", "--dir"])
            .arg(&dir),
    );
    assert_eq!(v["leftovers"].as_array().unwrap().len(), 0, "{v}");
    let v = json(
        ckpt()
            .args([
                "gc",
                "--dry-run",
                "--older-than",
                "0s",
                "--keep",
                "1",
                "--dir",
            ])
            .arg(&dir),
    );
    assert_eq!(v["leftovers"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["retention"].as_array().unwrap().len(), 2, "{v}");
    assert!(dir
        .join("quarantine/ckpt-000000000009.checksum-mismatch.x.1")
        .exists());
    let v = json(ckpt().args(["gc", "--older-than", "0s", "--dir"]).arg(&dir));
    assert_eq!(v["removed_leftovers"], 2, "{v}");
    assert!(!dir
        .join("quarantine/ckpt-000000000009.checksum-mismatch.x.1")
        .exists());
    assert!(!dir.join(".ckpt/staging/abc.999999999").exists());
    assert!(mine.exists(), "a live writer's staging stays");
    assert_eq!(checkpoints(&dir), vec![1, 2, 3], "no --keep: no retention");
}
