//! Transparent checkpoints (`ckpt run --transparent`) with CRIU, for jobs that link no client
//! (docs/transparent.md).
//!
//! - **Launch**: `ckpt __criu-waiter -- CMD` ([`waiter`]): the job is the init of its own PID
//!   namespace (a restore gets its PIDs back, whatever runs on the host by then) and leads its
//!   own session inside it (CRIU refuses a session leader outside the namespace). The leader
//!   ckpt sees is the waiter, which has ckpt's parent-death signal, passes the job's exit
//!   status on, and whose death SIGKILLs the init (the init's parent-death signal).
//! - **Checkpoint**: `criu dump --leave-running -t INIT` of the namespace into a [`Stage`]
//!   directory, then [`Stage::commit`]: the images get the same checksummed manifest, atomic
//!   publish, verification, retention and quarantine as a client's files. Only full dumps:
//!   incremental pre-dumps need the kernel's soft-dirty memory tracking, which is probed
//!   (`criu check --feature mem_dirty_track`) and logged, but not used yet.
//! - **Restore**: `criu restore -D ckpt-N --exec-cmd -- ckpt __criu-waiter`: CRIU recreates
//!   the namespace and the tree from the newest verified image set (read in place; CRIU's
//!   log goes to a work directory), then execs the waiter, which stays the restored init's
//!   parent (so the init's restored parent-death signal still ties it to ckpt) and exits
//!   with its status. The job's stdin/stdout/stderr are handed back with `--inherit-fd`:
//!   the restored job writes where this ckpt's own output goes.
//!
//! What CRIU cannot do is found up front ([`Criu::probe`]: binary, privileges, `criu
//! check`) or at the first failed dump ([`Dumped`] errors name CRIU's own error lines); the
//! supervisor then runs the job with restarts only and says so.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use std::collections::VecDeque;

use serde_json::json;

use super::machine::{Action, Event};
use super::spawn::{self, Exit};
use super::{fmt_bytes, Fatal, Run};
use crate::store::{Algo, Found, Stage, Store};

/// The place `scripts/install-criu` installs CRIU 4.1.1 to.
pub const INSTALL_PATH: &str = "/usr/local/lib/ckpt/criu-4.1.1/criu";
/// The `writer` of a transparent checkpoint's manifest.
pub const WRITER: &str = "ckpt-criu";
/// Capability numbers (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// A CRIU that passed the checks.
#[derive(Debug, Clone)]
pub struct Criu {
    pub bin: PathBuf,
    pub version: String,
    /// `criu check --feature mem_dirty_track` passed (incremental pre-dumps possible).
    pub dirty_tracking: bool,
    /// Where CRIU's logs go (`DIR/.ckpt/criu`).
    pub work: PathBuf,
}

/// A committed dump.
#[derive(Debug, Clone)]
pub struct Dumped {
    pub seq: u64,
    pub bytes: u64,
    /// How long the job was frozen (CRIU's "Frozen time"), microseconds.
    pub frozen_us: Option<u64>,
    /// The whole dump + publish, milliseconds.
    pub total_ms: u64,
}

/// Where `criu` is: `$CKPT_CRIU`, then [`INSTALL_PATH`], then `criu` on PATH.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CKPT_CRIU").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if Path::new(INSTALL_PATH).exists() {
        return Some(PathBuf::from(INSTALL_PATH));
    }
    which("criu")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What is missing for CRIU in this process's privileges, if anything.
pub fn privilege_problem() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    let has = |c: u32| eff & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) {
        return None;
    }
    let uid = unsafe { libc::geteuid() };
    Some(format!(
        "ckpt runs as uid {uid} without CAP_SYS_ADMIN{}: creating the job's PID namespace and CRIU's dump and restore need it; run ckpt as root with its full capabilities",
        if has(CAP_CHECKPOINT_RESTORE) { "" } else { " (and without CAP_CHECKPOINT_RESTORE)" }
    ))
}

/// CRIU's own error lines from a log (its noise about rlimits left out), at most `max`.
pub fn log_cause(log: &Path, max: usize) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.find("Error (").map(|i| &l[i..]))
        .filter(|l| !l.contains("rlimit: Can't setup RLIMIT_NOFILE"))
        .filter(|l| !l.contains("FAILED."))
        .collect();
    if lines.is_empty() {
        return None;
    }
    let pick: Vec<String> = lines
        .iter()
        .take(max)
        .map(|l| {
            // "Error (criu/cr-dump.c:1664): A session leader ..." -> the message.
            l.split_once("): ")
                .map_or(*l, |(_, m)| m)
                .trim()
                .to_string()
        })
        .collect();
    Some(pick.join("; "))
}

impl Criu {
    /// Finds CRIU and checks that it can work here; the error names the cause.
    pub fn probe(store: &Store) -> Result<Criu, String> {
        if let Some(p) = privilege_problem() {
            return Err(p);
        }
        let bin = find().ok_or_else(|| {
            format!("no criu found ($CKPT_CRIU, {INSTALL_PATH}, PATH); hint: run scripts/install-criu (builds CRIU 4.1.1)")
        })?;
        let out = Command::new(&bin)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let check = Command::new(&bin)
            .arg("check")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {} check: {e}", bin.display()))?;
        if !check.status.success() {
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            let why: Vec<&str> = all
                .lines()
                .filter(|l| l.starts_with("Error") || l.contains("rror"))
                .take(3)
                .collect();
            return Err(format!(
                "`{} check` fails on this kernel (CRIU {version}): {}{}",
                bin.display(),
                if !why.is_empty() {
                    why.join("; ")
                } else if all.trim().is_empty() {
                    format!("{}, no output", check.status)
                } else {
                    all.trim().to_string()
                },
                if version.starts_with("3.") {
                    "; hint: CRIU 3.x does not work on kernels >= 6.13: run scripts/install-criu (CRIU 4.1.1)"
                } else {
                    ""
                }
            ));
        }
        let dirty_tracking = Command::new(&bin)
            .args(["check", "--feature", "mem_dirty_track"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let work = store.private().join("criu");
        std::fs::create_dir_all(&work)
            .map_err(|e| format!("cannot create {}: {e}", work.display()))?;
        Ok(Criu {
            bin,
            version,
            dirty_tracking,
            work,
        })
    }

    /// The command that starts the job as the init of its own PID namespace
    /// (`ckpt __criu-waiter -- CMD`).
    pub fn wrap(command: &[OsString]) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![self_exe().into(), "__criu-waiter".into(), "--".into()];
        v.extend(command.iter().cloned());
        v
    }

    /// The command that restores checkpoint `f` (its images read in place) and then waits
    /// for the restored tree as its parent.
    pub fn restore_command(&self, f: &Found) -> Vec<OsString> {
        let _ = std::fs::remove_file(self.work.join("restore.log"));
        let mut v: Vec<OsString> = vec![self.bin.clone().into(), "restore".into()];
        v.push("-D".into());
        v.push(f.path.clone().into());
        v.push("-W".into());
        v.push(self.work.clone().into());
        for a in [
            "-o",
            "restore.log",
            "--shell-job",
            "--manage-cgroups=ignore",
        ] {
            v.push(a.into());
        }
        // The job's stdin/stdout/stderr at the dump become this ckpt's (inherited by criu).
        let mut seen: Vec<String> = Vec::new();
        if let Some(fds) = f.manifest.meta.get("stdio").and_then(|v| v.as_array()) {
            for (n, t) in fds.iter().enumerate().take(3) {
                let Some(key) = t.as_str().and_then(inherit_key) else {
                    continue;
                };
                if seen.contains(&key) {
                    continue;
                }
                v.push("--inherit-fd".into());
                v.push(format!("fd[{n}]:{key}").into());
                seen.push(key);
            }
        }
        v.push("--exec-cmd".into());
        v.push("--".into());
        v.push(self_exe().into());
        v.push("__criu-waiter".into());
        v
    }

    /// Dumps the tree of the namespace whose init is `init` (host pid) into a new checkpoint
    /// of `store`, leaving it running. Nothing is visible unless the whole dump succeeded
    /// and was published.
    pub fn dump(&self, store: &Store, init: u32) -> Result<Dumped, String> {
        let t0 = Instant::now();
        let stdio: Vec<String> = (0..3)
            .map(|n| {
                std::fs::read_link(format!("/proc/{init}/fd/{n}"))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let stage = Stage::new(store, Algo::Crc32c).map_err(|e| e.to_string())?;
        let log = self.work.join("dump.log");
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("dump")
            .arg("-t")
            .arg(init.to_string())
            .arg("-D")
            .arg(stage.path())
            .arg("-W")
            .arg(&self.work)
            .args([
                "-o",
                "dump.log",
                "--leave-running",
                "--shell-job",
                "--manage-cgroups=ignore",
                "--display-stats",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        // A dump must not outlive ckpt (it would write into a staging directory nobody
        // publishes, and keep the job frozen).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let out = cmd
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        if !out.status.success() {
            let cause =
                log_cause(&log, 3).unwrap_or_else(|| format!("criu exited with {}", out.status));
            return Err(format!("{cause} (CRIU's log: {})", log.display()));
        }
        let stats = String::from_utf8_lossy(&out.stdout);
        let frozen_us = stats
            .lines()
            .find_map(|l| l.strip_prefix("Frozen time:"))
            .and_then(|v| v.trim().trim_end_matches("us").trim().parse::<u64>().ok());
        let mut meta = serde_json::Map::new();
        meta.insert("transparent".into(), "criu".into());
        meta.insert("criu_version".into(), self.version.clone().into());
        meta.insert("stdio".into(), stdio.into());
        if let Some(f) = frozen_us {
            meta.insert("frozen_us".into(), f.into());
        }
        let m = stage
            .commit(None, WRITER, meta)
            .map_err(|e| e.to_string())?;
        Ok(Dumped {
            seq: m.seq,
            bytes: m.total_bytes(),
            frozen_us,
            total_ms: t0.elapsed().as_millis() as u64,
        })
    }
}

/// A process that exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !matches!(r.trim_start().chars().next(), Some('Z' | 'X')))
    })
}

/// Whether `prog` can be executed (looked up in PATH unless it holds a `/`), so that a
/// missing command fails at once, as without `--transparent`, instead of inside the
/// namespace at every restart.
pub fn runnable(prog: &std::ffi::OsStr) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::PermissionsExt;
    let p = Path::new(prog);
    let found = if prog.as_encoded_bytes().contains(&b'/') {
        Some(p.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(p))
                .find(|c| c.is_file())
        })
    };
    match found.map(|f| std::fs::metadata(&f)) {
        None => Err(Error::from(ErrorKind::NotFound)),
        Some(Err(e)) => Err(e),
        Some(Ok(m)) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Some(Ok(_)) => Err(Error::from(ErrorKind::PermissionDenied)),
    }
}

fn self_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ckpt"))
}

/// Whether a checkpoint is a CRIU image set.
pub fn is_image(f: &Found) -> bool {
    f.manifest.writer == WRITER
}

/// CRIU's `--inherit-fd` key for what a job's fd pointed to: pipes and regular files (whose
/// size CRIU would otherwise check against the dump's).
fn inherit_key(target: &str) -> Option<String> {
    if target.starts_with("pipe:[") {
        return Some(target.to_string());
    }
    if let Some(rel) = target.strip_prefix('/') {
        if target.starts_with("/dev/") || target.ends_with(" (deleted)") {
            return None;
        }
        return Some(rel.to_string());
    }
    None
}

/// The only child of `pid` (the namespace's init under `unshare` or the waiter).
pub fn only_child(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// `ckpt __criu-waiter [-- CMD...]`. With CMD: the launch of a transparent job: enters a new
/// PID namespace and forks CMD as its init, in its own session, with SIGKILL as its
/// parent-death signal. Without: what `criu restore --exec-cmd` becomes, the parent of the
/// restored init. Either way it reaps its child and exits with its status (re-raising a
/// signal that killed it), and dies with ckpt (its own parent-death signal).
pub fn waiter(command: &[OsString]) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    if !command.is_empty() {
        if let Err(code) = start_init(command) {
            return code;
        }
    }
    // Signals meant for the job's processes (Slurm and `scancel` signal every process of a
    // job at once) must not end the waiter, whose death kills the job before ckpt could
    // dump it: ckpt ends it with SIGKILL. (After the fork: the job keeps its own.)
    for sig in [
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let mut last: Option<WaitStatus> = None;
    loop {
        match waitpid(None, None) {
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => last = Some(s),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    match last {
        Some(WaitStatus::Exited(_, code)) => code,
        Some(WaitStatus::Signaled(_, sig, _)) => {
            unsafe {
                libc::signal(sig as i32, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig as i32);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::raise(sig as i32);
            }
            128 + sig as i32
        }
        _ => 0,
    }
}

/// Forks `command` as the init of a new PID namespace (in the child: new session,
/// parent-death SIGKILL, exec). `Err(exit code)` when that cannot be done.
fn start_init(command: &[OsString]) -> Result<(), i32> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_default())
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let name = command[0].to_string_lossy().into_owned();
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        eprintln!(
            "ckpt: cannot create a PID namespace for the job: {}",
            std::io::Error::last_os_error()
        );
        return Err(126);
    }
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("ckpt: cannot fork: {}", std::io::Error::last_os_error());
            Err(126)
        }
        0 => unsafe {
            libc::setsid();
            // ckpt's Rust runtime ignores SIGPIPE; the job must get the default back.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            // (The parent is outside the namespace: getppid() is 0 here, so a parent that
            // died before this line cannot be told; the job's cgroup covers that instant.)
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::execvp(ptrs[0], ptrs.as_ptr());
            let e = std::io::Error::last_os_error();
            eprintln!("ckpt: cannot run `{name}`: {e}");
            libc::_exit(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        },
        _ => Ok(()),
    }
}

/// The supervisor's side of `--transparent` (called from the I/O edge in `mod.rs`).
impl Run {
    /// A group signal for a job in its own PID namespace: the checkpoint request becomes a
    /// dump; SIGTERM (the end of a stop, after the dump) kills the tree, whose state is
    /// saved (the namespace's init would ignore it anyway). `true` when handled here.
    pub(super) fn transparent_signal(&mut self, sig: i32, queue: &mut VecDeque<Action>) -> bool {
        let dumping = self.criu.is_some() && !self.dumps_off;
        if dumping && sig == self.cfg.signal {
            // The request's own log line and status first, so the log reads in order.
            while matches!(queue.front(), Some(Action::Log(_) | Action::Status)) {
                if let Some(a) = queue.pop_front() {
                    let _ = self.act(a, queue);
                }
            }
            self.transparent_dump(queue);
            return true;
        }
        if sig == libc::SIGTERM {
            if let Some(init) = self.job_pid.and_then(only_child) {
                if dumping {
                    self.rep.event(
                        "kill_after_dump",
                        Some("stopping a transparent job: killed its process tree (its state is in the checkpoint)".into()),
                        json!({}),
                    );
                    if let Some(cg) = &self.cgroup {
                        cg.kill();
                    }
                    spawn::signal_pid(init, libc::SIGKILL);
                    if let Some(pid) = self.job_pid {
                        spawn::signal_group(pid, libc::SIGKILL);
                    }
                    for p in spawn::descendants() {
                        spawn::signal_pid(p, libc::SIGKILL);
                    }
                    return true;
                }
                // Restarts only: a job that handles SIGTERM gets it (an init ignores it
                // otherwise, and --kill-after ends it).
                spawn::signal_pid(init, libc::SIGTERM);
            }
        }
        false
    }

    /// One transparent checkpoint: dump, publish, rescan (the machine hears `Committed`),
    /// or `SaveFailed`. The first dump that fails before any succeeded turns transparent
    /// checkpoints off, saying why.
    fn transparent_dump(&mut self, queue: &mut VecDeque<Action>) {
        let (Some(c), Some(leader)) = (self.criu.clone(), self.job_pid) else {
            return;
        };
        // While `criu restore` still runs (it becomes the waiter once every process is
        // back), there is nothing whole to dump: a failed save, not a reason to give up.
        let restoring = std::fs::read(format!("/proc/{leader}/cmdline"))
            .map(|c| !c.split(|&b| b == 0).any(|a| a == b"__criu-waiter"))
            .unwrap_or(false);
        if restoring {
            queue.extend(self.m.on(
                Event::SaveFailed {
                    pid: leader,
                    error: "the job is still being restored by CRIU".into(),
                },
                Instant::now(),
            ));
            return;
        }
        let init = only_child(leader);
        // A dump can fail for a moment's reason (a child exiting while CRIU seizes the
        // tree: "Unable to detach ... No such process"): up to 3 attempts.
        let mut res = Err("the job's process tree is gone".to_string());
        for _ in 0..3 {
            let Some(init) = init.filter(|&p| is_alive(p)) else {
                break;
            };
            res = c.dump(&self.store, init);
            if res.is_ok() {
                break;
            }
        }
        // A job that died during its dump says nothing about what CRIU can do.
        let alive = init.is_some_and(is_alive);
        match res {
            Ok(d) => {
                self.dumps += 1;
                self.last_commit_ms = Some(d.total_ms);
                self.rep.event(
                    "dumped",
                    Some(format!(
                        "CRIU dump {}: job frozen {}, image {} (dump + publish {} ms)",
                        d.seq,
                        d.frozen_us
                            .map(|f| format!("{:.1} ms", f as f64 / 1000.0))
                            .unwrap_or_else(|| "? ms".into()),
                        fmt_bytes(d.bytes),
                        d.total_ms
                    )),
                    json!({ "seq": d.seq, "frozen_us": d.frozen_us, "bytes": d.bytes, "duration_ms": d.total_ms }),
                );
                // As a client's `committed` message would: the cost of a checkpoint is the
                // time the job was frozen (`--every auto`), the stop margin under Slurm is
                // the whole dump and publish.
                self.auto_adjust(d.total_ms, d.frozen_us.map(|f| f.div_ceil(1000)));
                if let Some(sl) = self.slurm.as_mut() {
                    sl.note_save(d.total_ms);
                }
                self.rescan(queue);
            }
            Err(e) => {
                if self.dumps == 0 && alive {
                    self.dumps_off = true;
                    self.m.s.signal_explicit = self.cfg.signal_explicit;
                    self.rep.warn(
                        "transparent_unavailable",
                        format!("--transparent: CRIU cannot checkpoint this job: {e}; the job runs with restarts only (no checkpoints)"),
                        json!({ "cause": e }),
                    );
                }
                queue.extend(self.m.on(
                    Event::SaveFailed {
                        pid: leader,
                        error: format!("CRIU dump failed: {e}"),
                    },
                    Instant::now(),
                ));
            }
        }
    }

    /// The checkpoint to restore. A CRIU image set when CRIU is not in use (no
    /// `--transparent`, or CRIU unavailable) cannot be: ckpt refuses to start the job from
    /// scratch over it unless `--allow-fresh` is given.
    pub(super) fn restorable(&mut self, found: Option<Found>) -> Result<Option<Found>, Fatal> {
        let f = match found {
            Some(f) if is_image(&f) && self.criu.is_none() => f,
            other => return Ok(other),
        };
        let why = if self.cfg.transparent {
            "CRIU is unavailable (see above)"
        } else {
            "this run has no --transparent"
        };
        let msg = format!(
            "checkpoint {} is a CRIU image set (from ckpt run --transparent) and cannot be restored because {why}",
            f.seq
        );
        if !self.cfg.allow_fresh {
            return Err(Fatal::usage(format!("{msg}; refusing to start the job from scratch over it; hint: run with --transparent where CRIU works, or pass --allow-fresh to start over")));
        }
        self.rep.warn(
            "image_not_restored",
            format!("{msg}: the job starts from scratch (--allow-fresh)"),
            json!({ "seq": f.seq }),
        );
        Ok(None)
    }

    /// After a `criu restore` launch ended: if the restore itself failed, say why.
    pub(super) fn restore_failed(&mut self, exit: Exit) {
        if self.wrapped != Some(true) || exit.success() {
            return;
        }
        let Some(c) = &self.criu else { return };
        let log = c.work.join("restore.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !text.contains("Restoring FAILED") {
            return;
        }
        let cause = log_cause(&log, 3).unwrap_or_else(|| "see the log".into());
        self.rep.warn(
            "restore_failed",
            format!(
                "criu restore failed: {cause} (CRIU's log: {}); the restart policy applies",
                log.display()
            ),
            json!({ "cause": cause }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherit_keys() {
        assert_eq!(inherit_key("pipe:[123]").as_deref(), Some("pipe:[123]"));
        assert_eq!(inherit_key("/tmp/out.log").as_deref(), Some("tmp/out.log"));
        assert_eq!(inherit_key("/dev/null"), None);
        assert_eq!(inherit_key("/dev/pts/3"), None);
        assert_eq!(inherit_key("socket:[9]"), None);
    }

    #[test]
    fn runnable_commands() {
        use std::io::ErrorKind;
        assert!(runnable("sh".as_ref()).is_ok());
        assert_eq!(
            runnable("/nonexistent/prog".as_ref()).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            runnable("no-such-prog-ckpt".as_ref()).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("data");
        std::fs::write(&f, "x").unwrap();
        assert_eq!(
            runnable(f.as_os_str()).unwrap_err().kind(),
            ErrorKind::PermissionDenied
        );
    }

    #[test]
    fn cause_from_log() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dump.log");
        std::fs::write(&p, "(00.000012) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\nError (criu/cr-dump.c:1664): A session leader of 1(1) is outside of its pid namespace\nError (criu/cr-dump.c:2111): Dumping FAILED.\n").unwrap();
        assert_eq!(
            log_cause(&p, 3).as_deref(),
            Some("A session leader of 1(1) is outside of its pid namespace")
        );
    }
}
