//! The supervisor's Slurm steps (see `crate::integrations::slurm` and `docs/slurm.md`):
//! the start-up report and end-time lookup, the stop before the time limit, and the
//! requeue after a stop.

use serde_json::json;

use super::machine::Event;
use super::{exit_codes, fmt_dur, signame, Run};
use crate::integrations::slurm;

impl Run {
    /// Reports the Slurm job (with `SLURM_RESTART_COUNT`) and looks up its end time.
    pub(super) fn slurm_start(&mut self) {
        let Some(sl) = self.slurm.as_mut() else {
            return;
        };
        let mut end_note = String::new();
        if sl.settings.margin.is_some() {
            match slurm::lookup_end_time(&sl.env) {
                Ok(Some((end, source))) => {
                    sl.end = Some(end);
                    let left = end
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default();
                    sl.left_at_start = Some(left);
                    if sl.margin_adapted() {
                        let msg = format!(
                            "the time left ({}) leaves the job too little before the stop margin ({}): stopping {} before the end instead, so the job gets at least a quarter of its time (10 s at least) to make progress (hint: ask for a longer --time, or a smaller --slurm-margin)",
                            fmt_dur(left),
                            fmt_dur(sl.settings.margin.unwrap_or_default()),
                            fmt_dur(sl.margin())
                        );
                        self.rep.warn("slurm_margin_adapted", msg, json!({ "left_ms": left.as_millis() as u64, "margin_ms": sl.margin().as_millis() as u64 }));
                    }
                    let sl = self.slurm.as_mut().expect("checked above");
                    end_note = format!(
                        "; time left {} (from {source}), stopping {} before the end",
                        fmt_dur(left),
                        fmt_dur(sl.margin())
                    );
                }
                Ok(None) => end_note = "; no time limit".into(),
                Err(e) => {
                    let msg = format!("cannot read the job's end time ({e}); ckpt will not stop before the time limit on its own (the warning signal and SIGTERM still work)");
                    self.rep.warn("slurm_end_unknown", msg, json!({}));
                }
            }
        }
        let sl = self.slurm.as_ref().expect("checked above");
        let end_s = sl
            .end
            .and_then(|e| e.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        let human = format!(
            "Slurm {}, SLURM_RESTART_COUNT={}; warning signal {}, requeue {}{end_note}",
            sl.env.describe(),
            sl.env.restart_count,
            signame(sl.settings.warning_signal),
            match sl.settings.requeue {
                slurm::RequeuePolicy::Auto => "auto",
                slurm::RequeuePolicy::Always => "always",
                slurm::RequeuePolicy::Never => "never",
            },
        );
        let fields = json!({
            "job_id": sl.env.job_id,
            "requeue_target": sl.env.requeue_target(),
            "restart_count": sl.env.restart_count,
            "end_time": end_s,
            "margin_ms": sl.margin().as_millis() as u64,
            "warning_signal": sl.settings.warning_signal,
        });
        self.rep.event("slurm", Some(human), fields);
    }

    /// The stop time before the end came: re-check the end time (it may have been
    /// extended), then stop.
    /// The time limit is within the margin: re-reads the end time (it may have been
    /// extended), and returns the stop event, if it is still due.
    pub(super) fn slurm_time_limit(&mut self) -> Option<Event> {
        let sl = self.slurm.as_mut()?;
        if sl.env.end_time.is_none() {
            if let Ok(Some((end, _))) = slurm::lookup_end_time(&sl.env) {
                let moved = sl.end.is_some_and(|old| end > old);
                sl.end = Some(end);
                if moved && sl.stop_at().is_some_and(|t| t > std::time::Instant::now()) {
                    self.rep.event(
                        "slurm_extended",
                        Some("the job's time limit was extended; carrying on".into()),
                        json!({}),
                    );
                    return None;
                }
            }
        }
        let left = sl
            .end
            .and_then(|e| e.duration_since(std::time::SystemTime::now()).ok())
            .unwrap_or_default();
        let margin = sl.margin();
        Some(Event::SlurmTimeLimit { left, margin })
    }

    pub(super) fn slurm_after_stop(&mut self) -> i32 {
        let Some(sl) = self.slurm.as_ref() else {
            return exit_codes::TEMPFAIL;
        };
        match slurm::requeue(&sl.env, sl.settings.requeue) {
            slurm::Requeue::Done(msg) => {
                self.rep.event(
                    "requeued",
                    Some(format!(
                        "{msg}; exit {} = requeued, nothing left to do",
                        exit_codes::REQUEUED
                    )),
                    json!({ "target": sl.env.requeue_target(), "code": exit_codes::REQUEUED, "detail": msg }),
                );
                exit_codes::REQUEUED
            }
            slurm::Requeue::NotDone(msg) => {
                self.rep.warn(
                    "not_requeued",
                    format!(
                        "{msg}; exit {} = run me again (the batch script should requeue itself)",
                        exit_codes::TEMPFAIL
                    ),
                    json!({ "target": sl.env.requeue_target(), "code": exit_codes::TEMPFAIL, "detail": msg }),
                );
                exit_codes::TEMPFAIL
            }
        }
    }
}
