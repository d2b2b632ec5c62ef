//! The supervisor behind `ckpt run`: one event loop over signals, child exits, job messages
//! and timers; the job's state lives in `Run`. Process model and each failure case:
//! `docs/design.md`.

pub mod branch;
pub mod control;
pub mod interval;
pub mod lock;
pub mod policy;
pub mod report;
mod slurm_hooks;
pub mod spawn;
pub mod stop_soon;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::integrations::slurm;
use crate::protocol::{self, Message};
use crate::store::{Found, Store};
use policy::{Decision, History, Policy};
use report::Reporter;
use spawn::Exit;

/// ckpt's exit codes: one table, documented in the README.
pub mod exit_codes {
    /// The job finished (exit 0), now or in an earlier run.
    pub const FINISHED: i32 = 0;
    /// Bad command line.
    pub const USAGE: i32 = 64;
    /// Checkpoints exist but none verifies (restore refused), or `ckpt verify` found bad ones.
    pub const DATA: i32 = 65;
    /// Internal error (a bug: please report it).
    pub const SOFTWARE: i32 = 70;
    /// The checkpoint directory cannot be created, locked or written.
    pub const CANT_CREATE: i32 = 73;
    /// An I/O error while saving or reading.
    pub const IO: i32 = 74;
    /// Stopped (signal, preemption, time limit) after a checkpoint: run me again.
    pub const TEMPFAIL: i32 = 75;
    /// `ckpt status/checkpoint/stop`: no supervisor runs on that directory.
    pub const NOT_RUNNING: i32 = 69;
    /// Stopped after a checkpoint and requeued through Slurm (`scontrol requeue`): nothing
    /// left to do, Slurm runs the batch script again (docs/slurm.md).
    pub const REQUEUED: i32 = 79;
    /// The command exists but cannot be executed.
    pub const CANNOT_EXECUTE: i32 = 126;
    /// The command was not found.
    pub const NOT_FOUND: i32 = 127;
}

/// A fatal error: the exit code and the message.
#[derive(Debug)]
pub struct Fatal {
    pub code: i32,
    pub msg: String,
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

fn fatal(code: i32, msg: impl Into<String>) -> Fatal {
    Fatal {
        code,
        msg: msg.into(),
    }
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
    pub grace: Duration,
    pub kill_after: Duration,
    pub keep: usize,
    pub keep_every: Option<Duration>,
    pub policy: Policy,
    pub allow_fresh: bool,
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
}

enum Ev {
    Signal(i32),
    Msg(Message),
    BadMsg(String),
    Control(control::ControlEvent),
    /// From an integration's watcher thread (e.g. a cloud preemption notice).
    External(stop_soon::External),
}

#[derive(Debug, Clone, Copy)]
enum StopPhase {
    /// The job was asked to checkpoint (and exit); waiting until `deadline`.
    Requested { deadline: Instant, base_seq: u64 },
    /// SIGTERM sent to the group; SIGKILL at `deadline`.
    Terminating { deadline: Instant },
}

struct Job {
    pid: u32,
    started: Instant,
    seq_at_launch: u64,
    /// Processes that announced a client, with their request signal.
    announced: BTreeMap<u32, i32>,
    next_request: Option<Instant>,
    step: Option<u64>,
    /// The "no client, no requests" notice was logged for this launch.
    skip_logged: bool,
    /// Last sign of life from a client (any message), for hang detection.
    last_beat: Instant,
    /// A checkpoint was requested at this time and has not committed yet.
    pending_since: Option<Instant>,
    /// The job was declared hung; SIGKILL at this time.
    kill_at: Option<Instant>,
}

/// Runs the supervisor to the end; returns ckpt's exit code.
pub fn run(cfg: Config) -> Result<i32, Fatal> {
    let store = Store::new(&cfg.dir);
    store.create().map_err(|e| {
        fatal(
            exit_codes::CANT_CREATE,
            format!("cannot prepare checkpoint directory: {e}"),
        )
    })?;
    let cmdline = cfg
        .command
        .iter()
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let _lock = lock::DirLock::acquire(&store, &cmdline)
        .map_err(|e| fatal(exit_codes::CANT_CREATE, e.to_string()))?;
    let mut rep = Reporter::new(store.private(), cfg.quiet, cfg.log_json);
    if let Some(from) = &cfg.from {
        branch::apply(&store, from, &mut rep)?;
    }

    let finished = store.private().join("finished");
    if finished.exists() {
        if cfg.again {
            std::fs::remove_file(&finished).map_err(|e| {
                fatal(
                    exit_codes::CANT_CREATE,
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

    let (tx, rx) = mpsc::channel();
    let socket_path = bind_socket(&store, tx.clone())?;
    let control_path = bind_control(&store, tx.clone())?;
    if let Some(p) = cfg.preemption.clone() {
        crate::integrations::cloud::start(p, stop_soon::Notifier::new(tx.clone()));
    }
    let session = cfg
        .slurm
        .clone()
        .and_then(|st| slurm::JobEnv::from_process_env().map(|e| slurm::Session::new(e, st)));
    start_signal_thread(tx, session.as_ref().map(|s| s.settings.warning_signal))?;
    spawn::become_subreaper().map_err(|e| {
        fatal(
            exit_codes::SOFTWARE,
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
        json!({ "pid": std::process::id(), "command": cmdline, "dir": store.dir() }),
    );

    let notices = stop_soon::Notices::load(&store.private());
    let mut run = Run {
        cfg,
        store,
        rep,
        rx,
        socket_path,
        hist: History::default(),
        last_seq: 0,
        stop: None,
        stop_requested: false,
        last_commit_ms: None,
        slurm: session,
        control_path,
        started: Instant::now(),
        waits: Vec::new(),
        bad_controls: 0,
        notices,
        last_commit: None,
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
            fatal(
                exit_codes::CANT_CREATE,
                format!("cannot create {}: {e}", d.display()),
            )
        })?;
    Ok(d.join(name))
}

fn bind_control(store: &Store, tx: Sender<Ev>) -> Result<PathBuf, Fatal> {
    let path = socket_path(store, "control.sock")?;
    let tx = std::sync::Mutex::new(tx);
    control::serve(&path, move |ev| {
        tx.lock()
            .map(|t| t.send(Ev::Control(ev)).is_ok())
            .unwrap_or(false)
    })
    .map_err(|e| {
        fatal(
            exit_codes::CANT_CREATE,
            format!("cannot bind control socket {}: {e}", path.display()),
        )
    })?;
    Ok(path)
}

fn bind_socket(store: &Store, tx: Sender<Ev>) -> Result<PathBuf, Fatal> {
    let path = socket_path(store, "sock")?;
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).map_err(|e| {
        fatal(
            exit_codes::CANT_CREATE,
            format!("cannot bind job socket {}: {e}", path.display()),
        )
    })?;
    std::thread::Builder::new()
        .name("ckpt-socket".into())
        .spawn(move || {
            let mut buf = vec![0u8; protocol::MAX_MESSAGE_BYTES + 1];
            loop {
                let n = match sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                let ev = match Message::parse(&buf[..n]) {
                    Ok(m) => Ev::Msg(m),
                    Err(e) => Ev::BadMsg(e),
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| {
            fatal(
                exit_codes::SOFTWARE,
                format!("cannot start socket thread: {e}"),
            )
        })?;
    Ok(path)
}

use std::os::unix::fs::DirBuilderExt;

fn start_signal_thread(tx: Sender<Ev>, extra: Option<i32>) -> Result<(), Fatal> {
    use signal_hook::consts::*;
    let mut signals = signal_hook::iterator::Signals::new(
        [SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGCHLD]
            .into_iter()
            .chain(extra),
    )
    .map_err(|e| {
        fatal(
            exit_codes::SOFTWARE,
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
            fatal(
                exit_codes::SOFTWARE,
                format!("cannot start signal thread: {e}"),
            )
        })?;
    Ok(())
}

struct Run {
    cfg: Config,
    store: Store,
    rep: Reporter,
    rx: Receiver<Ev>,
    socket_path: PathBuf,
    hist: History,
    /// Newest checkpoint known to verify.
    last_seq: u64,
    stop: Option<StopPhase>,
    stop_requested: bool,
    last_commit_ms: Option<u64>,
    /// Set when running inside a Slurm job with `--slurm auto`.
    slurm: Option<slurm::Session>,
    control_path: PathBuf,
    started: Instant,
    /// `ckpt checkpoint --wait` callers: answered when a checkpoint above the sequence commits.
    waits: Vec<(u64, Sender<serde_json::Value>)>,
    bad_controls: u64,
    notices: stop_soon::Notices,
    /// The newest committed checkpoint this supervisor saw (for `ckpt status`).
    last_commit: Option<serde_json::Value>,
}

fn signame(s: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(s)
        .map(|s| s.as_str())
        .unwrap_or("signal")
}

impl Run {
    fn main_loop(&mut self) -> Result<i32, Fatal> {
        loop {
            if self.stop_requested {
                self.rep.event(
                    "stopped",
                    Some("stopped before relaunching the job; run again to resume".into()),
                    json!({ "code": exit_codes::TEMPFAIL }),
                );
                self.notice_after_stop();
                return Ok(self.slurm_after_stop());
            }
            // Every process of the previous launch is gone: a rank killed while writing its
            // shard leaves a staging directory of a dead pid (docs/multi-rank.md).
            if self.hist.restarts > 0 {
                let _ = self.store.clean_leftovers();
            }
            let restore = self.pick_restore()?;
            let mut job = self.launch(restore.as_ref())?;
            let exit = self.supervise(&mut job);
            self.rep.live(None);
            let (reaped, left) = spawn::kill_tree(Some(job.pid), Duration::from_secs(10));
            drop(reaped);
            if !left.is_empty() {
                self.rep.warn(
                    "orphans",
                    format!("processes {left:?} of the job did not die after SIGKILL within 10s"),
                    json!({ "pids": left }),
                );
            }
            self.rescan(Some(&mut job));
            let progress = self.last_seq > job.seq_at_launch;
            let ran = job.started.elapsed();
            self.rep.event(
                "exit",
                Some(format!("job (pid {}) ended with {exit} after {}", job.pid, fmt_dur(ran))),
                json!({ "pid": job.pid, "exit": exit.as_code(), "signaled": matches!(exit, Exit::Signal(_)), "ran_ms": ran.as_millis() as u64, "progress": progress }),
            );
            if self.stop_requested {
                self.write_status("stopped", None);
                let newest = if self.last_seq > 0 {
                    format!("newest checkpoint {}", self.last_seq)
                } else {
                    "no checkpoint yet".into()
                };
                self.rep.event(
                    "stopped",
                    Some(format!(
                        "stopped ({newest}); exit {} = run me again to resume",
                        exit_codes::TEMPFAIL
                    )),
                    json!({ "code": exit_codes::TEMPFAIL, "seq": self.last_seq }),
                );
                self.notice_after_stop();
                return Ok(self.slurm_after_stop());
            }
            if exit.success() {
                self.mark_finished(exit);
                self.write_status("finished", None);
                self.rep.event(
                    "finished",
                    Some("job finished successfully".into()),
                    json!({}),
                );
                return Ok(exit_codes::FINISHED);
            }
            match self
                .cfg
                .policy
                .on_failure(&mut self.hist, progress, fastrand::f64())
            {
                Decision::GiveUp { reason } => {
                    self.write_status("gave_up", None);
                    self.rep.warn(
                        "give_up",
                        format!(
                            "giving up: {reason}; exiting with the job's status {}",
                            exit.as_code()
                        ),
                        json!({ "reason": reason, "code": exit.as_code() }),
                    );
                    return Ok(exit.as_code().clamp(1, 255));
                }
                Decision::Restart { delay } => {
                    self.rep.event(
                        "restart",
                        Some(format!("restart {} in {} ({})", self.hist.restarts, fmt_dur(delay), if progress { "progress was made" } else { "no new checkpoint since the last launch" })),
                        json!({ "restart": self.hist.restarts, "delay_ms": delay.as_millis() as u64, "progress": progress }),
                    );
                    self.write_status("backing_off", None);
                    self.backoff(delay);
                }
            }
        }
    }

    fn pick_restore(&mut self) -> Result<Option<Found>, Fatal> {
        let mut bad = Vec::new();
        let found = self
            .store
            .latest_verified(true, |b| bad.push(b.to_string()))
            .map_err(|e| fatal(exit_codes::IO, format!("cannot scan checkpoints: {e}")))?;
        for b in &bad {
            self.rep
                .warn("quarantined", b.clone(), json!({ "detail": b }));
        }
        match found {
            Some(f) => {
                self.last_seq = self.last_seq.max(f.seq);
                Ok(Some(f))
            }
            None => {
                let qdir = self.store.dir().join(crate::store::QUARANTINE);
                let quarantined = std::fs::read_dir(&qdir)
                    .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).count())
                    .unwrap_or(0);
                if quarantined > 0 && !self.cfg.allow_fresh {
                    return Err(fatal(
                        exit_codes::DATA,
                        format!(
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

    fn launch(&mut self, restore: Option<&Found>) -> Result<Job, Fatal> {
        let dir = self.store.dir().as_os_str().to_owned();
        let mut env: Vec<(String, OsString)> = vec![
            (protocol::ENV_DIR.into(), dir),
            (
                protocol::ENV_RESTART_COUNT.into(),
                self.hist.restarts.to_string().into(),
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
        match restore {
            Some(f) => {
                env.push((protocol::ENV_RESTORE.into(), f.path.as_os_str().to_owned()));
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
                ] {
                    env.push((k.into(), OsString::new()));
                }
            }
        }
        let pid = spawn::launch(&self.cfg.command, &env).map_err(|e| {
            let prog = self.cfg.command[0].to_string_lossy();
            match e.kind() {
                std::io::ErrorKind::NotFound => fatal(exit_codes::NOT_FOUND, format!("cannot run `{prog}`: command not found; hint: check the spelling and PATH, or give a path")),
                std::io::ErrorKind::PermissionDenied => fatal(exit_codes::CANNOT_EXECUTE, format!("cannot run `{prog}`: permission denied; hint: chmod +x it")),
                _ => fatal(exit_codes::CANNOT_EXECUTE, format!("cannot run `{prog}`: {e}")),
            }
        })?;
        let what = match restore {
            Some(f) => format!(
                "resuming from checkpoint {}{}",
                f.seq,
                f.manifest
                    .step
                    .map(|s| format!(" (step {s})"))
                    .unwrap_or_default()
            ),
            None => "fresh start".into(),
        };
        self.rep.event(
            "launch",
            Some(format!("launched job (pid {pid}), {what}{}", if self.hist.restarts > 0 { format!(", restart {}", self.hist.restarts) } else { String::new() })),
            json!({ "pid": pid, "restart": self.hist.restarts, "restore_seq": restore.map(|f| f.seq) }),
        );
        let job = Job {
            pid,
            started: Instant::now(),
            seq_at_launch: self.last_seq,
            announced: BTreeMap::new(),
            next_request: None,
            step: None,
            skip_logged: false,
            last_beat: Instant::now(),
            pending_since: None,
            kill_at: None,
        };
        self.write_status("running", Some(&job));
        Ok(job)
    }

    /// Runs the loop while the job lives; returns the leader's exit.
    fn supervise(&mut self, job: &mut Job) -> Exit {
        let tick = Duration::from_millis(500);
        let mut last_scan = Instant::now();
        let mut last_live = Instant::now();
        job.next_request = self.cfg.every.map(|e| Instant::now() + e);
        if self.stop_requested {
            self.begin_stop(job);
        }
        let mut bad_msgs = 0u64;
        loop {
            for (pid, exit) in spawn::reap() {
                if pid == job.pid {
                    return exit;
                }
            }
            let now = Instant::now();
            let mut wake = now + tick;
            // Only deadlines that the loop acts on: a periodic request that is due but held back
            // by a stop would otherwise make every wait return at once (a busy loop).
            if let Some(t) = job.next_request.filter(|_| self.stop.is_none()) {
                wake = wake.min(t);
            }
            let slurm_stop_at = self.slurm.as_ref().and_then(|s| s.stop_at());
            if let Some(t) = slurm_stop_at.filter(|_| !self.stop_requested) {
                wake = wake.min(t);
            }
            match self.stop {
                Some(StopPhase::Requested { deadline, .. })
                | Some(StopPhase::Terminating { deadline }) => wake = wake.min(deadline),
                None => {}
            }
            match self.rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(Ev::Signal(libc::SIGCHLD)) => {}
                Ok(Ev::Signal(s @ (libc::SIGTERM | libc::SIGINT | libc::SIGHUP))) => {
                    if self.stop_requested && s == libc::SIGINT {
                        self.rep.warn(
                            "force_stop",
                            "second interrupt: killing the job now".into(),
                            json!({}),
                        );
                        spawn::signal_group(job.pid, libc::SIGKILL);
                        for p in spawn::descendants() {
                            spawn::signal_pid(p, libc::SIGKILL);
                        }
                    } else if !self.stop_requested {
                        if let (Some(sl), libc::SIGTERM) = (self.slurm.as_mut(), s) {
                            // Slurm signals every process of the job at once.
                            sl.job_got_sigterm = true;
                        }
                        self.rep.event(
                            "stop_requested",
                            Some(format!(
                                "received {}: checkpointing, then stopping the job",
                                signame(s)
                            )),
                            json!({ "signal": s }),
                        );
                        self.stop_requested = true;
                        self.begin_stop(job);
                    }
                }
                Ok(Ev::Signal(s))
                    if self
                        .slurm
                        .as_ref()
                        .is_some_and(|sl| sl.settings.warning_signal == s) =>
                {
                    if !self.stop_requested {
                        self.rep.event(
                            "slurm_warning",
                            Some(format!("received {} (Slurm's warning: the time is nearly up): checkpointing, then stopping the job", signame(s))),
                            json!({ "signal": s }),
                        );
                        self.stop_requested = true;
                        self.begin_stop(job);
                    }
                }
                Ok(Ev::Signal(libc::SIGUSR1)) => self.request(job, "on demand (SIGUSR1 to ckpt)"),
                Ok(Ev::Signal(_)) => {}
                Ok(Ev::Msg(m)) => self.on_message(job, m),
                Ok(Ev::Control(ev)) => self.on_control(Some(job), ev),
                Ok(Ev::External(x)) => self.on_external(Some(job), x),
                Ok(Ev::BadMsg(e)) => {
                    bad_msgs += 1;
                    if bad_msgs <= 5 || bad_msgs.is_power_of_two() {
                        self.rep.warn(
                            "bad_message",
                            format!(
                                "ignored a malformed message on {}: {e} ({bad_msgs} so far)",
                                self.socket_path.display()
                            ),
                            json!({ "error": e }),
                        );
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(tick),
            }
            let now = Instant::now();
            if now.duration_since(last_scan) >= Duration::from_secs(1) {
                last_scan = now;
                self.rescan(Some(job));
            }
            if job.next_request.is_some_and(|t| now >= t) && self.stop.is_none() {
                self.request(job, "periodic");
            }
            self.check_hang(job, now);
            if now.duration_since(last_live) >= Duration::from_secs(1) {
                last_live = now;
                let line = self.live_line(job);
                self.rep.live(Some(line));
            }
            if !self.stop_requested && slurm_stop_at.is_some_and(|t| now >= t) {
                self.slurm_time_limit(job);
            }
            self.advance_stop(job, now);
        }
    }

    fn on_message(&mut self, job: &mut Job, m: Message) {
        match m {
            Message::Hello {
                pid,
                signal,
                client,
                ..
            } => {
                let ours =
                    spawn::is_descendant(pid) || (self.slurm.is_some() && slurm::is_job_peer(pid));
                if !ours {
                    self.rep.warn(
                        "bad_hello",
                        format!("ignored a hello from pid {pid}: not a process of the job"),
                        json!({ "pid": pid }),
                    );
                    return;
                }
                let first = job.announced.is_empty();
                job.announced.insert(pid, signal);
                self.rep.event(
                    "hello",
                    Some(format!(
                        "job process {pid} announced a {client} client (request signal {})",
                        signame(signal)
                    )),
                    json!({ "pid": pid, "client": client, "signal": signal }),
                );
                if first {
                    job.next_request = self.cfg.every.map(|e| Instant::now() + e);
                }
                if self.stop_requested {
                    // A stop came before the client was ready: ask it now.
                    spawn::signal_pid(pid, libc::SIGTERM);
                }
            }
            Message::Progress { step, .. } => {
                job.last_beat = Instant::now();
                if step.is_some() {
                    job.step = step;
                }
            }
            Message::Committed {
                seq,
                duration_ms,
                blocked_ms,
                ..
            } => {
                self.last_commit_ms = Some(duration_ms);
                self.auto_adjust(duration_ms, blocked_ms);
                if let Some(sl) = self.slurm.as_mut() {
                    sl.note_save(duration_ms);
                }
                let _ = seq;
                job.last_beat = Instant::now();
                self.rescan(Some(job));
            }
            Message::SaveFailed { pid, error, .. } => {
                job.last_beat = Instant::now();
                job.pending_since = None;
                self.rep.warn(
                    "save_failed",
                    format!("job process {pid} could not save a checkpoint: {error}"),
                    json!({ "pid": pid, "error": error }),
                );
                self.answer_waits(Err(format!("the job could not save a checkpoint: {error}")));
            }
        }
    }

    /// Asks the job for a checkpoint.
    fn request(&mut self, job: &mut Job, why: &str) {
        job.next_request = self.cfg.every.map(|e| Instant::now() + e);
        job.announced
            .retain(|&pid, _| spawn::is_descendant(pid) || slurm::is_job_peer(pid));
        if !job.announced.is_empty() {
            for (&pid, &sig) in &job.announced {
                spawn::signal_pid(pid, sig);
            }
        } else if self.cfg.signal_explicit {
            spawn::signal_group(job.pid, self.cfg.signal);
        } else {
            if !job.skip_logged {
                job.skip_logged = true;
                self.rep.event(
                    "request_skipped",
                    Some(format!("checkpoint {why} skipped: the job has not announced a client, so it is only supervised and restarted (hint: use a ckpt client library, or pass --signal if the job traps the signal itself)")),
                    json!({ "why": why }),
                );
            }
            return;
        }
        job.pending_since.get_or_insert_with(Instant::now);
        self.rep.event(
            "request",
            Some(format!("requested a checkpoint ({why})")),
            json!({ "why": why }),
        );
    }

    fn begin_stop(&mut self, job: &mut Job) {
        let now = Instant::now();
        job.announced
            .retain(|&pid, _| spawn::is_descendant(pid) || slurm::is_job_peer(pid));
        if !job.announced.is_empty() {
            // Under Slurm a SIGTERM reached every process of the job: a second one would
            // make the clients exit without saving.
            if !self.slurm.as_ref().is_some_and(|s| s.job_got_sigterm) {
                for &pid in job.announced.keys() {
                    spawn::signal_pid(pid, libc::SIGTERM);
                }
            }
            self.stop = Some(StopPhase::Requested {
                deadline: self.stop_deadline(now),
                base_seq: self.last_seq,
            });
        } else if self.cfg.signal_explicit {
            spawn::signal_group(job.pid, self.cfg.signal);
            self.stop = Some(StopPhase::Requested {
                deadline: self.stop_deadline(now),
                base_seq: self.last_seq,
            });
        } else {
            self.terminate(job, now);
        }
        self.write_status("stopping", Some(job));
    }

    fn terminate(&mut self, job: &Job, now: Instant) {
        spawn::signal_group(job.pid, libc::SIGCONT);
        spawn::signal_group(job.pid, libc::SIGTERM);
        self.stop = Some(StopPhase::Terminating {
            deadline: now + self.cfg.kill_after,
        });
    }

    fn advance_stop(&mut self, job: &mut Job, now: Instant) {
        match self.stop {
            Some(StopPhase::Requested { deadline, base_seq }) => {
                let committed = self.last_seq > base_seq;
                if committed && job.announced.is_empty() {
                    // A job that traps the signal itself saved: now ask it to end.
                    self.terminate(job, now);
                } else if now >= deadline {
                    self.rep.warn(
                        "grace_expired",
                        format!(
                            "the job did not {} within --grace {}; sending SIGTERM",
                            if committed {
                                "exit"
                            } else {
                                "commit a checkpoint"
                            },
                            fmt_dur(self.cfg.grace)
                        ),
                        json!({ "committed": committed }),
                    );
                    self.terminate(job, now);
                }
            }
            Some(StopPhase::Terminating { deadline }) if now >= deadline => {
                self.rep.warn(
                    "kill",
                    format!(
                        "the job ignored SIGTERM for {}; sending SIGKILL",
                        fmt_dur(self.cfg.kill_after)
                    ),
                    json!({}),
                );
                spawn::signal_group(job.pid, libc::SIGKILL);
                for p in spawn::descendants() {
                    spawn::signal_pid(p, libc::SIGKILL);
                }
                self.stop = Some(StopPhase::Terminating {
                    deadline: now + Duration::from_secs(3600),
                });
            }
            _ => {}
        }
    }

    /// Looks for checkpoints newer than the newest known; verifies them; prunes.
    fn rescan(&mut self, job: Option<&mut Job>) {
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
        let newer: Vec<_> = list
            .into_iter()
            .filter(|(s, _)| *s > self.last_seq)
            .collect();
        if newer.is_empty() {
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
                    let moved = self.store.quarantine(*seq, &reason);
                    self.rep.warn(
                        "quarantined",
                        format!(
                            "new checkpoint {seq} does not verify: {reason}; {}",
                            match &moved {
                                Ok(p) => format!("moved aside to {}", p.display()),
                                Err(e) => format!("could not move it aside: {e}"),
                            }
                        ),
                        json!({ "seq": seq, "reason": reason.to_string() }),
                    );
                }
            }
        }
        let Some(m) = found else { return };
        self.last_seq = m.seq;
        let dur = self.last_commit_ms.take();
        self.notice_committed(m.seq, dur, job.as_ref().and_then(|j| j.pending_since));
        let info = json!({ "seq": m.seq, "step": m.step, "bytes": m.total_bytes(), "duration_ms": dur, "created_ms": m.created_ms });
        self.answer_waits(Ok(info.clone()));
        self.last_commit = Some(info);
        self.rep.event(
            "committed",
            Some(format!(
                "checkpoint {} committed{} ({}{})",
                m.seq,
                m.step.map(|s| format!(" at step {s}")).unwrap_or_default(),
                fmt_bytes(m.total_bytes()),
                dur.map(|d| format!(", saved in {d} ms")).unwrap_or_default()
            )),
            json!({ "seq": m.seq, "step": m.step, "bytes": m.total_bytes(), "duration_ms": dur, "files": m.files.len() }),
        );
        if let Some(job) = job {
            job.pending_since = None;
            if job.next_request.is_some() {
                job.next_request = self.cfg.every.map(|e| Instant::now() + e);
            }
            self.write_status(
                if self.stop.is_some() {
                    "stopping"
                } else {
                    "running"
                },
                Some(job),
            );
        }
        match self
            .store
            .prune(self.cfg.keep, self.cfg.keep_every, &[self.last_seq])
        {
            Ok(gone) if !gone.is_empty() => {
                self.rep.event(
                    "pruned",
                    Some(format!("retention removed checkpoint(s) {gone:?}")),
                    json!({ "seqs": gone }),
                );
            }
            Ok(_) => {}
            Err(e) => self
                .rep
                .warn("prune_failed", format!("retention failed: {e}"), json!({})),
        }
    }

    fn backoff(&mut self, delay: Duration) {
        let until = Instant::now() + delay;
        loop {
            spawn::reap();
            let now = Instant::now();
            if now >= until || self.stop_requested {
                return;
            }
            match self.rx.recv_timeout(until - now) {
                Ok(Ev::Signal(s @ (libc::SIGTERM | libc::SIGINT | libc::SIGHUP))) => {
                    self.rep.event(
                        "stop_requested",
                        Some(format!("received {} while waiting to restart", signame(s))),
                        json!({ "signal": s }),
                    );
                    self.stop_requested = true;
                }
                Ok(Ev::Control(ev)) => self.on_control(None, ev),
                Ok(Ev::External(x)) => self.on_external(None, x),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(until - now),
            }
        }
    }

    fn mark_finished(&mut self, exit: Exit) {
        let path = self.store.private().join("finished");
        let tmp = self.store.private().join("finished.tmp");
        let body =
            json!({ "t_ms": crate::store::manifest::now_ms(), "exit": exit.as_code() }).to_string();
        let res = (|| -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            crate::store::io::write_owner_only(&tmp, body.as_bytes())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(self.store.private())?.sync_all()
        })();
        if let Err(e) = res {
            self.rep.warn(
                "finish_marker",
                format!(
                    "cannot record that the job finished in {}: {e}",
                    path.display()
                ),
                json!({}),
            );
        }
    }

    /// Handles a request on the control socket; `job` is `None` between launches.
    fn on_control(&mut self, job: Option<&mut Job>, ev: control::ControlEvent) {
        use control::{ControlEvent, Request};
        match ev {
            ControlEvent::Refused { uid, pid } => self.rep.warn(
                "control_refused",
                format!("refused a control connection from uid {uid} (pid {pid}): only the supervisor's own user may control it"),
                json!({ "uid": uid, "pid": pid }),
            ),
            ControlEvent::Malformed(e) => {
                self.bad_controls += 1;
                if self.bad_controls <= 5 || self.bad_controls.is_power_of_two() {
                    self.rep.warn("bad_control", format!("answered a malformed control request with an error: {e}"), json!({ "error": e }));
                }
            }
            ControlEvent::Request(Request::Status {}, reply) => {
                let _ = reply.send(self.status_json(job.as_deref()));
            }
            ControlEvent::Request(Request::Checkpoint { wait }, reply) => {
                let Some(job) = job else {
                    let _ = reply.send(json!({ "ok": false, "error": "no job is running right now (ckpt is waiting to restart it); try again shortly" }));
                    return;
                };
                if job.announced.is_empty() && !self.cfg.signal_explicit {
                    let _ = reply.send(json!({ "ok": false, "error": "the job has not announced a ckpt client, so it cannot be asked to checkpoint (hint: use a client library, or run it with --signal if it traps the signal itself)" }));
                    return;
                }
                self.rep.event("control", Some("checkpoint requested through the control socket".into()), json!({ "cmd": "checkpoint" }));
                self.request(job, "requested by `ckpt checkpoint`");
                if wait {
                    self.waits.push((self.last_seq, reply));
                } else {
                    let _ = reply.send(json!({ "ok": true, "requested": true }));
                }
            }
            ControlEvent::Request(Request::Stop { checkpoint }, reply) => {
                let _ = reply.send(json!({ "ok": true, "stopping": true, "supervisor_pid": std::process::id() }));
                if self.stop_requested {
                    return;
                }
                self.rep.event(
                    "stop_requested",
                    Some(format!("stop requested through the control socket{}", if checkpoint { ": checkpointing, then stopping the job" } else { " without a checkpoint" })),
                    json!({ "checkpoint": checkpoint }),
                );
                self.stop_requested = true;
                if let Some(job) = job {
                    if checkpoint {
                        self.begin_stop(job);
                    } else {
                        // A client treats SIGTERM as "checkpoint, then exit": without a
                        // checkpoint the only honest stop is SIGKILL.
                        spawn::signal_group(job.pid, libc::SIGKILL);
                        for p in spawn::descendants() {
                            spawn::signal_pid(p, libc::SIGKILL);
                        }
                        self.write_status("stopping", Some(job));
                    }
                }
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

    /// Hang detection: no progress from a client for `--hang-timeout`, or a requested
    /// checkpoint not committed within `--checkpoint-timeout`. A hung job gets the
    /// `--hang-signal` (for a stack dump) and is SIGKILLed 2 s later: a failure, so the
    /// restart policy relaunches it from the newest checkpoint.
    fn check_hang(&mut self, job: &mut Job, now: Instant) {
        if let Some(t) = job.kill_at {
            if now >= t {
                job.kill_at = Some(now + Duration::from_secs(3600));
                spawn::signal_group(job.pid, libc::SIGKILL);
                for p in spawn::descendants() {
                    spawn::signal_pid(p, libc::SIGKILL);
                }
            }
            return;
        }
        if self.stop_requested {
            return;
        }
        let silent = now.duration_since(job.last_beat);
        let why = match (
            self.cfg.hang_timeout,
            self.cfg.checkpoint_timeout,
            job.pending_since,
        ) {
            (Some(h), _, _) if !job.announced.is_empty() && silent >= h => {
                format!(
                    "no progress reported for {} (--hang-timeout {})",
                    fmt_dur(silent),
                    fmt_dur(h)
                )
            }
            (_, Some(c), Some(since)) if now.duration_since(since) >= c => {
                format!(
                    "a requested checkpoint did not commit within --checkpoint-timeout {}",
                    fmt_dur(c)
                )
            }
            _ => return,
        };
        let dump = self.cfg.hang_signal;
        self.rep.warn(
            "hang",
            format!(
                "the job is hung: {why}; {}killing it and restarting from the newest checkpoint",
                dump.map(|s| format!("sending {} for a stack dump, then ", signame(s)))
                    .unwrap_or_default()
            ),
            json!({ "reason": why, "pid": job.pid }),
        );
        match dump {
            Some(sig) => {
                spawn::signal_group(job.pid, sig);
                job.kill_at = Some(now + Duration::from_secs(2));
            }
            None => job.kill_at = Some(now),
        }
        self.answer_waits(Err(format!("the job hung: {why}")));
    }

    /// The live status shown in the terminal's title.
    fn live_line(&self, job: &Job) -> String {
        let mut l = format!(
            "ckpt: job pid {} up {}",
            job.pid,
            fmt_dur(Duration::from_secs(job.started.elapsed().as_secs()))
        );
        let committed_step = self.last_commit.as_ref().and_then(|c| c["step"].as_u64());
        if let Some(step) = job.step.max(committed_step) {
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
            .filter(|_| !job.announced.is_empty() || self.cfg.signal_explicit)
        {
            l.push_str(&format!(
                " | next in {}",
                fmt_dur(Duration::from_secs(
                    t.saturating_duration_since(Instant::now()).as_secs()
                ))
            ));
        }
        if self.stop_requested {
            l.push_str(" | stopping");
        }
        l
    }

    /// The full answer to `ckpt status`.
    fn status_json(&self, job: Option<&Job>) -> serde_json::Value {
        let now = Instant::now();
        let state = match (job, self.stop.is_some() || self.stop_requested) {
            (None, true) => "stopping",
            (None, false) => "backing_off",
            (Some(_), true) => "stopping",
            (Some(j), false) if j.pending_since.is_some() => "checkpointing",
            (Some(j), false)
                if j.announced.is_empty() && j.started.elapsed() < Duration::from_secs(2) =>
            {
                "starting"
            }
            (Some(_), false) => "running",
        };
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
            "dir": self.store.dir(),
            "command": self.cfg.command.iter().map(|s| s.to_string_lossy()).collect::<Vec<_>>(),
            "state": state,
            "uptime_seconds": self.started.elapsed().as_secs_f64(),
            "restarts": self.hist.restarts,
            "job": job.map(|j| json!({
                "pid": j.pid,
                "uptime_seconds": j.started.elapsed().as_secs_f64(),
                "clients": j.announced.keys().collect::<Vec<_>>(),
                "step": j.step,
                "last_progress_seconds_ago": now.duration_since(j.last_beat).as_secs_f64(),
                "next_request_in_seconds": j.next_request.map(|t| t.saturating_duration_since(now).as_secs_f64()),
            })),
            "tree": tree,
            "last_checkpoint": last,
            "newest_seq": if self.last_seq > 0 { Some(self.last_seq) } else { None },
        })
    }

    fn write_status(&self, state: &str, job: Option<&Job>) {
        self.rep.status(&json!({
            "control_socket": self.control_path,
            "supervisor_pid": std::process::id(),
            "state": state,
            "job_pid": job.map(|j| j.pid),
            "restarts": self.hist.restarts,
            "last_seq": if self.last_seq > 0 { Some(self.last_seq) } else { None },
            "step": job.and_then(|j| j.step),
            "command": self.cfg.command.iter().map(|s| s.to_string_lossy()).collect::<Vec<_>>(),
            "updated_ms": crate::store::manifest::now_ms(),
        }));
    }
}

/// `1.2s`, `3m04s`, `250ms`.
pub fn fmt_dur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

/// `512 B`, `1.5 MiB`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Whether `p` lies under the system temp dir (for cleanup of the fallback socket dir).
pub fn in_temp(p: &Path) -> bool {
    p.starts_with(std::env::temp_dir())
}
