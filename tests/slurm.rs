//! `ckpt run` under a real Slurm (slurmctld + slurmd + munged, started by
//! `scripts/slurm/start-local-slurm.sh`; Slurm 22.05 from Debian here).
//!
//! Without a cluster: when root, the tests start one (about 0.5 s, plus the apt install on the
//! first run); otherwise they skip, except when `CI` is set: then they FAIL. Every job has a
//! unique name, every wait a hard deadline, and a guard cancels the job if a test fails.
//! A requeued job waits cred_expire + 1 = 11 s before it runs again (the script's setting).
//! Longest test: `time_limit_*` (about 40 s); nextest runs them in parallel.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckpt::integrations::slurm::parse_show_job;
use common::slurm::*;
use common::*;

/// Cancels the job when the test ends, however it ends.
struct JobGuard(String);
impl Drop for JobGuard {
    fn drop(&mut self) {
        let _ = slurm_cmd("scancel").arg(&self.0).output();
    }
}

struct T {
    name: String,
    work: tempfile::TempDir,
}

impl T {
    fn new(test: &str) -> T {
        let work = tempdir();
        // slurmd runs jobs as root here; keep the directory readable anyway
        std::fs::set_permissions(
            work.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        T {
            name: format!("ckpt-{test}-{}", std::process::id()),
            work,
        }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.work.path().join(p)
    }
    /// Submits a batch script (body after the shebang); returns the job id.
    fn submit(&self, body: &str, args: &[&str]) -> (String, JobGuard) {
        let script = self.path("job.sh");
        std::fs::write(&script, format!("#!/bin/bash\n{body}\n")).unwrap();
        let out = output_deadline(
            slurm_cmd("sbatch")
                .arg("--parsable")
                .arg(format!("--job-name={}", self.name))
                .arg(format!("--chdir={}", self.work.path().display()))
                .arg(format!(
                    "--output={}/job-%a.out",
                    self.work.path().display()
                ))
                .arg("--open-mode=append")
                .args(args)
                .arg(&script),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "sbatch failed: {}", text(&out.stderr));
        let id = text(&out.stdout)
            .trim()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        eprintln!(
            "{}: submitted job {id} in {}",
            self.name,
            self.work.path().display()
        );
        (id.clone(), JobGuard(id))
    }
    fn output(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(self.work.path()).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("job-") && n.ends_with(".out") {
                s += &format!(
                    "--- {n}\n{}",
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                );
            }
        }
        s
    }
}

fn show_job(id: &str) -> BTreeMap<String, String> {
    let out = slurm_cmd("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .expect("scontrol");
    parse_show_job(&text(&out.stdout))
}

fn wait_for(t: &T, timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!(
                "{}: timed out after {timeout:?} waiting for: {what}\n{}",
                t.name,
                t.output()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scancel_batch_usr1(id: &str) {
    let out = slurm_cmd("scancel")
        .args(["-b", "-s", "USR1", id])
        .output()
        .expect("scancel");
    assert!(
        out.status.success(),
        "scancel -b -s USR1 {id}: {}",
        text(&out.stderr)
    );
}

const STEPS: u64 = 200;
const DIM: usize = 32;
const STEP_MS: u64 = 40;

fn trainer_cmd(steps: u64, digest: &Path) -> String {
    format!(
        "{} __trainer --steps {steps} --dim {DIM} --step-ms {STEP_MS} --digest-file {}",
        ckpt_bin().display(),
        digest.display()
    )
}

/// The `slurm` events' restart counts, in order.
fn restart_counts(ck: &Path) -> Vec<u64> {
    events(ck, "slurm")
        .iter()
        .map(|e| e["restart_count"].as_u64().unwrap())
        .collect()
}

fn read_digest(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The batch shell gets USR1 (`scancel -b`, as from `--signal=B:USR1@N`): checkpoint, requeue,
/// a second run with SLURM_RESTART_COUNT=1 resumes and ends with the uninterrupted digest.
#[test]
fn warning_signal_checkpoints_requeues_and_resumes() {
    if !ensure_cluster("warning_signal") {
        return;
    }
    let t = T::new("warn");
    let ck = t.path("ck");
    let digest = t.path("digest");
    let body = format!(
        "exec {} run --dir {} --every off -- {}",
        ckpt_bin().display(),
        ck.display(),
        trainer_cmd(STEPS, &digest)
    );
    let t0 = Instant::now();
    let (id, _g) = t.submit(&body, &["--requeue", "--time=5"]);
    wait_for(
        &t,
        Duration::from_secs(60),
        "the trainer announced itself",
        || !events(&ck, "hello").is_empty(),
    );
    std::thread::sleep(Duration::from_secs(1));
    let t_sig = Instant::now();
    scancel_batch_usr1(&id);
    wait_for(&t, Duration::from_secs(30), "requeued event", || {
        !events(&ck, "requeued").is_empty()
    });
    eprintln!("{}: USR1 -> requeued in {:?}", t.name, t_sig.elapsed());
    let req = &events(&ck, "requeued")[0];
    assert_eq!(req["code"], 79, "{req}");
    assert!(!events(&ck, "slurm_warning").is_empty());
    assert!(
        !events(&ck, "committed").is_empty(),
        "no checkpoint before the requeue\n{}",
        t.output()
    );
    wait_for(
        &t,
        Duration::from_secs(90),
        "the second run finished",
        || read_digest(&digest).is_some(),
    );
    eprintln!("{}: submit -> finished in {:?}", t.name, t0.elapsed());
    assert_eq!(
        read_digest(&digest).unwrap(),
        reference(STEPS, DIM),
        "digest differs from an uninterrupted run\n{}",
        t.output()
    );
    assert_eq!(restart_counts(&ck), vec![0, 1], "{}", t.output());
    let launches = events(&ck, "launch");
    assert!(
        launches.last().unwrap()["restore_seq"].as_u64().is_some(),
        "second run did not resume: {launches:?}"
    );
    wait_for(&t, Duration::from_secs(30), "JobState=COMPLETED", || {
        show_job(&id).get("JobState").map(String::as_str) == Some("COMPLETED")
    });
    assert_eq!(show_job(&id).get("Restarts").map(String::as_str), Some("1"));
    assert!(
        t.output().contains("SLURM_RESTART_COUNT=1"),
        "{}",
        t.output()
    );
    assert_no_survivors(&ck);
}

/// No `--signal` at all: ckpt reads the end time (squeue %e on 22.05) and stops `--slurm-margin`
/// before it, checkpointed, long before Slurm's SIGTERM/SIGKILL; requeued, it resumes.
/// About 40 s: the shortest time limit is 1 minute.
#[test]
fn time_limit_stops_before_the_end_and_resumes() {
    if !ensure_cluster("time_limit") {
        return;
    }
    let t = T::new("tlim");
    let ck = t.path("ck");
    let digest = t.path("digest");
    let steps = 450; // 18 s of work: more than the first run's ~12 s window
    let body = format!(
        "exec {} run --dir {} --every off --slurm-margin 48s -- {}",
        ckpt_bin().display(),
        ck.display(),
        trainer_cmd(steps, &digest)
    );
    let t0 = Instant::now();
    let (id, _g) = t.submit(&body, &["--requeue", "--time=1"]);
    wait_for(
        &t,
        Duration::from_secs(60),
        "slurm_time_limit event",
        || !events(&ck, "slurm_time_limit").is_empty(),
    );
    let ev = &events(&ck, "slurm_time_limit")[0];
    let left = ev["left_ms"].as_u64().unwrap();
    eprintln!(
        "{}: stopped {left} ms before the limit, {:?} after submit",
        t.name,
        t0.elapsed()
    );
    assert!((40_000..=49_000).contains(&left), "{ev}");
    let first = events(&ck, "slurm")[0].clone();
    assert!(first["end_time"].as_u64().is_some(), "{first}");
    wait_for(&t, Duration::from_secs(30), "requeued event", || {
        !events(&ck, "requeued").is_empty()
    });
    let committed_before = events(&ck, "committed");
    assert!(
        !committed_before.is_empty(),
        "no checkpoint at the time-limit stop\n{}",
        t.output()
    );
    wait_for(
        &t,
        Duration::from_secs(90),
        "the second run finished",
        || read_digest(&digest).is_some(),
    );
    eprintln!("{}: submit -> finished in {:?}", t.name, t0.elapsed());
    assert_eq!(
        read_digest(&digest).unwrap(),
        reference(steps, DIM),
        "{}",
        t.output()
    );
    assert_eq!(restart_counts(&ck), vec![0, 1], "{}", t.output());
    assert!(events(&ck, "launch").last().unwrap()["restore_seq"]
        .as_u64()
        .is_some());
    assert_eq!(show_job(&id).get("Restarts").map(String::as_str), Some("1"));
    assert_no_survivors(&ck);
}

/// Two array tasks; the warning goes to task 1 only: it alone is requeued (`A_1`), task 0
/// runs through once.
#[test]
fn array_task_requeues_alone() {
    if !ensure_cluster("array") {
        return;
    }
    let t = T::new("array");
    let body = format!(
        "exec {} run --dir {}/ck$SLURM_ARRAY_TASK_ID --every off -- {} __trainer --steps {STEPS} --dim {DIM} --step-ms {STEP_MS} --digest-file {}/digest$SLURM_ARRAY_TASK_ID",
        ckpt_bin().display(),
        t.work.path().display(),
        ckpt_bin().display(),
        t.work.path().display(),
    );
    let (array, _g) = t.submit(&body, &["--requeue", "--time=5", "--array=0-1"]);
    let (ck0, ck1) = (t.path("ck0"), t.path("ck1"));
    wait_for(&t, Duration::from_secs(60), "task 1 announced", || {
        !events(&ck1, "hello").is_empty()
    });
    std::thread::sleep(Duration::from_secs(1));
    scancel_batch_usr1(&format!("{array}_1"));
    wait_for(&t, Duration::from_secs(30), "task 1 requeued", || {
        !events(&ck1, "requeued").is_empty()
    });
    assert_eq!(events(&ck1, "requeued")[0]["target"], format!("{array}_1"));
    for i in 0..2 {
        let d = t.path(&format!("digest{i}"));
        wait_for(
            &t,
            Duration::from_secs(90),
            &format!("task {i} finished"),
            || read_digest(&d).is_some(),
        );
        assert_eq!(
            read_digest(&d).unwrap(),
            reference(STEPS, DIM),
            "task {i}\n{}",
            t.output()
        );
    }
    assert_eq!(
        restart_counts(&ck0),
        vec![0],
        "task 0 must not be requeued\n{}",
        t.output()
    );
    assert_eq!(restart_counts(&ck1), vec![0, 1], "{}", t.output());
    assert!(events(&ck0, "requeued").is_empty());
    assert_eq!(
        show_job(&format!("{array}_0"))
            .get("Restarts")
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(
        show_job(&format!("{array}_1"))
            .get("Restarts")
            .map(String::as_str),
        Some("1")
    );
    assert_no_survivors(&ck0);
    assert_no_survivors(&ck1);
}

/// `ckpt run -- srun trainer` in the batch script: the trainer is a child of slurmstepd, not
/// of ckpt; ckpt accepts its hello (same Slurm job, same supervisor) and its periodic and
/// stop requests reach it across srun; the job then requeues and resumes as usual.
#[test]
fn srun_step_gets_the_requests() {
    if !ensure_cluster("srun") {
        return;
    }
    let t = T::new("srun");
    let ck = t.path("ck");
    let digest = t.path("digest");
    let body = format!(
        "exec {} run --dir {} --every 2s -- srun -n1 {}",
        ckpt_bin().display(),
        ck.display(),
        trainer_cmd(STEPS, &digest)
    );
    let (id, _g) = t.submit(&body, &["--requeue", "--time=5"]);
    wait_for(
        &t,
        Duration::from_secs(60),
        "a periodic checkpoint from the srun step",
        || !events(&ck, "committed").is_empty(),
    );
    assert!(
        events(&ck, "bad_hello").is_empty(),
        "hello from the srun step was refused\n{}",
        t.output()
    );
    let hello_pid = events(&ck, "hello")[0]["pid"].as_u64().unwrap();
    let leader = events(&ck, "launch")[0]["pid"].as_u64().unwrap();
    assert_ne!(
        hello_pid, leader,
        "the hello should come from the step, not from srun"
    );
    scancel_batch_usr1(&id);
    wait_for(&t, Duration::from_secs(30), "requeued event", || {
        !events(&ck, "requeued").is_empty()
    });
    wait_for(
        &t,
        Duration::from_secs(90),
        "the second run finished",
        || read_digest(&digest).is_some(),
    );
    assert_eq!(
        read_digest(&digest).unwrap(),
        reference(STEPS, DIM),
        "{}",
        t.output()
    );
    assert_eq!(restart_counts(&ck), vec![0, 1], "{}", t.output());
    assert!(events(&ck, "launch").last().unwrap()["restore_seq"]
        .as_u64()
        .is_some());
    assert_no_survivors(&ck);
}

/// A job submitted with `--no-requeue`: ckpt checkpoints, says why it cannot requeue, and
/// exits 75 (here: the job's exit code, since ckpt is the batch shell).
#[test]
fn not_requeueable_job_exits_75() {
    if !ensure_cluster("no_requeue") {
        return;
    }
    let t = T::new("noreq");
    let ck = t.path("ck");
    let digest = t.path("digest");
    let body = format!(
        "exec {} run --dir {} --every off -- {}",
        ckpt_bin().display(),
        ck.display(),
        trainer_cmd(STEPS, &digest)
    );
    let (id, _g) = t.submit(&body, &["--no-requeue", "--time=5"]);
    wait_for(&t, Duration::from_secs(60), "hello", || {
        !events(&ck, "hello").is_empty()
    });
    scancel_batch_usr1(&id);
    wait_for(&t, Duration::from_secs(30), "not_requeued event", || {
        !events(&ck, "not_requeued").is_empty()
    });
    let ev = &events(&ck, "not_requeued")[0];
    assert!(
        ev["detail"].as_str().unwrap().contains("not requeueable"),
        "{ev}"
    );
    wait_for(&t, Duration::from_secs(30), "job ended", || {
        show_job(&id)
            .get("JobState")
            .is_some_and(|s| s == "FAILED" || s == "COMPLETED")
    });
    let job = show_job(&id);
    assert_eq!(
        job.get("ExitCode").map(String::as_str),
        Some("75:0"),
        "{job:?}"
    );
    assert!(!events(&ck, "committed").is_empty());
    assert!(read_digest(&digest).is_none());
    assert_no_survivors(&ck);
}

/// No cluster needed: inside a "Slurm job" whose tools are missing (a container), the
/// warning signal still checkpoints and stops, and ckpt says clearly that it cannot requeue
/// and exits 75.
#[test]
fn missing_scontrol_is_reported_and_exits_75() {
    let dir = tempdir();
    let ck = dir.path().join("ck");
    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let mut child = ckpt()
        .env("PATH", &empty)
        .env("SLURM_JOB_ID", "4242")
        .env("SLURM_RESTART_COUNT", "3")
        .env_remove("SLURM_JOB_END_TIME")
        .args(["run", "--dir"])
        .arg(&ck)
        .args(["--every", "off", "--"])
        .arg(ckpt_bin())
        .args([
            "__trainer",
            "--steps",
            "100000",
            "--dim",
            "8",
            "--step-ms",
            "10",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn_guarded();
    let err_t = read_stderr(&mut child);
    wait_until(Duration::from_secs(20), "hello", || {
        !events(&ck, "hello").is_empty()
    });
    signal(child.id(), libc::SIGUSR1);
    let st = wait_deadline(&mut child, Duration::from_secs(30));
    let err = err_t.join().unwrap();
    assert_eq!(st.code(), Some(75), "{err}");
    assert!(err.contains("SLURM_RESTART_COUNT=3"), "{err}");
    assert!(err.contains("`squeue` not found"), "{err}");
    assert!(err.contains("`scontrol` not found"), "{err}");
    assert!(err.contains("requeue itself"), "{err}");
    assert!(!events(&ck, "committed").is_empty(), "{err}");
    assert_no_survivors(&ck);
}

/// The time limit itself, with the end-time watch off (`--slurm-margin off`): at the limit
/// Slurm sends SIGTERM to every process of the job (ckpt and the trainer), SIGKILL KillWait
/// (30 s) later. The trainer's client saves on that one SIGTERM (ckpt must not send a second
/// one, which would make the client exit at once); ckpt requeues; the next run resumes.
/// LONG: the limit fires 60-90 s after the start (Slurm checks every 30 s).
#[test]
fn time_limit_sigterm_checkpoints_before_sigkill() {
    if !ensure_cluster("time_limit_sigterm") {
        return;
    }
    let t = T::new("tterm");
    let ck = t.path("ck");
    let digest = t.path("digest");
    let steps = 2_500; // 100 s of work: the limit always comes first
    let body = format!(
        "exec {} run --dir {} --every off --slurm-margin off -- {}",
        ckpt_bin().display(),
        ck.display(),
        trainer_cmd(steps, &digest)
    );
    let t0 = Instant::now();
    let (id, _g) = t.submit(&body, &["--requeue", "--time=1"]);
    wait_for(
        &t,
        Duration::from_secs(150),
        "stop at the time limit",
        || !events(&ck, "stop_requested").is_empty(),
    );
    eprintln!(
        "{}: SIGTERM at the limit {:?} after submit",
        t.name,
        t0.elapsed()
    );
    wait_for(
        &t,
        Duration::from_secs(40),
        "ckpt's verdict after the stop",
        || !events(&ck, "requeued").is_empty() || !events(&ck, "not_requeued").is_empty(),
    );
    let committed = events(&ck, "committed");
    assert!(
        !committed.is_empty(),
        "no checkpoint after SIGTERM\n{}",
        t.output()
    );
    let exits = events(&ck, "exit");
    assert_eq!(
        exits[0]["signaled"],
        false,
        "the trainer was killed, not stopped: {exits:?}\n{}",
        t.output()
    );
    assert!(
        !events(&ck, "requeued").is_empty(),
        "not requeued: {:?}\n{}",
        events(&ck, "not_requeued"),
        t.output()
    );
    // the second run resumes; stop it early with the warning, we only need the resume
    wait_for(
        &t,
        Duration::from_secs(60),
        "the second run launched",
        || events(&ck, "launch").len() >= 2,
    );
    let l = events(&ck, "launch");
    assert_eq!(
        l[1]["restore_seq"],
        committed.last().unwrap()["seq"],
        "{l:?}"
    );
    assert_eq!(restart_counts(&ck), vec![0, 1]);
    let _ = slurm_cmd("scancel").arg(&id).output();
    wait_for(&t, Duration::from_secs(60), "job processes gone", || {
        job_processes(&ck).is_empty()
    });
    eprintln!("{}: done in {:?}", t.name, t0.elapsed());
}

#[test]
fn a_margin_longer_than_the_time_limit_leaves_the_job_its_share() {
    // The livelock: `--time=1` with the default 60 s margin used to stop the job ~30 ms after
    // its launch (before it could announce a client), requeue, and do it again, forever.
    if !ensure_cluster("margin_cap") {
        return;
    }
    let t = T::new("mcap");
    let ck = t.path("ck");
    let digest = t.path("digest");
    let steps = 150; // 6 s of work: well inside a quarter of the minute
    let body = format!(
        "exec {} run --dir {} --every off -- {}",
        ckpt_bin().display(),
        ck.display(),
        trainer_cmd(steps, &digest)
    );
    let (_id, _g) = t.submit(&body, &["--requeue", "--time=1"]);
    wait_for(&t, Duration::from_secs(60), "the job to finish", || {
        read_digest(&digest).is_some() && !events(&ck, "finished").is_empty()
    });
    let adapted = events(&ck, "slurm_margin_adapted");
    assert_eq!(adapted.len(), 1, "{}", t.output());
    let margin = adapted[0]["margin_ms"].as_u64().unwrap();
    let left = adapted[0]["left_ms"].as_u64().unwrap();
    assert!(margin <= left * 3 / 4 + 1, "{}", adapted[0]);
    assert!(events(&ck, "requeued").is_empty(), "{}", t.output());
    assert!(events(&ck, "slurm_time_limit").is_empty(), "{}", t.output());
    assert_eq!(read_digest(&digest).unwrap(), reference(steps, DIM));
    assert_no_survivors(&ck);
}

// ---------------------------------------------------------------------------------------
// `ckpt run --transparent` (CRIU) under Slurm: no client in the job.

/// Why CRIU cannot be used here, if it cannot (as in tests/transparent.rs).
fn criu_skip_reason() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    let criu = std::env::var_os("CKPT_CRIU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/ckpt/criu-4.1.1/criu"));
    match std::process::Command::new(&criu)
        .arg("check")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        other => Some(format!("`{} check`: {other:?}", criu.display())),
    }
}

/// A job without a client: an LCG over 1..=n with a 1 ms sleep every 100 iterations (n =
/// 1,500,000: about 17 s), a start marker appended to `starts`, the result in `result`, a
/// last line on stdout (the Slurm output file: the restored job's stdout is handed over).
const COUNT_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    unsigned long long n = strtoull(argv[1], 0, 10), acc = 0;
    FILE *f = fopen("starts", "a"); fprintf(f, "start\n"); fclose(f);
    struct timespec ts = {0, 1000000};
    for (unsigned long long i = 1; i <= n; i++) {
        acc = acc * 6364136223846793005ULL + i;
        if (i % 100 == 0) nanosleep(&ts, 0);
    }
    f = fopen("result.tmp", "w"); fprintf(f, "%llu %llu", n, acc); fclose(f);
    rename("result.tmp", "result");
    printf("count: done with %llu\n", n);
    return 0;
}
"#;

fn lcg(n: u64) -> String {
    let mut acc: u64 = 0;
    for i in 1..=n {
        acc = acc.wrapping_mul(6364136223846793005).wrapping_add(i);
    }
    format!("{n} {acc}")
}

/// Compiles COUNT_C as `count` in the test's directory (the job's working directory).
fn compile_count(t: &T) {
    let src = t.path("count.c");
    std::fs::write(&src, COUNT_C).unwrap();
    let out = output_deadline(
        std::process::Command::new("cc")
            .args(["-O1", "-o"])
            .arg(t.path("count"))
            .arg(&src),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "cc: {}", text(&out.stderr));
}

/// The voluntary context switches (one per 1 ms sleep: its progress) of the test's `count`
/// process (0 if it is not running).
fn count_sleeps(t: &T) -> u64 {
    let (Ok(rd), Ok(work)) = (std::fs::read_dir("/proc"), t.work.path().canonicalize()) else {
        return 0;
    };
    for e in rd.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim() != "count" || std::fs::read_link(p.join("cwd")).ok().as_ref() != Some(&work)
        {
            continue;
        }
        let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
        return status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
    }
    0
}

/// After a transparent job's stop and requeue: it finishes with the uninterrupted result,
/// started once (each requeued run restored it with CRIU: the count continued), and Slurm
/// ran it once more per stop (a loaded machine may need a third run under a time limit).
fn transparent_job_resumed(t: &T, id: &str, ck: &Path, n: u64) {
    wait_for(t, Duration::from_secs(30), "requeued event", || {
        !events(ck, "requeued").is_empty()
    });
    assert!(!events(ck, "dumped").is_empty(), "{}", t.output());
    assert!(!t.path("result").exists(), "finished before its stop");
    wait_for(
        t,
        Duration::from_secs(120),
        "the second run finished",
        || read_digest(&t.path("result")).is_some() && !events(ck, "finished").is_empty(),
    );
    assert_eq!(
        read_digest(&t.path("result")).unwrap(),
        lcg(n),
        "{}",
        t.output()
    );
    let starts = std::fs::read_to_string(t.path("starts")).unwrap_or_default();
    assert_eq!(
        starts.lines().count(),
        1,
        "the job started from scratch again\n{}",
        t.output()
    );
    let counts = restart_counts(ck);
    let stops = counts.len() as u64 - 1;
    assert!(stops >= 1, "{}", t.output());
    assert_eq!(counts, (0..=stops).collect::<Vec<_>>(), "{}", t.output());
    assert_eq!(
        events(ck, "kill_after_dump").len() as u64,
        stops,
        "{}",
        t.output()
    );
    // Every requeued run restored the dump of the stop before it.
    let launches = events(ck, "launch");
    let dumped = events(ck, "dumped");
    for l in &launches[1..] {
        assert!(
            dumped.iter().any(|d| d["seq"] == l["restore_seq"]),
            "a requeued run did not restore a dump: {l}\n{}",
            t.output()
        );
    }
    // The restored job wrote to the requeued run's output file (`--inherit-fd`).
    assert!(
        t.output().contains(&format!("count: done with {n}")),
        "{}",
        t.output()
    );
    assert_eq!(
        launches.last().unwrap()["restore_seq"],
        dumped.last().unwrap()["seq"],
        "the last run did not restore the last stop's dump: {launches:?}\n{}",
        t.output()
    );
    assert!(
        events(ck, "transparent_unavailable").is_empty(),
        "{}",
        t.output()
    );
    assert!(events(ck, "restore_failed").is_empty(), "{}", t.output());
    wait_for(t, Duration::from_secs(30), "JobState=COMPLETED", || {
        show_job(id).get("JobState").map(String::as_str) == Some("COMPLETED")
    });
    assert_eq!(
        show_job(id).get("Restarts").cloned(),
        Some(stops.to_string())
    );
    assert_no_survivors(ck);
}

/// The batch script of docs/transparent.md ("Under Slurm"), as written there (only `ckpt`
/// replaced by the binary under test; `sbatch --time=5` on the command line overrides its
/// 24 h): the warning (`scancel -b -s USR1`, what `--signal=B:USR1@180` sends) makes ckpt
/// dump the job, kill it and requeue it; the requeued run restores it with CRIU.
#[test]
fn transparent_recipe_warning_dumps_requeues_and_restores() {
    if let Some(why) = criu_skip_reason() {
        eprintln!("transparent_recipe: SKIPPED: {why}");
        return;
    }
    if !ensure_cluster("transparent_recipe") {
        return;
    }
    let t = T::new("crwarn");
    compile_count(&t);
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/transparent.md"))
            .unwrap();
    let recipe = doc
        .split_once("\n## Under Slurm\n")
        .and_then(|(_, rest)| rest.split_once("```bash\n"))
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block.to_string())
        .expect("docs/transparent.md: no bash block under \"## Under Slurm\"");
    assert!(recipe.contains("exec ckpt run --transparent"), "{recipe}");
    let body = recipe.replace(
        "exec ckpt run",
        &format!("exec {} run", ckpt_bin().display()),
    );
    let n = 1_500_000;
    assert!(body.contains(&format!("./count {n}")), "{body}");
    let ck = t.path("ck");
    let (id, _g) = t.submit(&body, &["--time=5"]);
    wait_for(&t, Duration::from_secs(60), "the job started", || {
        t.path("starts").exists() && !events(&ck, "launch").is_empty()
    });
    // Let the count get under way (a tenth of it: 1,500 of its 1 ms sleeps) before the
    // warning, so that the dump catches it mid-computation.
    wait_for(&t, Duration::from_secs(60), "the count under way", || {
        count_sleeps(&t) >= 1_500
    });
    scancel_batch_usr1(&id);
    transparent_job_resumed(&t, &id, &ck, n);
}

/// A 1-minute time limit: ckpt's end-time watch (`--slurm-margin 48s`, adapted to leave the
/// job a quarter of its time) stops the transparent job with a CRIU dump before the limit,
/// requeues it, and the requeued run restores it. About 45 s.
#[test]
fn transparent_time_limit_dumps_requeues_and_restores() {
    if let Some(why) = criu_skip_reason() {
        eprintln!("transparent_time_limit: SKIPPED: {why}");
        return;
    }
    if !ensure_cluster("transparent_time_limit") {
        return;
    }
    let t = T::new("crtlim");
    compile_count(&t);
    let ck = t.path("ck");
    let n = 1_800_000; // about 20 s of work: more than the first run's ~15 s window
    let body = format!(
        "exec {} run --transparent --dir {} --every off --slurm-margin 48s -- ./count {n}",
        ckpt_bin().display(),
        ck.display()
    );
    let (id, _g) = t.submit(&body, &["--requeue", "--time=1"]);
    wait_for(
        &t,
        Duration::from_secs(60),
        "slurm_time_limit event",
        || !events(&ck, "slurm_time_limit").is_empty(),
    );
    transparent_job_resumed(&t, &id, &ck, n);
}
