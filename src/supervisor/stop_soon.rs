//! "Stop soon" notices from integrations that watch the outside world on their own thread
//! (cloud preemption notices: `crate::integrations::cloud`, `docs/cloud.md`): "this machine
//! goes away at T: checkpoint now and stop". A watcher sends [`External`] events through a
//! [`Notifier`]; the supervisor's loop acts on them here, logs how long the checkpoint took
//! against the notice window, and exits 75 (run me again).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::machine::Event;
use super::{fmt_dur, Ev, Run};

/// Called once the job has stopped after a notice (e.g. Azure: approve the event so the
/// platform need not wait out the rest of the window). Returns a line for the log.
pub type Ack = Box<dyn FnOnce() -> Result<String, String> + Send>;

/// What a watcher thread tells the supervisor.
pub enum External {
    /// The watcher is active: notices from `source` give `window` of warning, and the
    /// watcher sees one at most `detect` after it is posted.
    Armed {
        source: String,
        window: Duration,
        detect: Duration,
    },
    /// Checkpoint at once and stop the job; the machine goes away at `deadline`.
    StopSoon {
        reason: String,
        deadline: Option<SystemTime>,
        ack: Option<Ack>,
    },
    /// A line for the log (`warn`: shown even with `--quiet`).
    Log {
        warn: bool,
        event: &'static str,
        msg: String,
        data: Value,
    },
}

/// The sending end a watcher thread holds. Every method returns false once the supervisor
/// has gone (the watcher should then end).
#[derive(Clone)]
pub struct Notifier(Sender<Ev>);

impl Notifier {
    pub(super) fn new(tx: Sender<Ev>) -> Notifier {
        Notifier(tx)
    }

    pub fn send(&self, e: External) -> bool {
        self.0.send(Ev::External(e)).is_ok()
    }

    pub fn armed(&self, source: impl Into<String>, window: Duration, detect: Duration) -> bool {
        self.send(External::Armed {
            source: source.into(),
            window,
            detect,
        })
    }

    pub fn stop_soon(
        &self,
        reason: impl Into<String>,
        deadline: Option<SystemTime>,
        ack: Option<Ack>,
    ) -> bool {
        self.send(External::StopSoon {
            reason: reason.into(),
            deadline,
            ack,
        })
    }

    pub fn event(&self, event: &'static str, msg: String, data: Value) -> bool {
        self.send(External::Log {
            warn: false,
            event,
            msg,
            data,
        })
    }

    pub fn warn(&self, event: &'static str, msg: String, data: Value) -> bool {
        self.send(External::Log {
            warn: true,
            event,
            msg,
            data,
        })
    }
}

/// A notice being acted on.
struct Active {
    at: Instant,
    deadline: Option<Instant>,
    base_seq: u64,
    reported: bool,
    ack: Option<Ack>,
}

/// The supervisor's notice state.
#[derive(Default)]
pub(super) struct Notices {
    /// How long the newest checkpoint's save took (the client's `duration_ms`), from this
    /// run or, at start-up, from the event log of earlier runs.
    last_save_ms: Option<u64>,
    /// Source, window and detection delay of the active watcher.
    armed: Option<(String, Duration, Duration)>,
    fit_warned: bool,
    active: Option<Active>,
    /// Stops in a row without progress before this run (from the last `stopped` event).
    pub(super) stalled_stops: u32,
}

impl Notices {
    /// Reads the duration of the newest logged save from `events.jsonl` (its last MiB).
    pub(super) fn load(private: &Path) -> Notices {
        let tail = tail_events(&private.join("events.jsonl"));
        Notices {
            last_save_ms: last_logged_save_ms(&tail),
            stalled_stops: tail
                .iter()
                .rev()
                .find(|v| v["event"] == "stopped" || v["event"] == "stalled")
                .and_then(|v| v["stops_without_progress"].as_u64())
                .map_or(0, |n| n.min(u32::MAX as u64) as u32),
            ..Notices::default()
        }
    }
}

/// The newest checkpoint's duration in the log: the client's `duration_ms` of its
/// `committed` event or, when it was the checkpoint after a notice, the notice-to-durable
/// time if that is longer.
/// The events of the last MiB of the log (read without blocking on a planted FIFO).
fn tail_events(path: &Path) -> Vec<Value> {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
    else {
        return Vec::new();
    };
    let Ok(meta) = f.metadata() else {
        return Vec::new();
    };
    if !meta.is_file() {
        return Vec::new();
    }
    let len = meta.len();
    if f.seek(SeekFrom::Start(len.saturating_sub(1 << 20)))
        .is_err()
    {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .filter(|l| {
            l.contains("\"committed\"")
                || l.contains("\"notice_checkpoint\"")
                || l.contains("\"stopped\"")
                || l.contains("\"stalled\"")
        })
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

fn last_logged_save_ms(evs: &[Value]) -> Option<u64> {
    let last = evs.iter().rev().find(|v| v["event"] == "committed")?;
    let notice = evs
        .iter()
        .rev()
        .find(|v| v["event"] == "notice_checkpoint" && v["seq"] == last["seq"])
        .and_then(|v| v["notice_to_durable_ms"].as_u64());
    [last["duration_ms"].as_u64(), notice]
        .into_iter()
        .flatten()
        .max()
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Run {
    pub(super) fn on_external(&mut self, x: External) -> Option<Event> {
        match x {
            External::Log {
                warn,
                event,
                msg,
                data,
            } => {
                if warn {
                    self.rep.warn(event, msg, data);
                } else {
                    self.rep.event(event, Some(msg), data);
                }
            }
            External::Armed {
                source,
                window,
                detect,
            } => {
                self.rep.event(
                    "notice_watch",
                    Some(format!(
                        "watching for {source} preemption notices ({} of warning; seen within {})",
                        fmt_dur(window),
                        fmt_dur(detect)
                    )),
                    json!({ "source": source, "window_ms": window.as_millis() as u64, "detect_ms": detect.as_millis() as u64, "last_save_ms": self.notices.last_save_ms }),
                );
                self.notices.armed = Some((source, window, detect));
                self.check_fit();
            }
            External::StopSoon {
                reason,
                deadline,
                ack,
            } => return self.stop_soon(reason, deadline, ack),
        }
        None
    }

    /// Warns (once per run) when the last save plus the detection delay does not fit in the
    /// notice window.
    fn check_fit(&mut self) {
        let (Some(save), Some((source, window, detect))) =
            (self.notices.last_save_ms, self.notices.armed.as_ref())
        else {
            return;
        };
        if self.notices.fit_warned {
            return;
        }
        let save_d = Duration::from_millis(save);
        if save_d + *detect > *window {
            self.notices.fit_warned = true;
            let msg = format!(
                "the last checkpoint took {} to save; with up to {} to see a notice it cannot fit in the {} warning of {source}: a preemption will lose the work since the previous checkpoint (hint: make saves smaller or faster, and checkpoint more often with --every)",
                fmt_dur(save_d),
                fmt_dur(*detect),
                fmt_dur(*window)
            );
            let data = json!({ "save_ms": save, "window_ms": window.as_millis() as u64, "detect_ms": detect.as_millis() as u64, "source": source });
            self.rep.warn("notice_no_fit", msg, data);
        }
    }

    fn stop_soon(
        &mut self,
        reason: String,
        deadline: Option<SystemTime>,
        ack: Option<Ack>,
    ) -> Option<Event> {
        if self.notices.active.is_some() {
            return None;
        }
        let now = Instant::now();
        let left = deadline.map(|d| d.duration_since(SystemTime::now()).unwrap_or_default());
        let mut msg = format!(
            "{reason}: checkpointing now, then stopping the job{}",
            left.map(|l| format!(" ({} left)", fmt_dur(l)))
                .unwrap_or_default()
        );
        if let (Some(save), Some(l)) = (self.notices.last_save_ms, left) {
            if Duration::from_millis(save) > l {
                msg.push_str(&format!(
                    "; the last checkpoint took {}, longer than that: it may not be durable in time",
                    fmt_dur(Duration::from_millis(save))
                ));
            }
        }
        self.rep.warn(
            "preemption_notice",
            msg,
            json!({ "reason": reason, "deadline_ms": deadline.map(epoch_ms), "left_ms": left.map(|l| l.as_millis() as u64), "last_save_ms": self.notices.last_save_ms }),
        );
        let deadline = left.and_then(|l| now.checked_add(l));
        self.notices.active = Some(Active {
            at: now,
            deadline,
            base_seq: self.m.last_seq(),
            reported: false,
            ack,
        });
        Some(Event::Notice { deadline })
    }

    /// When the job must have committed its checkpoint: `--grace` from now or, after a
    /// notice with a deadline, the whole window less `--kill-after` and a second if that is
    /// longer (cutting a save short before the machine goes away gains nothing).
    pub(super) fn notice_committed(
        &mut self,
        seq: u64,
        save_ms: Option<u64>,
        requested: Option<Instant>,
    ) {
        let now = Instant::now();
        let active = self
            .notices
            .active
            .as_ref()
            .filter(|a| !a.reported && seq > a.base_seq);
        let took_ms = [
            save_ms,
            requested.map(|t| (now - t).as_millis() as u64),
            active.map(|a| (now - a.at).as_millis() as u64),
        ]
        .into_iter()
        .flatten()
        .max();
        if took_ms.is_some() {
            self.notices.last_save_ms = took_ms;
            self.check_fit();
        }
        let Some(a) = self.notices.active.as_mut() else {
            return;
        };
        if a.reported || seq <= a.base_seq {
            return;
        }
        a.reported = true;
        let took = now - a.at;
        let margin = a
            .deadline
            .map(|d| (d.saturating_duration_since(now), now <= d));
        let save = save_ms
            .map(|s| format!(", the save itself {}", fmt_dur(Duration::from_millis(s))))
            .unwrap_or_default();
        let data = json!({ "seq": seq, "notice_to_durable_ms": took.as_millis() as u64, "save_ms": save_ms, "margin_ms": margin.map(|(m, _)| m.as_millis() as u64), "in_time": margin.map(|(_, ok)| ok) });
        match margin {
            Some((_, false)) => {
                let late = now - a.deadline.expect("margin implies a deadline");
                self.rep.warn(
                    "notice_checkpoint",
                    format!("checkpoint {seq} became durable {} after the notice{save}: {} AFTER the deadline", fmt_dur(took), fmt_dur(late)),
                    data,
                );
            }
            Some((m, true)) => self.rep.event(
                "notice_checkpoint",
                Some(format!(
                    "checkpoint {seq} durable {} after the notice{save}; {} before the deadline",
                    fmt_dur(took),
                    fmt_dur(m)
                )),
                data,
            ),
            None => self.rep.event(
                "notice_checkpoint",
                Some(format!(
                    "checkpoint {seq} durable {} after the notice{save}",
                    fmt_dur(took)
                )),
                data,
            ),
        }
    }

    /// The job stopped after a notice: say if no checkpoint made it, then acknowledge.
    pub(super) fn notice_after_stop(&mut self) {
        let Some(a) = self.notices.active.as_mut() else {
            return;
        };
        if !a.reported {
            a.reported = true;
            let newest = if self.m.last_seq() > 0 {
                format!("checkpoint {}", self.m.last_seq())
            } else {
                "the start (no checkpoint yet)".into()
            };
            self.rep.warn(
                "notice_no_checkpoint",
                format!("no checkpoint was committed after the preemption notice; the next run resumes from {newest}"),
                json!({ "seq": self.m.last_seq() }),
            );
        }
        if let Some(ack) = a.ack.take() {
            match ack() {
                Ok(m) => self.rep.event("notice_ack", Some(m), json!({})),
                Err(e) => self.rep.warn("notice_ack_failed", e, json!({})),
            }
        }
    }
}
