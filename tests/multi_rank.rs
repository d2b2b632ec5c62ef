//! Multi-rank jobs (docs/multi-rank.md): 4 and 8 local ranks started by a plain launcher
//! (`rank_launcher`, which forwards signals like torchrun/mpirun), random SIGKILLs of one rank,
//! of all ranks and of the launcher, mid-save and between saves; the resumed job must end with
//! the digest of an uninterrupted run and no restore may ever see a partial checkpoint. Also:
//! a rank dying mid-save without a launcher to stop the others (the round is abandoned by
//! timeout and its shards removed), a world-size mismatch, and `srun -n 4` on the local Slurm
//! cluster (skipped without one unless `CI` is set). The coordinator (rank 0) killed while a
//! round gathers, mid-save and between saves, with and without a launcher; and the cost of a
//! round per rank, flat in the number of ranks (2 and 16 ranks under `strace`). The survivors
//! of a killed rank under `srun -K`, asked to stop, exit 143 within the stop timeout; late
//! ranks in a per-step collective (only rank 0 signalled) converge through the coordinator's
//! horizon (docs/multi-rank.md, "A stop that cannot complete", "Late ranks").

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ranks::{assert_complete_checkpoints, assert_restores_complete, combined, reference};
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

/// A round is gathering: some rank proposed, the coordinator has not written `agreed` yet
/// (nor did the round end).
fn mid_gather(dir: &Path) -> bool {
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
            let r = round.path();
            let proposed = std::fs::read_dir(&r)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("propose-"));
            if proposed
                && !["agreed", "published", "aborted"]
                    .iter()
                    .any(|f| r.join(f).exists())
            {
                return true;
            }
        }
    }
    false
}

/// Runs the job under `ckpt run` with a plain launcher and `kills` random SIGKILLs.
fn random_kills(test: &str, world: u32, steps: u64, kills: usize, extra: &[&str]) {
    random_kills_of(
        test,
        world,
        steps,
        kills,
        extra,
        &["one rank", "all ranks", "the launcher"],
    )
}

/// [`random_kills`] choosing what to kill among `whats`: "one rank", "all ranks", "the
/// launcher", or "the coordinator" (rank 0, which gathers every round), the latter at one of
/// three moments: while the round gathers proposals, mid-save, between saves.
fn random_kills_of(
    test: &str,
    world: u32,
    steps: u64,
    kills: usize,
    extra: &[&str],
    whats: &[&str],
) {
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
    let err_t = read_stderr(&mut child);
    let deadline = Instant::now() + Duration::from_secs(100);
    let mut done_kills = 0;
    // The newest checkpoint when the first kill came.
    let mut at_first_kill = None;
    'kills: for i in 0..kills {
        let what = whats[rng.usize(..whats.len())];
        let mut mid = rng.bool();
        // The coordinator is killed at each moment in turn: while the round gathers the
        // proposals (before `agreed`), mid-save, between saves.
        let gather = what == "the coordinator" && i % 3 == 0;
        if what == "the coordinator" {
            mid = i % 3 != 2;
        }
        // The newest checkpoint's number, not the count: retention keeps the count flat.
        let base = checkpoints(&dir).last().copied().unwrap_or(0);
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
            let ready = if gather {
                mid_gather(&dir)
            } else if mid {
                mid_save(&dir)
            } else {
                checkpoints(&dir).last().copied().unwrap_or(0) > base && !mid_save(&dir)
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
                    "the coordinator" => procs
                        .iter()
                        .filter(|p| p.1 == Some(0))
                        .map(|p| p.0)
                        .collect(),
                    _ => procs
                        .iter()
                        .filter(|p| p.1.is_none())
                        .map(|p| p.0)
                        .collect(),
                };
                if done_kills == 0 {
                    at_first_kill = Some(checkpoints(&dir).last().copied().unwrap_or(0));
                }
                for &p in &targets {
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                eprintln!(
                    "{test}: kill {i}: SIGKILL {what} {targets:?} {} (checkpoints {:?})",
                    if gather {
                        "mid-gather"
                    } else if mid {
                        "mid-save"
                    } else {
                        "between saves"
                    },
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
    let (st, err) = wait_end(&mut child, err_t, deadline, &dir, test);
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
    // Every planned kill found its moment (a test that quietly did fewer would prove less).
    assert_eq!(
        done_kills, kills,
        "{test}: only {done_kills} of {kills} kills happened"
    );
    if whats == ["the coordinator"] {
        // Later rounds published without the killed coordinator's process: a checkpoint
        // newer than the newest at the first kill.
        let newest = checkpoints(&dir).last().copied().unwrap_or(0);
        assert!(
            newest > at_first_kill.unwrap_or(0),
            "{test}: no checkpoint was published after the first kill (newest {newest})"
        );
    }
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

/// The coordinator (rank 0, which alone gathers the proposals and done markers, writes
/// `agreed` and publishes) SIGKILLed while a round gathers proposals, mid-save (other shards
/// waiting in the stage for its gather) and between saves: nothing partial is ever visible,
/// the launcher ends the others, the next launch's rounds publish, bit-identical result.
#[test]
fn coordinator_killed_mid_round_resumes_to_the_same_digest() {
    random_kills_of("coordinator", 4, 1000, 5, &[], &["the coordinator"]);
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
    rank_dying_mid_save(1);
}

/// The same with the coordinator (rank 0, which alone gathers and publishes): the other ranks
/// wait for an outcome that never comes, abandon the round after CKPT_ROUND_TIMEOUT (they do
/// not hang), nothing is published; then a new launch of the job on the same directory saves,
/// its round publishes, and its result is bit-identical to an uninterrupted run.
#[test]
fn coordinator_dying_mid_save_times_out_then_a_later_round_publishes() {
    let (_tmp, dir, out) = rank_dying_mid_save(0);
    let world = 4u32;
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::create_dir(&out).unwrap();
    let steps = 300;
    let mut args = trainer_args(steps, &out);
    args[6] = "0".into(); // --save-ms
    let mut kids: Vec<_> = (0..world)
        .map(|r| standalone_rank(&args, &dir, "standalone-test-2", r, world))
        .collect();
    wait_until(Duration::from_secs(10), "every rank's handlers", || {
        kids.iter().all(|k| catches_usr1(k.id()))
    });
    // One request to one rank is enough: the others join through the round.
    signal(kids[2].id(), libc::SIGUSR1);
    for (r, k) in kids.iter_mut().enumerate() {
        let st = wait_deadline(k, Duration::from_secs(60));
        assert!(st.success(), "rank {r}: {st}");
    }
    let published = checkpoints(&dir);
    assert_eq!(
        published.len(),
        1,
        "the later round did not publish once: {published:?}"
    );
    assert_complete_checkpoints(&dir, world);
    assert_eq!(combined(world, &out), reference(world, steps));
}

/// Rank `r` of `world` started directly on `dir` (no supervisor, no launcher).
fn standalone_rank(args: &[String], dir: &Path, run_id: &str, r: u32, world: u32) -> Running {
    let mut c = Command::new(&args[0]);
    c.args(&args[1..])
        .env("CKPT_DIR", dir)
        .env("CKPT_RUN_ID", run_id)
        .env("CKPT_ROUND_TIMEOUT", "1")
        .env("RANK", r.to_string())
        .env("WORLD_SIZE", world.to_string());
    for k in ["CKPT_SOCKET", "CKPT_RESTORE", "CKPT_SUPERVISOR_PID"] {
        c.env_remove(k);
    }
    c.spawn_guarded()
}

/// The process catches SIGUSR1 (SigCgt in /proc/<pid>/status): its client is up.
fn catches_usr1(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (libc::SIGUSR1 - 1)) != 0)
}

/// Four ranks started directly; rank `victim` is SIGKILLed in its 400 ms save; the others
/// abandon the round after the timeout and finish. Returns (the temporary directory, DIR, the
/// trainers' out dir).
fn rank_dying_mid_save(victim: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempdir();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let world = 4u32;
    let mut args = trainer_args(1500, &out);
    args[6] = "400".into(); // --save-ms: a long save to kill the victim in
    let mut kids: Vec<_> = (0..world)
        .map(|r| standalone_rank(&args, &dir, "standalone-test", r, world))
        .collect();
    // Request only once every rank caught SIGUSR1.
    wait_until(Duration::from_secs(10), "every rank's handlers", || {
        kids.iter().all(|k| catches_usr1(k.id()))
    });
    for k in &kids {
        signal(k.id(), libc::SIGUSR1);
    }
    // The victim is in its 400 ms save (its staging dir exists): kill it there.
    let pid1 = kids[victim].id() as i32;
    wait_until(
        Duration::from_secs(10),
        "the victim writing its shard",
        || {
            std::fs::read_dir(dir.join(".ckpt/staging"))
                .map(|rd| {
                    rd.flatten().any(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .ends_with(&format!(".{pid1}"))
                    })
                })
                .unwrap_or(false)
        },
    );
    signal(kids[victim].id(), libc::SIGKILL);
    let _ = kids[victim].wait();
    // The others finish their shards, wait, abandon the round and run to the end.
    for (r, k) in kids.iter_mut().enumerate() {
        if r == victim {
            continue;
        }
        let st = wait_deadline(k, Duration::from_secs(30));
        assert!(st.success(), "rank {r}: {st}");
    }
    assert!(
        checkpoints(&dir).is_empty(),
        "a checkpoint was published without rank {victim}'s shard: {:?}",
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
    (tmp, dir, out)
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

/// `ckpt run` (a request every 100 ms, `extra` options) of `world` ranks started by
/// `rank_launcher` running `args` (a `trainer_args`), stderr piped.
fn launched_ranks(dir: &Path, world: u32, extra: &[&str], args: &[String]) -> Command {
    let mut c = ckpt();
    c.args([
        "run",
        "--every",
        "100ms",
        "--backoff",
        "20ms..50ms",
        "--max-failures",
        "1",
        "--dir",
    ])
    .arg(dir)
    .args(extra)
    .arg("--")
    .arg(test_bin("rank_launcher"))
    .args(["--n", &world.to_string(), "--"])
    .args(args)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

/// `--restore-check client` with 4 ranks: one byte of rank 2's shard of the newest
/// checkpoint is flipped (every size intact, so the supervisor's check passes it); rank 2's
/// client finds it as it reads its shard and reports it; the supervisor verifies, sets the
/// checkpoint aside, kills the whole job and relaunches it from the one before, not counted
/// as a failure; the job ends with the uninterrupted digest.
#[test]
fn a_damaged_shard_under_restore_check_client_is_reported_by_its_rank_and_resumed_past() {
    let (world, steps) = (4u32, 300u64);
    let tmp = tempdir();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let args = trainer_args(steps, &out);
    let run = |check: bool| {
        let extra: &[&str] = if check {
            &["--restore-check", "client"]
        } else {
            &[]
        };
        launched_ranks(&dir, world, extra, &args)
    };
    // A first run, stopped once it has two checkpoints.
    let mut first = run(false).spawn_guarded();
    let err_t = read_stderr(&mut first);
    wait_until(Duration::from_secs(60), "two checkpoints", || {
        checkpoints(&dir).len() >= 2
    });
    signal(first.id(), libc::SIGTERM);
    let st = wait_deadline(&mut first, Duration::from_secs(60));
    let err = err_t.join().unwrap();
    assert_eq!(st.code(), Some(75), "{err}");
    let cks = checkpoints(&dir);
    let newest = *cks.last().unwrap();
    let shard = dir
        .join(format!("ckpt-{newest:012}"))
        .join("rank-00002/state.bin");
    let mut b = std::fs::read(&shard).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x10;
    std::fs::write(&shard, b).unwrap();

    let mut second = run(true).spawn_guarded();
    let err_t = read_stderr(&mut second);
    let st = wait_deadline(&mut second, Duration::from_secs(120));
    let err = err_t.join().unwrap();
    assert!(st.success(), "{err}");
    let rejected = events(&dir, "restore_rejected");
    assert_eq!(rejected.len(), 1, "{err}");
    assert_eq!(rejected[0]["seq"], newest, "{rejected:?}");
    let q: Vec<String> = std::fs::read_dir(dir.join("quarantine"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".reason.txt"))
        .collect();
    assert_eq!(q.len(), 1, "{q:?}");
    assert!(q[0].starts_with(&format!("ckpt-{newest:012}.")), "{q:?}");
    let launches = events(&dir, "launch");
    let n = launches.len();
    assert_eq!(launches[n - 2]["restore_seq"], newest, "{launches:?}");
    assert!(
        launches[n - 1]["restore_seq"]
            .as_u64()
            .is_some_and(|s| s < newest),
        "{launches:?}"
    );
    assert!(
        events(&dir, "restart")
            .iter()
            .any(|r| r["restore_rejected"] == true),
        "{err}"
    );
    assert_eq!(
        combined(world, &out),
        reference(world, steps),
        "the resumed job's global digest differs from an uninterrupted run\n{err}"
    );
    assert_no_survivors(&dir);
}

/// The default `--restore-check auto` with 4 ranks: the first resume is verified in full;
/// once every rank's client has said it verified its whole shard (`restore_verified`, one per
/// rank), the next `ckpt run` reads the checkpoint once (`restore_check` `client`), and the
/// job ends with the uninterrupted digest.
#[test]
fn under_restore_check_auto_every_rank_vouches_before_a_resume_is_read_once() {
    let (world, steps) = (4u32, 300u64);
    let tmp = tempdir();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // Without padding: each rank's shard is its state.bin alone, which it reads back whole
    // (a rank that left a file of its shard unread would not vouch).
    let mut args = trainer_args(steps, &out);
    let pad = args.iter().position(|a| a == "--pad-kib").unwrap();
    args[pad + 1] = "0".into();
    let run = || launched_ranks(&dir, world, &[], &args);
    // Two runs stopped once they have new checkpoints: fresh, then the first resume.
    for _ in 0..2 {
        let want = checkpoints(&dir).last().copied().unwrap_or(0) + 2;
        let mut sup = run().spawn_guarded();
        let err_t = read_stderr(&mut sup);
        wait_until(Duration::from_secs(60), "two new checkpoints", || {
            checkpoints(&dir).last().is_some_and(|&s| s >= want)
        });
        signal(sup.id(), libc::SIGTERM);
        let st = wait_deadline(&mut sup, Duration::from_secs(60));
        let err = err_t.join().unwrap();
        assert_eq!(st.code(), Some(75), "{err}");
    }
    let launches = events(&dir, "launch");
    assert_eq!(launches[1]["restore_check"], "full", "{launches:?}");
    let heard = events(&dir, "restore_verified");
    let mut ranks: Vec<u64> = heard.iter().filter_map(|e| e["rank"].as_u64()).collect();
    ranks.sort();
    assert_eq!(ranks, vec![0, 1, 2, 3], "{heard:?}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(".ckpt/restore-check.json")).unwrap())
            .unwrap();
    assert_eq!(rec["ranks"], world, "{rec}");
    let mut last = run().spawn_guarded();
    let err_t = read_stderr(&mut last);
    let st = wait_deadline(&mut last, Duration::from_secs(120));
    let err = err_t.join().unwrap();
    assert!(st.success(), "{err}");
    let launches = events(&dir, "launch");
    assert_eq!(
        launches[2]["restore_check"], "client",
        "{launches:?}\n{err}"
    );
    assert_eq!(
        combined(world, &out),
        reference(world, steps),
        "the resumed job's global digest differs from an uninterrupted run\n{err}"
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
    // About 35 s alone; up to 60 s seen with the other multi-rank tests running beside it on
    // 2 busy cores (the same on the previous protocol's build): room for that.
    let deadline = Instant::now() + Duration::from_secs(120);
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

/// Per-rank cost of a save round, from an `strace` of one rank: (round files of other ranks
/// it touched, file-system calls on `.ckpt/rounds` it made, rounds it proposed in).
fn traced_costs(trace: &str, rank: u32) -> (u64, u64, u64) {
    let own = format!("{rank:05}");
    let (mut others, mut ops, mut rounds) = (0, 0, 0);
    for line in trace.lines() {
        if line.contains("/.ckpt/rounds/") {
            ops += 1;
        }
        if line.contains("rename") && line.contains(&format!("/propose-{own}\"")) {
            rounds += 1;
        }
        // `.../propose-00003"` or `.../done-00003"`: a rank's file (temporary names have a
        // dot before them and a token after).
        for prefix in ["/propose-", "/done-"] {
            let mut rest = line;
            while let Some(i) = rest.find(prefix) {
                rest = &rest[i + prefix.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if digits.len() == 5 && rest[5..].starts_with('"') && digits != own {
                    others += 1;
                }
            }
        }
    }
    (others, ops, rounds)
}

/// Runs `world` ranks, each under `strace`, through several save rounds under `ckpt run`;
/// returns per rank (other ranks' round files touched, calls on the rounds, rounds).
fn round_costs(world: u32) -> Vec<(u64, u64, u64)> {
    let tmp = tempdir();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut args = trainer_args(250, &out);
    args[6] = "0".into(); // --save-ms
    args[8] = "4".into(); // --pad-kib
    let mut cmd = ckpt();
    cmd.args(["run", "--quiet", "--every", "150ms", "--dir"])
        .arg(&dir)
        .env("CKPT_ROUND_TIMEOUT", "60")
        .arg("--")
        .arg(test_bin("rank_launcher"))
        .args(["--n", &world.to_string(), "--"])
        .args([
            "sh",
            "-c",
            "exec strace -f -qq -e trace=%file,getdents64 -o \"$0/strace-$RANK\" \"$@\"",
        ])
        .arg(&out)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let o = output_deadline(&mut cmd, Duration::from_secs(180));
    assert!(
        o.status.success(),
        "{world} ranks under strace failed: {}\n{}",
        text(&o.stderr),
        diagnose(&dir)
    );
    assert_complete_checkpoints(&dir, world);
    (0..world)
        .map(|r| {
            let t = std::fs::read_to_string(out.join(format!("strace-{r}"))).unwrap();
            traced_costs(&t, r)
        })
        .collect()
}

/// The cost of a save round per rank is flat in the number of ranks (docs/multi-rank.md,
/// "Scale"): every rank runs under `strace`; a rank other than the coordinator never touches
/// another rank's `propose-*` or `done-*` file (it reads the round's `agreed`, `published`,
/// `aborted`), the coordinator reads each at most once per round; so over all ranks, at most
/// 2 (N-1) such calls per round, under 2 per rank, with 2 ranks as with 16. (Before the
/// coordinator, every rank read every proposal at every look and looked for every done
/// marker: at least 2 (N-1) per rank and round.)
#[test]
fn round_cost_per_rank_is_flat_in_the_number_of_ranks() {
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "strace is needed: scripts/setup must install it (Debian package strace)"
        );
        eprintln!("skipped: strace is not installed");
        return;
    }
    for world in [2u32, 16] {
        let costs = round_costs(world);
        let rounds = costs[0].2;
        assert!(rounds >= 2, "{world} ranks: only {rounds} round(s)");
        let per_rank: f64 =
            costs.iter().map(|c| c.0).sum::<u64>() as f64 / (world as f64 * rounds as f64);
        let ops: Vec<f64> = costs.iter().map(|c| c.1 as f64 / c.2 as f64).collect();
        eprintln!(
            "{world} ranks, {rounds} rounds: other ranks' round files touched per rank and round {per_rank:.2}; calls on the rounds per round: coordinator {:.0}, other ranks {:?}",
            ops[0],
            ops[1..].iter().map(|o| o.round() as u64).collect::<Vec<_>>()
        );
        for (r, c) in costs.iter().enumerate().skip(1) {
            assert_eq!(
                c.0, 0,
                "{world} ranks: rank {r} touched other ranks' round files {} times in {} rounds",
                c.0, c.2
            );
        }
        assert!(
            costs[0].0 <= 2 * (world as u64 - 1) * costs[0].2,
            "{world} ranks: the coordinator touched other ranks' round files {} times in {} rounds (at most once each per round)",
            costs[0].0,
            costs[0].2
        );
        assert!(
            per_rank < 2.0,
            "{world} ranks: {per_rank:.2} per rank and round"
        );
    }
}

// ---- a stop that cannot complete; late ranks (docs/multi-rank.md) ----

/// The ranks of an srun step on `dir` (the trainer processes, not srun's or env's): (pid,
/// `SLURM_PROCID`).
fn srun_rank_pids(dir: &Path, python: bool) -> Vec<(i32, u32)> {
    job_processes(dir)
        .into_iter()
        .filter_map(|p| {
            let env = std::fs::read(format!("/proc/{p}/environ")).ok()?;
            let rank = env
                .split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"SLURM_PROCID="))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())?;
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let exe = std::fs::read_link(format!("/proc/{p}/exe")).unwrap_or_default();
            let trainer = if python {
                exe.to_string_lossy().contains("python")
                    && text(&cmd).contains("python_rank_trainer.py")
            } else {
                exe.ends_with("rank_trainer")
            };
            trainer.then_some((p, rank))
        })
        .collect()
}

/// `ckpt run -- srun -K -n 4` with one rank SIGKILLed between saves and then mid-save: srun
/// ends the step by SIGTERM (and SIGKILL only KillWait = 30 s later); the survivors, asked to
/// stop, cannot complete a stop round without the dead rank, so they give up after the stop
/// timeout (CKPT_STOP_TIMEOUT = 2 s here), name the rank that never joined and exit 143
/// (docs/multi-rank.md, "A stop that cannot complete"). They must be gone within 5 s plus the
/// stop timeout of the kill (before: they ran on until KillWait, 5-30 s); no partial
/// checkpoint is published, and the relaunched job ends bit-identical.
#[test]
fn srun_survivors_of_a_killed_rank_stop_within_the_stop_timeout() {
    srun_survivors("srun_survivors", false);
}

/// The same with the Python client's ranks.
#[test]
fn srun_python_survivors_of_a_killed_rank_stop_within_the_stop_timeout() {
    srun_survivors("srun_python_survivors", true);
}

fn srun_survivors(test: &str, python: bool) {
    if !ensure_cluster(test) {
        return;
    }
    let seed = seed(test);
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempdir();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let steps = 1500;
    let stop_timeout = Duration::from_secs(2);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut job = trainer_args(steps, &out);
    if python {
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
            "#!/bin/bash\nexport CKPT_STOP_TIMEOUT={}ms\nexec {} run --every 300ms --backoff 20ms..100ms --max-failures 10 --dir {} -- srun -K -n 4 {}\n",
            stop_timeout.as_millis(),
            ckpt_bin().display(),
            dir.display(),
            job.join(" ")
        ),
    )
    .unwrap();
    let sb = output_deadline(
        slurm_cmd("sbatch")
            .arg("--parsable")
            .arg(format!("--job-name=ckpt-survivors-{}", std::process::id()))
            .arg("-n4")
            .arg("--time=3")
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
    let _cancel = Cancel(id);
    let log = || std::fs::read_to_string(tmp.path().join("job.out")).unwrap_or_default();
    let finished = || dir.join(".ckpt/finished").exists();
    let deadline = Instant::now() + Duration::from_secs(150);
    let bound = Duration::from_secs(5) + stop_timeout;
    let mut gone_after = Vec::new();
    for mid in [false, true] {
        let base = checkpoints(&dir).last().copied().unwrap_or(0);
        let victim = rng.u32(..4);
        let launches = events(&dir, "launch").len();
        // Between saves: a new checkpoint of this launch, no save running. Mid-save: a rank
        // writing its shard or shards in a round's stage.
        let (pid, ranks) = loop {
            assert!(
                Instant::now() < deadline && !finished(),
                "{test}: no moment to kill rank {victim} (mid-save {mid})\n{}\n{}",
                log(),
                diagnose(&dir)
            );
            let ranks = srun_rank_pids(&dir, python);
            let newest = checkpoints(&dir).last().copied().unwrap_or(0);
            let ready = ranks.len() == 4
                && if mid {
                    newest > 0 && mid_save(&dir)
                } else {
                    newest > base && !mid_save(&dir)
                };
            if let Some(&(p, _)) = ranks.iter().find(|&&(_, r)| r == victim).filter(|_| ready) {
                break (p, ranks);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t = Instant::now();
        eprintln!(
            "{test}: SIGKILL rank {victim} (pid {pid}) {}, checkpoints {:?}",
            if mid { "mid-save" } else { "between saves" },
            checkpoints(&dir)
        );
        loop {
            let alive: Vec<i32> = ranks
                .iter()
                .map(|&(p, _)| p)
                .filter(|&p| srun_rank_pids(&dir, python).iter().any(|&(q, _)| q == p))
                .collect();
            if alive.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < bound,
                "{test}: ranks {alive:?} still run {:?} after rank {victim} was killed (bound {bound:?})\n{}\n{}",
                t.elapsed(),
                log(),
                diagnose(&dir)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "{test}: the survivors of rank {victim} ({}) were gone {:?} after the kill (bound {bound:?})",
            if mid { "mid-save" } else { "between saves" },
            t.elapsed()
        );
        gone_after.push(t.elapsed());
        wait_until(
            deadline.saturating_duration_since(Instant::now()),
            "the relaunch",
            || events(&dir, "launch").len() > launches || finished(),
        );
        assert!(
            !finished(),
            "{test}: the job finished instead of relaunching"
        );
    }
    while !finished() {
        assert!(
            Instant::now() < deadline,
            "{test}: job did not finish\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = log();
    assert!(
        log.contains("the stop checkpoint cannot complete") && log.contains("never joined"),
        "{test}: no survivor said which rank never joined:\n{log}"
    );
    assert_eq!(
        combined(4, &out),
        reference(4, steps),
        "{test}: digest differs\n{log}"
    );
    assert_restores_complete(&out, 4);
    assert_complete_checkpoints(&dir, 4);
    eprintln!(
        "{test}: survivors gone after {gone_after:?}, checkpoints {:?}",
        checkpoints(&dir)
    );
}

/// Ranks whose steps end in a collective (`rank_trainer --barrier`: all ranks meet every
/// step, as in DDP) of a few ms, started directly; only rank 0 is signalled (the others as on
/// another node, finding the round at most every 100 ms). Rank 0 proposes and reaches its
/// proposal long before the others look; before, it blocked there while the others blocked in
/// the next step's barrier, until CKPT_ROUND_TIMEOUT. Now the coordinator moves the round's
/// horizon on (docs/multi-rank.md, "Late ranks"): every request must be published within 5 s
/// (the round timeout is 120 s here), three times, and the job ends bit-identical.
#[test]
fn late_ranks_in_a_collective_converge_quickly() {
    late_ranks("late_ranks", None, false);
}

/// The same with `CKPT_ROUND_LOOKAHEAD=0`: rank 0 blocks at once at its proposal, a sure
/// deadlock before.
#[test]
fn late_ranks_in_a_collective_converge_quickly_with_lookahead_0() {
    late_ranks("late_ranks_lookahead_0", Some(0), false);
}

/// Python ranks, lookahead 0.
#[test]
fn late_python_ranks_in_a_collective_converge_quickly() {
    late_ranks("late_python_ranks", Some(0), true);
}

fn late_ranks(test: &str, lookahead: Option<u64>, python: bool) {
    let tmp = tempdir();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    let bar = tmp.path().join("barrier");
    std::fs::create_dir(&out).unwrap();
    std::fs::create_dir(&bar).unwrap();
    let world = 4u32;
    let steps = if python { 2500 } else { 4000 };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut args = trainer_args(steps, &out);
    args[4] = "1".into(); // --step-ms
    args[6] = "0".into(); // --save-ms
    args.extend(["--barrier".into(), bar.display().to_string()]);
    if python {
        args[0] = repo
            .join("test-programs/python_rank_trainer.py")
            .display()
            .to_string();
        args.insert(0, "python3".into());
    }
    let mut kids: Vec<Running> = (0..world)
        .map(|r| {
            let mut c = Command::new(&args[0]);
            c.args(&args[1..])
                .env("CKPT_DIR", &dir)
                .env("CKPT_RUN_ID", "late")
                .env("CKPT_ROUND_TIMEOUT", "120")
                .env("PYTHONPATH", repo.join("python/src"))
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string());
            match lookahead {
                Some(l) => c.env("CKPT_ROUND_LOOKAHEAD", l.to_string()),
                None => c.env_remove("CKPT_ROUND_LOOKAHEAD"),
            };
            for k in ["CKPT_SOCKET", "CKPT_RESTORE", "CKPT_SUPERVISOR_PID"] {
                c.env_remove(k);
            }
            c.spawn_guarded()
        })
        .collect();
    wait_until(Duration::from_secs(20), "every rank's handlers", || {
        kids.iter().all(|k| catches_usr1(k.id()))
    });
    let mut took = Vec::new();
    for i in 0..3 {
        let before = checkpoints(&dir).len();
        let t = Instant::now();
        signal(kids[0].id(), libc::SIGUSR1);
        loop {
            if checkpoints(&dir).len() > before {
                break;
            }
            assert!(
                kids.iter_mut().all(|k| k.try_wait().unwrap().is_none()),
                "{test}: a rank ended before request {i} was published\n{}",
                diagnose(&dir)
            );
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{test}: request {i} to rank 0 was not published within 5 s (late ranks not waited for?)\n{}",
                diagnose(&dir)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        eprintln!("{test}: request {i} published after {:?}", t.elapsed());
        took.push(t.elapsed());
    }
    for (r, k) in kids.iter_mut().enumerate() {
        let st = wait_deadline(k, Duration::from_secs(120));
        assert!(st.success(), "{test}: rank {r}: {st}");
    }
    assert_eq!(combined(world, &out), reference(world, steps), "{test}");
    assert_complete_checkpoints(&dir, world);
    eprintln!("{test}: requests published after {took:?}");
}

/// Ranks 0 and 1 of a world of two in epoch `epoch` of a fresh store (round timeout 30 s),
/// and the directory of their first round: for the step-by-step tests of the round rules.
struct TwoRanks {
    _tmp: tempfile::TempDir,
    r0: ckpt::multi_rank::MultiRank,
    r1: ckpt::multi_rank::MultiRank,
    rd: PathBuf,
}

fn two_ranks(epoch: &str) -> TwoRanks {
    use ckpt::multi_rank::{MultiRank, World};
    let tmp = tempdir();
    let store = ckpt::store::Store::new(tmp.path().join("ckpt"));
    store.create().unwrap();
    let rank = |r: u32| {
        let mut m = MultiRank::new(&store, World::new(r, 2).unwrap(), epoch).unwrap();
        m.set_timeout(Duration::from_secs(30));
        m
    };
    TwoRanks {
        r0: rank(0),
        r1: rank(1),
        rd: store.private().join("rounds").join(epoch).join("00000001"),
        _tmp: tmp,
    }
}

/// docs/multi-rank.md, "Late ranks", step by step (the Rust side of
/// python/tests/test_multi_rank.py::test_a_late_rank_follows_the_coordinators_horizon): rank 0
/// proposes 10 + 2 and waits at its bound 12; rank 1 has not looked yet. After the longest
/// pause (20 ms) rank 0 writes `horizon` 14 and runs on; rank 1, late, proposes 13 + 2 = 15;
/// the agreed step is the highest of the proposals and the horizon, and both ranks are true
/// there only.
#[test]
fn a_late_rank_follows_the_coordinators_horizon() {
    let TwoRanks {
        _tmp,
        mut r0,
        mut r1,
        rd,
    } = two_ranks("h.0");
    let read = |n: &str| text(&std::fs::read(rd.join(n)).unwrap());
    assert!(!r0.poll(true, false, 10).unwrap());
    assert!(!r0.poll(false, false, 11).unwrap());
    let t = Instant::now();
    assert!(
        !r0.poll(false, false, 12).unwrap(),
        "rank 0 passed its bound without an agreement"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "rank 0 waited at its bound instead of moving the horizon on"
    );
    assert_eq!(read("horizon"), r#"{"step":14}"#);
    assert!(!rd.join("agreed").exists());
    assert!(!r0.poll(false, false, 13).unwrap());
    // Rank 1 looks for the first time at its position 13: it joins and proposes 15.
    assert!(!r1.poll(false, false, 13).unwrap());
    assert_eq!(read("propose-00001"), r#"{"step":15,"stop":false}"#);
    assert!(!r0.poll(false, false, 14).unwrap()); // at its bound: gathers both proposals
    assert_eq!(read("agreed"), r#"{"step":15,"stop":false}"#);
    assert!(!r1.poll(false, false, 14).unwrap());
    assert!(r0.poll(false, false, 15).unwrap() && r1.poll(false, false, 15).unwrap());
}

/// docs/multi-rank.md, "Waiting": the request reaches rank 1 one step before rank 0 (ranks in
/// a collective every step). Rank 1 proposes 468 + 2 = 470, rank 0 joins at 469 and proposes
/// 471. At 470 rank 1 blocks at its proposal; rank 0, one step before its own, must gather
/// then (every call), not "every 20 ms": it would otherwise go on into the next collective,
/// which needs rank 1, and both would wait until the round timeout (the real torchrun test's
/// deadlock). The agreed step is 471, and both ranks are true there only.
#[test]
fn the_coordinator_gathers_at_every_call_before_its_proposal() {
    let TwoRanks {
        _tmp,
        mut r0,
        mut r1,
        rd,
    } = two_ranks("g.0");
    let read = |n: &str| text(&std::fs::read(rd.join(n)).unwrap());
    assert!(!r1.poll(true, false, 468).unwrap());
    assert_eq!(read("propose-00001"), r#"{"step":470,"stop":false}"#);
    assert!(!r0.poll(true, false, 469).unwrap());
    assert_eq!(read("propose-00000"), r#"{"step":471,"stop":false}"#);
    // Rank 0's next call comes at once (a short step): it gathers there.
    assert!(!r0.poll(false, false, 470).unwrap());
    assert!(
        rd.join("agreed").exists(),
        "rank 0 did not gather one step before its proposal: rank 1, blocked at 470, would wait for it"
    );
    assert_eq!(read("agreed"), r#"{"step":471,"stop":false}"#);
    assert!(!r1.poll(false, false, 470).unwrap());
    assert!(r0.poll(false, false, 471).unwrap() && r1.poll(false, false, 471).unwrap());
}

/// An explicit step that is not the count of calls (docs/multi-rank.md, "Which step"): both
/// ranks give ckpt 10 x their loop's step (`rank_trainer --step-scale 10`:
/// `should_checkpoint_at(10 i)`, the save with `Some(10 i)`), while a request's proposal is the
/// position plus the lookahead (2). Every checkpoint must record the explicit step (10 x the
/// loop step of every shard); the job, all ranks SIGKILLed after a checkpoint, must resume from
/// it (the restore sees that step) and end bit-identical.
#[test]
fn explicit_steps_apart_from_the_call_count_publish_and_resume() {
    let test = "explicit_steps";
    let (world, steps, scale) = (2u32, 400u64, 10u64);
    let tmp = tempdir();
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut child = ckpt()
        .args([
            "run",
            "--quiet",
            "--every",
            "150ms",
            "--backoff",
            "20ms..100ms",
        ])
        .arg("--dir")
        .arg(&dir)
        .env("CKPT_ROUND_TIMEOUT", "10")
        .arg("--")
        .arg(test_bin("rank_launcher"))
        .args(["--n", &world.to_string(), "--"])
        .args(trainer_args(steps, &out))
        .args(["--step-scale", &scale.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let err_t = read_stderr(&mut child);
    let deadline = Instant::now() + Duration::from_secs(60);
    // A published checkpoint, no save running, every rank up: SIGKILL all ranks.
    loop {
        if child.try_wait().unwrap().is_some() {
            let err = err_t.join().unwrap();
            panic!("{test}: the job ended before any checkpoint was published\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "{test}: no checkpoint in time\n{}",
            diagnose(&dir)
        );
        let ranks: Vec<i32> = job_ranks(&dir)
            .into_iter()
            .filter_map(|(p, r)| r.map(|_| p))
            .collect();
        if !checkpoints(&dir).is_empty() && !mid_save(&dir) && ranks.len() == world as usize {
            for &p in &ranks {
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            eprintln!(
                "{test}: SIGKILL all ranks {ranks:?} (checkpoints {:?})",
                checkpoints(&dir)
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (st, err) = wait_end(&mut child, err_t, deadline, &dir, test);
    assert!(st.success(), "{test}: ckpt run failed ({st}):\n{err}");
    assert!(
        !err.contains("abandon") && !err.contains("past its save point"),
        "{test}: a save round failed:\n{err}"
    );
    // One launch, the kill, one relaunch: no other failure.
    assert_eq!(events(&dir, "launch").len(), 2, "{test}: launches\n{err}");
    assert_eq!(
        combined(world, &out),
        reference(world, steps),
        "{test}: the resumed job's global digest differs from an uninterrupted run\n{err}"
    );
    assert_complete_checkpoints(&dir, world);
    // Each checkpoint records the explicit step: 10 x the loop step in every shard.
    let store = ckpt::store::Store::new(&dir);
    let seqs = checkpoints(&dir);
    assert!(!seqs.is_empty());
    for &seq in &seqs {
        let m = store.verify(seq).unwrap();
        for r in 0..world {
            let b =
                std::fs::read(dir.join(format!("ckpt-{seq:012}/rank-{r:05}/state.bin"))).unwrap();
            let own = u64::from_le_bytes(b[0..8].try_into().unwrap());
            assert_eq!(
                m.step,
                Some(own * scale),
                "{test}: checkpoint {seq}, rank {r}: loop step {own}"
            );
        }
    }
    // The relaunch resumed from an explicit step (rank_trainer asserts the shard agrees).
    let restores = assert_restores_complete(&out, world);
    assert!(restores >= world as usize, "{test}: no resume");
    let log = std::fs::read_to_string(out.join("restores.log")).unwrap();
    for l in log.lines() {
        let step: u64 = l.split(' ').nth(5).unwrap().parse().unwrap();
        assert!(step > 0 && step % scale == 0, "{test}: restored {l}");
    }
    assert_no_survivors(&dir);
    eprintln!("{test}: {restores} shard restores, checkpoints {seqs:?}");
}

/// Waits for the supervisor until `deadline`; on a timeout it is killed and the test fails
/// showing its stderr and what it saw (`diagnose`). Returns its status and stderr.
fn wait_end(
    child: &mut Running,
    err_t: std::thread::JoinHandle<String>,
    deadline: Instant,
    dir: &Path,
    test: &str,
) -> (std::process::ExitStatus, String) {
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, err_t.join().unwrap());
        }
        if Instant::now() > deadline {
            let diag = diagnose(dir);
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            let err = err_t.join().unwrap();
            panic!("{test}: job did not finish in time\n--- stderr\n{err}\n{diag}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
