//! Helpers shared by the integration tests: locating the binaries, running `ckpt` with a
//! hard deadline, polling conditions, random seeds that are printed so a failure can be
//! replayed, and checking that no process of a job survives.
#![allow(dead_code)]

pub mod ranks;
pub mod slurm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `ckpt` binary under test.
pub fn ckpt_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ckpt"))
}

/// A helper job from `test-programs/` (built by `cargo build --workspace`, which the test
/// command runs first).
pub fn test_bin(name: &str) -> PathBuf {
    let p = ckpt_bin().parent().unwrap().join(name);
    assert!(p.exists(), "helper job {} is missing; run `cargo build --workspace` before the tests (the README's test command does)", p.display());
    p
}

/// A `ckpt` command with a clean environment for the protocol variables.
pub fn ckpt() -> Command {
    let mut c = Command::new(ckpt_bin());
    clear_ckpt_env(&mut c);
    c
}

/// Removes the protocol variables, so that a test run under a supervisor (or by hand with
/// them exported) does not leak them into the process under test.
pub fn clear_ckpt_env(c: &mut Command) {
    for k in ckpt::protocol::SUPERVISOR_ENV {
        c.env_remove(k);
    }
}

/// The seed for a randomised test: `CKPT_TEST_SEED` if set (to replay), else fresh. Printed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("CKPT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{test}: seed {s} (replay with CKPT_TEST_SEED={s})");
    s
}

/// A fresh temporary directory, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ckpt-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes (then panics with
/// `what`).
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Waits for a child with a hard deadline; on timeout kills it (and its group) and panics.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            panic!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A supervisor (or any process of a test) that must not outlive the test: on drop, when the
/// test ended early (a failed assertion panics), it is SIGKILLed and so is every process of
/// its job on `dir` (found by `CKPT_DIR` in their environment). Derefs to the [`Child`].
pub struct Running {
    child: Child,
    dir: Option<PathBuf>,
}

/// Spawns a command whose process must not outlive the test (see [`Running`]). The job's
/// directory is the argument of `--dir` (or `CKPT_DIR` in the command's environment).
pub trait SpawnGuarded {
    fn spawn_guarded(&mut self) -> Running;
}

impl SpawnGuarded for Command {
    fn spawn_guarded(&mut self) -> Running {
        let args: Vec<&std::ffi::OsStr> = self.get_args().collect();
        let dir = args
            .iter()
            .position(|a| *a == "--dir")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
            .or_else(|| {
                self.get_envs()
                    .find(|(k, _)| *k == "CKPT_DIR")
                    .and_then(|(_, v)| v.map(PathBuf::from))
            });
        Running {
            child: self.spawn().expect("spawn"),
            dir,
        }
    }
}

impl Running {
    /// Like [`Child::wait_with_output`] (no deadline: use it where the process was already
    /// told to exit).
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        let out_pipe = self.child.stdout.take();
        let err_pipe = self.child.stderr.take();
        let out_t = std::thread::spawn(move || out_pipe.map(read_all).unwrap_or_default());
        let err_t = std::thread::spawn(move || err_pipe.map(read_all).unwrap_or_default());
        let status = self.child.wait()?;
        Ok(Output {
            status,
            stdout: out_t.join().unwrap(),
            stderr: err_t.join().unwrap(),
        })
    }
}

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
        if let Some(dir) = self.dir.take() {
            for p in job_processes(&dir) {
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
}

/// Runs a command to completion with a hard deadline, capturing its output.
pub fn output_deadline(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out_pipe = child.stdout.take().unwrap();
    let err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || read_all(out_pipe));
    let err_t = std::thread::spawn(move || read_all(err_pipe));
    let status = wait_deadline(&mut child, timeout);
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn read_all(mut r: impl std::io::Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v);
    v
}

/// Text of an output stream, for assertions and failure messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Pids of every live (non-zombie) process whose environment holds `CKPT_DIR=<dir>`: the
/// processes of a job supervised on `dir`, wherever they were re-parented.
pub fn job_processes(dir: &Path) -> Vec<i32> {
    let needle = format!("CKPT_DIR={}", dir.display());
    let mut out = Vec::new();
    for ent in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

/// Asserts that no process of the job on `dir` is alive (polling briefly: the kernel may
/// still be tearing a process down).
pub fn assert_no_survivors(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = job_processes(dir);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for &p in &left {
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            panic!("processes of the job survived ckpt: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The supervisor's status file, if present.
pub fn status(dir: &Path) -> Option<serde_json::Value> {
    std::fs::read(dir.join(".ckpt/status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Published checkpoint sequence numbers in `dir`.
pub fn checkpoints(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix("ckpt-"))
                        .and_then(|n| n.parse().ok())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Events of the supervisor's log whose `event` is `name`.
pub fn events(dir: &Path, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(".ckpt/events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == name)
        .collect()
}

/// Sends a signal to a pid.
pub fn signal(pid: u32, sig: i32) {
    unsafe { libc::kill(pid as i32, sig) };
}

/// The command line of the `trainer` helper job (seed 42) writing its final digest to `digest`.
pub fn trainer_args(steps: u64, dim: usize, step_ms: u64, digest: &Path) -> Vec<String> {
    vec![
        test_bin("trainer").display().to_string(),
        "--steps".into(),
        steps.to_string(),
        "--dim".into(),
        dim.to_string(),
        "--step-ms".into(),
        step_ms.to_string(),
        "--digest-file".into(),
        digest.display().to_string(),
    ]
}

/// The digest of an uninterrupted trainer run (seed 42), computed in-process.
pub fn reference(steps: u64, dim: usize) -> String {
    ckpt::demo::reference_digest(&ckpt::demo::TrainerArgs {
        steps,
        dim,
        seed: 42,
        step_ms: 0,
        crash_at: None,
        digest_file: None,
    })
}

/// Reads the child's piped stderr to its end on a thread (so that the child never blocks on
/// a full pipe); join the handle for the text.
pub fn read_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let pipe = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { pipe }, &mut s);
        s
    })
}
