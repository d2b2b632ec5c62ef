//! The supervisor's rules, each one a finding of a user trial that failed on the old
//! supervisor (issue "The supervisor as one explicit state machine"): the crash-loop guard
//! counts only real progress, unanswered requests are noticed, requests never pile up, a
//! hello cannot choose a deadly signal or another process, every signal ends ckpt cleanly,
//! a dead supervisor's orphans are ended by the next run, a job that never progresses is not
//! stopped and run again forever, and a blocked client does not hold a SIGTERM for long.
//! The pure transition rules are unit-tested in `src/supervisor/machine.rs`.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn pid_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
}

/// `ckpt run -q [extra] --dir DIR -- plain --ms 60000` (a job without a client that runs for
/// a minute), once it is launched.
fn supervise_plain(dir: &Path, extra: &[&str]) -> Running {
    let n = events(dir, "launch").len();
    let child = ckpt()
        .args(["run", "-q"])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .arg("--")
        .arg(test_bin("plain"))
        .args(["--ms", "60000"])
        .stderr(Stdio::null())
        .spawn_guarded();
    wait_until(T, "the launch", || events(dir, "launch").len() > n);
    child
}

/// The pid a job wrote into `path`.
fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn sh(script: &str) -> Vec<String> {
    vec!["bash".into(), "-c".into(), script.into()]
}

#[test]
fn a_job_that_saves_the_same_step_and_crashes_is_given_up_on() {
    // Old supervisor: any new checkpoint counted as progress, so this looped forever
    // (157 restarts in 10 minutes with --max-failures 1).
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let script = format!(
        "echo state > {w}/f && {ckpt} save --step 5 {w}/f && exit 3",
        w = tmp.path().display(),
        ckpt = ckpt_bin().display()
    );
    let out = output_deadline(
        ckpt()
            .args([
                "run",
                "--max-failures",
                "1",
                "--backoff",
                "10ms..20ms",
                "--dir",
            ])
            .arg(&dir)
            .arg("--")
            .args(sh(&script)),
        T,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(events(&dir, "launch").len(), 2, "{err}");
    let give_up = events(&dir, "give_up");
    assert_eq!(give_up.len(), 1, "{err}");
    let commits = events(&dir, "committed");
    assert_eq!(commits.len(), 2, "{err}");
    assert_eq!(commits[0]["progress"], true);
    assert_eq!(commits[1]["progress"], false, "{err}");
    assert!(err.contains("not beyond"), "{err}");
    // `ckpt stats` does not count the second launch's time as useful.
    let stats = output_deadline(ckpt().args(["stats", "--json", "--dir"]).arg(&dir), T);
    let s: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(s["checkpoints_without_progress"], 1, "{s}");
}

#[test]
fn unanswered_requests_are_warned_with_the_likely_cause() {
    // Old supervisor: 6 requests, 0 commits, exit 0, and not a word.
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let out = output_deadline(
        ckpt()
            .args(["run", "--every", "100ms", "--dir"])
            .arg(&dir)
            .arg("--")
            .arg(test_bin("nosaver"))
            .args(["--ms", "4500"]),
        T,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let warned = events(&dir, "unanswered");
    assert_eq!(warned.len(), 1, "{err}");
    assert!(err.contains("should_checkpoint() returns true"), "{err}");
    // One request at a time: never more than one per answer timeout (2 s floor).
    let requests = events(&dir, "request").len();
    assert!((2..=6).contains(&requests), "{requests} requests: {err}");
    let stats = output_deadline(ckpt().args(["stats", "--json", "--dir"]).arg(&dir), T);
    let s: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert!(s["unanswered_requests"].as_u64().unwrap() >= 1, "{s}");
}

#[test]
fn requests_never_pile_up_on_a_slow_failing_save() {
    // A shell job whose save trap takes longer than the interval and fails: the old
    // supervisor sent a request every 150 ms, and the job spent its time in the trap.
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let script = format!(
        r#"
n=0
trap 'sleep 0.4; {ckpt} save --step $n {w}/missing-file 2>/dev/null' USR1
while [ $n -lt 40 ]; do sleep 0.025 & wait $!; n=$((n+1)); done
"#,
        ckpt = ckpt_bin().display(),
        w = tmp.path().display()
    );
    let out = output_deadline(
        ckpt()
            .args(["run", "--signal", "USR1", "--every", "150ms", "--dir"])
            .arg(&dir)
            .arg("--")
            .args(sh(&script)),
        T,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let requests = events(&dir, "request").len();
    assert!(requests <= 10, "{requests} requests for a 1 s job: {err}");
}

/// A job that sends a hand-made hello: `signal` as its request signal, `pid` as its pid
/// (`$$` for its own), then lives `ms` and exits 0.
fn forged_hello(signal: &str, pid: &str) -> String {
    format!(
        r#"python3 - <<'PY'
import os, socket, json, time
pid = os.getpid() if "{pid}" == "self" else int("{pid}")
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(json.dumps({{"type": "hello", "v": 1, "pid": pid, "signal": {signal}, "client": "forged"}}).encode(), os.environ["CKPT_SOCKET"])
time.sleep(1.5)
PY"#
    )
}

#[test]
fn a_hello_cannot_choose_a_deadly_signal_or_another_process() {
    for (signal, pid, why) in [
        ("9", "self", "cannot be caught"),
        ("19", "self", "cannot be caught"),
        ("15", "self", "stop"),
        ("0", "self", "not a signal"),
        ("999", "self", "not a signal"),
        ("10", "1", "sent by pid"),
    ] {
        let tmp = tempdir();
        let dir = tmp.path().join("ck");
        let out = output_deadline(
            ckpt()
                .args(["run", "--every", "100ms", "--dir"])
                .arg(&dir)
                .arg("--")
                .args(sh(&forged_hello(signal, pid))),
            T,
        );
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "signal {signal} pid {pid}: {err}"
        );
        let bad = events(&dir, "bad_hello");
        assert_eq!(bad.len(), 1, "signal {signal} pid {pid}: {err}");
        assert!(
            bad[0]["reason"].as_str().unwrap().contains(why),
            "signal {signal} pid {pid}: {}",
            bad[0]
        );
        assert!(events(&dir, "hello").is_empty());
        assert!(events(&dir, "request").is_empty(), "{err}");
    }
}

#[test]
fn every_deadly_signal_to_ckpt_stops_the_job_and_profiling_signals_are_ignored() {
    // Old supervisor: USR2, ALRM, XCPU, VTALRM, PROF and ABRT killed ckpt by their default
    // action and left the whole job running.
    for sig in [libc::SIGUSR2, libc::SIGALRM, libc::SIGXCPU, libc::SIGABRT] {
        let tmp = tempdir();
        let dir = tmp.path().join("ck");
        let mut child = supervise_plain(&dir, &["--kill-after", "2s"]);
        signal(child.id(), sig);
        assert_eq!(
            wait_deadline(&mut child, T).code(),
            Some(75),
            "signal {sig}"
        );
        assert_eq!(events(&dir, "stop_requested")[0]["signal"], sig);
        assert_no_survivors(&dir);
    }
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let mut child = supervise_plain(&dir, &[]);
    for sig in [libc::SIGVTALRM, libc::SIGPROF] {
        signal(child.id(), sig);
    }
    wait_until(T, "both signals to be logged as ignored", || {
        events(&dir, "signal_ignored").len() == 2
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "ckpt died of a profiling signal"
    );
    signal(child.id(), libc::SIGTERM);
    assert_eq!(wait_deadline(&mut child, T).code(), Some(75));
    assert_no_survivors(&dir);
}

fn cgroup2_available() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|m| m.lines().any(|l| l.contains(" - cgroup2 ")))
        && unsafe { libc::geteuid() } == 0
}

#[test]
fn the_next_run_ends_what_a_sigkilled_supervisor_left() {
    // Grandchildren that setsid() away survive a SIGKILL of the supervisor (PDEATHSIG only
    // reaches its own child); the next `ckpt run` on the directory ends them.
    if !cgroup2_available() {
        eprintln!("skipped: needs root and a cgroup2 hierarchy (the /proc walk cannot find processes of a dead supervisor)");
        return;
    }
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let pidf = tmp.path().join("orphan.pid");
    let script = format!(
        "setsid bash -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 600' & wait",
        p = pidf.display()
    );
    let mut sup = ckpt()
        .args(["run", "-q", "--dir"])
        .arg(&dir)
        .arg("--")
        .args(sh(&script))
        .stderr(Stdio::null())
        .spawn_guarded();
    wait_until(T, "the orphan-to-be to start", || pidf.exists());
    let orphan = read_pid(&pidf);
    signal(sup.id(), libc::SIGKILL);
    let _ = sup.wait();
    // PDEATHSIG takes the job's leader; the setsid() grandchild lives on.
    let leader = events(&dir, "launch")[0]["pid"].as_i64().unwrap() as i32;
    wait_until(T, "the leader to die with ckpt", || !pid_alive(leader));
    assert!(pid_alive(orphan), "the scenario needs a survivor");
    let out = output_deadline(
        ckpt().args(["run", "--dir"]).arg(&dir).args(["--", "true"]),
        T,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    wait_until(Duration::from_secs(5), "the orphan to be gone", || {
        !pid_alive(orphan)
    });
    let killed = events(&dir, "leftovers_killed");
    assert_eq!(killed.len(), 1, "{err}");
    assert_no_survivors(&dir);
}

#[test]
fn a_job_stopped_again_and_again_without_progress_is_given_up_on() {
    // The Slurm livelock's general form: each run stops the job before it made progress,
    // and asks to be run (requeued) again, forever. After --max-stops-without-progress
    // stops in a row, ckpt exits 76 instead.
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let run = |dir: &Path| {
        let mut child = supervise_plain(dir, &["--max-stops-without-progress", "2"]);
        signal(child.id(), libc::SIGTERM);
        let code = wait_deadline(&mut child, T).code();
        assert_no_survivors(dir);
        code
    };
    assert_eq!(run(&dir), Some(75));
    assert_eq!(run(&dir), Some(75));
    assert_eq!(run(&dir), Some(76));
    let stalled = events(&dir, "stalled");
    assert_eq!(stalled.len(), 1);
    assert_eq!(stalled[0]["stops_without_progress"], 3);
}

#[test]
fn a_blocked_client_does_not_hold_a_sigterm_for_long() {
    // torchrun SIGTERMs the surviving ranks when one dies and SIGKILLs them 30 s later; a
    // flag-only handler kept a rank blocked outside ckpt's code alive for the full 30 s.
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let pidf = tmp.path().join("pid");
    let mut sup = ckpt()
        .args([
            "run",
            "-q",
            "--every",
            "off",
            "--max-failures",
            "1",
            "--dir",
        ])
        .arg(&dir)
        .arg("--")
        .arg(test_bin("blocker"))
        .arg("--pid-file")
        .arg(&pidf)
        .env("CKPT_STOP_TIMEOUT", "1s")
        .stderr(Stdio::piped())
        .spawn_guarded();
    wait_until(T, "the job to block", || pidf.exists());
    let pid = read_pid(&pidf) as u32;
    // The SIGTERM comes from the launcher, not from ckpt.
    signal(pid, libc::SIGTERM);
    wait_until(Duration::from_secs(10), "the blocked job to exit", || {
        !events(&dir, "exit").is_empty()
    });
    let exits = events(&dir, "exit");
    assert_eq!(exits[0]["exit"], 143, "{exits:?}");
    signal(sup.id(), libc::SIGTERM);
    let _ = wait_deadline(&mut sup, T);
    assert_no_survivors(&dir);
}

#[test]
fn checkpoint_on_a_job_without_a_client_has_its_own_exit_code() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let mut sup = supervise_plain(&dir, &[]);
    let out = output_deadline(ckpt().args(["checkpoint", "--dir"]).arg(&dir), T);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("has not announced a ckpt client"));
    // `ckpt stop` says that no checkpoint was taken.
    let out = output_deadline(ckpt().args(["stop", "--dir"]).arg(&dir), T);
    assert_eq!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(err.contains("no checkpoint was taken"), "{err}");
    assert_eq!(wait_deadline(&mut sup, T).code(), Some(75));
    assert_no_survivors(&dir);
}

#[test]
fn a_command_without_dashes_gets_a_hint() {
    let out = output_deadline(
        ckpt().args(["run", "--dir", "/nonexistent/x", "python3", "train.py"]),
        T,
    );
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(
        err.contains("hint: the job's command goes after `--`: ckpt run --dir /nonexistent/x -- python3 train.py"),
        "{err}"
    );
}

#[test]
fn durations_too_long_and_unusable_signals_are_refused() {
    for args in [
        vec!["--every", "18446744073709551615s"],
        vec!["--backoff", "1s..18446744073709551615s"],
        vec!["--signal", "SEGV"],
        vec!["--signal", "32"],
        vec!["--signal", "TERM"],
    ] {
        let out = output_deadline(
            ckpt()
                .arg("run")
                .args(&args)
                .args(["--dir", "/tmp/ckpt-never-created", "--", "true"]),
            T,
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Errors become exit codes in one place (`ErrKind::code`, called at the CLI's edge): no
/// source file outside `src/exit.rs` builds a `Fatal` from a number or names an error's code.
#[test]
fn errors_become_exit_codes_only_at_the_cli_edge() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    let mut offenders = Vec::new();
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if p.extension().is_none_or(|e| e != "rs") || p.ends_with("exit.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for (n, line) in text.lines().enumerate() {
            let error_code = [
                "USAGE",
                "DATA",
                "SOFTWARE",
                "CANT_CREATE",
                "IO",
                "NOT_RUNNING",
                "NO_CLIENT",
                "CANNOT_EXECUTE",
                "NOT_FOUND",
            ]
            .iter()
            .any(|c| {
                line.contains(&format!("exit_codes::{c}"))
                    && !line.contains(&format!("exit_codes::{c}_"))
            });
            if error_code || line.contains("code: ") && line.contains("Fatal") {
                offenders.push(format!("{}:{}: {}", p.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "error codes picked outside src/exit.rs (use an ErrKind):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_exit_code_table_is_one_table() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("## Exit codes of `ckpt run`")
        .nth(1)
        .expect("README has the exit code section");
    let rows: Vec<(String, String)> = section
        .lines()
        .skip_while(|l| !l.starts_with("| code |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
            (cells[0].trim().to_string(), cells[1].trim().to_string())
        })
        .collect();
    let table: Vec<(String, String)> = ckpt::supervisor::exit_codes::TABLE
        .iter()
        .map(|(c, w)| (c.to_string(), w.to_string()))
        .collect();
    assert_eq!(
        rows, table,
        "README's exit code table differs from exit_codes::TABLE"
    );
    let help = output_deadline(ckpt().args(["run", "--help"]), T);
    let help = text(&help.stdout);
    for (code, _) in ckpt::supervisor::exit_codes::TABLE {
        assert!(
            help.contains(&format!("  {code} ")),
            "`ckpt run --help` lacks {code}"
        );
    }
}

#[test]
fn a_directory_deleted_under_a_running_supervisor_is_noticed_and_taken_back() {
    // Old supervisor: deaf (its sockets gone) with no warning; `ckpt status` said "no
    // supervisor running" while it ran on.
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let digest = tmp.path().join("digest");
    let mut sup = ckpt()
        .args(["run", "-q", "--every", "200ms", "--dir"])
        .arg(&dir)
        .arg("--")
        .args(trainer_args(100_000, 16, 2, &digest))
        .stderr(Stdio::piped())
        .spawn_guarded();
    wait_until(T, "a first checkpoint", || {
        !events(&dir, "committed").is_empty()
    });
    std::fs::remove_dir_all(&dir).unwrap();
    // Noticed at once (that warning goes to stderr: the log went with the directory), made
    // again after DIR_GRACE (10 s), or at once by a relaunch (the job's save failed).
    wait_until(T, "the directory to be made again", || {
        !events(&dir, "dir_made_again").is_empty()
    });
    let st = output_deadline(ckpt().args(["status", "--json", "--dir"]).arg(&dir), T);
    assert_eq!(st.status.code(), Some(0), "{}", text(&st.stderr));
    // The job's next checkpoint lands in the new directory, and the lock is held again.
    wait_until(T, "a checkpoint in the new directory", || {
        !checkpoints(&dir).is_empty()
    });
    let second = output_deadline(
        ckpt().args(["run", "--dir"]).arg(&dir).args(["--", "true"]),
        T,
    );
    assert_eq!(second.status.code(), Some(73), "{}", text(&second.stderr));
    let stop = output_deadline(ckpt().args(["stop", "--dir"]).arg(&dir), T);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop.stderr));
    assert_eq!(wait_deadline(&mut sup, T).code(), Some(75));
    assert_no_survivors(&dir);
}

/// A small ext4 file system on a loop device, unmounted (and thawed) on drop.
struct LoopFs {
    mnt: std::path::PathBuf,
    frozen: std::cell::Cell<bool>,
}

impl LoopFs {
    fn new(tmp: &Path) -> Option<LoopFs> {
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let img = tmp.join("fs.img");
        let mnt = tmp.join("mnt");
        std::fs::create_dir(&mnt).ok()?;
        let ok = |c: &mut std::process::Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(std::process::Command::new("truncate")
            .args(["-s", "64M"])
            .arg(&img))
            || !ok(std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&img))
            || !ok(std::process::Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt))
        {
            return None;
        }
        Some(LoopFs {
            mnt,
            frozen: false.into(),
        })
    }
    fn freeze(&self, on: bool) {
        let st = std::process::Command::new("fsfreeze")
            .arg(if on { "-f" } else { "-u" })
            .arg(&self.mnt)
            .status()
            .unwrap();
        assert!(st.success());
        self.frozen.set(on);
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.frozen.get() {
            let _ = std::process::Command::new("fsfreeze")
                .arg("-u")
                .arg(&self.mnt)
                .status();
        }
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

/// Thaws the file system when dropped: declared after the supervisor's guard, it is dropped
/// first (a process blocked on a frozen file system cannot die until it thaws).
struct Thaw<'a>(&'a LoopFs);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        if self.0.frozen.get() {
            self.0.freeze(false);
        }
    }
}

#[test]
fn a_frozen_file_system_does_not_make_the_supervisor_deaf() {
    // Old supervisor: its one loop did the disk I/O, so `status` and `stop --no-checkpoint`
    // timed out while the file system was frozen.
    let tmp = tempdir();
    let Some(fs) = LoopFs::new(tmp.path()) else {
        eprintln!("skipped: needs root, a loop device and mkfs.ext4");
        return;
    };
    let dir = fs.mnt.join("ck");
    let digest = tmp.path().join("digest");
    let mut sup = ckpt()
        .args(["run", "-q", "--every", "100ms", "--dir"])
        .arg(&dir)
        .arg("--")
        .args(trainer_args(100_000, 16, 2, &digest))
        .stderr(Stdio::null())
        .spawn_guarded();
    let thaw = Thaw(&fs);
    wait_until(T, "a first checkpoint", || {
        !events(&dir, "committed").is_empty()
    });
    fs.freeze(true);
    // Requests and their log lines keep coming: the loop soon blocks on the frozen log, and
    // the control thread answers from the last status it shared.
    wait_until(T, "a status answered while the loop is blocked", || {
        let st = output_deadline(ckpt().args(["status", "--json", "--dir"]).arg(&dir), T);
        assert_eq!(st.status.code(), Some(0), "{}", text(&st.stderr));
        text(&st.stdout).contains("stale_seconds")
    });
    let t0 = std::time::Instant::now();
    let stop = output_deadline(
        ckpt()
            .args(["stop", "--no-checkpoint", "--no-wait", "--dir"])
            .arg(&dir),
        T,
    );
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop.stderr));
    assert!(t0.elapsed() < Duration::from_secs(10));
    drop(thaw);
    assert_eq!(wait_deadline(&mut sup, T).code(), Some(75));
    let exit = &events(&dir, "exit")[0];
    assert_eq!(exit["exit"], 128 + libc::SIGKILL, "{exit}");
    assert_no_survivors(&dir);
}
