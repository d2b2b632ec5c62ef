//! The supervisor behind `ckpt run`: one loop over signals, child exits, job messages,
//! control requests and timers. The job's state and every decision live in the pure state
//! machine of `machine.rs`; this file is its I/O edge: it turns what happened into
//! `machine::Event`s and carries out the `machine::Action`s. Process model, state diagram and
//! each failure case: `docs/design.md`.

pub mod branch;
pub mod cgroup;
pub mod control;
pub mod criu;
pub mod interval;
pub mod lock;
pub mod machine;
pub mod policy;
mod remote_hooks;
pub mod report;
mod slurm_hooks;
pub mod spawn;
pub mod stop_soon;
pub mod vouch;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

pub use crate::fmt::{fmt_bytes, fmt_dur, signame};
use crate::integrations::slurm;
use crate::protocol::{self, Message};
use crate::store::{Found, Manifest, Store};
use machine::{Action, Event, Machine, Mark, Outcome, Phase, Why};
use policy::Policy;
use report::Reporter;

pub use crate::exit::{codes as exit_codes, ErrKind, Fatal};

/// Where `--signal` requests go when the job announced no client (`--signal-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalTo {
    /// Only the job's leader (the command ckpt started): its helpers and background
    /// workers, which never asked for the signal, keep running (the default).
    Leader,
    /// The job's whole process group.
    Group,
}

/// Everything `ckpt run` was told.
#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    pub command: Vec<OsString>,
    /// Periodic request interval; `None` for none. With `auto_every` it is the current
    /// choice, adjusted after every commit.
    pub every: Option<Duration>,
    /// `--every auto`: the interval follows the Young/Daly rule (`interval.rs`).
    pub auto_every: Option<interval::AutoEvery>,
    pub signal: i32,
    /// `--signal` was given: the job traps it itself even without announcing a client.
    pub signal_explicit: bool,
    /// `--signal-to`: where a request signal goes for a job without a client.
    pub signal_to: SignalTo,
    /// `--max-stops-without-progress`: stops in a row without progress before ckpt gives
    /// up instead of asking to be run again (or requeuing).
    pub max_stops_without_progress: u32,
    pub grace: Duration,
    pub kill_after: Duration,
    pub keep: usize,
    pub keep_every: Option<Duration>,
    pub policy: Policy,
    pub allow_fresh: bool,
    /// `--restore-check`: how a checkpoint is checked before a launch restores it.
    pub restore_check: protocol::RestoreCheckMode,
    pub again: bool,
    pub quiet: bool,
    pub log_json: bool,
    /// Slurm integration (`--slurm auto`); used only when a Slurm job is detected.
    pub slurm: Option<slurm::Settings>,
    /// A job with a client that reports no progress for this long is treated as failed.
    pub hang_timeout: Option<Duration>,
    /// Signal sent to a hung job before it is killed (for a stack dump), if any.
    pub hang_signal: Option<i32>,
    /// A requested checkpoint not committed within this long is treated as a hang.
    pub checkpoint_timeout: Option<Duration>,
    /// Cloud preemption notices to watch for (`--preemption-notice`).
    pub preemption: Option<crate::integrations::cloud::Settings>,
    /// `--from`: seed the first launch from another run's checkpoint, or roll back
    /// (`branch.rs`).
    pub from: Option<String>,
    /// `--transparent`: checkpoint the job's whole process tree with CRIU (`criu.rs`).
    pub transparent: bool,
    /// `--remote`: upload every commit, restore from there when it is newer (`crate::remote`).
    pub remote: Option<crate::remote::Settings>,
}

/// What the event sources hand to the loop.
enum Ev {
    Signal(i32),
    /// A job message and the sender's pid as the kernel saw it (`SCM_CREDENTIALS`).
    Msg(Message, Option<u32>),
    BadMsg(String),
    Control(control::ControlEvent),
    /// From an integration's watcher thread (e.g. a cloud preemption notice).
    External(stop_soon::External),
    /// A line from the remote uploader's thread.
    Remote(crate::remote::Report),
}

/// Signals that stop ckpt like SIGTERM (checkpoint, then stop the job): besides TERM, INT
/// and HUP, the ones whose default action would kill ckpt and leave the job running.
pub const STOP_SIGNALS: [i32; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGXCPU,
    libc::SIGABRT,
];
/// Signals ckpt receives and ignores (logged): profiling timers.
pub const IGNORED_SIGNALS: [i32; 2] = [libc::SIGVTALRM, libc::SIGPROF];

/// Runs the supervisor to the end; returns ckpt's exit code.
pub fn run(cfg: Config) -> Result<i32, Fatal> {
    let store = Store::new(&cfg.dir);
    store.create().map_err(|e| {
        Fatal::new(
            ErrKind::CantCreate,
            format!("cannot prepare checkpoint directory: {e}"),
        )
    })?;
    let cmdline = cfg
        .command
        .iter()
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let lock = lock::DirLock::acquire(&store, &cmdline)
        .map_err(|e| Fatal::new(ErrKind::CantCreate, e.to_string()))?;
    let mut rep = Reporter::new(store.private(), cfg.quiet, cfg.log_json);
    // What a dead predecessor left running (it was SIGKILLed, so it could not clean up).
    let ended = cgroup::end_leftovers(&store.private());
    if ended > 0 {
        rep.warn(
            "leftovers_killed",
            format!("killed {ended} process(es) left running by an earlier supervisor of this directory that died"),
            json!({ "count": ended }),
        );
    }
    if let Some(from) = &cfg.from {
        branch::apply(&store, from, &mut rep)?;
    }

    let finished = store.private().join("finished");
    if finished.exists() {
        if cfg.again {
            std::fs::remove_file(&finished).map_err(|e| {
                Fatal::new(
                    ErrKind::CantCreate,
                    format!("cannot remove {}: {e}", finished.display()),
                )
            })?;
        } else {
            rep.event(
                "already_finished",
                Some(format!("the job in {} already finished; nothing to do (hint: pass --again to run it once more)", store.dir().display())),
                json!({}),
            );
            return Ok(exit_codes::FINISHED);
        }
    }
    if let Some(s) = &cfg.remote {
        if remote_hooks::remote_finished(s, &store, cfg.again, &mut rep) {
            return Ok(exit_codes::FINISHED);
        }
    }

    let cgroup = cgroup::Cgroup::create(&store.private());
    let shared = Arc::new(Shared {
        status: Mutex::new((json!({ "ok": true, "state": "starting" }), Instant::now())),
        job_pid: AtomicU32::new(0),
        cgroup: cgroup.as_ref().map(|c| c.path().to_path_buf()),
        busy: Mutex::new(None),
    });
    let (tx, rx) = mpsc::channel();
    let socket_path = bind_socket(&store, tx.clone())?;
    let control_path = bind_control(&store, tx.clone(), shared.clone())?;
    if let Some(p) = cfg.preemption.clone() {
        crate::integrations::cloud::start(p, stop_soon::Notifier::new(tx.clone()));
    }
    let session = cfg
        .slurm
        .clone()
        .and_then(|st| slurm::JobEnv::from_process_env().map(|e| slurm::Session::new(e, st)));
    let tx_keep = tx.clone();
    start_signal_thread(tx, session.as_ref().map(|s| s.settings.warning_signal))?;
    spawn::become_subreaper().map_err(|e| {
        Fatal::new(
            ErrKind::Internal,
            format!("cannot become a child subreaper: {e}"),
        )
    })?;
    match store.clean_leftovers() {
        Ok(0) => {}
        Ok(n) => rep.event(
            "cleaned",
            Some(format!(
                "removed {n} leftover staging/trash entries of an earlier crash"
            )),
            json!({ "count": n }),
        ),
        Err(e) => rep.warn(
            "clean_failed",
            format!("could not clean leftovers: {e}"),
            json!({}),
        ),
    }
    rep.event(
        "start",
        None,
        json!({ "pid": std::process::id(), "command": cmdline, "dir": crate::store::display_path(store.dir()), "cgroup": cgroup.as_ref().map(|c| crate::store::display_path(c.path())) }),
    );

    let uploader = match &cfg.remote {
        Some(s) => Some(start_uploader(s, &store, &tx_keep, &mut rep)?),
        None => None,
    };
    let notices = stop_soon::Notices::load(&store.private());
    let criu = cfg
        .transparent
        .then(|| transparent_probe(&store, &mut rep))
        .flatten();
    let m = Machine::new(machine::Settings {
        every: cfg.every,
        grace: cfg.grace,
        kill_after: cfg.kill_after,
        policy: cfg.policy.clone(),
        // A transparent job is checkpointed from outside: requests go to the edge (a dump).
        signal_explicit: cfg.signal_explicit || criu.is_some(),
        signal: cfg.signal,
        hang_timeout: cfg.hang_timeout,
        hang_signal: cfg.hang_signal,
        checkpoint_timeout: cfg.checkpoint_timeout,
    });
    let dir_id = dir_identity(&store);
    let record = match vouch::load(&store.private()) {
        Ok(r) => r,
        Err(why) => {
            rep.warn(
                "restore_check_record",
                format!("{why}: ignored, resumes are verified in full until the job's client shows again that it verifies its restore (hint: remove the file)"),
                json!({}),
            );
            None
        }
    };
    let mut vouch = vouch::Vouch::new(cfg.restore_check, vouch::command_of(&cfg.command), record);
    recover_light_launch(&store, &mut rep, &mut vouch);
    let mut run = Run {
        cfg,
        store,
        rep,
        rx,
        socket_path,
        m,
        job_pid: None,
        last_commit_ms: None,
        slurm: session,
        control_path,
        started: Instant::now(),
        waits: Vec::new(),
        bad_controls: 0,
        bad_msgs: 0,
        notices,
        last_commit: None,
        cgroup,
        lock_fds: lock.raw_fds(),
        shared,
        dir_id,
        lock,
        tx: tx_keep,
        dir_missing_since: None,
        criu,
        wrapped: None,
        dumps: 0,
        dumps_off: false,
        uploader,
        restoring: None,
        light_launched: Vec::new(),
        vouch,
        tainted: None,
        verified_now: None,
    };
    run.slurm_start();
    let code = run.main_loop();
    run.answer_waits(Err(
        "the supervisor stopped before a checkpoint committed".into()
    ));
    let _ = std::fs::remove_file(&run.socket_path);
    let _ = std::fs::remove_file(&run.control_path);
    if let Some(parent) = run
        .socket_path
        .parent()
        .filter(|p| p.starts_with(std::env::temp_dir()))
    {
        let _ = std::fs::remove_dir(parent);
    }
    if let Some(cg) = run.cgroup.take() {
        cg.remove();
    }
    drop(run.lock);
    code
}

/// A socket path in `DIR/.ckpt`, or in a private temp directory when that path would not fit
/// in `sun_path` (108 bytes).
fn socket_path(store: &Store, name: &str) -> Result<PathBuf, Fatal> {
    let path = store.private().join(name);
    if path.as_os_str().len() <= 100 {
        return Ok(path);
    }
    let d = std::env::temp_dir().join(format!(
        "ckpt-{}-{}-{name}",
        std::process::id(),
        crate::store::manifest::now_ms()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&d)
        .map_err(|e| {
            Fatal::new(
                ErrKind::CantCreate,
                format!("cannot create {}: {e}", d.display()),
            )
        })?;
    Ok(d.join(name))
}

/// What the control thread may read or do without the loop, which may be stuck in disk I/O
/// (a frozen file system): the last status, and the job to kill for `stop --no-checkpoint`.
struct Shared {
    status: Mutex<(serde_json::Value, Instant)>,
    job_pid: AtomicU32,
    cgroup: Option<PathBuf>,
    /// What the loop is doing when it is busy on purpose (a CRIU dump), and since when:
    /// requests then wait for it instead of being told it is stuck.
    busy: Mutex<Option<(&'static str, Instant)>>,
}

/// Marks the loop busy with a known, bounded task until dropped (`Shared::busy`).
struct BusyGuard(Arc<Shared>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut b) = self.0.busy.lock() {
            *b = None;
        }
    }
}

impl Shared {
    /// Marks the loop busy with `what` until the guard is dropped.
    fn busy_with(self: &Arc<Self>, what: &'static str) -> BusyGuard {
        if let Ok(mut b) = self.busy.lock() {
            *b = Some((what, Instant::now()));
        }
        BusyGuard(self.clone())
    }

    /// What to do with a request the loop did not answer in time: `status` and
    /// `stop --no-checkpoint` are answered at once; the others wait for the loop (longer when
    /// it said it is busy with a CRIU dump), then are told it is stuck.
    fn fallback(&self, req: &control::Request) -> control::Fallback {
        use control::Fallback::{Answer, Wait};
        let known = self.busy.lock().ok().and_then(|b| *b);
        if !matches!(
            req,
            control::Request::Status {} | control::Request::Stop { checkpoint: false }
        ) {
            let wait = if known.is_some() {
                control::BUSY_ANSWER_TIMEOUT
            } else {
                control::SLOW_ANSWER_TIMEOUT
            };
            return Wait(wait, self.stuck_answer(req));
        }
        if let Some((what, since)) = known {
            if let control::Request::Status {} = req {
                let (mut v, at) = self
                    .status
                    .lock()
                    .map(|g| g.clone())
                    .unwrap_or_else(|e| e.into_inner().clone());
                v["stale_seconds"] = json!(at.elapsed().as_secs_f64());
                v["busy"] = json!(what);
                v["note"] = json!(format!(
                    "the supervisor is {what} (for {:.1}s); this status is {:.1}s old",
                    since.elapsed().as_secs_f64(),
                    at.elapsed().as_secs_f64()
                ));
                return Answer(v);
            }
        }
        Answer(self.stuck_answer(req))
    }

    /// The answer when the loop is stuck (not busy with a known task).
    fn stuck_answer(&self, req: &control::Request) -> serde_json::Value {
        let busy = "the supervisor's loop is busy (waiting for disk I/O: is the file system frozen or hung?)";
        match req {
            control::Request::Status {} => {
                let (mut v, at) = self
                    .status
                    .lock()
                    .map(|g| g.clone())
                    .unwrap_or_else(|e| e.into_inner().clone());
                v["stale_seconds"] = json!(at.elapsed().as_secs_f64());
                v["note"] = json!(format!(
                    "{busy}; this status is {:.1}s old",
                    at.elapsed().as_secs_f64()
                ));
                v
            }
            control::Request::Stop { checkpoint: false } => {
                let pid = self.job_pid.load(Ordering::SeqCst);
                if pid != 0 {
                    if let Some(cg) = &self.cgroup {
                        let _ = std::fs::write(cg.join("cgroup.kill"), b"1");
                    }
                    spawn::signal_group(pid, libc::SIGKILL);
                    for p in spawn::descendants() {
                        spawn::signal_pid(p, libc::SIGKILL);
                    }
                }
                json!({ "ok": true, "stopping": true, "supervisor_pid": std::process::id(), "will_checkpoint": false, "note": format!("{busy}; the job was killed directly") })
            }
            _ => {
                json!({ "ok": false, "error": format!("{busy}; try again, or `ckpt stop --no-checkpoint`") })
            }
        }
    }
}

fn bind_control(store: &Store, tx: Sender<Ev>, shared: Arc<Shared>) -> Result<PathBuf, Fatal> {
    let path = socket_path(store, "control.sock")?;
    let tx = std::sync::Mutex::new(tx);
    control::serve(
        &path,
        move |ev| {
            tx.lock()
                .map(|t| t.send(Ev::Control(ev)).is_ok())
                .unwrap_or(false)
        },
        move |req| shared.fallback(req),
    )
    .map_err(|e| {
        Fatal::new(
            ErrKind::CantCreate,
            format!("cannot bind control socket {}: {e}", path.display()),
        )
    })?;
    Ok(path)
}

/// The job socket: owner-only (bound under a 0o077 umask), and every datagram carries the
/// sender's credentials (`SO_PASSCRED`), so a hello's pid is checked against its sender.
fn bind_socket(store: &Store, tx: Sender<Ev>) -> Result<PathBuf, Fatal> {
    let path = socket_path(store, "sock")?;
    let _ = std::fs::remove_file(&path);
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixDatagram::bind(&path);
    unsafe { libc::umask(old) };
    let sock = bound.map_err(|e| {
        Fatal::new(
            ErrKind::CantCreate,
            format!("cannot bind job socket {}: {e}", path.display()),
        )
    })?;
    let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true);
    std::thread::Builder::new()
        .name("ckpt-socket".into())
        .spawn(move || {
            let mut buf = vec![0u8; protocol::MAX_MESSAGE_BYTES + 1];
            loop {
                let (n, sender) = match recv_with_creds(&sock, &mut buf) {
                    Ok(x) => x,
                    Err(_) => continue,
                };
                let ev = match Message::parse(&buf[..n]) {
                    Ok(m) => Ev::Msg(m, sender),
                    Err(e) => Ev::BadMsg(e),
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| {
            Fatal::new(
                ErrKind::Internal,
                format!("cannot start socket thread: {e}"),
            )
        })?;
    Ok(path)
}

/// One datagram and the pid of its sender (from `SCM_CREDENTIALS`).
fn recv_with_creds(sock: &UnixDatagram, buf: &mut [u8]) -> std::io::Result<(usize, Option<u32>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::os::fd::AsRawFd;
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let msg = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    let mut sender = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmCredentials(cred) = c {
                sender = Some(cred.pid() as u32);
            }
        }
    }
    Ok((msg.bytes, sender))
}

use std::os::unix::fs::DirBuilderExt;

fn start_signal_thread(tx: Sender<Ev>, extra: Option<i32>) -> Result<(), Fatal> {
    let mut signals = signal_hook::iterator::Signals::new(
        STOP_SIGNALS
            .into_iter()
            .chain(IGNORED_SIGNALS)
            .chain([libc::SIGUSR1, libc::SIGCHLD])
            .chain(extra),
    )
    .map_err(|e| {
        Fatal::new(
            ErrKind::Internal,
            format!("cannot install signal handlers: {e}"),
        )
    })?;
    std::thread::Builder::new()
        .name("ckpt-signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if tx.send(Ev::Signal(s)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| {
            Fatal::new(
                ErrKind::Internal,
                format!("cannot start signal thread: {e}"),
            )
        })?;
    Ok(())
}

/// The loop's I/O side: everything the pure [`Machine`] does not hold.
struct Run {
    cfg: Config,
    store: Store,
    rep: Reporter,
    rx: Receiver<Ev>,
    socket_path: PathBuf,
    /// The state machine.
    m: Machine,
    /// The current launch's leader (its process group).
    job_pid: Option<u32>,
    last_commit_ms: Option<u64>,
    /// Set when running inside a Slurm job with `--slurm auto`.
    slurm: Option<slurm::Session>,
    control_path: PathBuf,
    started: Instant,
    /// `ckpt checkpoint --wait` callers: answered when a checkpoint above the sequence commits.
    waits: Vec<(u64, Sender<serde_json::Value>)>,
    bad_controls: u64,
    bad_msgs: u64,
    notices: stop_soon::Notices,
    /// The newest committed checkpoint this supervisor saw (for `ckpt status`).
    last_commit: Option<serde_json::Value>,
    /// The job's own cgroup (v2), where the machine allows one.
    cgroup: Option<cgroup::Cgroup>,
    /// The directory lock's descriptors (closed in the job's child).
    lock_fds: [Option<std::os::fd::RawFd>; 2],
    /// Shared with the control thread.
    shared: Arc<Shared>,
    /// The device and inode of `DIR/.ckpt` at start: a directory deleted (or replaced) under
    /// a running supervisor is noticed.
    dir_id: Option<(u64, u64)>,
    lock: lock::DirLock,
    /// For re-binding the sockets when the directory was deleted.
    tx: Sender<Ev>,
    /// `DIR/.ckpt` was found missing (or replaced) at this time.
    dir_missing_since: Option<Instant>,
    /// `--transparent` and CRIU works: checkpoint requests become dumps.
    criu: Option<criu::Criu>,
    /// The current launch runs in its own PID namespace (`--transparent`): `Some(true)` when
    /// it is a `criu restore`.
    wrapped: Option<bool>,
    /// Transparent dumps committed in this run.
    dumps: u64,
    /// CRIU could not dump this job: restarts only (CRIU still restores).
    dumps_off: bool,
    /// `--remote`: uploads every commit in the background.
    uploader: Option<crate::remote::Uploader>,
    /// The checkpoint the current launch restores, and how it was checked before it.
    restoring: Option<(u64, protocol::RestoreCheck)>,
    /// `--restore-check client`: the checkpoints a launch already restored after the light
    /// check; a later launch from one of them checks it in full first (a job that failed on
    /// it without a report, e.g. killed, is never relaunched on an unverified one again).
    light_launched: Vec<u64>,
    /// `--restore-check auto`: what the job's client has shown (`vouch.rs`).
    vouch: vouch::Vouch,
    /// The current launch read a damaged checkpoint that no one had verified (the net of
    /// [`Run::vouch_net`]): its seq and the damage. Whatever the launch still publishes
    /// before it is gone is set aside, as derived from it.
    tainted: Option<(u64, String)>,
    /// `pick_restore` verified this checkpoint in full (launched after the light check
    /// before): its launch is a full one.
    verified_now: Option<u64>,
}

/// Opens `--remote` and starts its uploader, whose lines come back through the loop's
/// channel (the uploader never blocks the loop or the job).
fn start_uploader(
    s: &crate::remote::Settings,
    store: &Store,
    tx: &Sender<Ev>,
    rep: &mut Reporter,
) -> Result<crate::remote::Uploader, Fatal> {
    let remote = crate::remote::Remote::open(s)
        .map_err(|e| Fatal::new(ErrKind::Usage, format!("--remote: {e}")))?;
    crate::remote::remember(s, store);
    rep.event(
        "remote",
        Some(format!(
            "checkpoints are uploaded to {} (signed with key {})",
            remote.display,
            remote.key_id()
        )),
        json!({ "remote": remote.display, "key_id": remote.key_id(), "keep": s.keep }),
    );
    let tags = store.clone();
    let tx = std::sync::Mutex::new(tx.clone());
    crate::remote::Uploader::start(
        Arc::new(remote),
        s.keep,
        crate::remote::ShardCfg {
            claims: crate::remote::claims_dir(store),
            ranks: s.ranks.clone(),
            wait: Duration::from_secs(300),
        },
        Box::new(move || tags.tags().map_err(|e| e.to_string())),
        Box::new(move |r| {
            if let Ok(t) = tx.lock() {
                let _ = t.send(Ev::Remote(r));
            }
        }),
    )
    .map_err(|e| {
        Fatal::new(
            ErrKind::Internal,
            format!("cannot start the upload thread: {e}"),
        )
    })
}

/// `--transparent`: finds CRIU and checks it can work here; else says why, once, and the
/// job runs with restarts only.
fn transparent_probe(store: &Store, rep: &mut Reporter) -> Option<criu::Criu> {
    match criu::Criu::probe(store) {
        Ok(c) => {
            let how = c.dump_mode();
            rep.event(
                "transparent",
                Some(format!(
                    "transparent checkpoints with CRIU {} ({}): {how}",
                    c.version,
                    c.bin.display()
                )),
                json!({ "criu": c.bin, "version": c.version, "dirty_tracking": c.dirty_tracking }),
            );
            Some(c)
        }
        Err(why) => {
            rep.warn(
                "transparent_unavailable",
                format!("--transparent: CRIU cannot checkpoint here: {why}; the job runs with restarts only (no checkpoints)"),
                json!({ "cause": why }),
            );
            None
        }
    }
}

/// How long `DIR/.ckpt` may be gone before the supervisor makes it again.
pub const DIR_GRACE: Duration = Duration::from_secs(10);

fn dir_identity(store: &Store) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(store.private())
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes `DIR/.ckpt/<name>` durably (then fsyncs `.ckpt`); already absent is fine.
fn remove_private(store: &Store, name: &str) -> std::io::Result<()> {
    let private = store.private();
    let io = store.io();
    match io.remove_file(&private.join(name)) {
        Ok(()) => io.fsync_dir(&private),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets aside checkpoints `newer`, published by a launch that read damaged checkpoint `seq`
/// without verifying it (`reason`: the damage), slug `derived-from-damaged`.
fn set_aside_derived(store: &Store, rep: &mut Reporter, newer: &[u64], seq: u64, reason: &str) {
    for &n in newer {
        let why = format!("it was written by a launch that restored checkpoint {seq} without verifying every file of it, and checkpoint {seq} is damaged ({reason}): its state may be computed from damaged bytes");
        let said = match store.quarantine_as(n, "derived-from-damaged", &why) {
            Ok(p) => format!("checkpoint {n} set aside to {}: {why}", p.display()),
            Err(e) => {
                format!("checkpoint {n} should be set aside ({why}) but cannot be moved: {e}")
            }
        };
        rep.warn(
            "quarantined",
            said,
            json!({ "seq": n, "reason": why, "derived_from": seq }),
        );
    }
}

/// At start-up: a `light-launch.json` marker means the previous supervisor of this directory
/// died during a light-checked launch whose processes had not all vouched (`vouch.rs`), so
/// its job may have read bytes no one verified and saved what it computed from them. The
/// record is dropped (this start checks in full), and the checkpoint that launch restored is
/// verified now: damaged (or gone: retention keeps it, so only a quarantine or a hand
/// removed it), it and every newer checkpoint are set aside (`derived-from-damaged`), as the
/// net would have done. The marker is then removed.
fn recover_light_launch(store: &Store, rep: &mut Reporter, v: &mut vouch::Vouch) {
    let private = store.private();
    let marker = match vouch::load_marker(&private) {
        Ok(None) => return,
        Ok(Some(m)) => Some(m),
        Err(why) => {
            rep.warn(
                "restore_check_record",
                format!("{why}: ignored (removed)"),
                json!({}),
            );
            None
        }
    };
    // The record of the command that launch ran is void (any record, when the marker cannot
    // be read).
    let void = match (&marker, vouch::load(&private)) {
        (Some(m), Ok(Some(r))) => r.command == m.command,
        (Some(_), _) => false,
        (None, _) => true,
    };
    if void {
        v.forget();
    }
    let names: &[&str] = if void {
        &[vouch::MARKER, vouch::FILE]
    } else {
        &[vouch::MARKER]
    };
    for &name in names {
        if let Err(e) = remove_private(store, name) {
            rep.warn(
                "restore_check_record",
                format!(
                    "cannot remove {}: {e}; hint: remove it by hand",
                    crate::store::display_path(private.join(name))
                ),
                json!({}),
            );
        }
    }
    let Some(m) = marker else { return };
    let seq = m.seq;
    let damage = if std::fs::symlink_metadata(store.path_of(seq)).is_err() {
        Some("it is no longer in the directory (set aside or removed)".to_string())
    } else {
        match store.verify(seq) {
            Ok(_) => None,
            Err(reason) => {
                let (said, _) = set_aside(store, "checkpoint", seq, &reason);
                rep.warn(
                    "quarantined",
                    said,
                    json!({ "seq": seq, "reason": reason.to_string() }),
                );
                Some(reason.to_string())
            }
        }
    };
    let newer: Vec<u64> = store
        .list()
        .map(|l| l.into_iter().map(|(s, _)| s).filter(|&s| s > seq).collect())
        .unwrap_or_default();
    let what = format!("the previous ckpt of this directory stopped during a launch that restored checkpoint {seq} after the light check, before the job's client had vouched for it");
    match damage {
        None => rep.warn(
            "restore_check_full",
            format!(
                "{what}; checkpoint {seq} verified in full now: intact; this start checks in full"
            ),
            json!({ "seq": seq, "intact": true }),
        ),
        Some(reason) => {
            rep.warn(
                "restore_check_full",
                format!("{what}; checkpoint {seq} is damaged ({reason}): the {} checkpoint(s) newer than it are set aside", newer.len()),
                json!({ "seq": seq, "intact": false, "reason": reason }),
            );
            set_aside_derived(store, rep, &newer, seq, &reason);
        }
    }
}

/// Moves checkpoint `seq` ("checkpoint" or "new checkpoint": `what`), which does not verify
/// (`reason`), to `quarantine/`: the `quarantined` warning's text, and whether it moved.
fn set_aside(
    store: &Store,
    what: &str,
    seq: u64,
    reason: &crate::error::Invalid,
) -> (String, bool) {
    match store.quarantine(seq, reason) {
        Ok(p) => (
            format!(
                "{what} {seq} does not verify: {reason}; moved aside to {}",
                p.display()
            ),
            true,
        ),
        Err(e) => (
            format!("{what} {seq} does not verify: {reason}; could not move it aside: {e}"),
            false,
        ),
    }
}

/// A checkpoint's progress mark: sequence, step, and a digest of its files' checksums.
fn mark_of(m: &Manifest) -> Mark {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in &m.files {
        (&f.name, f.size, f.sum).hash(&mut h);
    }
    Mark {
        seq: m.seq,
        step: m.step,
        digest: h.finish(),
    }
}

impl Run {
    fn main_loop(&mut self) -> Result<i32, Fatal> {
        let tick = Duration::from_millis(500);
        let mut queue: VecDeque<Action> = self.m.start().into();
        let mut last_scan = Instant::now();
        let mut last_live = Instant::now();
        loop {
            while let Some(a) = queue.pop_front() {
                if let Some(code) = self.act(a, &mut queue)? {
                    return Ok(code);
                }
            }
            let now = Instant::now();
            let slurm_stop_at = self
                .slurm
                .as_ref()
                .and_then(|s| s.stop_at())
                .filter(|_| self.m.stop.is_none());
            let wake = [self.m.next_wake(), slurm_stop_at]
                .into_iter()
                .flatten()
                .fold(now + tick, |a, b| a.min(b));
            let evs = match self.rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(ev) => self.translate(ev),
                Err(RecvTimeoutError::Timeout) => Vec::new(),
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(tick);
                    Vec::new()
                }
            };
            for ev in evs {
                queue.extend(self.m.on(ev, Instant::now()));
            }
            self.reap(&mut queue);
            let now = Instant::now();
            if self.job_pid.is_some() && now.duration_since(last_scan) >= Duration::from_secs(1) {
                last_scan = now;
                self.rescan(&mut queue);
            }
            if slurm_stop_at.is_some_and(|t| now >= t) {
                if let Some(ev) = self.slurm_time_limit() {
                    queue.extend(self.m.on(ev, now));
                }
            }
            queue.extend(self.m.on(Event::Tick, now));
            if now.duration_since(last_live) >= Duration::from_secs(1) {
                last_live = now;
                let line = self.live_line();
                self.rep.live(line);
                self.share_status();
                self.check_dir(false);
            }
        }
    }

    /// Reaps children; when the leader is gone, ends the rest of its tree, rescans, and tells
    /// the machine.
    fn reap(&mut self, queue: &mut VecDeque<Action>) {
        for (pid, exit) in spawn::reap() {
            if Some(pid) != self.job_pid {
                continue;
            }
            self.rep.live(None);
            if matches!(self.restoring, Some((_, protocol::RestoreCheck::Client))) {
                // A client that found its checkpoint damaged reports it and ends: take in
                // what it sent before its exit is judged (a report is a relaunch, not a
                // failure). Bounded: ranks still alive may keep sending.
                let until = Instant::now() + Duration::from_millis(200);
                while let Ok(ev) = self.rx.recv_timeout(
                    until
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(20)),
                ) {
                    for ev in self.translate(ev) {
                        queue.extend(self.m.on(ev, Instant::now()));
                    }
                }
            }
            self.restore_failed(exit);
            self.kill_tree_wait(pid);
            self.job_pid = None;
            self.shared.job_pid.store(0, Ordering::SeqCst);
            // The launch is still current here: a checkpoint its last moments published
            // goes through the net (`vouch_net`) before the launch is closed.
            self.rescan(queue);
            let light = matches!(self.restoring, Some((_, protocol::RestoreCheck::Client)));
            if let Some(why) = self.vouch.ended() {
                self.drop_vouch_record(&why);
            }
            if light {
                self.clear_light_marker();
            }
            queue.extend(self.m.on(
                Event::Exited {
                    exit,
                    jitter: fastrand::f64(),
                },
                Instant::now(),
            ));
        }
    }

    /// SIGKILLs what is left of the tree of leader `pid` and waits (10 s at most).
    fn kill_tree_wait(&mut self, pid: u32) {
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
        let (_, left) = spawn::kill_tree(Some(pid), Duration::from_secs(10));
        if !left.is_empty() {
            self.rep.warn(
                "orphans",
                format!(
                    "processes {} of the job did not die after SIGKILL within 10s",
                    left.iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                json!({ "pids": left }),
            );
        }
    }

    /// Carries out one action; `Some(code)` ends the run.
    fn act(&mut self, a: Action, queue: &mut VecDeque<Action>) -> Result<Option<i32>, Fatal> {
        match a {
            Action::Launch => {
                // The directory may have been deleted since the last look: a launch needs it.
                self.check_dir(true);
                // Every process of the previous launch is gone: a rank killed while writing
                // its shard leaves a staging directory of a dead pid (docs/multi-rank.md).
                if self.m.hist.restarts > 0 {
                    let _ = self.store.clean_leftovers();
                }
                let restore = self.pick_restore()?;
                let restore = self.restorable(restore)?;
                let pid = self.launch(restore.as_ref())?;
                self.job_pid = Some(pid);
                self.shared.job_pid.store(pid, Ordering::SeqCst);
                let restored = restore.as_ref().map(|f| mark_of(&f.manifest));
                queue.extend(self.m.on(Event::Launched { pid, restored }, Instant::now()));
            }
            Action::Signal { pid, sig } => {
                // Never signal a pid that is no longer ours (it may have been reused).
                if spawn::is_descendant(pid) || (self.slurm.is_some() && slurm::is_job_peer(pid)) {
                    spawn::signal_pid(pid, sig);
                }
            }
            Action::SignalGroup(sig)
                if self.wrapped.is_some() && self.transparent_signal(sig, queue) => {}
            Action::SignalGroup(sig) => {
                if let Some(pid) = self.job_pid {
                    if sig == libc::SIGTERM {
                        spawn::signal_group(pid, libc::SIGCONT);
                        spawn::signal_group(pid, sig);
                    } else if sig == self.cfg.signal && self.cfg.signal_to == SignalTo::Leader {
                        spawn::signal_pid(pid, sig);
                    } else {
                        spawn::signal_group(pid, sig);
                    }
                }
            }
            Action::KillTree => {
                if let Some(pid) = self.job_pid {
                    if let Some(cg) = &self.cgroup {
                        cg.kill();
                    }
                    spawn::signal_group(pid, libc::SIGKILL);
                    for p in spawn::descendants() {
                        spawn::signal_pid(p, libc::SIGKILL);
                    }
                }
            }
            Action::Rescan => self.rescan(queue),
            Action::Log(l) => {
                if l.warn {
                    self.rep.warn(l.event, l.human.unwrap_or_default(), l.data);
                } else {
                    self.rep.event(l.event, l.human, l.data);
                }
            }
            Action::Status => self.write_status(),
            Action::FailWaits(e) => self.answer_waits(Err(e)),
            Action::MarkFinished => self.mark_finished(),
            Action::Finish(outcome) => return Ok(Some(self.finish(outcome))),
        }
        Ok(None)
    }

    fn finish(&mut self, outcome: Outcome) -> i32 {
        self.write_status();
        if let Some(code) = self.remote_flush(matches!(outcome, Outcome::Stopped)) {
            return code;
        }
        match outcome {
            Outcome::Finished => {
                self.remote_mark_finished();
                self.rep.event(
                    "finished",
                    Some("job finished successfully".into()),
                    json!({}),
                );
                exit_codes::FINISHED
            }
            Outcome::GaveUp { code } => code,
            Outcome::Stopped => {
                let seq = self.m.last_seq();
                let progress = self.m.progress_this_run;
                let stalled = if progress {
                    0
                } else {
                    self.notices.stalled_stops + 1
                };
                let newest = if seq > 0 {
                    format!("newest checkpoint {seq}")
                } else {
                    "no checkpoint yet".into()
                };
                let max = self.cfg.max_stops_without_progress;
                if stalled > max {
                    self.rep.warn(
                        "stalled",
                        format!("stopped ({newest}); the job was stopped {stalled} times in a row without making progress since its launch (more than --max-stops-without-progress {max}): giving up instead of {}; exit {} (hint: give the job more time per run (a longer --time, a smaller --slurm-margin), or make it checkpoint earlier with --every)", if self.slurm.is_some() { "requeuing it" } else { "asking to be run again" }, exit_codes::NO_PROGRESS),
                        json!({ "code": exit_codes::NO_PROGRESS, "seq": seq, "stops_without_progress": stalled }),
                    );
                    self.notice_after_stop();
                    return exit_codes::NO_PROGRESS;
                }
                let taken = if self.m.commits > 0 {
                    String::new()
                } else {
                    "; no checkpoint was taken in this run".into()
                };
                self.rep.event(
                    "stopped",
                    Some(format!(
                        "stopped ({newest}{taken}); exit {} = run me again to resume",
                        exit_codes::TEMPFAIL
                    )),
                    json!({ "code": exit_codes::TEMPFAIL, "seq": seq, "progress": progress, "stops_without_progress": stalled, "commits": self.m.commits }),
                );
                self.notice_after_stop();
                self.slurm_after_stop()
            }
        }
    }

    /// Turns what a source sent into machine events (checking hellos and answering control
    /// requests on the way).
    fn translate(&mut self, ev: Ev) -> Vec<Event> {
        match ev {
            Ev::Signal(libc::SIGCHLD) => vec![],
            Ev::Signal(s)
                if self
                    .slurm
                    .as_ref()
                    .is_some_and(|sl| sl.settings.warning_signal == s) =>
            {
                vec![Event::SlurmWarning(s)]
            }
            Ev::Signal(libc::SIGUSR1) => vec![Event::CheckpointAsked(Why::OnDemand)],
            Ev::Signal(s) if STOP_SIGNALS.contains(&s) => {
                if s == libc::SIGTERM && self.slurm.is_some() && self.m.stop.is_none() {
                    // Slurm signals every process of the job at once: a second SIGTERM to
                    // the clients would make them exit without saving.
                    self.m.job_got_sigterm = true;
                }
                vec![Event::StopSignal(s)]
            }
            Ev::Signal(s) => {
                self.rep.event(
                    "signal_ignored",
                    Some(format!(
                        "ignored {} (not a stop or checkpoint signal for ckpt)",
                        signame(s)
                    )),
                    json!({ "signal": s }),
                );
                vec![]
            }
            Ev::Msg(m, sender) => self.on_message(m, sender),
            Ev::BadMsg(e) => {
                self.bad_msgs += 1;
                let n = self.bad_msgs;
                if n <= 5 || n.is_power_of_two() {
                    self.rep.warn(
                        "bad_message",
                        format!(
                            "ignored a malformed message on {}: {e} ({n} so far)",
                            self.socket_path.display()
                        ),
                        json!({ "error": e, "count": n }),
                    );
                }
                vec![]
            }
            Ev::Control(ev) => self.on_control(ev),
            Ev::External(x) => self.on_external(x).into_iter().collect(),
            Ev::Remote(r) => {
                if r.warn {
                    self.rep.warn(r.event, r.human, r.data);
                } else {
                    self.rep.event(r.event, Some(r.human), r.data);
                }
                vec![]
            }
        }
    }

    fn on_message(&mut self, m: Message, sender: Option<u32>) -> Vec<Event> {
        match m {
            Message::Hello {
                pid,
                signal,
                client,
                rank,
                ..
            } => {
                let refused = match sender {
                    Some(s) if s != pid => {
                        Some(format!("it names pid {pid} but was sent by pid {s}"))
                    }
                    _ if !(spawn::is_descendant(pid)
                        || (self.slurm.is_some() && slurm::is_job_peer(pid))) =>
                    {
                        Some("not a process of the job".into())
                    }
                    _ => None,
                };
                vec![Event::Hello {
                    pid,
                    signal,
                    client,
                    rank,
                    refused,
                }]
            }
            Message::Progress { step, .. } => vec![Event::Progress { step }],
            Message::Committed {
                duration_ms,
                blocked_ms,
                ..
            } => {
                self.last_commit_ms = Some(duration_ms);
                self.auto_adjust(duration_ms, blocked_ms);
                if let Some(sl) = self.slurm.as_mut() {
                    sl.note_save(duration_ms);
                }
                vec![Event::SaveReported { duration_ms }]
            }
            Message::SaveFailed { pid, error, .. } => vec![Event::SaveFailed { pid, error }],
            Message::RestoreFailed {
                pid, seq, error, ..
            } => self.on_restore_failed(pid, sender, seq, error),
            Message::RestoreVerified { pid, seq, rank, .. } => {
                self.on_restore_verified(pid, sender, seq, rank);
                vec![]
            }
        }
    }

    /// A client says its verifying reads covered every file of the checkpoint it restores
    /// (`vouch.rs`). Taken only from its real sender (`SCM_CREDENTIALS`), a live process of
    /// the job, naming the checkpoint this launch restores; once every rank
    /// has said it, the record is written so that the next launches of this command (and the
    /// next `ckpt run`) read their checkpoint once under `--restore-check auto`.
    fn on_restore_verified(&mut self, pid: u32, sender: Option<u32>, seq: u64, rank: Option<u32>) {
        let heard = match sender {
            Some(s) if s != pid => {
                vouch::Heard::Ignored(format!("it names pid {pid} but was sent by pid {s}"))
            }
            // Unlike a damage report (which only ever leads to a verify), this one makes the
            // next launches skip a verify: only a live process of the job's tree may send it.
            // A process that announced a client in this launch counts even if it is gone by
            // now (a vouch read at the job's exit).
            _ if !(spawn::is_descendant(pid)
                || self
                    .m
                    .job
                    .as_ref()
                    .is_some_and(|j| j.announced.contains_key(&pid))
                || (self.slurm.is_some() && slurm::is_job_peer(pid))) =>
            {
                vouch::Heard::Ignored("not a process of the job".into())
            }
            _ => self
                .vouch
                .heard(seq, rank, crate::store::manifest::now_ms()),
        };
        let info = json!({ "pid": pid, "seq": seq, "rank": rank });
        match heard {
            vouch::Heard::Ignored(why) => self.rep.event(
                "restore_verified_ignored",
                None,
                json!({ "pid": pid, "seq": seq, "rank": rank, "why": why }),
            ),
            vouch::Heard::Repeat => {}
            vouch::Heard::Counted { got, need } => self.rep.event(
                "restore_verified",
                None,
                json!({ "pid": pid, "seq": seq, "rank": rank, "ranks": got, "of": need }),
            ),
            vouch::Heard::Complete(record) => {
                let new = record.is_some();
                if self
                    .restoring
                    .is_some_and(|(_, h)| h == protocol::RestoreCheck::Client)
                {
                    self.clear_light_marker();
                }
                if let Some(r) = record {
                    let body = serde_json::to_vec(&r).expect("a record serialises");
                    if let Err(e) = self.write_private(vouch::FILE, &body) {
                        self.rep.warn(
                            "restore_check_record",
                            format!("cannot record that the job's client verifies its restore ({e}): the next resumes are checked in full"),
                            json!({}),
                        );
                    }
                }
                let auto = self.cfg.restore_check == protocol::RestoreCheckMode::Auto;
                self.rep.event(
                    "restore_verified",
                    (new && auto).then(|| format!("the job's client verified every file of checkpoint {seq} as it restored it: from now on a resume of this command reads its checkpoint once (--restore-check auto)")),
                    info,
                );
            }
        }
    }

    /// What the net found (`intact` or not) about checkpoint `seq`, said once: as the reason
    /// the record is dropped when it was this command's (`ours`), else as its own warning.
    fn late_verdict(&mut self, ours: bool, seq: u64, intact: bool, why: String) {
        if ours {
            self.drop_vouch_record(&why);
        } else {
            self.rep.warn(
                "restore_checked_late",
                why,
                json!({ "seq": seq, "intact": intact }),
            );
        }
    }

    /// Sets aside checkpoints `newer`, published by a launch that read damaged checkpoint
    /// `seq` without verifying it (`reason`: the damage), slug `derived-from-damaged`.
    fn set_aside_derived(&mut self, newer: &[u64], seq: u64, reason: &str) {
        set_aside_derived(&self.store, &mut self.rep, newer, seq, reason);
    }

    /// Before a light-checked launch: `DIR/.ckpt/light-launch.json` says which checkpoint it
    /// restores, until its processes have vouched or it ended, so that a supervisor that dies
    /// meanwhile leaves a trace the next one acts on (`recover_light_launch`).
    fn write_light_marker(&mut self, seq: u64) {
        let m = vouch::Marker {
            v: 1,
            seq,
            t_ms: crate::store::manifest::now_ms(),
            command: vouch::command_of(&self.cfg.command),
        };
        let body = serde_json::to_vec(&m).expect("a marker serialises");
        if let Err(e) = self.write_private(vouch::MARKER, &body) {
            self.rep.warn(
                "restore_check_record",
                format!("cannot write {} ({e}): should ckpt die before the job's client has vouched for checkpoint {seq}, the next run will not know that it was restored after the light check", vouch::MARKER),
                json!({ "seq": seq }),
            );
        }
    }

    fn clear_light_marker(&mut self) {
        if let Err(e) = remove_private(&self.store, vouch::MARKER) {
            let path = self.store.private().join(vouch::MARKER);
            self.rep.warn(
                "restore_check_record",
                format!("cannot remove {}: {e}; the next ckpt run will verify checkpoints it need not (hint: remove it by hand)", crate::store::display_path(&path)),
                json!({}),
            );
        }
    }

    /// Removes the `--restore-check auto` record: the next launch is checked in full.
    fn drop_vouch_record(&mut self, why: &str) {
        let path = self.store.private().join(vouch::FILE);
        let gone = remove_private(&self.store, vouch::FILE);
        let mut text = match self.cfg.restore_check {
            protocol::RestoreCheckMode::Auto => format!(
                "{why}: the next resume verifies its checkpoint in full (--restore-check auto)"
            ),
            _ => format!(
                "{why}: the record that this command's client vouches for its restores is dropped"
            ),
        };
        if let Err(e) = gone {
            text.push_str(&format!(
                "; but {} cannot be removed ({e}): remove it by hand",
                crate::store::display_path(&path)
            ));
        }
        self.rep
            .warn("restore_check_full", text, json!({ "why": why }));
    }

    /// The net under a light check: the current launch restored checkpoint `seq` after the
    /// light check and published a newer one before its client vouched for every file of
    /// `seq`, so the job may have read bytes no one checked (its own code reading
    /// `$CKPT_RESTORE`) and saved what it computed from them. `seq` is verified in full now
    /// (from the page cache, usually). Intact: the record is dropped (this job does not only
    /// read through the client) and the rescan goes on. Damaged: it is set aside, and so is
    /// every checkpoint newer than it (`newer`: they may hold state computed from damaged
    /// bytes; slug `derived-from-damaged`), and the machine stops the job and relaunches it
    /// from the newest that verifies. Returns whether the rescan must stop there.
    fn vouch_net(&mut self, newer: &[u64], queue: &mut VecDeque<Action>) -> bool {
        if let Some((seq, reason)) = self.tainted.clone() {
            self.set_aside_derived(newer, seq, &reason);
            return true;
        }
        if self.vouch.pending().is_some() {
            // A vouch sent just before the save may still wait in the channel: take in what
            // is there first (without waiting), so that a job that vouched is not netted.
            // Bounded: ranks still running may keep sending.
            for _ in 0..1024 {
                let Ok(ev) = self.rx.try_recv() else { break };
                for ev in self.translate(ev) {
                    queue.extend(self.m.on(ev, Instant::now()));
                }
            }
        }
        let Some(seq) = self.vouch.net() else {
            return false;
        };
        let _busy = self
            .shared
            .busy_with("verifying the checkpoint the job restored before taking in its new one");
        let ours = self.vouch.forget();
        let newest = newer.iter().max().copied().unwrap_or(seq);
        if std::fs::symlink_metadata(self.store.path_of(seq)).is_err() {
            // Set aside already (a client's damage report, taken in the drain): what the
            // launch published without vouching derives from a damaged checkpoint.
            let reason = "it was set aside as damaged".to_string();
            self.tainted = Some((seq, reason.clone()));
            self.set_aside_derived(newer, seq, &reason);
            if ours {
                self.drop_vouch_record(&format!("the job published checkpoint {newest} after checkpoint {seq}, which it restored after the light check, was set aside as damaged"));
            }
            return true;
        }
        match self.store.verify(seq) {
            Ok(_) => {
                self.light_launched.retain(|&s| s != seq);
                // Nothing is left for a successor to check: the marker goes.
                self.clear_light_marker();
                self.late_verdict(ours, seq, true, format!(
                    "the job published checkpoint {newest} before its client verified every file of checkpoint {seq}, which it restored after the light check; checkpoint {seq} was verified in full now and is intact"
                ));
                false
            }
            Err(reason) => {
                let (said, _) = set_aside(&self.store, "checkpoint", seq, &reason);
                self.rep.warn(
                    "quarantined",
                    said,
                    json!({ "seq": seq, "reason": reason.to_string() }),
                );
                self.tainted = Some((seq, reason.to_string()));
                self.set_aside_derived(newer, seq, &reason.to_string());
                self.late_verdict(ours, seq, false, format!(
                    "the job published checkpoint {newest} before its client verified every file of checkpoint {seq}, which it restored after the light check and which is damaged"
                ));
                queue.extend(self.m.on(
                    Event::RestoreRejected {
                        seq,
                        error: reason.to_string(),
                    },
                    Instant::now(),
                ));
                true
            }
        }
    }

    /// A client says the checkpoint it is restoring is damaged (`--restore-check client`).
    /// Taken only when it names its real sender (`SCM_CREDENTIALS`) and the checkpoint this
    /// launch restores; then verified here in full: damaged, it is set aside and the machine
    /// relaunches from the next one; intact, it stays and the report is logged. The sender
    /// need not still be a process of the job: a client reports and exits at once, and may be
    /// reaped before the report is read. A report cannot do harm: only the supervisor's own
    /// verify sets a checkpoint aside (and then it is damaged).
    fn on_restore_failed(
        &mut self,
        pid: u32,
        sender: Option<u32>,
        seq: u64,
        error: String,
    ) -> Vec<Event> {
        let untrusted = match sender {
            Some(s) if s != pid => Some(format!("it names pid {pid} but was sent by pid {s}")),
            _ => None,
        };
        let ours = self.restoring.map(|(s, _)| s) == Some(seq);
        if let Some(why) = untrusted
            .or_else(|| (!ours).then(|| format!("this launch does not restore checkpoint {seq}")))
        {
            self.rep.warn(
                "restore_failed_ignored",
                format!("ignored a report that checkpoint {seq} is damaged (pid {pid}): {why}"),
                json!({ "pid": pid, "seq": seq, "error": error, "why": why }),
            );
            return vec![];
        }
        let _busy = self
            .shared
            .busy_with("verifying a checkpoint a client reported damaged");
        match self.store.verify(seq) {
            Ok(_) => {
                self.rep.warn(
                    "restore_failed_but_verifies",
                    format!("the job (pid {pid}) reported checkpoint {seq} damaged ({error}), but it verifies: kept; if the job fails, that counts as its own failure"),
                    json!({ "pid": pid, "seq": seq, "error": error }),
                );
                vec![]
            }
            Err(reason) => {
                if std::fs::symlink_metadata(self.store.path_of(seq)).is_err() {
                    // Already gone (set aside by a report of another rank).
                    return vec![];
                }
                let (said, _) = set_aside(&self.store, "checkpoint", seq, &reason);
                self.rep.warn(
                    "quarantined",
                    said,
                    json!({ "seq": seq, "reason": reason.to_string(), "reported_by": pid }),
                );
                vec![Event::RestoreRejected {
                    seq,
                    error: reason.to_string(),
                }]
            }
        }
    }

    fn pick_restore(&mut self) -> Result<Option<Found>, Fatal> {
        if self.m.hist.restarts == 0 {
            // Only before the first launch: a restart on this machine has the newest.
            self.remote_restore();
        }
        let mut bad = Vec::new();
        // A CRIU image is restored by CRIU, which checks nothing: always in full.
        let check = match self.vouch.check(self.criu.is_some()) {
            protocol::RestoreCheck::Client => crate::store::Check::Sizes,
            protocol::RestoreCheck::Full => crate::store::Check::Full,
        };
        let mut found = self
            .store
            .latest_checked(check, true, |b| bad.push(b.to_string()))
            .map_err(|e| Fatal::new(ErrKind::Io, format!("cannot scan checkpoints: {e}")))?;
        // Launched from after the light check already: this time in full.
        while let Some(f) = found
            .as_ref()
            .filter(|f| check == crate::store::Check::Sizes && self.light_launched.contains(&f.seq))
        {
            let seq = f.seq;
            match self.store.verify(seq) {
                Ok(_) => {
                    self.light_launched.retain(|&s| s != seq);
                    self.verified_now = Some(seq);
                    break;
                }
                Err(reason) => {
                    let (said, moved) = set_aside(&self.store, "checkpoint", seq, &reason);
                    bad.push(said);
                    if !moved {
                        return Err(Fatal::new(
                            ErrKind::Io,
                            format!("checkpoint {seq} does not verify and cannot be moved aside"),
                        ));
                    }
                    found = self
                        .store
                        .latest_checked(check, true, |b| bad.push(b.to_string()))
                        .map_err(|e| {
                            Fatal::new(ErrKind::Io, format!("cannot scan checkpoints: {e}"))
                        })?;
                }
            }
        }
        for b in &bad {
            self.rep
                .warn("quarantined", b.clone(), json!({ "detail": b }));
        }
        match found {
            Some(f) => {
                if f.seq > self.m.last_seq() {
                    self.m.last = Some(mark_of(&f.manifest));
                }
                if let Some(u) = &self.uploader {
                    // Uploaded unless it already is there (an upload cut short by a crash).
                    u.submit(f.seq, f.path.clone());
                }
                Ok(Some(f))
            }
            None => {
                let qdir = self.store.dir().join(crate::store::QUARANTINE);
                let quarantined = std::fs::read_dir(&qdir)
                    .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).count())
                    .unwrap_or(0);
                if quarantined > 0 && !self.cfg.allow_fresh {
                    return Err(Fatal::new(ErrKind::Data, format!(
                            "no checkpoint in {} verifies ({quarantined} set aside in {}); refusing to start the job from scratch; hint: inspect them with `ckpt verify`, or pass --allow-fresh to start over",
                            self.store.dir().display(),
                            qdir.display()
                        ),
                    ));
                }
                Ok(None)
            }
        }
    }

    fn launch(&mut self, restore: Option<&Found>) -> Result<u32, Fatal> {
        let dir = self.store.dir().as_os_str().to_owned();
        let restarts = self.m.hist.restarts;
        let mut env: Vec<(String, OsString)> = vec![
            (protocol::ENV_DIR.into(), dir),
            (
                protocol::ENV_RESTART_COUNT.into(),
                restarts.to_string().into(),
            ),
            (
                protocol::ENV_SOCKET.into(),
                self.socket_path.as_os_str().to_owned(),
            ),
            (
                protocol::ENV_SIGNAL.into(),
                self.cfg.signal.to_string().into(),
            ),
            (
                protocol::ENV_PROTOCOL.into(),
                protocol::PROTOCOL_VERSION.to_string().into(),
            ),
            (
                protocol::ENV_SUPERVISOR_PID.into(),
                std::process::id().to_string().into(),
            ),
        ];
        env.push((
            protocol::ENV_START.into(),
            protocol::start_kind(restore.map(|f| &f.manifest)).into(),
        ));
        // Empty values mean "unset" to every client (see docs/protocol.md).
        let (how, why) = match restore {
            // Verified in full just now (launched after the light check before): said so.
            Some(f) if self.verified_now == Some(f.seq) => (
                protocol::RestoreCheck::Full,
                "verified in full: launched after the light check before".to_string(),
            ),
            _ => (
                self.vouch.check(self.criu.is_some()),
                self.vouch.why(self.criu.is_some()),
            ),
        };
        self.verified_now = None;
        self.tainted = None;
        if let (Some(f), protocol::RestoreCheck::Client) = (restore, how) {
            self.write_light_marker(f.seq);
        }
        self.restoring = restore.map(|f| {
            if how == protocol::RestoreCheck::Client {
                self.light_launched.push(f.seq);
            }
            (f.seq, how)
        });
        self.vouch
            .launched(restore.map(|f| (f.seq, how, f.manifest.world_size.unwrap_or(1))));
        match restore {
            Some(f) => {
                env.push((protocol::ENV_RESTORE.into(), f.path.as_os_str().to_owned()));
                let how = self.restoring.map(|(_, h)| h).unwrap_or_default();
                env.push((protocol::ENV_RESTORE_CHECK.into(), how.as_str().into()));
                env.push((protocol::ENV_RESTORE_SEQ.into(), f.seq.to_string().into()));
                env.push((
                    protocol::ENV_RESTORE_STEP.into(),
                    f.manifest
                        .step
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                        .into(),
                ));
            }
            None => {
                for k in [
                    protocol::ENV_RESTORE,
                    protocol::ENV_RESTORE_SEQ,
                    protocol::ENV_RESTORE_STEP,
                    protocol::ENV_RESTORE_CHECK,
                ] {
                    env.push((k.into(), OsString::new()));
                }
            }
        }
        let cgroup_procs = self.cgroup.as_ref().map(|c| c.procs_path());
        let command = match &self.criu {
            Some(c) => match restore.filter(|f| criu::is_image(f)) {
                Some(f) => Ok(c.restore_command(f)),
                None => criu::runnable(&self.cfg.command[0])
                    .map(|()| criu::Criu::wrap(&self.cfg.command)),
            },
            None => Ok(self.cfg.command.clone()),
        };
        self.wrapped = self
            .criu
            .as_ref()
            .map(|_| restore.is_some_and(criu::is_image));
        let spawned = command.and_then(|command| {
            spawn::launch(&command, &env, cgroup_procs.as_deref(), self.lock_fds)
        });
        if spawned.is_err() && how == protocol::RestoreCheck::Client && restore.is_some() {
            self.clear_light_marker();
        }
        let pid = spawned.map_err(|e| {
            let prog = self.cfg.command[0].to_string_lossy();
            match e.kind() {
                std::io::ErrorKind::NotFound => Fatal::new(ErrKind::NotFound, format!("cannot run `{prog}`: command not found; hint: check the spelling and PATH, or give a path")),
                std::io::ErrorKind::PermissionDenied => Fatal::new(ErrKind::CannotExecute, format!("cannot run `{prog}`: permission denied; hint: chmod +x it")),
                _ => Fatal::new(ErrKind::CannotExecute, format!("cannot run `{prog}`: {e}")),
            }
        })?;
        let what = match restore {
            Some(f) => format!(
                "resuming from checkpoint {}{} ({})",
                f.seq,
                f.manifest
                    .step
                    .map(|s| format!(" at step {s}"))
                    .unwrap_or_default(),
                why
            ),
            None => "fresh start".into(),
        };
        self.rep.event(
            "launch",
            Some(format!("launched job (pid {pid}), {what}{}", if restarts > 0 { format!(", restart {restarts}") } else { String::new() })),
            json!({ "pid": pid, "restart": restarts, "restore_seq": restore.map(|f| f.seq), "restore_step": restore.and_then(|f| f.manifest.step), "restore_check": self.restoring.map(|(_, h)| h.as_str()), "restore_check_mode": self.cfg.restore_check.as_str(), "restore_check_why": restore.map(|_| why) }),
        );
        Ok(pid)
    }

    /// Looks for checkpoints newer than the newest known; verifies them; prunes; tells the
    /// machine about the newest that verifies.
    fn rescan(&mut self, queue: &mut VecDeque<Action>) {
        let last_seq = self.m.last_seq();
        let list = match self.store.list() {
            Ok(l) => l,
            Err(e) => {
                self.rep.warn(
                    "scan_failed",
                    format!("cannot list checkpoints: {e}"),
                    json!({}),
                );
                return;
            }
        };
        let newer: Vec<_> = list.into_iter().filter(|(s, _)| *s > last_seq).collect();
        if newer.is_empty() {
            return;
        }
        let seqs: Vec<u64> = newer.iter().map(|(s, _)| *s).collect();
        if self.vouch_net(&seqs, queue) {
            return;
        }
        let mut found = None;
        for (seq, _) in newer.iter().rev() {
            match self.store.verify(*seq) {
                Ok(m) => {
                    found = Some(m);
                    break;
                }
                Err(reason) => {
                    let (said, _) = set_aside(&self.store, "new checkpoint", *seq, &reason);
                    self.rep.warn(
                        "quarantined",
                        said,
                        json!({ "seq": seq, "reason": reason.to_string() }),
                    );
                }
            }
        }
        let Some(m) = found else { return };
        let dur = self.last_commit_ms.take();
        let requested = match self.m.phase {
            Phase::Checkpointing { since } => Some(since),
            _ => None,
        };
        self.notice_committed(m.seq, dur, requested);
        let mark = mark_of(&m);
        let progress = match self.m.job.as_ref() {
            Some(j) => machine::is_progress(j.restored, mark),
            None => true,
        };
        let info = json!({ "seq": m.seq, "step": m.step, "bytes": m.total_bytes(), "duration_ms": dur, "created_ms": m.created_ms });
        self.answer_waits(Ok(info.clone()));
        self.last_commit = Some(info);
        self.rep.event(
            "committed",
            Some(format!(
                "checkpoint {} committed{} ({}{}){}",
                m.seq,
                m.step.map(|s| format!(" at step {s}")).unwrap_or_default(),
                fmt_bytes(m.total_bytes()),
                dur.map(|d| format!(", saved in {d} ms")).unwrap_or_default(),
                if progress { "" } else { "; not beyond the checkpoint this launch restored: no progress" }
            )),
            json!({ "seq": m.seq, "step": m.step, "bytes": m.total_bytes(), "duration_ms": dur, "files": m.files.len(), "progress": progress }),
        );
        queue.extend(self.m.on(Event::Committed(mark), Instant::now()));
        let mut protect = vec![self.m.last_seq()];
        // The restore checkpoint of a light launch not vouched for yet: the net may need it.
        protect.extend(self.vouch.pending());
        if let Some(u) = &self.uploader {
            u.submit(m.seq, self.store.path_of(m.seq));
            protect.extend(u.busy());
        }
        match self
            .store
            .prune(self.cfg.keep, self.cfg.keep_every, &protect)
        {
            Ok(gone) if !gone.is_empty() => {
                self.rep.event(
                    "pruned",
                    Some(format!(
                        "retention removed checkpoint{} {}",
                        if gone.len() == 1 { "" } else { "s" },
                        gone.iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    json!({ "seqs": gone }),
                );
            }
            Ok(_) => {}
            Err(e) => self
                .rep
                .warn("prune_failed", format!("retention failed: {e}"), json!({})),
        }
    }

    /// Records durably that the job finished (`DIR/.ckpt/finished`), through the store's one
    /// door to disk: write a temporary file, fsync, rename over, fsync the directory.
    fn mark_finished(&mut self) {
        let path = self.store.private().join("finished");
        let body = json!({ "t_ms": crate::store::manifest::now_ms(), "exit": 0 }).to_string();
        if let Err(e) = self.write_private("finished", body.as_bytes()) {
            self.rep.warn(
                "finish_marker",
                format!(
                    "cannot record that the job finished in {}: {e}",
                    crate::store::display_path(&path)
                ),
                json!({}),
            );
        }
    }

    /// Replaces `DIR/.ckpt/<name>` durably, through the store's one door to disk: write a
    /// temporary file, fsync, rename over, fsync the directory.
    fn write_private(&self, name: &str, body: &[u8]) -> std::io::Result<()> {
        let private = self.store.private();
        let path = private.join(name);
        let tmp = private.join(format!("{name}.tmp"));
        let io = self.store.io();
        let _ = io.remove_file(&tmp);
        io.write_new(&tmp, body)?;
        io.fsync_file(&tmp)?;
        io.rename_replace(&tmp, &path)?;
        io.fsync_dir(&private)
    }

    /// Handles a request on the control socket.
    fn on_control(&mut self, ev: control::ControlEvent) -> Vec<Event> {
        use control::{ControlEvent, Request};
        match ev {
            ControlEvent::Refused { uid, pid } => {
                self.rep.warn(
                    "control_refused",
                    format!("refused a control connection from uid {uid} (pid {pid}): only the supervisor's own user may control it"),
                    json!({ "uid": uid, "pid": pid }),
                );
                vec![]
            }
            ControlEvent::Malformed(e) => {
                self.bad_controls += 1;
                if self.bad_controls <= 5 || self.bad_controls.is_power_of_two() {
                    self.rep.warn(
                        "bad_control",
                        format!("answered a malformed control request with an error: {e}"),
                        json!({ "error": e }),
                    );
                }
                vec![]
            }
            ControlEvent::Request(Request::Status {}, reply) => {
                let _ = reply.send(self.status_json());
                vec![]
            }
            ControlEvent::Request(Request::Checkpoint { wait }, reply) => {
                let refuse =
                    |code: &str, msg: &str| json!({ "ok": false, "code": code, "error": msg });
                let answer = if self.m.job.is_none() {
                    Some(refuse("no_job", "no job is running right now (ckpt is waiting to restart it); try again shortly"))
                } else if self.m.stop.is_some() {
                    Some(refuse(
                        "stopping",
                        "the job is being stopped; the stop takes its own checkpoint",
                    ))
                } else if self.m.job.as_ref().is_some_and(|j| j.announced.is_empty())
                    && !self.m.s.signal_explicit
                {
                    Some(refuse("no_client", "the job has not announced a ckpt client, so it cannot be asked to checkpoint (hint: use a client library, or run it with --signal if it traps the signal itself)"))
                } else {
                    None
                };
                if let Some(a) = answer {
                    let _ = reply.send(a);
                    return vec![];
                }
                self.rep.event(
                    "control",
                    Some("checkpoint requested through the control socket".into()),
                    json!({ "cmd": "checkpoint" }),
                );
                if wait {
                    self.waits.push((self.m.last_seq(), reply));
                } else {
                    let _ = reply.send(json!({ "ok": true, "requested": true }));
                }
                vec![Event::CheckpointAsked(Why::Control)]
            }
            ControlEvent::Request(Request::Stop { checkpoint }, reply) => {
                let can_save = self
                    .m
                    .job
                    .as_ref()
                    .is_some_and(|j| !j.announced.is_empty() || self.m.s.signal_explicit);
                let _ = reply.send(json!({ "ok": true, "stopping": true, "supervisor_pid": std::process::id(), "will_checkpoint": checkpoint && can_save }));
                vec![Event::ControlStop { checkpoint }]
            }
        }
    }

    /// Answers `ckpt checkpoint --wait` callers: on success those waiting for a sequence
    /// below the new one; on failure all of them.
    fn answer_waits(&mut self, result: Result<serde_json::Value, String>) {
        let waits = std::mem::take(&mut self.waits);
        for (base, reply) in waits {
            match &result {
                Ok(info) if info["seq"].as_u64().is_some_and(|s| s > base) => {
                    let _ = reply.send(json!({ "ok": true, "checkpoint": info }));
                }
                Ok(_) => self.waits.push((base, reply)),
                Err(e) => {
                    let _ = reply.send(json!({ "ok": false, "error": e }));
                }
            }
        }
    }

    /// The live status shown in the terminal's title.
    fn live_line(&self) -> Option<String> {
        let job = self.m.job.as_ref()?;
        let mut l = format!(
            "ckpt: job pid {} up {}",
            job.pid,
            fmt_dur(Duration::from_secs(job.started.elapsed().as_secs()))
        );
        if let Some(step) = job.step {
            l.push_str(&format!(" | step {step}"));
        }
        match &self.last_commit {
            Some(c) => {
                let age = crate::store::manifest::now_ms()
                    .saturating_sub(c["created_ms"].as_u64().unwrap_or(0));
                let age = if age < 1000 {
                    "just now".to_string()
                } else {
                    format!("{} ago", fmt_dur(Duration::from_secs(age / 1000)))
                };
                l.push_str(&format!(" | checkpoint {} {age}", c["seq"]));
            }
            None => l.push_str(" | no checkpoint yet"),
        }
        if let Some(t) = job
            .next_request
            .filter(|_| !job.announced.is_empty() || self.m.s.signal_explicit)
        {
            l.push_str(&format!(
                " | next in {}",
                fmt_dur(Duration::from_secs(
                    t.saturating_duration_since(Instant::now()).as_secs()
                ))
            ));
        }
        l.push_str(&format!(" | {}", self.m.status_word()));
        Some(l)
    }

    /// The full answer to `ckpt status`.
    fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let job = self.m.job.as_ref();
        let tree = job.map(|_| {
            let (n, cpu, rss) = spawn::tree_usage();
            json!({ "processes": n, "cpu_seconds": cpu, "rss_bytes": rss })
        });
        let last = self.last_commit.clone().map(|mut c| {
            if let Some(created) = c["created_ms"].as_u64() {
                c["age_seconds"] =
                    json!(crate::store::manifest::now_ms().saturating_sub(created) as f64 / 1000.0);
            }
            c
        });
        json!({
            "ok": true,
            "supervisor_pid": std::process::id(),
            "dir": crate::store::display_path(self.store.dir()),
            "command": self.cfg.command.iter().map(|s| s.to_string_lossy()).collect::<Vec<_>>(),
            "state": self.m.status_word(),
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "restarts": self.m.hist.restarts,
            "requests": self.m.requests,
            "unanswered_requests": self.m.unanswered,
            "job": job.map(|j| json!({
                "pid": j.pid,
                "uptime_seconds": now.saturating_duration_since(j.started).as_secs_f64(),
                "clients": j.announced.keys().collect::<Vec<_>>(),
                "step": j.step,
                "restored_step": j.restored.and_then(|r| r.step),
                "progress": j.progress,
                "last_progress_seconds_ago": now.saturating_duration_since(j.last_beat).as_secs_f64(),
                "next_request_in_seconds": j.next_request.map(|t| t.saturating_duration_since(now).as_secs_f64()),
            })),
            "tree": tree,
            "last_checkpoint": last,
            "newest_seq": if self.m.last_seq() > 0 { Some(self.m.last_seq()) } else { None },
            "remote": self.uploader.as_ref().map(|u| u.summary()),
        })
    }

    /// Refreshes the status the control thread answers with when the loop is busy.
    fn share_status(&self) {
        let v = self.status_json();
        if let Ok(mut g) = self.shared.status.lock() {
            *g = (v, Instant::now());
        }
    }

    /// Notices `DIR/.ckpt` deleted, moved away or replaced under the running supervisor:
    /// warns at once; if it does not come back within [`DIR_GRACE`] (a `mv` and back, a
    /// mount that hiccups), or a launch needs it now (`force`), makes it again and takes the
    /// lock and the sockets back, so that `ckpt status`, `ckpt stop` and the job's messages
    /// reach this supervisor again.
    fn check_dir(&mut self, force: bool) {
        let now_id = dir_identity(&self.store);
        if now_id.is_some() && now_id == self.dir_id {
            if self.dir_missing_since.take().is_some() {
                self.rep.event(
                    "dir_back",
                    Some(format!(
                        "{}/.ckpt is back",
                        crate::store::display_path(self.store.dir())
                    )),
                    json!({}),
                );
            }
            return;
        }
        let dir = crate::store::display_path(self.store.dir());
        let what = if now_id.is_none() {
            "was deleted or moved away"
        } else {
            "was replaced"
        };
        let since = match self.dir_missing_since {
            Some(t) => t,
            None => {
                let t = Instant::now();
                self.dir_missing_since = Some(t);
                self.rep.warn(
                    "dir_lost",
                    format!("{dir}/.ckpt {what} while the supervisor runs: `ckpt status/stop` cannot reach it and checkpoints cannot be saved; waiting {} for it to come back, then making it again", fmt_dur(DIR_GRACE)),
                    json!({ "dir": dir }),
                );
                t
            }
        };
        if !force && since.elapsed() < DIR_GRACE {
            return;
        }
        let mut steps = Vec::new();
        let res = (|| -> Result<(), String> {
            self.store.create().map_err(|e| e.to_string())?;
            let cmdline = self
                .cfg
                .command
                .iter()
                .map(|s| s.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ");
            self.lock = lock::DirLock::acquire(&self.store, &cmdline).map_err(|e| e.to_string())?;
            self.lock_fds = self.lock.raw_fds();
            steps.push("the lock");
            self.socket_path = bind_socket(&self.store, self.tx.clone()).map_err(|e| e.msg)?;
            self.control_path = bind_control(&self.store, self.tx.clone(), self.shared.clone())
                .map_err(|e| e.msg)?;
            steps.push("the sockets");
            Ok(())
        })();
        self.dir_id = dir_identity(&self.store);
        self.dir_missing_since = None;
        self.rep.reopen();
        if let Some(seq) = self.vouch.pending() {
            // The marker of the light launch still running went with the old `.ckpt`.
            self.write_light_marker(seq);
        }
        match res {
            Ok(()) => self.rep.warn(
                "dir_made_again",
                format!("made {dir}/.ckpt again and took back {} (what it held is gone; the job's next checkpoint goes into it)", steps.join(" and ")),
                json!({ "dir": dir }),
            ),
            Err(e) => self.rep.warn(
                "dir_made_again",
                format!("cannot make {dir}/.ckpt again ({e}): `ckpt status/stop` cannot reach this supervisor; stop it with a signal (kill -TERM {})", std::process::id()),
                json!({ "dir": dir, "error": e }),
            ),
        }
        self.write_status();
    }

    fn write_status(&self) {
        let job = self.m.job.as_ref();
        self.rep.status(&json!({
            "control_socket": crate::store::display_path(&self.control_path),
            "supervisor_pid": std::process::id(),
            "state": self.m.status_word(),
            "job_pid": job.map(|j| j.pid),
            "restarts": self.m.hist.restarts,
            "last_seq": if self.m.last_seq() > 0 { Some(self.m.last_seq()) } else { None },
            "step": job.and_then(|j| j.step),
            "command": self.cfg.command.iter().map(|s| s.to_string_lossy()).collect::<Vec<_>>(),
            "updated_ms": crate::store::manifest::now_ms(),
        }));
    }
}

/// Whether `p` lies under the system temp dir (for cleanup of the fallback socket dir).
pub fn in_temp(p: &Path) -> bool {
    p.starts_with(std::env::temp_dir())
}
