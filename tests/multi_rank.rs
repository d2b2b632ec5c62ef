//! Multi-rank jobs (docs/multi-rank.md): 4 and 8 local ranks started by a plain launcher
//! (`rank_launcher`, which forwards signals like torchrun/mpirun), random SIGKILLs of one rank,
//! of all ranks and of the launcher, mid-save and between saves; the resumed job must end with
//! the digest of an uninterrupted run and no restore may ever see a partial checkpoint. Also:
//! a rank dying mid-save without a launcher to stop the others (the round is abandoned by
//! timeout and its shards removed), a world-size mismatch, and `srun -n 4` on the local Slurm
//! cluster (skipped without one unless `CI` is set).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::slurm::*;
use common::*;

fn trainer_args(steps: u64, out: &Path) -> Vec<String> {
    vec![
        test_bin("rank_trainer").display().to_string(),
        "--steps".into(),
        steps.to_string(),
        "--step-ms".into(),
        "3".into(),
        "--save-ms".into(),
        "40".into(),
        "--pad-kib".into(),
        "64".into(),
        "--out".into(),
        out.display().to_string(),
    ]
}

fn reference(world: u32, steps: u64) -> String {
    let out = Command::new(test_bin("rank_trainer"))
        .args(["--reference", "--world", &world.to_string()])
        .args(["--steps", &steps.to_string()])
        .output()
        .unwrap();
    text(&out.stdout).trim().to_string()
}

fn combined(world: u32, out: &Path) -> String {
    let ds: Vec<String> = (0..world)
        .map(|r| {
            std::fs::read_to_string(out.join(format!("digest-{r}")))
                .unwrap_or_else(|_| panic!("rank {r} wrote no digest"))
        })
        .collect();
    let o = Command::new(test_bin("rank_trainer"))
        .args(["--combine", &ds.join(",")])
        .output()
        .unwrap();
    text(&o.stdout).trim().to_string()
}

/// The job's processes on `dir`: (pid, rank) with `None` for the launcher.
fn job_ranks(dir: &Path) -> Vec<(i32, Option<u32>)> {
    job_processes(dir)
        .into_iter()
        .map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let rank = env
                .split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"RANK="))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
            (pid, rank)
        })
        .collect()
}

/// Some rank is writing its shard (staging) or its shard waits in a round's stage.
fn mid_save(dir: &Path) -> bool {
    // Staging directories of live writers (`<token>.<pid>`; dead ones wait for cleanup).
    let staging = std::fs::read_dir(dir.join(".ckpt/staging"))
        .map(|rd| {
            rd.flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.rsplit('.').next())
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
            })
        })
        .unwrap_or(false);
    staging || !stage_shards(dir).is_empty()
}

/// Shard directories sitting in the stage of any round.
fn stage_shards(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for epoch in std::fs::read_dir(dir.join(".ckpt/rounds"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for round in std::fs::read_dir(epoch.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for e in std::fs::read_dir(round.path().join("stage"))
                .into_iter()
                .flatten()
                .flatten()
            {
                if e.file_name().to_string_lossy().starts_with("rank-") {
                    v.push(e.path());
                }
            }
        }
    }
    v
}

/// Every published checkpoint verifies and holds exactly one shard per rank.
fn assert_complete_checkpoints(dir: &Path, world: u32) {
    let store = ckpt::store::Store::new(dir);
    for seq in checkpoints(dir) {
        let m = store
            .verify(seq)
            .unwrap_or_else(|e| panic!("checkpoint {seq} does not verify: {e}"));
        assert_eq!(m.world_size, Some(world), "checkpoint {seq}: world_size");
        for r in 0..world {
            let name = format!("rank-{r:05}/state.bin");
            assert!(
                m.files.iter().any(|f| f.name == name),
                "checkpoint {seq} lacks {name}"
            );
        }
    }
}

/// Every restore any rank made saw all shards of a checkpoint of this world size.
fn assert_restores_complete(out: &Path, world: u32) -> usize {
    let log = std::fs::read_to_string(out.join("restores.log")).unwrap_or_default();
    for l in log.lines() {
        assert!(
            l.ends_with(&format!("world {world} shards {world}")),
            "a partial or foreign checkpoint was restored: {l}"
        );
    }
    log.lines().count()
}

/// Runs the job under `ckpt run` with a plain launcher and `kills` random SIGKILLs.
fn random_kills(test: &str, world: u32, steps: u64, kills: usize, extra: &[&str]) {
    let seed = seed(test);
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempdir();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut cmd = ckpt();
    cmd.args([
        "run",
        "--quiet",
        "--every",
        "150ms",
        "--backoff",
        "20ms..100ms",
    ])
    .args(["--max-failures", "30", "--dir"])
    .arg(&dir)
    // A round that a rank never joins is abandoned after this (default 300 s): keeps a stalled
    // round (seen once in CI under load, seed 10476665565114153835, not reproduced since)
    // within the test's deadline; the digest check still proves the result.
    .env("CKPT_ROUND_TIMEOUT", "10")
    .arg("--")
    .arg(test_bin("rank_launcher"))
    .args(["--n", &world.to_string(), "--"])
    .args(trainer_args(steps, &out))
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn_guarded();
    let err_pipe = child.stderr.take().unwrap();
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { err_pipe }, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(100);
    let mut done_kills = 0;
    'kills: for i in 0..kills {
        let what = ["one rank", "all ranks", "the launcher"][rng.usize(..3)];
        let mid = rng.bool();
        let base = checkpoints(&dir).len();
        // Wait for the moment: a save in progress, or a new checkpoint and no save running.
        loop {
            if child.try_wait().unwrap().is_some() {
                break 'kills;
            }
            assert!(
                Instant::now() < deadline,
                "{test}: no moment for kill {i} came in time\n{}",
                diagnose(&dir)
            );
            let ready = if mid {
                mid_save(&dir)
            } else {
                checkpoints(&dir).len() > base && !mid_save(&dir)
            };
            let procs = job_ranks(&dir);
            if ready && procs.iter().filter(|p| p.1.is_some()).count() == world as usize {
                let targets: Vec<i32> = match what {
                    "one rank" => {
                        let ranks: Vec<i32> = procs
                            .iter()
                            .filter(|p| p.1.is_some())
                            .map(|p| p.0)
                            .collect();
                        vec![ranks[rng.usize(..ranks.len())]]
                    }
                    "all ranks" => procs
                        .iter()
                        .filter(|p| p.1.is_some())
                        .map(|p| p.0)
                        .collect(),
                    _ => procs
                        .iter()
                        .filter(|p| p.1.is_none())
                        .map(|p| p.0)
                        .collect(),
                };
                for &p in &targets {
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                eprintln!(
                    "{test}: kill {i}: SIGKILL {what} {targets:?} {} (checkpoints {:?})",
                    if mid { "mid-save" } else { "between saves" },
                    checkpoints(&dir)
                );
                done_kills += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The next launch is up (every rank alive again) before the next kill.
        let launches = events(&dir, "launch").len();
        loop {
            if child.try_wait().unwrap().is_some() {
                break 'kills;
            }
            assert!(
                Instant::now() < deadline,
                "{test}: no relaunch\n{}",
                diagnose(&dir)
            );
            if events(&dir, "launch").len() > launches {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Wait for the end; on a timeout, show what the supervisor saw before failing.
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let diag = diagnose(&dir);
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            let err = err_t.join().unwrap();
            panic!("{test}: job did not finish in time\n--- stderr\n{err}\n{diag}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let err = err_t.join().unwrap();
    assert!(st.success(), "{test}: ckpt run failed ({st}):\n{err}");
    // The launcher takes every rank down with a killed one: no live rank ever waits for a
    // dead one, so no round may time out (that would be a stall of CKPT_ROUND_TIMEOUT).
    assert!(
        !err.contains("abandoning the round"),
        "{test}: a save round timed out although every rank was alive:\n{err}\n--- rounds\n{}",
        walk_names(&dir.join(".ckpt/rounds"))
    );
    assert_eq!(
        combined(world, &out),
        reference(world, steps),
        "{test}: the resumed job's global digest differs from an uninterrupted run\n{err}"
    );
    let restores = assert_restores_complete(&out, world);
    assert_complete_checkpoints(&dir, world);
    assert_no_survivors(&dir);
    eprintln!(
        "{test}: {done_kills} kills, {} launches, {restores} shard restores, checkpoints {:?}",
        events(&dir, "launch").len(),
        checkpoints(&dir)
    );
    assert!(done_kills > 0, "{test}: no kill happened");
}

#[test]
fn four_ranks_random_kills_resume_to_the_same_digest() {
    random_kills("four_ranks", 4, 700, 5, &[]);
}

/// The README's single-process loop unchanged (`if ck.should_checkpoint() { save }`, no step
/// given to `should_checkpoint`) under a launcher: the ranks agree on the count of calls,
/// which continues from the restored checkpoint's step after every kill; the save records
/// the step given, or the count without one.
#[test]
fn readme_pattern_random_kills_resume_to_the_same_digest() {
    random_kills("readme_step", 3, 500, 3, &["--readme", "step"]);
    random_kills("readme_none", 3, 500, 3, &["--readme", "none"]);
}

#[test]
fn eight_ranks_random_kills_resume_to_the_same_digest() {
    random_kills("eight_ranks", 8, 600, 4, &[]);
}

/// Ranks that finish at different times (seen in the 8-rank test under load, seed
/// 16304337529064726944): rank 2 leaves, rank 1 takes part in a round and leaves too, then
/// rank 0 still gets requests. Nobody may wait for the departed ranks (before the fix, a
/// departed rank was represented only by a "never" proposal in the one round after it left:
/// once that round was abandoned by the next rank to leave, every later round waited for it
/// until CKPT_ROUND_TIMEOUT). Also: an explicit save after a rank left fails with a clear
/// message instead of waiting.
#[test]
fn ranks_that_left_are_never_waited_for() {
    use ckpt::multi_rank::{MultiRank, World};
    let tmp = tempdir();
    let store = ckpt::store::Store::new(tmp.path().join("ckpt"));
    store.create().unwrap();
    let rank = |r: u32| {
        let mut m = MultiRank::new(&store, World::new(r, 3).unwrap(), "leave-test.0").unwrap();
        // Long enough that any wait for a departed rank shows as a failure below.
        m.set_timeout(Duration::from_secs(30));
        m
    };
    let (mut r0, mut r1, mut r2) = (rank(0), rank(1), rank(2));
    r2.leave();
    let quick = |what: &str, f: &mut dyn FnMut() -> bool| {
        let t = Instant::now();
        let v = f();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{what} waited {:?} for a rank that left",
            t.elapsed()
        );
        v
    };
    // Both remaining ranks are asked to checkpoint; rank 1, which finishes right after its
    // step 10, leaves as soon as its poll returns, while rank 0 still waits for the round's
    // outcome (the sequence of the 8-rank failure: the next rank to leave abandons the round).
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut v = vec![];
            for step in 10..20 {
                v.push(quick("rank 0's poll", &mut || {
                    r0.poll(true, false, step).unwrap()
                }));
            }
            v
        });
        // Rank 0 first proposes and waits (as before the fix), or is already done polling.
        let proposed = store
            .private()
            .join("rounds/leave-test.0/00000001/propose-00000");
        wait_until(
            Duration::from_secs(10),
            "rank 0 to propose or finish",
            || proposed.exists() || a.is_finished(),
        );
        assert!(
            !quick("rank 1's poll", &mut || r1.poll(true, false, 10).unwrap()),
            "a save was agreed without rank 2"
        );
        r1.leave();
        assert!(
            a.join().unwrap().iter().all(|v| !v),
            "rank 0 agreed to save after ranks 1 and 2 left"
        );
    });
    assert!(r0.rank_left());
    let stage = ckpt::store::Stage::new(&store, ckpt::store::Algo::Crc32c).unwrap();
    let err = r0
        .commit_shard(stage, ckpt::store::Algo::Crc32c, Some(20), false, "test")
        .unwrap_err()
        .to_string();
    assert!(err.contains("a rank left"), "{err}");
    assert!(checkpoints(store.dir()).is_empty());
}

/// Ranks started directly (no launcher to stop the others): rank 1 dies while writing its
/// shard; the others give up on the round after CKPT_ROUND_TIMEOUT, nothing is published,
/// their shards are removed, they finish; the dead rank's staging goes at the next start.
#[test]
fn rank_dying_mid_save_leaves_no_partial_checkpoint() {
    let tmp = tempdir();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let world = 4u32;
    let mut args = trainer_args(1500, &out);
    args[6] = "400".into(); // --save-ms: a long save to kill rank 1 in
    let mut kids: Vec<_> = (0..world)
        .map(|r| {
            let mut c = Command::new(&args[0]);
            c.args(&args[1..])
                .env("CKPT_DIR", &dir)
                .env("CKPT_RUN_ID", "standalone-test")
                .env("CKPT_ROUND_TIMEOUT", "1")
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string());
            for k in ["CKPT_SOCKET", "CKPT_RESTORE", "CKPT_SUPERVISOR_PID"] {
                c.env_remove(k);
            }
            c.spawn_guarded()
        })
        .collect();
    // Request only once every rank caught SIGUSR1 (SigCgt in /proc/<pid>/status).
    let catches_usr1 = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & (1 << (libc::SIGUSR1 - 1)) != 0)
    };
    wait_until(Duration::from_secs(10), "every rank's handlers", || {
        kids.iter().all(|k| catches_usr1(k.id()))
    });
    for k in &kids {
        signal(k.id(), libc::SIGUSR1);
    }
    // Rank 1 is in its 400 ms save (its staging dir exists): kill it there.
    let pid1 = kids[1].id() as i32;
    wait_until(Duration::from_secs(10), "rank 1 writing its shard", || {
        std::fs::read_dir(dir.join(".ckpt/staging"))
            .map(|rd| {
                rd.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .ends_with(&format!(".{pid1}"))
                })
            })
            .unwrap_or(false)
    });
    signal(kids[1].id(), libc::SIGKILL);
    let _ = kids[1].wait();
    // The others finish their shards, wait, abandon the round and run to the end.
    for (r, k) in kids.iter_mut().enumerate() {
        if r == 1 {
            continue;
        }
        let st = wait_deadline(k, Duration::from_secs(30));
        assert!(st.success(), "rank {r}: {st}");
    }
    assert!(
        checkpoints(&dir).is_empty(),
        "a checkpoint was published without rank 1's shard: {:?}",
        checkpoints(&dir)
    );
    assert!(
        stage_shards(&dir).is_empty(),
        "shards left: {:?}",
        stage_shards(&dir)
    );
    let aborted = std::fs::read_dir(dir.join(".ckpt/rounds/standalone-test.0"))
        .unwrap()
        .flatten()
        .filter(|r| r.path().join("aborted").exists())
        .count();
    assert!(aborted >= 1, "the round was not recorded as abandoned");
    // The dead rank's own staging directory (dead pid) goes with the supervisor's cleanup.
    let store = ckpt::store::Store::new(&dir);
    assert!(store.clean_leftovers().unwrap() >= 1);
    assert_eq!(
        std::fs::read_dir(dir.join(".ckpt/staging"))
            .unwrap()
            .count(),
        0
    );
}

/// A checkpoint of 4 ranks is refused by a job of 2, naming both sizes.
#[test]
fn restore_with_another_world_size_is_refused() {
    let tmp = tempdir();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let run = |n: u32, again: bool| {
        let mut c = ckpt();
        c.args(["run", "--every", "100ms", "--max-failures", "1", "--dir"])
            .arg(&dir);
        if again {
            c.arg("--again");
        }
        c.arg("--")
            .arg(test_bin("rank_launcher"))
            .args(["--n", &n.to_string(), "--"])
            .args(trainer_args(200, &out));
        output_deadline(&mut c, Duration::from_secs(60))
    };
    let first = run(4, false);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(!checkpoints(&dir).is_empty());
    let second = run(2, true);
    let err = text(&second.stderr);
    assert!(
        !second.status.success(),
        "a 2-rank job restored a 4-rank checkpoint: {err}"
    );
    assert!(
        err.contains("saved by a job of 4 rank(s), this job runs with 2 rank(s)"),
        "{err}"
    );
    assert_no_survivors(&dir);
}

// ---- srun -n 4 on the local Slurm cluster (helpers in tests/common/slurm.rs) ----

struct Cancel(String);
impl Drop for Cancel {
    fn drop(&mut self) {
        let _ = slurm_cmd("scancel").arg(&self.0).output();
    }
}

/// `ckpt run -- srun -K -n 4 rank_trainer` in a batch job: one rank is SIGKILLed mid-save;
/// srun ends the step, ckpt relaunches it, and the ranks resume from their own shards.
#[test]
fn srun_four_ranks_kill_one_mid_save() {
    srun_four_ranks("srun_four_ranks", false);
}

/// The same with the Python client's ranks (`python_rank_trainer.py`, the same job).
#[test]
fn srun_four_python_ranks_kill_one_mid_save() {
    srun_four_ranks("srun_four_python_ranks", true);
}

fn srun_four_ranks(test: &str, python: bool) {
    if !ensure_cluster(test) {
        return;
    }
    let seed = seed(test);
    let tmp = tempdir();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let steps = 800;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut job = trainer_args(steps, &out);
    if python {
        // The same arguments; the Python client from the checkout.
        job[0] = format!(
            "env PYTHONPATH={} python3 {}",
            repo.join("python/src").display(),
            repo.join("test-programs/python_rank_trainer.py").display()
        );
    }
    let script = tmp.path().join("job.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nexec {} run --every 300ms --backoff 20ms..100ms --max-failures 10 --dir {} -- srun -K -n 4 {}\n",
            ckpt_bin().display(),
            dir.display(),
            job.join(" ")
        ),
    )
    .unwrap();
    let name = format!("ckpt-multirank-{}", std::process::id());
    let sb = output_deadline(
        slurm_cmd("sbatch")
            .arg("--parsable")
            .arg(format!("--job-name={name}"))
            .arg("-n4")
            .arg("--time=2")
            .arg(format!("--chdir={}", tmp.path().display()))
            .arg(format!("--output={}/job.out", tmp.path().display()))
            .arg(&script),
        Duration::from_secs(30),
    );
    assert!(sb.status.success(), "sbatch: {}", text(&sb.stderr));
    let id = text(&sb.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let _cancel = Cancel(id.clone());
    let log = || std::fs::read_to_string(tmp.path().join("job.out")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = || tmp.path().join("ckpt/.ckpt/finished").exists();
    // Kill one rank in the middle of a save, after a first checkpoint exists.
    let mut rng = fastrand::Rng::with_seed(seed);
    let victim = rng.u32(..4);
    loop {
        assert!(
            Instant::now() < deadline,
            "{test}: no save to kill in\n{}",
            log()
        );
        if finished() {
            break;
        }
        if !checkpoints(&dir).is_empty() && mid_save(&dir) {
            let pids: Vec<i32> = job_processes(&dir)
                .into_iter()
                .filter(|&p| {
                    std::fs::read(format!("/proc/{p}/environ"))
                        .unwrap_or_default()
                        .split(|&b| b == 0)
                        .any(|kv| kv == format!("SLURM_PROCID={victim}").as_bytes())
                })
                .filter(|&p| {
                    // The trainer itself, not srun's or env's process.
                    let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    let exe = std::fs::read_link(format!("/proc/{p}/exe")).unwrap_or_default();
                    if python {
                        exe.to_string_lossy().contains("python")
                            && text(&cmd).contains("python_rank_trainer.py")
                    } else {
                        exe.ends_with("rank_trainer")
                    }
                })
                .collect();
            if let Some(&p) = pids.first() {
                unsafe { libc::kill(p, libc::SIGKILL) };
                eprintln!(
                    "{test}: SIGKILL rank {victim} (pid {p}) mid-save, checkpoints {:?}",
                    checkpoints(&dir)
                );
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    while !finished() {
        assert!(
            Instant::now() < deadline,
            "{test}: job did not finish\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        combined(4, &out),
        reference(4, steps),
        "{test}: digest differs\n{}",
        log()
    );
    let restores = assert_restores_complete(&out, 4);
    assert_complete_checkpoints(&dir, 4);
    eprintln!(
        "{test}: {restores} shard restores, checkpoints {:?}, launches {}",
        checkpoints(&dir),
        events(&dir, "launch").len()
    );
    assert!(
        restores >= 4,
        "{test}: the relaunched ranks did not restore\n{}",
        log()
    );
}

/// The event log and the round files of the job on `dir`, for a failure message.
fn diagnose(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join(".ckpt/events.jsonl")).unwrap_or_default();
    let rounds = walk_names(&dir.join(".ckpt/rounds"));
    format!("--- events\n{log}\n--- rounds\n{rounds}")
}

/// Every path under `dir`, one per line, with the contents of small files (for failure
/// reports).
fn walk_names(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let body = match std::fs::read(e.path()) {
                Ok(b) if b.len() <= 200 && e.path().is_file() => format!(" {}", text(&b).trim()),
                _ => String::new(),
            };
            out.push_str(&format!("{}{body}\n", e.path().display()));
            if e.path().is_dir() {
                out.push_str(&walk_names(&e.path()));
            }
        }
    }
    out
}

/// `CKPT_ROUND_TIMEOUT` forms, the same table as the Python client's
/// (`python/tests/test_multi_rank.py::test_round_timeout_forms`).
#[test]
fn round_timeout_forms() {
    use ckpt::multi_rank::parse_round_timeout;
    for (v, want) in [
        ("300", Some(300.0)),
        ("2.5", Some(2.5)),
        ("2s", Some(2.0)),
        (" 2 s ", Some(2.0)),
        ("500ms", Some(0.5)),
        ("5m", Some(300.0)),
        (".5", Some(0.5)),
    ] {
        assert_eq!(
            parse_round_timeout(v).map(|d| d.as_secs_f64()),
            want,
            "{v:?}"
        );
    }
    for v in [
        "", "0", "0s", "-1", "1e3", "inf", "nan", "s", "ms", ".", "2h", "2 5", "1.2.3", "2sec",
    ] {
        assert_eq!(parse_round_timeout(v), None, "{v:?}");
    }
}
