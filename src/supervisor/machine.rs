//! The supervisor's state machine: one [`Phase`], one [`Event`] enum, and one transition
//! function, [`Machine::on`], that turns `(state, event, now)` into [`Action`]s. It does no
//! I/O: the loop in `mod.rs` turns signals, reaped children, socket messages, control
//! requests, timers and rescans into events, and carries out the actions (signal, kill the
//! tree, launch, rescan, log, write the status, answer). Every (phase, event) pair is unit
//! tested below without processes, the way watchexec tests its job supervisor.
//!
//! The state diagram and the transition table are in `docs/design.md` ("The state machine").

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::policy::{Decision, History, Policy};
use super::spawn::Exit;
use crate::fmt::{fmt_dur, signame};

/// Where the supervised job is in its life.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Before the first launch.
    Idle,
    /// Launched; no process has announced a client yet (and no `--signal` was given), so
    /// checkpoints cannot be requested.
    Starting,
    /// The job runs; the next periodic request is due at `JobState::next_request`.
    Running,
    /// A checkpoint was requested at `since` and has neither committed nor failed.
    Checkpointing { since: Instant },
    /// A stop: the job was asked to checkpoint and exit; SIGTERM at `deadline`.
    Stopping { deadline: Instant, base_seq: u64 },
    /// SIGTERM (after SIGCONT) went to the job's group; SIGKILL at `deadline`.
    Terminating { deadline: Instant },
    /// The job was declared hung; it got the `--hang-signal`, and is SIGKILLed at `kill_at`.
    Hung { kill_at: Instant },
    /// SIGKILL went to the whole tree; waiting for the leader to be reaped.
    Killing,
    /// Waiting until `until` to relaunch the job.
    BackingOff { until: Instant },
    /// The supervisor is done.
    Done(Outcome),
}

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The job exited 0.
    Finished,
    /// Stopped (a signal, a time limit, a notice, `ckpt stop`): run again (or requeue).
    Stopped,
    /// The restart policy gave up; ckpt exits with the job's status.
    GaveUp { code: i32 },
}

/// Why the supervisor is stopping the job (sticky once set).
#[derive(Debug, Clone, PartialEq)]
pub enum StopCause {
    /// One of ckpt's own stop signals (TERM, INT, HUP, and the others in `docs/design.md`).
    Signal(i32),
    /// Slurm's warning signal (`--slurm-signal`).
    SlurmWarning(i32),
    /// The Slurm time limit is within the stop margin.
    SlurmTimeLimit,
    /// A cloud preemption notice.
    Notice,
    /// `ckpt stop` (with or without a checkpoint).
    Control { checkpoint: bool },
}

/// Who asked for a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Why {
    Periodic,
    /// SIGUSR1 to ckpt.
    OnDemand,
    /// `ckpt checkpoint`.
    Control,
}

impl Why {
    fn text(self) -> &'static str {
        match self {
            Why::Periodic => "periodic",
            Why::OnDemand => "on demand (SIGUSR1 to ckpt)",
            Why::Control => "requested by `ckpt checkpoint`",
        }
    }
}

/// Something that happened, as the loop saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// The job was launched (the answer to [`Action::Launch`]).
    Launched {
        pid: u32,
        /// The restored checkpoint's sequence, step and content digest, if any.
        restored: Option<Mark>,
    },
    /// The job's leader was reaped (the loop has already killed the rest of the tree and
    /// rescanned the directory). `jitter` in 0..1 spreads the backoff.
    Exited { exit: Exit, jitter: f64 },
    /// A stop signal to ckpt itself (TERM, INT, HUP, ...).
    StopSignal(i32),
    /// Slurm's warning signal.
    SlurmWarning(i32),
    /// The Slurm time limit is within the stop margin (the loop checked the end time).
    SlurmTimeLimit { left: Duration, margin: Duration },
    /// A cloud preemption notice; `deadline` is when the machine goes away, if known.
    Notice { deadline: Option<Instant> },
    /// `ckpt stop`.
    ControlStop { checkpoint: bool },
    /// SIGUSR1 to ckpt, or `ckpt checkpoint`.
    CheckpointAsked(Why),
    /// A hello, already checked by the loop: `refused` says why it is not trusted
    /// (not the sender's pid, not a process of the job).
    Hello {
        pid: u32,
        signal: i32,
        client: String,
        rank: Option<u32>,
        refused: Option<String>,
    },
    /// A heartbeat.
    Progress { step: Option<u64> },
    /// A client says it committed (the loop rescans; the checkpoint counts once it verifies).
    SaveReported { duration_ms: u64 },
    /// A rescan found a new checkpoint that verifies.
    Committed(Mark),
    /// A client could not save.
    SaveFailed { pid: u32, error: String },
    /// Under `--restore-check client`: a client reported the checkpoint this launch restored
    /// damaged, and the loop's own full verify agreed and set it aside (`quarantine/`).
    RestoreRejected { seq: u64, error: String },
    /// Time passed (the loop calls this at [`Machine::next_wake`] and at least every 500 ms).
    Tick,
}

/// A checkpoint, as far as progress is concerned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mark {
    pub seq: u64,
    pub step: Option<u64>,
    /// A digest of the member files' checksums: tells a new checkpoint of the same content
    /// (a job that saves and crashes at the same point) from real progress when steps are
    /// absent.
    pub digest: u64,
}

/// What the loop must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Pick the newest verified checkpoint and launch the job; answer with
    /// [`Event::Launched`].
    Launch,
    /// Send `sig` to one process.
    Signal { pid: u32, sig: i32 },
    /// Send `sig` to the job's process group (and, for SIGTERM, after a SIGCONT).
    SignalGroup(i32),
    /// SIGKILL the job's whole tree (group, cgroup, descendants).
    KillTree,
    /// Look for new checkpoints (answers with [`Event::Committed`] for a new one).
    Rescan,
    /// Log an event (stderr for humans, `events.jsonl` for tools).
    Log(Log),
    /// Rewrite `status.json`.
    Status,
    /// Answer `ckpt checkpoint --wait` callers that wait for a failure.
    FailWaits(String),
    /// Record that the job finished (`.ckpt/finished`).
    MarkFinished,
    /// The run is over with this outcome (the loop reports, requeues and exits).
    Finish(Outcome),
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub warn: bool,
    pub event: &'static str,
    pub human: Option<String>,
    pub data: Value,
}

fn log(event: &'static str, human: impl Into<String>, data: Value) -> Action {
    Action::Log(Log {
        warn: false,
        event,
        human: Some(human.into()),
        data,
    })
}

fn warn(event: &'static str, human: impl Into<String>, data: Value) -> Action {
    Action::Log(Log {
        warn: true,
        event,
        human: Some(human.into()),
        data,
    })
}

/// What the machine is told at start (from `ckpt run`'s flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub every: Option<Duration>,
    pub grace: Duration,
    pub kill_after: Duration,
    pub policy: Policy,
    /// `--signal` was given: the job traps it itself, even without announcing a client.
    pub signal_explicit: bool,
    pub signal: i32,
    pub hang_timeout: Option<Duration>,
    pub hang_signal: Option<i32>,
    pub checkpoint_timeout: Option<Duration>,
}

/// After this many requests in a row with no commit and no failure report, warn.
pub const UNANSWERED_WARN: u32 = 3;
/// A request is given up on after `max(2 x interval, 2 x the longest save attempt, this)`;
/// only then is the next one sent. It counts as *unanswered* only if a client reported
/// progress after it (so it reached a safe point and saw the request): a job busy in a long
/// step or in its teardown has not ignored anything. Clients report progress at most once a
/// second, so the floor leaves room for one report.
pub const ANSWER_FLOOR: Duration = Duration::from_secs(2);
/// A progress report this soon after a request may have been sent before the request arrived.
pub const SEEN_AFTER: Duration = Duration::from_millis(50);
/// Failed saves double the interval, at most this many times (x32).
pub const SAVE_BACKOFF_MAX_DOUBLINGS: u32 = 5;
/// Without a client, the "no client announced" hint waits this long after a launch (a
/// launcher's ranks importing torch and joining their process group take tens of seconds).
pub const HINT_AFTER: Duration = Duration::from_secs(60);
/// The hang signal's head start before SIGKILL.
pub const HANG_DUMP_TIME: Duration = Duration::from_secs(2);

/// The current launch.
#[derive(Debug, Clone)]
pub struct JobState {
    pub pid: u32,
    pub started: Instant,
    pub seq_at_launch: u64,
    /// The checkpoint this launch restored from.
    pub restored: Option<Mark>,
    /// A checkpoint beyond the restored one committed in this launch.
    pub progress: bool,
    /// Processes that announced a client, with their request signal and rank.
    pub announced: BTreeMap<u32, (i32, Option<u32>)>,
    pub next_request: Option<Instant>,
    pub step: Option<u64>,
    pub last_beat: Instant,
    /// The last `progress` message (a safe point reached).
    pub last_progress: Option<Instant>,
    pub hint_logged: bool,
    /// The checkpoint this launch restored was found damaged and set aside
    /// ([`Event::RestoreRejected`]): its end is a relaunch, not a failure.
    pub restore_rejected: bool,
}

/// The whole state of a supervisor.
#[derive(Debug, Clone)]
pub struct Machine {
    pub s: Settings,
    pub phase: Phase,
    pub stop: Option<StopCause>,
    pub job: Option<JobState>,
    pub hist: History,
    /// Newest checkpoint known to verify.
    pub last: Option<Mark>,
    /// The interval in force (`--every auto` changes it).
    pub every: Option<Duration>,
    /// Some launch of this run made progress.
    pub progress_this_run: bool,
    /// Save attempts in a row that failed (the interval backs off).
    pub save_failures: u32,
    /// Requests in a row that got no answer at all.
    pub unanswered: u32,
    pub unanswered_warned: bool,
    /// Requests sent and commits seen in this run (for the final report).
    pub requests: u64,
    pub commits: u64,
    /// The longest time from a request to its answer (commit or failure).
    pub longest_attempt: Duration,
    /// SIGTERM reached every process of the job already (Slurm signals the whole job).
    pub job_got_sigterm: bool,
    /// Deadline of an active preemption notice (the stop's deadline is fitted to it).
    pub notice_deadline: Option<Instant>,
}

impl Machine {
    pub fn new(s: Settings) -> Machine {
        Machine {
            every: s.every,
            s,
            phase: Phase::Idle,
            stop: None,
            job: None,
            hist: History::default(),
            last: None,
            progress_this_run: false,
            save_failures: 0,
            unanswered: 0,
            unanswered_warned: false,
            requests: 0,
            commits: 0,
            longest_attempt: Duration::ZERO,
            job_got_sigterm: false,
            notice_deadline: None,
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last.map_or(0, |m| m.seq)
    }

    /// The first action: launch (the loop may have found the job already finished, or
    /// refused to start, before that).
    pub fn start(&mut self) -> Vec<Action> {
        vec![Action::Launch]
    }

    /// The status word shown by `ckpt status` and `status.json`: derived from the phase here
    /// and nowhere else.
    pub fn status_word(&self) -> &'static str {
        match self.phase {
            Phase::Idle => "starting",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Checkpointing { .. } => "checkpointing",
            Phase::Stopping { .. } | Phase::Terminating { .. } => "stopping",
            Phase::Hung { .. } | Phase::Killing => {
                if self.stop.is_some() {
                    "stopping"
                } else {
                    "killing"
                }
            }
            Phase::BackingOff { .. } => "backing_off",
            Phase::Done(Outcome::Finished) => "finished",
            Phase::Done(Outcome::Stopped) => "stopped",
            Phase::Done(Outcome::GaveUp { .. }) => "gave_up",
        }
    }

    /// When the loop must wake up next to act on a timer.
    pub fn next_wake(&self) -> Option<Instant> {
        let job = self.job.as_ref();
        let mut t: Option<Instant> = None;
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        match self.phase {
            Phase::Starting | Phase::Running => at(job.and_then(|j| j.next_request)),
            Phase::Checkpointing { since } => at(Some(since + self.answer_timeout())),
            Phase::Stopping { deadline, .. } | Phase::Terminating { deadline } => {
                at(Some(deadline))
            }
            Phase::Hung { kill_at } => at(Some(kill_at)),
            Phase::BackingOff { until } => at(Some(until)),
            Phase::Idle | Phase::Killing | Phase::Done(_) => {}
        }
        t
    }

    /// How long a request may stay unanswered before the next one is sent.
    pub fn answer_timeout(&self) -> Duration {
        let every = self.every.unwrap_or(Duration::ZERO);
        every
            .saturating_mul(2)
            .max(self.longest_attempt.saturating_mul(2))
            .max(ANSWER_FLOOR)
    }

    /// The interval in force now: `every`, doubled for each failed save in a row.
    pub fn interval(&self) -> Option<Duration> {
        self.every
            .map(|e| e.saturating_mul(1 << self.save_failures.min(SAVE_BACKOFF_MAX_DOUBLINGS)))
    }

    /// The transition function.
    pub fn on(&mut self, ev: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if let Phase::Done(_) = self.phase {
            return out;
        }
        match ev {
            Event::Launched { pid, restored } => self.launched(pid, restored, now, &mut out),
            Event::Exited { exit, jitter } => self.exited(exit, jitter, now, &mut out),
            Event::StopSignal(sig) => {
                if self.stop.is_some() {
                    if sig == libc::SIGINT {
                        if self.job.is_some() && self.phase != Phase::Killing {
                            out.push(warn(
                                "force_stop",
                                "second interrupt: killing the job now",
                                json!({}),
                            ));
                            self.kill(&mut out);
                        }
                    } else {
                        out.push(log(
                            "stop_repeated",
                            format!("received {} again: already stopping", signame(sig)),
                            json!({ "signal": sig }),
                        ));
                    }
                } else {
                    let human = if self.job.is_some() {
                        format!(
                            "received {}: checkpointing, then stopping the job",
                            signame(sig)
                        )
                    } else {
                        format!("received {} while waiting to restart", signame(sig))
                    };
                    out.push(log("stop_requested", human, json!({ "signal": sig })));
                    self.begin_stop(StopCause::Signal(sig), now, &mut out);
                }
            }
            Event::SlurmWarning(sig) => {
                if self.stop.is_none() {
                    out.push(log(
                        "slurm_warning",
                        format!("received {} (Slurm's warning: the time is nearly up): checkpointing, then stopping the job", signame(sig)),
                        json!({ "signal": sig }),
                    ));
                    self.begin_stop(StopCause::SlurmWarning(sig), now, &mut out);
                }
            }
            Event::SlurmTimeLimit { left, margin } => {
                if self.stop.is_none() {
                    out.push(log(
                        "slurm_time_limit",
                        format!("the job's time limit is {} away (stop margin {}): checkpointing, then stopping the job", fmt_dur(left), fmt_dur(margin)),
                        json!({ "left_ms": left.as_millis() as u64, "margin_ms": margin.as_millis() as u64 }),
                    ));
                    self.begin_stop(StopCause::SlurmTimeLimit, now, &mut out);
                }
            }
            Event::Notice { deadline } => {
                if self.notice_deadline.is_none() {
                    self.notice_deadline = deadline;
                }
                if self.stop.is_none() {
                    self.begin_stop(StopCause::Notice, now, &mut out);
                }
            }
            Event::ControlStop { checkpoint } => {
                if self.stop.is_none() {
                    out.push(log(
                        "stop_requested",
                        format!(
                            "stop requested through the control socket{}",
                            if checkpoint {
                                ": checkpointing, then stopping the job"
                            } else {
                                " without a checkpoint"
                            }
                        ),
                        json!({ "checkpoint": checkpoint }),
                    ));
                    self.begin_stop(StopCause::Control { checkpoint }, now, &mut out);
                }
            }
            Event::CheckpointAsked(why) => {
                if self.stop.is_none() && self.job.is_some() {
                    self.request(why, now, &mut out);
                }
            }
            Event::Hello {
                pid,
                signal,
                client,
                rank,
                refused,
            } => self.hello(pid, signal, client, rank, refused, now, &mut out),
            Event::Progress { step } => {
                if let Some(j) = self.job.as_mut() {
                    j.last_beat = now;
                    j.last_progress = Some(now);
                    if step.is_some() {
                        j.step = step;
                    }
                }
            }
            Event::SaveReported { .. } => {
                if let Some(j) = self.job.as_mut() {
                    j.last_beat = now;
                }
                out.push(Action::Rescan);
            }
            Event::Committed(m) => self.committed(m, now, &mut out),
            Event::RestoreRejected { seq, error } => {
                let Some(j) = self.job.as_mut() else {
                    return out;
                };
                if j.restored.map(|r| r.seq) != Some(seq) || j.restore_rejected {
                    return out;
                }
                j.restore_rejected = true;
                let pid = j.pid;
                // `last` may still name it: numbers are never reused, so a rescan still
                // sees every new commit as newer.
                out.push(warn(
                    "restore_rejected",
                    format!("checkpoint {seq}, which the job (pid {pid}) was restoring, is damaged ({error}) and was set aside: stopping the job to relaunch it from the next checkpoint that verifies"),
                    json!({ "seq": seq, "pid": pid, "error": error }),
                ));
                if self.phase != Phase::Killing {
                    self.kill(&mut out);
                }
            }
            Event::SaveFailed { pid, error } => {
                if let Some(j) = self.job.as_mut() {
                    j.last_beat = now;
                }
                self.save_failures = self.save_failures.saturating_add(1);
                self.unanswered = 0;
                let was_checkpointing = matches!(self.phase, Phase::Checkpointing { .. });
                if let Phase::Checkpointing { since } = self.phase {
                    self.longest_attempt = self.longest_attempt.max(now - since);
                    self.phase = Phase::Running;
                }
                let next = self.interval();
                if let Some(j) = self.job.as_mut() {
                    if j.next_request.is_some() || matches!(self.phase, Phase::Running) {
                        j.next_request = next.map(|i| now + i);
                    }
                }
                let backoff = match (self.save_failures > 1, next) {
                    (true, Some(i)) => format!("; next request in {}", fmt_dur(i)),
                    _ => String::new(),
                };
                out.push(warn(
                    "save_failed",
                    format!("job process {pid} could not save a checkpoint: {error}{backoff}"),
                    json!({ "pid": pid, "error": error, "failures": self.save_failures, "next_ms": next.map(|i| i.as_millis() as u64) }),
                ));
                out.push(Action::FailWaits(format!(
                    "the job could not save a checkpoint: {error}"
                )));
                // The status changes only with the phase (a flood of messages must not turn
                // into a flood of status writes).
                if was_checkpointing {
                    out.push(Action::Status);
                }
            }
            Event::Tick => self.tick(now, &mut out),
        }
        out
    }

    fn launched(&mut self, pid: u32, restored: Option<Mark>, now: Instant, out: &mut Vec<Action>) {
        let explicit = self.s.signal_explicit;
        self.job = Some(JobState {
            pid,
            started: now,
            seq_at_launch: self.last_seq(),
            restored,
            progress: false,
            announced: BTreeMap::new(),
            // Without a client the first "request" is only the hint about it.
            next_request: self
                .interval()
                .map(|i| now + if explicit { i } else { i.max(HINT_AFTER) }),
            step: restored.and_then(|m| m.step),
            last_beat: now,
            last_progress: None,
            hint_logged: false,
            restore_rejected: false,
        });
        self.phase = if explicit {
            Phase::Running
        } else {
            Phase::Starting
        };
        out.push(Action::Status);
        if self.stop.is_some() {
            // A stop that came while the launch was under way.
            let cause = self.stop.take().expect("checked");
            self.begin_stop(cause, now, out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn hello(
        &mut self,
        pid: u32,
        signal: i32,
        client: String,
        rank: Option<u32>,
        refused: Option<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        let refused = refused.or_else(|| {
            crate::protocol::request_signal_problem(signal)
                .map(|p| format!("its request signal {signal} {p}"))
        });
        if let Some(why) = refused {
            out.push(warn(
                "bad_hello",
                format!("ignored a hello from pid {pid}: {why}"),
                json!({ "pid": pid, "signal": signal, "reason": why }),
            ));
            return;
        }
        let first = job.announced.is_empty();
        job.announced.insert(pid, (signal, rank));
        job.last_beat = now;
        let who = match rank {
            Some(r) => format!("job process {pid} (rank {r})"),
            None => format!("job process {pid}"),
        };
        out.push(log(
            "hello",
            format!(
                "{who} announced a {client} client (request signal {})",
                signame(signal)
            ),
            json!({ "pid": pid, "client": client, "signal": signal, "rank": rank }),
        ));
        if first && !self.s.signal_explicit {
            job.next_request = self.every.map(|e| now + e);
        }
        match self.phase {
            Phase::Starting => self.phase = Phase::Running,
            Phase::Stopping { .. } if !self.job_got_sigterm => {
                // A stop came before this client was ready: ask it now.
                out.push(Action::Signal {
                    pid,
                    sig: libc::SIGTERM,
                });
            }
            _ => {}
        }
        out.push(Action::Status);
    }

    fn committed(&mut self, m: Mark, now: Instant, out: &mut Vec<Action>) {
        if m.seq <= self.last_seq() {
            return;
        }
        self.last = Some(m);
        self.commits += 1;
        self.unanswered = 0;
        self.save_failures = 0;
        if let Some(j) = self.job.as_mut() {
            let beyond = is_progress(j.restored, m);
            j.progress |= beyond;
            self.progress_this_run |= beyond;
            if let Some(s) = m.step {
                j.step = Some(j.step.map_or(s, |x| x.max(s)));
            }
            j.last_beat = now;
        }
        match self.phase {
            Phase::Checkpointing { since } => {
                self.longest_attempt = self.longest_attempt.max(now - since);
                self.phase = Phase::Running;
                self.schedule(now);
            }
            Phase::Running => self.schedule(now),
            Phase::Stopping { base_seq, .. } if m.seq > base_seq => {
                let no_client = self.job.as_ref().is_some_and(|j| j.announced.is_empty());
                if no_client {
                    // A job that traps the signal itself saved: now ask it to end.
                    self.terminate(now, out);
                }
            }
            _ => {}
        }
        out.push(Action::Status);
    }

    fn schedule(&mut self, now: Instant) {
        let next = self.interval().map(|i| now + i);
        if let Some(j) = self.job.as_mut() {
            j.next_request = next;
        }
    }

    fn exited(&mut self, exit: Exit, jitter: f64, now: Instant, out: &mut Vec<Action>) {
        let Some(job) = self.job.take() else {
            return;
        };
        let ran = now.saturating_duration_since(job.started);
        let progress = job.progress;
        out.push(log(
            "exit",
            format!("job (pid {}) ended with {exit} after {}", job.pid, fmt_dur(ran)),
            json!({ "pid": job.pid, "exit": exit.as_code(), "signaled": matches!(exit, Exit::Signal(_)), "ran_ms": ran.as_millis() as u64, "progress": progress }),
        ));
        if self.unanswered > 0 {
            self.warn_unanswered(true, out);
        }
        if self.stop.is_some() {
            self.phase = Phase::Done(Outcome::Stopped);
            out.push(Action::Finish(Outcome::Stopped));
            return;
        }
        if job.restore_rejected {
            // Not the job's failure: its checkpoint was damaged. Bounded: each such relaunch
            // sets one checkpoint aside.
            self.hist.restarts = self.hist.restarts.saturating_add(1);
            out.push(log(
                "restart",
                format!(
                    "restart {} now (the checkpoint it restored was damaged and set aside; not counted as a failure)",
                    self.hist.restarts
                ),
                json!({ "restart": self.hist.restarts, "delay_ms": 0, "progress": progress, "restore_rejected": true }),
            ));
            self.phase = Phase::BackingOff { until: now };
            out.push(Action::Status);
            return;
        }
        if exit.success() {
            self.phase = Phase::Done(Outcome::Finished);
            out.push(Action::MarkFinished);
            out.push(Action::Finish(Outcome::Finished));
            return;
        }
        match self.s.policy.on_failure(&mut self.hist, progress, jitter) {
            Decision::GiveUp { reason } => {
                let code = exit.as_code().clamp(1, 255);
                out.push(warn(
                    "give_up",
                    format!("giving up: {reason}; exiting with the job's status {code}"),
                    json!({ "reason": reason, "code": code }),
                ));
                self.phase = Phase::Done(Outcome::GaveUp { code });
                out.push(Action::Finish(Outcome::GaveUp { code }));
            }
            Decision::Restart { delay } => {
                let why = if progress {
                    "progress was made"
                } else if self.last_seq() > job.seq_at_launch {
                    "a new checkpoint, but not beyond the step it restored from"
                } else {
                    "no new checkpoint since the last launch"
                };
                out.push(log(
                    "restart",
                    format!(
                        "restart {} in {} ({why})",
                        self.hist.restarts,
                        fmt_dur(delay)
                    ),
                    json!({ "restart": self.hist.restarts, "delay_ms": delay.as_millis() as u64, "progress": progress }),
                ));
                self.phase = Phase::BackingOff {
                    until: now.checked_add(delay).unwrap_or(now),
                };
                out.push(Action::Status);
            }
        }
    }

    fn warn_unanswered(&mut self, at_exit: bool, out: &mut Vec<Action>) {
        if self.unanswered_warned {
            return;
        }
        self.unanswered_warned = true;
        let (n, c) = (self.requests, self.commits);
        let cause = if self.s.signal_explicit
            && self.job.as_ref().is_none_or(|j| j.announced.is_empty())
        {
            "the job's trap for the request signal does not run `ckpt save`, or it fails before saving"
        } else {
            "the job sees the request (should_checkpoint() returns true) but does not save, or its save never finishes"
        };
        let when = if at_exit { "by its exit" } else { "so far" };
        out.push(warn(
            "unanswered",
            format!("{} checkpoint request(s) got no checkpoint {when} ({n} sent, {c} committed in this run): likely {cause}; hint: save whenever should_checkpoint() is true; --checkpoint-timeout turns an unanswered request into a hang", self.unanswered.max(1)),
            json!({ "unanswered": self.unanswered, "requests": n, "commits": c }),
        ));
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Starting | Phase::Running => {
                let due = self
                    .job
                    .as_ref()
                    .and_then(|j| j.next_request)
                    .is_some_and(|t| now >= t);
                if due {
                    self.request(Why::Periodic, now, out);
                }
                self.check_hang(now, out);
            }
            Phase::Checkpointing { since } => {
                if let Some(c) = self.s.checkpoint_timeout {
                    if now.saturating_duration_since(since) >= c {
                        let why = format!(
                            "a requested checkpoint did not commit within --checkpoint-timeout {}",
                            fmt_dur(c)
                        );
                        self.hang(why, now, out);
                        return;
                    }
                }
                if now.saturating_duration_since(since) >= self.answer_timeout() {
                    let seen = self
                        .job
                        .as_ref()
                        .and_then(|j| j.last_progress)
                        .is_some_and(|p| p >= since + SEEN_AFTER);
                    if seen {
                        self.unanswered += 1;
                    }
                    self.phase = Phase::Running;
                    self.schedule(now);
                    if self.unanswered >= UNANSWERED_WARN {
                        self.warn_unanswered(false, out);
                    }
                    out.push(Action::Status);
                    return;
                }
                self.check_hang(now, out);
            }
            Phase::Stopping { deadline, base_seq } if now >= deadline => {
                let committed = self.last_seq() > base_seq;
                out.push(warn(
                    "grace_expired",
                    format!(
                        "the job did not {} within --grace {}; sending SIGTERM",
                        if committed {
                            "exit"
                        } else {
                            "commit a checkpoint"
                        },
                        fmt_dur(self.s.grace)
                    ),
                    json!({ "committed": committed }),
                ));
                self.terminate(now, out);
            }
            Phase::Terminating { deadline } if now >= deadline => {
                out.push(warn(
                    "kill",
                    format!(
                        "the job ignored SIGTERM for {}; sending SIGKILL",
                        fmt_dur(self.s.kill_after)
                    ),
                    json!({}),
                ));
                self.kill(out);
            }
            Phase::Hung { kill_at } if now >= kill_at => self.kill(out),
            Phase::BackingOff { until } if now >= until && self.stop.is_none() => {
                out.push(Action::Launch);
            }
            _ => {}
        }
    }

    fn check_hang(&mut self, now: Instant, out: &mut Vec<Action>) {
        let (Some(h), Some(j)) = (self.s.hang_timeout, self.job.as_ref()) else {
            return;
        };
        let silent = now.saturating_duration_since(j.last_beat);
        if !j.announced.is_empty() && silent >= h {
            let why = format!(
                "no progress reported for {} (--hang-timeout {})",
                fmt_dur(silent),
                fmt_dur(h)
            );
            self.hang(why, now, out);
        }
    }

    fn hang(&mut self, why: String, now: Instant, out: &mut Vec<Action>) {
        let pid = self.job.as_ref().map_or(0, |j| j.pid);
        let dump = self.s.hang_signal;
        out.push(warn(
            "hang",
            format!(
                "the job is hung: {why}; {}killing it and restarting from the newest checkpoint",
                dump.map(|s| format!("sending {} for a stack dump, then ", signame(s)))
                    .unwrap_or_default()
            ),
            json!({ "reason": why, "pid": pid }),
        ));
        out.push(Action::FailWaits(format!("the job hung: {why}")));
        match dump {
            Some(sig) => {
                out.push(Action::SignalGroup(sig));
                self.phase = Phase::Hung {
                    kill_at: now + HANG_DUMP_TIME,
                };
                out.push(Action::Status);
            }
            None => self.kill(out),
        }
    }

    /// Asks the job for a checkpoint, unless one is outstanding.
    fn request(&mut self, why: Why, now: Instant, out: &mut Vec<Action>) {
        let Some(j) = self.job.as_mut() else { return };
        if j.announced.is_empty() && !self.s.signal_explicit {
            if why == Why::Periodic {
                j.next_request = None;
                if !j.hint_logged {
                    j.hint_logged = true;
                    out.push(log(
                        "request_skipped",
                        format!("checkpoint {} skipped: the job has not announced a client, so it is only supervised and restarted (hint: use a ckpt client library, or pass --signal if the job traps the signal itself)", why.text()),
                        json!({ "why": why.text() }),
                    ));
                }
            }
            return;
        }
        if let Phase::Checkpointing { .. } = self.phase {
            // One request at a time: the job is still answering the last one.
            return;
        }
        if !matches!(self.phase, Phase::Running | Phase::Starting) {
            return;
        }
        j.next_request = None;
        let targets: Vec<(u32, i32)> = j.announced.iter().map(|(&p, &(s, _))| (p, s)).collect();
        if targets.is_empty() {
            out.push(Action::SignalGroup(self.s.signal));
        } else {
            for (pid, sig) in targets {
                out.push(Action::Signal { pid, sig });
            }
        }
        self.requests += 1;
        self.phase = Phase::Checkpointing { since: now };
        out.push(log(
            "request",
            format!("requested a checkpoint ({})", why.text()),
            json!({ "why": why.text() }),
        ));
        out.push(Action::Status);
    }

    /// The deadline of a stop's checkpoint: `--grace`, or more when a preemption notice
    /// leaves more time (then SIGTERM comes `--kill-after` + 1 s before the machine goes).
    fn stop_deadline(&self, now: Instant) -> Instant {
        let grace = now.checked_add(self.s.grace).unwrap_or(now);
        match self.notice_deadline {
            Some(d) => d
                .checked_sub(self.s.kill_after + Duration::from_secs(1))
                .map_or(grace, |t| t.max(grace)),
            None => grace,
        }
    }

    fn begin_stop(&mut self, cause: StopCause, now: Instant, out: &mut Vec<Action>) {
        let checkpoint = !matches!(cause, StopCause::Control { checkpoint: false });
        self.stop = Some(cause);
        match self.phase {
            Phase::Idle | Phase::BackingOff { .. } => {
                self.phase = Phase::Done(Outcome::Stopped);
                out.push(Action::Finish(Outcome::Stopped));
                return;
            }
            Phase::Done(_) | Phase::Killing => return,
            Phase::Stopping { .. } | Phase::Terminating { .. } | Phase::Hung { .. } => {
                out.push(Action::Status);
                return;
            }
            Phase::Starting | Phase::Running | Phase::Checkpointing { .. } => {}
        }
        if !checkpoint {
            // A client treats SIGTERM as "checkpoint, then exit": without a checkpoint the
            // only honest stop is SIGKILL.
            self.kill(out);
            return;
        }
        let Some(j) = self.job.as_ref() else { return };
        if !j.announced.is_empty() {
            if !self.job_got_sigterm {
                for &pid in j.announced.keys() {
                    out.push(Action::Signal {
                        pid,
                        sig: libc::SIGTERM,
                    });
                }
            }
            self.phase = Phase::Stopping {
                deadline: self.stop_deadline(now),
                base_seq: self.last_seq(),
            };
        } else if self.s.signal_explicit {
            if !matches!(self.phase, Phase::Checkpointing { .. }) {
                out.push(Action::SignalGroup(self.s.signal));
            }
            self.phase = Phase::Stopping {
                deadline: self.stop_deadline(now),
                base_seq: self.last_seq(),
            };
        } else {
            self.terminate(now, out);
            return;
        }
        out.push(Action::Status);
    }

    fn terminate(&mut self, now: Instant, out: &mut Vec<Action>) {
        out.push(Action::SignalGroup(libc::SIGTERM));
        self.phase = Phase::Terminating {
            deadline: now.checked_add(self.s.kill_after).unwrap_or(now),
        };
        out.push(Action::Status);
    }

    fn kill(&mut self, out: &mut Vec<Action>) {
        out.push(Action::KillTree);
        self.phase = Phase::Killing;
        out.push(Action::Status);
    }
}

/// Progress: a checkpoint whose step is beyond the step the launch restored from; without
/// steps, one whose content differs from the restored one.
pub fn is_progress(restored: Option<Mark>, new: Mark) -> bool {
    match (restored, new.step) {
        (None, _) => true,
        (Some(r), Some(s)) => match r.step {
            Some(rs) => s > rs,
            None => r.digest != new.digest,
        },
        (Some(r), None) => r.digest != new.digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(0);

    fn settings() -> Settings {
        Settings {
            every: Some(Duration::from_secs(10)),
            grace: Duration::from_secs(30),
            kill_after: Duration::from_secs(5),
            policy: Policy {
                backoff_min: Duration::from_secs(1),
                backoff_max: Duration::from_secs(60),
                max_failures: 3,
                max_restarts: None,
            },
            signal_explicit: false,
            signal: libc::SIGUSR1,
            hang_timeout: None,
            hang_signal: None,
            checkpoint_timeout: None,
        }
    }

    struct T {
        m: Machine,
        t0: Instant,
    }

    impl T {
        fn new(s: Settings) -> T {
            let _ = T0;
            T {
                m: Machine::new(s),
                t0: Instant::now(),
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }
        fn ev(&mut self, ms: u64, e: Event) -> Vec<Action> {
            let now = self.at(ms);
            self.m.on(e, now)
        }
        /// Launched, with a client announced: Running.
        fn running(s: Settings) -> T {
            let mut t = T::new(s);
            assert_eq!(t.m.start(), vec![Action::Launch]);
            t.ev(0, launched(None));
            t.ev(10, hello(100));
            assert_eq!(t.m.phase, Phase::Running);
            t
        }
    }

    fn launched(restored: Option<Mark>) -> Event {
        Event::Launched { pid: 100, restored }
    }

    fn hello(pid: u32) -> Event {
        Event::Hello {
            pid,
            signal: libc::SIGUSR1,
            client: "rust".into(),
            rank: None,
            refused: None,
        }
    }

    fn mark(seq: u64, step: Option<u64>) -> Mark {
        Mark {
            seq,
            step,
            digest: seq * 7919,
        }
    }

    fn logs(a: &[Action]) -> Vec<&'static str> {
        a.iter()
            .filter_map(|x| match x {
                Action::Log(l) => Some(l.event),
                _ => None,
            })
            .collect()
    }

    fn signals(a: &[Action]) -> Vec<(u32, i32)> {
        a.iter()
            .filter_map(|x| match x {
                Action::Signal { pid, sig } => Some((*pid, *sig)),
                Action::SignalGroup(sig) => Some((0, *sig)),
                _ => None,
            })
            .collect()
    }

    fn died(code: i32) -> Event {
        Event::Exited {
            exit: Exit::Code(code),
            jitter: 1.0,
        }
    }

    // ---- Idle ----

    #[test]
    fn idle_stop_before_launch_is_done() {
        let mut t = T::new(settings());
        let a = t.ev(0, Event::StopSignal(libc::SIGTERM));
        assert!(a.contains(&Action::Finish(Outcome::Stopped)));
        assert_eq!(t.m.phase, Phase::Done(Outcome::Stopped));
        assert!(t.ev(1, Event::Tick).is_empty(), "done ignores everything");
    }

    #[test]
    fn idle_ignores_messages_and_requests() {
        let mut t = T::new(settings());
        for e in [
            Event::Tick,
            Event::CheckpointAsked(Why::Control),
            Event::Progress { step: Some(3) },
            hello(5),
        ] {
            let a = t.ev(0, e);
            assert!(signals(&a).is_empty());
        }
        assert_eq!(t.m.phase, Phase::Idle);
    }

    // ---- Starting ----

    #[test]
    fn starting_without_client_never_signals_and_hints_once_late() {
        let mut t = T::new(settings());
        t.ev(0, launched(None));
        assert_eq!(t.m.phase, Phase::Starting);
        assert_eq!(t.m.status_word(), "starting");
        // Not before HINT_AFTER even though --every is 10 s ... and exactly once.
        assert!(logs(&t.ev(59_000, Event::Tick)).is_empty());
        let a = t.ev(HINT_AFTER.as_millis() as u64, Event::Tick);
        assert_eq!(logs(&a), vec!["request_skipped"]);
        assert!(signals(&a).is_empty());
        assert!(logs(&t.ev(60_000, Event::Tick)).is_empty());
        assert_eq!(t.m.requests, 0);
    }

    #[test]
    fn starting_checkpoint_asked_without_client_is_not_sent() {
        let mut t = T::new(settings());
        t.ev(0, launched(None));
        let a = t.ev(5, Event::CheckpointAsked(Why::Control));
        assert!(signals(&a).is_empty());
        assert_eq!(t.m.phase, Phase::Starting);
    }

    #[test]
    fn starting_hello_arms_the_timer_and_runs() {
        let mut t = T::new(settings());
        t.ev(0, launched(None));
        let a = t.ev(500, hello(100));
        assert_eq!(logs(&a), vec!["hello"]);
        assert_eq!(t.m.phase, Phase::Running);
        assert_eq!(t.m.job.as_ref().unwrap().next_request, Some(t.at(10_500)));
    }

    #[test]
    fn starting_stop_without_client_terminates_the_group() {
        let mut t = T::new(settings());
        t.ev(0, launched(None));
        let a = t.ev(5, Event::StopSignal(libc::SIGTERM));
        assert_eq!(signals(&a), vec![(0, libc::SIGTERM)]);
        assert!(matches!(t.m.phase, Phase::Terminating { .. }));
    }

    #[test]
    fn starting_with_explicit_signal_runs_and_requests_the_group() {
        let mut t = T::new(Settings {
            signal_explicit: true,
            ..settings()
        });
        t.ev(0, launched(None));
        assert_eq!(t.m.phase, Phase::Running);
        let a = t.ev(10_000, Event::Tick);
        assert_eq!(signals(&a), vec![(0, libc::SIGUSR1)]);
        assert!(matches!(t.m.phase, Phase::Checkpointing { .. }));
    }

    // ---- Hello checks ----

    #[test]
    fn hello_with_a_dangerous_signal_is_refused() {
        for sig in [
            libc::SIGKILL,
            libc::SIGSTOP,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGCHLD,
            libc::SIGSEGV,
            0,
            -1,
            32,
            999,
        ] {
            let mut t = T::new(settings());
            t.ev(0, launched(None));
            let a = t.ev(
                1,
                Event::Hello {
                    pid: 100,
                    signal: sig,
                    client: "x".into(),
                    rank: None,
                    refused: None,
                },
            );
            assert_eq!(logs(&a), vec!["bad_hello"], "signal {sig}");
            assert_eq!(t.m.phase, Phase::Starting, "signal {sig}");
            assert!(t.m.job.as_ref().unwrap().announced.is_empty());
        }
    }

    #[test]
    fn hello_refused_by_the_loop_is_ignored() {
        let mut t = T::new(settings());
        t.ev(0, launched(None));
        let a = t.ev(
            1,
            Event::Hello {
                pid: 100,
                signal: libc::SIGUSR1,
                client: "x".into(),
                rank: None,
                refused: Some("not the sender".into()),
            },
        );
        assert_eq!(logs(&a), vec!["bad_hello"]);
        assert_eq!(t.m.phase, Phase::Starting);
    }

    #[test]
    fn hello_line_names_the_rank() {
        let mut t = T::new(settings());
        t.ev(0, launched(None));
        let a = t.ev(
            1,
            Event::Hello {
                pid: 100,
                signal: libc::SIGUSR2,
                client: "python".into(),
                rank: Some(3),
                refused: None,
            },
        );
        let Action::Log(l) = &a[0] else { panic!() };
        assert!(l.human.as_ref().unwrap().contains("(rank 3)"), "{l:?}");
    }

    // ---- Running / Checkpointing ----

    #[test]
    fn running_periodic_request_then_commit_reschedules_from_the_commit() {
        let mut t = T::running(settings());
        let a = t.ev(10_010, Event::Tick);
        assert_eq!(signals(&a), vec![(100, libc::SIGUSR1)]);
        assert_eq!(t.m.status_word(), "checkpointing");
        // A second request while one is outstanding is not sent.
        assert!(signals(&t.ev(10_500, Event::CheckpointAsked(Why::OnDemand))).is_empty());
        t.ev(12_000, Event::Committed(mark(1, Some(5))));
        assert_eq!(t.m.phase, Phase::Running);
        assert_eq!(t.m.job.as_ref().unwrap().next_request, Some(t.at(22_000)));
    }

    #[test]
    fn checkpointing_unanswered_requests_are_counted_and_warned_once() {
        // The job reaches a safe point every 500 ms (a progress report) and never saves.
        let mut t = T::running(Settings {
            every: Some(Duration::from_millis(100)),
            ..settings()
        });
        let mut ms = 200;
        let mut warned = 0;
        let mut sent = 0;
        for _ in 0..400 {
            if ms % 500 == 0 {
                t.ev(ms, Event::Progress { step: Some(ms) });
            }
            let a = t.ev(ms, Event::Tick);
            sent += signals(&a).len();
            warned += logs(&a).iter().filter(|e| **e == "unanswered").count();
            ms += 50;
        }
        assert_eq!(warned, 1);
        // At most one request per answer timeout (2 s floor) + interval.
        assert!((3..=10).contains(&sent), "{sent} requests in 20 s");
        assert!(t.m.unanswered >= UNANSWERED_WARN);
    }

    #[test]
    fn a_job_busy_away_from_safe_points_has_not_ignored_its_requests() {
        // No progress report after the requests (a long step, a teardown): nothing to warn.
        let mut t = T::running(Settings {
            every: Some(Duration::from_millis(100)),
            ..settings()
        });
        let mut ms = 200;
        for _ in 0..400 {
            assert!(!logs(&t.ev(ms, Event::Tick)).contains(&"unanswered"));
            ms += 50;
        }
        assert_eq!(t.m.unanswered, 0);
        assert!(!logs(&t.ev(ms, died(0))).contains(&"unanswered"));
    }

    #[test]
    fn checkpointing_save_failed_backs_off_the_interval() {
        let mut t = T::running(Settings {
            every: Some(Duration::from_millis(150)),
            ..settings()
        });
        t.ev(200, Event::Tick);
        let a = t.ev(
            900,
            Event::SaveFailed {
                pid: 100,
                error: "disk full".into(),
            },
        );
        assert_eq!(logs(&a), vec!["save_failed"]);
        assert!(a.contains(&Action::FailWaits(
            "the job could not save a checkpoint: disk full".into()
        )));
        assert_eq!(t.m.phase, Phase::Running);
        assert_eq!(t.m.interval(), Some(Duration::from_millis(300)));
        // The answer timeout covers twice the 700 ms attempt, at least the 2 s floor.
        assert_eq!(t.m.answer_timeout(), Duration::from_secs(2));
        t.ev(1200, Event::Tick);
        t.ev(
            1300,
            Event::SaveFailed {
                pid: 100,
                error: "disk full".into(),
            },
        );
        assert_eq!(t.m.interval(), Some(Duration::from_millis(600)));
        t.ev(1900, Event::Tick);
        t.ev(2000, Event::Committed(mark(1, Some(1))));
        assert_eq!(t.m.interval(), Some(Duration::from_millis(150)));
    }

    #[test]
    fn checkpoint_timeout_is_a_hang() {
        let mut t = T::running(Settings {
            checkpoint_timeout: Some(Duration::from_secs(3)),
            hang_signal: Some(libc::SIGQUIT),
            ..settings()
        });
        t.ev(10_010, Event::Tick);
        let a = t.ev(13_010, Event::Tick);
        assert_eq!(logs(&a), vec!["hang"]);
        assert_eq!(signals(&a), vec![(0, libc::SIGQUIT)]);
        assert!(matches!(t.m.phase, Phase::Hung { .. }));
        let a = t.ev(15_010, Event::Tick);
        assert!(a.contains(&Action::KillTree));
        assert_eq!(t.m.phase, Phase::Killing);
    }

    #[test]
    fn hang_timeout_needs_a_client_and_silence() {
        let mut t = T::running(Settings {
            hang_timeout: Some(Duration::from_secs(5)),
            every: None,
            ..settings()
        });
        t.ev(4_000, Event::Progress { step: Some(1) });
        assert!(logs(&t.ev(8_000, Event::Tick)).is_empty());
        let a = t.ev(9_001, Event::Tick);
        assert_eq!(logs(&a), vec!["hang"]);
        assert!(a.contains(&Action::KillTree));
    }

    #[test]
    fn save_reported_rescans() {
        let mut t = T::running(settings());
        assert_eq!(
            t.ev(20, Event::SaveReported { duration_ms: 3 }),
            vec![Action::Rescan]
        );
    }

    #[test]
    fn old_or_repeated_commits_are_ignored() {
        let mut t = T::running(settings());
        t.ev(20, Event::Committed(mark(2, Some(2))));
        assert!(t.ev(30, Event::Committed(mark(2, Some(2)))).is_empty());
        assert!(t.ev(30, Event::Committed(mark(1, Some(9)))).is_empty());
        assert_eq!(t.m.commits, 1);
    }

    // ---- Progress and the crash-loop guard ----

    #[test]
    fn progress_means_beyond_the_restored_step() {
        let r = Some(mark(4, Some(100)));
        assert!(!is_progress(r, mark(5, Some(100))));
        assert!(!is_progress(r, mark(5, Some(90))));
        assert!(is_progress(r, mark(5, Some(101))));
        assert!(is_progress(None, mark(1, None)));
        let same = Mark {
            seq: 9,
            step: None,
            digest: 1,
        };
        let restored = Mark {
            seq: 8,
            step: None,
            digest: 1,
        };
        assert!(!is_progress(Some(restored), same));
        assert!(is_progress(Some(restored), Mark { digest: 2, ..same }));
    }

    #[test]
    fn a_job_saving_the_same_step_then_crashing_is_given_up_on() {
        let mut t = T::new(Settings {
            policy: Policy {
                max_failures: 1,
                ..settings().policy
            },
            ..settings()
        });
        t.ev(0, launched(Some(mark(1, Some(7)))));
        t.ev(1, hello(100));
        t.ev(2, Event::Committed(mark(2, Some(7))));
        let a = t.ev(3, died(1));
        assert!(
            a.contains(&Action::Finish(Outcome::GaveUp { code: 1 })),
            "{a:?}"
        );
        assert!(!t.m.progress_this_run);
    }

    #[test]
    fn a_crash_after_progress_backs_off_then_relaunches() {
        let mut t = T::running(settings());
        t.ev(20, Event::Committed(mark(1, Some(1))));
        let a = t.ev(30, died(3));
        assert_eq!(logs(&a), vec!["exit", "restart"]);
        let Phase::BackingOff { until } = t.m.phase else {
            panic!("{:?}", t.m.phase)
        };
        assert_eq!(until, t.at(1030));
        assert_eq!(t.m.status_word(), "backing_off");
        assert!(t.ev(1000, Event::Tick).is_empty());
        assert_eq!(t.ev(1030, Event::Tick), vec![Action::Launch]);
    }

    #[test]
    fn exit_zero_finishes() {
        let mut t = T::running(settings());
        let a = t.ev(30, died(0));
        assert!(a.contains(&Action::MarkFinished));
        assert!(a.contains(&Action::Finish(Outcome::Finished)));
        assert_eq!(t.m.status_word(), "finished");
    }

    #[test]
    fn finishing_with_unanswered_requests_warns() {
        let mut t = T::running(settings());
        t.ev(10_010, Event::Tick);
        t.ev(11_000, Event::Progress { step: Some(3) });
        t.ev(30_100, Event::Tick);
        let a = t.ev(30_500, died(0));
        assert!(logs(&a).contains(&"unanswered"), "{a:?}");
    }

    // ---- Stops ----

    #[test]
    fn running_stop_asks_each_client_then_terminates_then_kills() {
        let mut t = T::running(settings());
        t.ev(20, hello(101));
        let a = t.ev(100, Event::StopSignal(libc::SIGTERM));
        assert_eq!(
            signals(&a),
            vec![(100, libc::SIGTERM), (101, libc::SIGTERM)]
        );
        assert!(matches!(t.m.phase, Phase::Stopping { .. }));
        assert_eq!(t.m.status_word(), "stopping");
        // No periodic request during a stop.
        assert!(signals(&t.ev(20_000, Event::Tick)).is_empty());
        let a = t.ev(30_100, Event::Tick);
        assert_eq!(logs(&a), vec!["grace_expired"]);
        assert_eq!(signals(&a), vec![(0, libc::SIGTERM)]);
        let a = t.ev(35_100, Event::Tick);
        assert!(a.contains(&Action::KillTree));
        let a = t.ev(35_200, died(137));
        assert!(a.contains(&Action::Finish(Outcome::Stopped)));
    }

    #[test]
    fn second_sigint_forces_a_kill_second_sigterm_does_not() {
        let mut t = T::running(settings());
        t.ev(100, Event::StopSignal(libc::SIGINT));
        let a = t.ev(200, Event::StopSignal(libc::SIGTERM));
        assert!(!a.contains(&Action::KillTree));
        assert_eq!(logs(&a), vec!["stop_repeated"]);
        let a = t.ev(300, Event::StopSignal(libc::SIGINT));
        assert!(a.contains(&Action::KillTree));
        assert_eq!(logs(&a), vec!["force_stop"]);
        assert_eq!(t.m.phase, Phase::Killing);
        // ... once.
        assert!(!t
            .ev(400, Event::StopSignal(libc::SIGINT))
            .contains(&Action::KillTree));
    }

    #[test]
    fn stop_during_a_checkpoint_keeps_the_base_and_waits_for_exit() {
        let mut t = T::running(settings());
        t.ev(10_010, Event::Tick);
        t.ev(10_100, Event::StopSignal(libc::SIGTERM));
        let Phase::Stopping { base_seq, .. } = t.m.phase else {
            panic!()
        };
        assert_eq!(base_seq, 0);
        // The commit racing the stop is recorded, the phase stays Stopping until exit.
        t.ev(10_200, Event::Committed(mark(1, Some(1))));
        assert!(matches!(t.m.phase, Phase::Stopping { .. }));
        let a = t.ev(10_300, died(0));
        assert!(a.contains(&Action::Finish(Outcome::Stopped)));
    }

    #[test]
    fn stop_with_explicit_signal_and_no_client_terminates_after_the_commit() {
        let mut t = T::new(Settings {
            signal_explicit: true,
            ..settings()
        });
        t.ev(0, launched(None));
        let a = t.ev(100, Event::StopSignal(libc::SIGTERM));
        assert_eq!(signals(&a), vec![(0, libc::SIGUSR1)]);
        let a = t.ev(300, Event::Committed(mark(1, Some(1))));
        assert_eq!(signals(&a), vec![(0, libc::SIGTERM)]);
        assert!(matches!(t.m.phase, Phase::Terminating { .. }));
    }

    #[test]
    fn stop_without_checkpoint_kills() {
        let mut t = T::running(settings());
        let a = t.ev(100, Event::ControlStop { checkpoint: false });
        assert!(a.contains(&Action::KillTree));
        assert_eq!(t.m.phase, Phase::Killing);
        assert!(t
            .ev(200, Event::ControlStop { checkpoint: true })
            .is_empty());
    }

    #[test]
    fn hello_during_a_stop_gets_sigterm_unless_slurm_sent_it() {
        let mut t = T::running(settings());
        t.ev(100, Event::StopSignal(libc::SIGTERM));
        let a = t.ev(200, hello(102));
        assert_eq!(signals(&a), vec![(102, libc::SIGTERM)]);
        let mut t = T::running(settings());
        t.m.job_got_sigterm = true;
        let a = t.ev(100, Event::StopSignal(libc::SIGTERM));
        assert!(signals(&a).is_empty());
        assert!(signals(&t.ev(200, hello(102))).is_empty());
    }

    #[test]
    fn slurm_warning_time_limit_and_notice_stop_once() {
        for e in [
            Event::SlurmWarning(libc::SIGUSR2),
            Event::SlurmTimeLimit {
                left: Duration::from_secs(50),
                margin: Duration::from_secs(60),
            },
            Event::Notice { deadline: None },
        ] {
            let mut t = T::running(settings());
            let a = t.ev(100, e.clone());
            assert_eq!(signals(&a), vec![(100, libc::SIGTERM)], "{e:?}");
            assert!(signals(&t.ev(150, e.clone())).is_empty(), "{e:?}");
            assert!(signals(&t.ev(160, Event::StopSignal(libc::SIGTERM))).is_empty());
        }
    }

    #[test]
    fn notice_deadline_stretches_the_grace() {
        let mut t = T::running(settings());
        let d = t.at(100_000);
        t.ev(100, Event::Notice { deadline: Some(d) });
        let Phase::Stopping { deadline, .. } = t.m.phase else {
            panic!()
        };
        assert_eq!(deadline, d - Duration::from_secs(6));
    }

    // ---- Backing off: every event ----

    fn backing_off() -> T {
        let mut t = T::running(settings());
        t.ev(20, Event::Committed(mark(1, Some(1))));
        t.ev(30, died(3));
        assert!(matches!(t.m.phase, Phase::BackingOff { .. }));
        t
    }

    #[test]
    fn backoff_stop_signal_slurm_warning_notice_or_control_stop_end_the_run() {
        for e in [
            Event::StopSignal(libc::SIGTERM),
            Event::StopSignal(libc::SIGINT),
            Event::SlurmWarning(libc::SIGUSR1),
            Event::SlurmTimeLimit {
                left: Duration::ZERO,
                margin: Duration::ZERO,
            },
            Event::Notice { deadline: None },
            Event::ControlStop { checkpoint: true },
            Event::ControlStop { checkpoint: false },
        ] {
            let mut t = backing_off();
            let a = t.ev(100, e.clone());
            assert!(
                a.contains(&Action::Finish(Outcome::Stopped)),
                "{e:?}: {a:?}"
            );
            assert_eq!(t.m.phase, Phase::Done(Outcome::Stopped));
            assert!(t.ev(5000, Event::Tick).is_empty(), "{e:?}");
        }
    }

    #[test]
    fn backoff_ignores_requests_messages_and_stray_exits() {
        let mut t = backing_off();
        for e in [
            Event::CheckpointAsked(Why::Control),
            Event::CheckpointAsked(Why::OnDemand),
            hello(5),
            Event::Progress { step: Some(9) },
            Event::SaveFailed {
                pid: 5,
                error: "x".into(),
            },
            died(0),
        ] {
            let a = t.ev(100, e.clone());
            assert!(signals(&a).is_empty(), "{e:?}");
            assert!(!a.contains(&Action::Launch));
            assert!(matches!(t.m.phase, Phase::BackingOff { .. }), "{e:?}");
        }
    }

    // ---- Every event in every phase ----

    /// A machine in each phase, reached through events only.
    fn in_every_phase() -> Vec<(&'static str, T)> {
        let s = || Settings {
            hang_signal: Some(libc::SIGQUIT),
            checkpoint_timeout: Some(Duration::from_secs(3)),
            ..settings()
        };
        let mut out = vec![("idle", T::new(s()))];
        let mut t = T::new(s());
        t.ev(0, launched(None));
        out.push(("starting", t));
        out.push(("running", T::running(s())));
        let mut t = T::running(s());
        t.ev(10_010, Event::Tick);
        out.push(("checkpointing", t));
        let mut t = T::running(s());
        t.ev(100, Event::StopSignal(libc::SIGTERM));
        out.push(("stopping", t));
        let mut t = T::running(s());
        t.ev(100, Event::StopSignal(libc::SIGTERM));
        t.ev(30_100, Event::Tick);
        out.push(("terminating", t));
        let mut t = T::running(s());
        t.ev(10_010, Event::Tick);
        t.ev(13_010, Event::Tick);
        out.push(("hung", t));
        let mut t = T::running(s());
        t.ev(100, Event::ControlStop { checkpoint: false });
        out.push(("killing", t));
        out.push(("backing_off", backing_off()));
        let mut t = T::running(s());
        t.ev(100, died(0));
        out.push(("done", t));
        out
    }

    fn every_event() -> Vec<Event> {
        vec![
            launched(Some(mark(1, Some(1)))),
            died(0),
            died(1),
            Event::StopSignal(libc::SIGTERM),
            Event::StopSignal(libc::SIGINT),
            Event::SlurmWarning(libc::SIGUSR1),
            Event::SlurmTimeLimit {
                left: Duration::from_secs(5),
                margin: Duration::from_secs(60),
            },
            Event::Notice { deadline: None },
            Event::ControlStop { checkpoint: true },
            Event::ControlStop { checkpoint: false },
            Event::CheckpointAsked(Why::Control),
            Event::CheckpointAsked(Why::OnDemand),
            hello(100),
            hello(101),
            Event::Progress { step: Some(9) },
            Event::SaveReported { duration_ms: 5 },
            Event::Committed(mark(7, Some(70))),
            Event::SaveFailed {
                pid: 100,
                error: "x".into(),
            },
            Event::RestoreRejected {
                seq: 1,
                error: "x".into(),
            },
            Event::Tick,
        ]
    }

    #[test]
    fn every_event_in_every_phase_keeps_the_invariants() {
        let phases = in_every_phase();
        assert_eq!(phases.len(), 10);
        for (name, _) in &phases {
            for ev in every_event() {
                // A fresh copy of the machine in that phase for each event.
                let (_, mut t) = in_every_phase()
                    .into_iter()
                    .find(|(n, _)| n == name)
                    .unwrap();
                let before = t.m.phase;
                let job = t.m.job.is_some();
                let a = t.ev(200_000, ev.clone());
                let what = format!("{name} + {ev:?} -> {:?}: {a:?}", t.m.phase);
                // Done never changes and never acts.
                if matches!(before, Phase::Done(_)) {
                    assert!(a.is_empty(), "{what}");
                    assert_eq!(t.m.phase, before, "{what}");
                }
                // Nothing is signalled or killed without a job.
                if !job && !matches!(ev, Event::Launched { .. }) {
                    assert!(
                        signals(&a).is_empty() && !a.contains(&Action::KillTree),
                        "{what}"
                    );
                }
                // A run ends only with a Finish action, and a Finish only ends the run.
                let finished = a.iter().filter(|x| matches!(x, Action::Finish(_))).count();
                assert!(finished <= 1, "{what}");
                assert_eq!(
                    finished == 1,
                    matches!(t.m.phase, Phase::Done(_)) && !matches!(before, Phase::Done(_)),
                    "{what}"
                );
                // A stop, once asked for, is never forgotten.
                let stop_event = matches!(
                    ev,
                    Event::StopSignal(_)
                        | Event::SlurmWarning(_)
                        | Event::SlurmTimeLimit { .. }
                        | Event::Notice { .. }
                        | Event::ControlStop { .. }
                );
                if stop_event && !matches!(before, Phase::Done(_)) {
                    assert!(t.m.stop.is_some(), "{what}");
                }
                // No request goes out during a stop.
                if t.m.stop.is_some() {
                    assert!(!logs(&a).contains(&"request"), "{what}");
                }
                // The status word is always defined.
                assert!(!t.m.status_word().is_empty());
            }
        }
    }

    // ---- A damaged restore checkpoint (--restore-check client) ----

    fn running_restored(s: Settings, seq: u64) -> T {
        let mut t = T::new(s);
        t.m.start();
        t.ev(0, launched(Some(mark(seq, Some(seq * 10)))));
        t.ev(10, hello(100));
        assert_eq!(t.m.phase, Phase::Running);
        t
    }

    fn rejected(seq: u64) -> Event {
        Event::RestoreRejected {
            seq,
            error: "file \"state\": checksum 1 != 2".into(),
        }
    }

    #[test]
    fn a_rejected_restore_kills_the_job_and_relaunches_at_once_without_a_failure() {
        // One failure allowed: a counted failure would give up.
        let mut t = running_restored(
            Settings {
                policy: Policy {
                    max_failures: 1,
                    ..settings().policy
                },
                ..settings()
            },
            4,
        );
        let a = t.ev(500, rejected(4));
        assert_eq!(logs(&a), vec!["restore_rejected"]);
        assert!(a.contains(&Action::KillTree));
        assert_eq!(t.m.phase, Phase::Killing);
        // A second report of the same is ignored (no second kill).
        assert!(t.ev(510, rejected(4)).is_empty());
        let before = t.m.hist.failures_without_progress;
        let a = t.ev(600, died(137));
        assert!(logs(&a).contains(&"restart"), "{a:?}");
        assert!(!logs(&a).contains(&"give_up"), "{a:?}");
        assert_eq!(t.m.hist.failures_without_progress, before);
        assert_eq!(t.m.hist.restarts, 1);
        assert_eq!(t.m.phase, Phase::BackingOff { until: t.at(600) });
        assert_eq!(t.ev(600, Event::Tick), vec![Action::Launch]);
    }

    #[test]
    fn a_rejection_of_another_checkpoint_or_without_a_job_is_ignored() {
        let mut t = running_restored(settings(), 4);
        assert!(t.ev(500, rejected(3)).is_empty());
        assert_eq!(t.m.phase, Phase::Running);
        let mut t = T::running(settings()); // a fresh start restored nothing
        assert!(t.ev(500, rejected(1)).is_empty());
        let mut t = backing_off();
        assert!(t.ev(500, rejected(1)).is_empty());
    }

    #[test]
    fn a_rejection_during_a_stop_kills_and_the_run_ends_stopped() {
        let mut t = running_restored(settings(), 4);
        t.ev(100, Event::StopSignal(libc::SIGTERM));
        let a = t.ev(200, rejected(4));
        assert!(a.contains(&Action::KillTree));
        let a = t.ev(300, died(137));
        assert!(a.contains(&Action::Finish(Outcome::Stopped)), "{a:?}");
    }

    #[test]
    fn a_job_that_exits_on_its_own_after_a_rejection_still_relaunches() {
        // The client raised; the job ended with an error before the kill landed.
        let mut t = running_restored(settings(), 2);
        t.ev(100, rejected(2));
        let a = t.ev(150, died(1));
        assert!(logs(&a).contains(&"restart"));
        assert_eq!(t.m.hist.failures_without_progress, 0);
    }

    // ---- Killing ----

    #[test]
    fn killing_waits_for_the_exit_then_restarts() {
        let mut t = T::running(Settings {
            hang_timeout: Some(Duration::from_secs(1)),
            ..settings()
        });
        t.ev(2_000, Event::Tick);
        assert_eq!(t.m.phase, Phase::Killing);
        assert!(t.ev(3_000, Event::Tick).is_empty());
        let a = t.ev(3_100, died(137));
        assert!(logs(&a).contains(&"restart"));
    }
}
