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
//!   publish, verification, retention and quarantine as a client's files. Incremental when
//!   the kernel tracks dirty memory (`criu check --feature mem_dirty_track`, i.e. soft-dirty
//!   bits): [`PRE_DUMP_ROUNDS`] `criu pre-dump`s while the job runs, then the final dump of
//!   the pages dirtied since, the job frozen only for that delta; the pre-dumps' images go
//!   into the checkpoint (`parent/`, `parent/parent/`), so it stays self-contained. Without
//!   tracking (CRIU 4.1.1 has no other way: `pre-dump` needs soft-dirty bits, even through
//!   PAGEMAP_SCAN), every checkpoint is a full dump, and the probe's log line says why.
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

use super::machine::{Action, Event, Phase};
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

/// How many `criu pre-dump` rounds precede a dump when the kernel tracks dirty memory: the
/// first copies all memory while the job runs, the second what the first round let it
/// dirty, and the final dump (the job frozen) only what the second let it dirty.
pub const PRE_DUMP_ROUNDS: usize = 2;

/// A committed dump.
#[derive(Debug, Clone)]
pub struct Dumped {
    pub seq: u64,
    pub bytes: u64,
    /// How long the job was frozen (CRIU's "Frozen time"), microseconds: by the final dump.
    pub frozen_us: Option<u64>,
    /// The pre-dump rounds' frozen times (empty: a full dump).
    pub pre_frozen_us: Vec<Option<u64>>,
    /// Why pre-dumps were tried but not used for this dump (it was then a full dump).
    pub pre_dump_error: Option<String>,
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

/// Where the pre-dump rounds of a dump into `stage` write, in the order they run: round 1
/// deepest (`parent/parent` for 2 rounds), the last round in `parent`, whose images the
/// final dump (`--prev-images-dir parent`) refers to. Each round's own parent is its
/// `parent` subdirectory, so the chain lives inside the checkpoint.
pub fn pre_dump_dirs(stage: &Path, rounds: usize) -> Vec<PathBuf> {
    (1..=rounds)
        .rev()
        .map(|depth| (0..depth).fold(stage.to_path_buf(), |p, _| p.join("parent")))
        .collect()
}

/// The arguments of `criu dump` (`pre_dump` false) or `criu pre-dump` of the namespace
/// whose init is `init` into `dir`; `parent`: the images dir of the previous round holds a
/// `parent` directory to take unchanged pages from (`--prev-images-dir parent`, relative to
/// `dir`, with `--track-mem`).
pub fn dump_args(
    init: u32,
    dir: &Path,
    work: &Path,
    pre_dump: bool,
    parent: bool,
) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        if pre_dump { "pre-dump" } else { "dump" }.into(),
        "-t".into(),
        init.to_string().into(),
        "-D".into(),
        dir.into(),
        "-W".into(),
        work.into(),
        "-o".into(),
        if pre_dump { "pre-dump.log" } else { "dump.log" }.into(),
    ];
    if !pre_dump {
        v.push("--leave-running".into());
    }
    for a in ["--shell-job", "--manage-cgroups=ignore", "--display-stats"] {
        v.push(a.into());
    }
    if pre_dump || parent {
        v.push("--track-mem".into());
    }
    if parent {
        v.push("--prev-images-dir".into());
        v.push("parent".into());
    }
    v
}

/// CRIU's "Frozen time: N us" from `--display-stats` output.
fn frozen_time(stats: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(stats)
        .lines()
        .find_map(|l| l.strip_prefix("Frozen time:"))
        .and_then(|v| v.trim().trim_end_matches("us").trim().parse::<u64>().ok())
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

    /// What kind of dumps this CRIU makes here, and why (the probe's log line).
    pub fn dump_mode(&self) -> String {
        if self.dirty_tracking {
            format!("incremental dumps ({PRE_DUMP_ROUNDS} pre-dumps while the job runs, then a dump of the pages dirtied since: the job is frozen only for that delta)")
        } else {
            "full dumps (no incremental pre-dumps: `criu check --feature mem_dirty_track` fails, this kernel has no soft-dirty memory tracking, CONFIG_MEM_SOFT_DIRTY, which CRIU's pre-dump needs)".into()
        }
    }

    /// Runs `criu pre-dump` or `criu dump` (`args` from [`dump_args`]); its stdout (the
    /// stats) on success, else CRIU's error lines from `log`.
    fn run_criu(&self, args: &[OsString], log: &Path) -> Result<Vec<u8>, String> {
        let _ = std::fs::remove_file(log);
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).stdin(Stdio::null()).stderr(Stdio::null());
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
                log_cause(log, 3).unwrap_or_else(|| format!("criu exited with {}", out.status));
            return Err(format!("{cause} (CRIU's log: {})", log.display()));
        }
        Ok(out.stdout)
    }

    /// The pre-dump rounds into `stage` (see [`pre_dump_dirs`]); their frozen times.
    fn pre_dumps(&self, init: u32, stage: &Path) -> Result<Vec<Option<u64>>, String> {
        let log = self.work.join("pre-dump.log");
        let mut frozen = Vec::new();
        for (i, dir) in pre_dump_dirs(stage, PRE_DUMP_ROUNDS).iter().enumerate() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let stats = self
                .run_criu(&dump_args(init, dir, &self.work, true, i > 0), &log)
                .map_err(|e| format!("pre-dump round {}: {e}", i + 1))?;
            frozen.push(frozen_time(&stats));
        }
        Ok(frozen)
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
    /// of `store`, leaving it running; `incremental`: pre-dumps first, if the kernel tracks
    /// dirty memory. Nothing is visible unless the whole dump succeeded and was published.
    pub fn dump(&self, store: &Store, init: u32, incremental: bool) -> Result<Dumped, String> {
        let t0 = Instant::now();
        let stdio: Vec<String> = (0..3)
            .map(|n| {
                std::fs::read_link(format!("/proc/{init}/fd/{n}"))
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let stage = Stage::new(store, Algo::Crc32c).map_err(|e| e.to_string())?;
        // Incremental: pre-dumps while the job runs, then the delta. A pre-dump that fails
        // leaves a full dump (said in the `dumped` event), not a failed checkpoint.
        let (mut pre_frozen_us, mut pre_dump_error) = (Vec::new(), None);
        if self.dirty_tracking && incremental {
            match self.pre_dumps(init, stage.path()) {
                Ok(f) => pre_frozen_us = f,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(stage.path().join("parent"));
                    pre_dump_error = Some(e);
                }
            }
        }
        let args = dump_args(
            init,
            stage.path(),
            &self.work,
            false,
            !pre_frozen_us.is_empty(),
        );
        let stats = self.run_criu(&args, &self.work.join("dump.log"))?;
        let frozen_us = frozen_time(&stats);
        let mut meta = serde_json::Map::new();
        meta.insert("transparent".into(), "criu".into());
        meta.insert("criu_version".into(), self.version.clone().into());
        meta.insert("stdio".into(), stdio.into());
        if let Some(f) = frozen_us {
            meta.insert("frozen_us".into(), f.into());
        }
        if !pre_frozen_us.is_empty() {
            meta.insert("pre_dumps".into(), pre_frozen_us.len().into());
        }
        let m = stage
            .commit(None, WRITER, meta)
            .map_err(|e| e.to_string())?;
        Ok(Dumped {
            seq: m.seq,
            bytes: m.total_bytes(),
            frozen_us,
            pre_frozen_us,
            pre_dump_error,
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

/// The children of `pid` (of all its threads).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    out
}

/// Whether `status` (the text of `/proc/PID/status`) is that of the init of a PID namespace
/// below ours: its `NSpid` line ends with 1 (and has more than one field).
fn status_is_ns_init(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().collect::<Vec<_>>())
        .is_some_and(|f| f.len() >= 2 && f.last() == Some(&"1"))
}

fn is_ns_init(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| status_is_ns_init(&s))
}

/// The job's own process: the init of its PID namespace, among the children of `pid` (the
/// waiter). Not merely its first child: right after `criu restore --exec-cmd`, the waiter
/// also has CRIU's exiting restore helper for a moment, and a dump of that fails.
pub fn ns_init(pid: u32) -> Option<u32> {
    children(pid).into_iter().find(|&c| is_ns_init(c))
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
    // The job's status is its init's: after a restore, the waiter's children also include
    // CRIU's restore helper, which exits at once (its status is not the job's).
    let mut last: Option<WaitStatus> = None;
    let mut init_status: Option<WaitStatus> = None;
    loop {
        // Which child ended, before reaping it (a zombie's NSpid still says whether it
        // was the namespace's init).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        let pid = unsafe { info.si_pid() };
        let was_init = is_ns_init(pid as u32);
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                if was_init {
                    init_status = Some(s);
                }
                last = Some(s);
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    let last = init_status.or(last);
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
            if let Some(init) = self.job_pid.and_then(ns_init) {
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
        let mut init = ns_init(leader);
        // A stop's dump is full: the job is killed right after it, so pre-dumps would only
        // make the stop longer (under Slurm, eat into the margin).
        let incremental = !matches!(self.m.phase, Phase::Stopping { .. });
        // A dump can fail for a moment's reason (a child exiting while CRIU seizes the
        // tree: "Unable to detach ... No such process"): up to 3 attempts.
        let mut res = Err("the job's process tree is gone".to_string());
        // Control requests (`ckpt stop`, `ckpt checkpoint`) wait for the dump to end rather
        // than being told the loop is stuck; `status` says what it is doing.
        let busy = self.shared.busy_with("taking a CRIU dump");
        for _ in 0..3 {
            let Some(pid) = init.filter(|&p| is_alive(p)) else {
                break;
            };
            res = c.dump(&self.store, pid, incremental);
            if res.is_ok() {
                break;
            }
            init = ns_init(leader);
        }
        drop(busy);
        // A job that died during its dump says nothing about what CRIU can do.
        let alive = init.is_some_and(is_alive);
        match res {
            Ok(d) => {
                self.dumps += 1;
                self.last_commit_ms = Some(d.total_ms);
                let ms = |f: Option<u64>| {
                    f.map(|f| format!("{:.1} ms", f as f64 / 1000.0))
                        .unwrap_or_else(|| "? ms".into())
                };
                let pre = if d.pre_frozen_us.is_empty() {
                    String::new()
                } else {
                    format!(
                        " for the delta after {} pre-dumps (frozen {})",
                        d.pre_frozen_us.len(),
                        d.pre_frozen_us
                            .iter()
                            .map(|&f| ms(f))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                let failed = d
                    .pre_dump_error
                    .as_ref()
                    .map(|e| format!("; a full dump: the pre-dumps failed: {e}"))
                    .unwrap_or_default();
                self.rep.event(
                    "dumped",
                    Some(format!(
                        "CRIU dump {}: job frozen {}{pre}, image {} (dump + publish {} ms){failed}",
                        d.seq,
                        ms(d.frozen_us),
                        fmt_bytes(d.bytes),
                        d.total_ms
                    )),
                    json!({ "seq": d.seq, "frozen_us": d.frozen_us, "pre_dump_frozen_us": d.pre_frozen_us, "pre_dump_error": d.pre_dump_error, "bytes": d.bytes, "duration_ms": d.total_ms }),
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
    fn pre_dump_rounds_nest_inside_the_checkpoint() {
        let st = Path::new("/d/.ckpt/staging/x");
        assert_eq!(
            pre_dump_dirs(st, 2),
            vec![st.join("parent/parent"), st.join("parent")]
        );
        assert_eq!(pre_dump_dirs(st, 1), vec![st.join("parent")]);
        assert!(pre_dump_dirs(st, 0).is_empty());
        let w = Path::new("/d/.ckpt/criu");
        let s = |v: Vec<OsString>| {
            v.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        // The first round: memory tracking on, no parent, the job left running.
        assert_eq!(
            s(dump_args(7, &st.join("parent/parent"), w, true, false)),
            "pre-dump -t 7 -D /d/.ckpt/staging/x/parent/parent -W /d/.ckpt/criu -o pre-dump.log --shell-job --manage-cgroups=ignore --display-stats --track-mem"
        );
        assert_eq!(
            s(dump_args(7, &st.join("parent"), w, true, true)),
            "pre-dump -t 7 -D /d/.ckpt/staging/x/parent -W /d/.ckpt/criu -o pre-dump.log --shell-job --manage-cgroups=ignore --display-stats --track-mem --prev-images-dir parent"
        );
        assert_eq!(
            s(dump_args(7, st, w, false, true)),
            "dump -t 7 -D /d/.ckpt/staging/x -W /d/.ckpt/criu -o dump.log --leave-running --shell-job --manage-cgroups=ignore --display-stats --track-mem --prev-images-dir parent"
        );
        // A full dump: no tracking asked for (CRIU refuses --track-mem without it).
        assert_eq!(
            s(dump_args(7, st, w, false, false)),
            "dump -t 7 -D /d/.ckpt/staging/x -W /d/.ckpt/criu -o dump.log --leave-running --shell-job --manage-cgroups=ignore --display-stats"
        );
    }

    #[test]
    fn dump_mode_says_why_dumps_are_full() {
        let mut c = Criu {
            bin: "criu".into(),
            version: "4.1.1".into(),
            dirty_tracking: false,
            work: "/w".into(),
        };
        let full = c.dump_mode();
        assert!(full.starts_with("full dumps"), "{full}");
        assert!(
            full.contains("mem_dirty_track") && full.contains("soft-dirty"),
            "{full}"
        );
        assert!(!full.contains('\n'));
        c.dirty_tracking = true;
        assert!(c.dump_mode().starts_with("incremental dumps (2 pre-dumps"));
        assert_eq!(
            frozen_time(b"Dumping finished successfully\nFrozen time: 40195 us\n"),
            Some(40195)
        );
        assert_eq!(frozen_time(b"nothing"), None);
    }

    #[test]
    fn the_namespace_init_is_told_by_its_nspid() {
        let st = |nspid: &str| {
            format!("Name:\tcount\nState:\tS (sleeping)\nNSpid:\t{nspid}\nNSpgid:\t1\n")
        };
        assert!(status_is_ns_init(&st("23387\t1")));
        assert!(
            !status_is_ns_init(&st("23386")),
            "CRIU's helper, in our namespace"
        );
        assert!(
            !status_is_ns_init(&st("23390\t7")),
            "another process of the job"
        );
        assert!(!status_is_ns_init(&st("1")), "the host's init");
        assert!(!status_is_ns_init("Name:\tx\n"));
        // This process is in no namespace below the test's own.
        assert!(!is_ns_init(std::process::id()));
        assert_eq!(ns_init(std::process::id()), None);
    }

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
