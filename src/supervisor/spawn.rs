//! Launching the job in its own process group, reaping, and making sure that no process of
//! the job survives: ckpt is a child subreaper, so every orphan of the job becomes ckpt's
//! child, and "the job's tree" is simply "ckpt's descendants".

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The shell's convention: the code, or 128 + the signal number.
    pub fn as_code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => {
                let name = Signal::try_from(*s).map(|s| s.as_str()).unwrap_or("?");
                write!(f, "signal {s} ({name})")
            }
        }
    }
}

/// Makes this process a child subreaper (orphaned descendants are re-parented to it).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Starts `command` in a new process group with `env` added. The child gets SIGKILL if
/// ckpt dies (parent-death signal), and std resets its signal mask and dispositions.
pub fn launch(
    command: &[OsString],
    env: &[(String, OsString)],
    cgroup_procs: Option<&std::path::Path>,
    close_fds: [Option<std::os::fd::RawFd>; 2],
) -> io::Result<u32> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]).process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let parent = std::process::id() as i32;
    let cgroup = cgroup_procs
        .and_then(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes().to_vec()).ok());
    unsafe {
        cmd.pre_exec(move || {
            for fd in close_fds.into_iter().flatten() {
                libc::close(fd);
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            // Join the job's cgroup (async-signal-safe calls only). Failing to is not fatal:
            // the process group and the /proc walk still end the tree.
            if let Some(procs) = &cgroup {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(child.id())
}

/// Reaps every exited child without blocking; returns them.
pub fn reap() -> Vec<(u32, Exit)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw() as u32, Exit::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                out.push((pid.as_raw() as u32, Exit::Signal(sig as i32)))
            }
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    out
}

/// Every descendant of this process, from /proc (processes vanishing mid-scan are fine).
pub fn descendants() -> Vec<u32> {
    let me = std::process::id() as i32;
    let mut parent_of: HashMap<i32, i32> = HashMap::new();
    if let Ok(all) = procfs::process::all_processes() {
        for p in all.flatten() {
            if let Ok(stat) = p.stat() {
                parent_of.insert(stat.pid, stat.ppid);
            }
        }
    }
    let mut out = Vec::new();
    for (&pid, _) in parent_of.iter() {
        let mut cur = pid;
        for _ in 0..4096 {
            match parent_of.get(&cur) {
                Some(&pp) if pp == me => {
                    out.push(pid as u32);
                    break;
                }
                Some(&pp) if pp > 1 => cur = pp,
                _ => break,
            }
        }
    }
    out
}

/// Whether `pid` is a (live) descendant of this process.
pub fn is_descendant(pid: u32) -> bool {
    let me = std::process::id() as i32;
    let mut cur = pid as i32;
    for _ in 0..4096 {
        let Ok(p) = procfs::process::Process::new(cur) else {
            return false;
        };
        let Ok(stat) = p.stat() else { return false };
        if stat.ppid == me {
            return true;
        }
        if stat.ppid <= 1 {
            return false;
        }
        cur = stat.ppid;
    }
    false
}

/// Sends `sig` to the job's process group.
pub fn signal_group(pgid: u32, sig: i32) {
    if let Ok(s) = Signal::try_from(sig) {
        let _ = killpg(Pid::from_raw(pgid as i32), s);
    }
}

/// Sends `sig` to one process.
pub fn signal_pid(pid: u32, sig: i32) -> bool {
    match Signal::try_from(sig) {
        Ok(s) => kill(Pid::from_raw(pid as i32), s).is_ok(),
        Err(_) => false,
    }
}

/// SIGKILLs the job's group and every descendant until none is left (or `deadline` passes),
/// reaping as it goes. Returns the exits reaped, so the caller sees the leader's status.
pub fn kill_tree(pgid: Option<u32>, deadline: Duration) -> (Vec<(u32, Exit)>, Vec<u32>) {
    let start = Instant::now();
    let mut reaped = Vec::new();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(g) = pgid {
            signal_group(g, libc::SIGKILL);
        }
        reaped.extend(reap());
        let left = descendants();
        if left.is_empty() {
            return (reaped, left);
        }
        for &p in &left {
            signal_pid(p, libc::SIGKILL);
        }
        if start.elapsed() > deadline {
            return (reaped, left);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
        reaped.extend(reap());
    }
}

/// Number of processes, CPU seconds (user + system) and resident bytes of this process's
/// descendants (the job's tree), from /proc.
pub fn tree_usage() -> (usize, f64, u64) {
    let tps = procfs::ticks_per_second() as f64;
    let page = procfs::page_size();
    let mut n = 0;
    let (mut cpu, mut rss) = (0.0, 0u64);
    for pid in descendants() {
        if let Ok(stat) = procfs::process::Process::new(pid as i32).and_then(|p| p.stat()) {
            n += 1;
            cpu += (stat.utime + stat.stime) as f64 / tps;
            rss += stat.rss * page;
        }
    }
    (n, cpu, rss)
}
