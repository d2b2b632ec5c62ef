//! The supervisor's `--remote` steps (see `crate::remote` and `docs/cloud.md`): restoring a
//! newer remote checkpoint before a launch, and waiting for the uploads before ckpt exits.

use std::time::Instant;

use serde_json::json;

use super::report::Reporter;
use super::{exit_codes, Run};
use crate::store::Store;

/// Before anything runs (the local directory has no `finished` marker, nor any checkpoint: a
/// new machine): with `--remote`, a job that the remote records as finished (on a machine
/// since lost) is finished here too:
/// the local marker is written and ckpt exits 0 without running the job again. With
/// `--again` the remote record is removed instead. A record that does not authenticate
/// counts for nothing (a planted one must not stop a job), nor does a remote that cannot be
/// read (the job runs; it resumes from its checkpoints as usual).
pub(super) fn remote_finished(
    s: &crate::remote::Settings,
    store: &Store,
    again: bool,
    rep: &mut Reporter,
) -> bool {
    use crate::remote::Finished;
    let remote = match crate::remote::Remote::open(s) {
        Ok(r) => r,
        // Reported (and fatal) where the uploader starts.
        Err(_) => return false,
    };
    if again {
        if let Err(e) = remote.clear_finished() {
            rep.warn(
                "remote_finished_failed",
                format!("cannot remove the remote finished record: {e}"),
                json!({ "remote": remote.display, "error": crate::remote::redact(&e) }),
            );
        }
        return false;
    }
    // Only a new machine (no local checkpoint) asks: where checkpoints are local, the job
    // ran here, and a finish here left the local marker; nor does a remote that is down
    // delay the start of a job that has its checkpoints at hand.
    if store.list().is_ok_and(|l| !l.is_empty()) {
        return false;
    }
    match remote.finished() {
        Ok(Finished::No) => false,
        Ok(Finished::Yes { seq, t_ms }) => {
            let private = store.private();
            let (path, tmp) = (private.join("finished"), private.join("finished.tmp"));
            let body = json!({ "t_ms": t_ms, "exit": 0, "remote": remote.display, "seq": seq })
                .to_string();
            let io = store.io();
            let res = (|| -> std::io::Result<()> {
                let _ = io.remove_file(&tmp);
                io.write_new(&tmp, body.as_bytes())?;
                io.fsync_file(&tmp)?;
                io.rename_replace(&tmp, &path)?;
                io.fsync_dir(&private)
            })();
            if let Err(e) = res {
                rep.warn(
                    "finish_marker",
                    format!(
                        "cannot record that the job finished in {}: {e}",
                        crate::store::display_path(&path)
                    ),
                    json!({}),
                );
            }
            rep.event(
                "already_finished",
                Some(format!(
                    "the job already finished (after checkpoint {seq}, at {}), as {} records; nothing to do (hint: pass --again to run it once more)",
                    crate::cli::fmt_utc_ms(t_ms, false),
                    remote.display
                )),
                json!({ "remote": remote.display, "seq": seq, "finished_ms": t_ms }),
            );
            true
        }
        Ok(Finished::Invalid(why)) => {
            rep.warn(
                "remote_finished_invalid",
                format!(
                    "{} holds a finished record that is not ours ({why}); ignored: the job runs",
                    remote.display
                ),
                json!({ "remote": remote.display, "reason": crate::remote::redact(&why) }),
            );
            false
        }
        Err(e) => {
            rep.warn(
                "remote_list_failed",
                format!("cannot read the remote finished record: {e}; the job runs"),
                json!({ "remote": remote.display, "error": crate::remote::redact(&e) }),
            );
            false
        }
    }
}

impl Run {
    /// Before a launch: when the remote holds a checkpoint newer than every local one (a new
    /// machine, an empty disk), downloads, verifies and publishes it locally.
    pub(super) fn remote_restore(&mut self) {
        let Some(u) = &self.uploader else {
            return;
        };
        let local_newest = self
            .store
            .list()
            .ok()
            .and_then(|l| l.last().map(|(s, _)| *s))
            .unwrap_or(0);
        let rep = &mut self.rep;
        crate::remote::restore_newer(u.remote(), &self.store, local_newest, &mut |r| {
            if r.human.is_empty() {
                rep.event(r.event, None, r.data);
            } else if r.warn {
                rep.warn(r.event, r.human, r.data);
            } else {
                rep.event(r.event, Some(r.human), r.data);
            }
        });
    }

    /// After the job finished and its checkpoints are uploaded: records it remotely, so that
    /// a new machine with the same `--remote` does not run the job again.
    pub(super) fn remote_mark_finished(&mut self) {
        let Some(u) = &self.uploader else {
            return;
        };
        let seq = self.m.last_seq();
        let display = u.remote().display.clone();
        match u.remote().mark_finished(seq) {
            Ok(()) => self.rep.event(
                "remote_finished",
                Some(format!("recorded on {display} that the job finished")),
                json!({ "remote": display, "seq": seq }),
            ),
            Err(e) => self.rep.warn(
                "remote_finished_failed",
                format!("cannot record on {display} that the job finished: {e}; a new machine would run it again from its newest remote checkpoint"),
                json!({ "remote": display, "error": crate::remote::redact(&e) }),
            ),
        }
    }

    /// Before ckpt exits: waits (at most `--remote-stop-timeout`) until the newest checkpoint
    /// is uploaded. After a stop with `--remote-required`, a checkpoint still only on this
    /// machine ends ckpt with its own exit code.
    pub(super) fn remote_flush(&mut self, stopped: bool) -> Option<i32> {
        let u = self.uploader.as_ref()?;
        let s = self.cfg.remote.as_ref()?;
        let seq = self.m.last_seq();
        if seq == 0 {
            return None;
        }
        let t = Instant::now();
        // A notice's end of the machine bounds the wait too: past it, nothing gets off.
        let notice = self.m.notice_deadline;
        let until = notice.map_or(t + s.stop_timeout, |d| d.min(t + s.stop_timeout));
        let idle = u.wait_idle(until);
        let up = u.uploaded(seq);
        let display = u.remote().display.clone();
        // Lines the uploader sent while we waited.
        while let Ok(ev) = self.rx.try_recv() {
            if let super::Ev::Remote(r) = ev {
                if r.warn {
                    self.rep.warn(r.event, r.human, r.data);
                } else {
                    self.rep.event(r.event, Some(r.human), r.data);
                }
            }
        }
        let waited = t.elapsed();
        let versus = match notice {
            Some(d) if d > Instant::now() => format!(
                "; {:.1}s before the machine's announced end",
                d.duration_since(Instant::now()).as_secs_f64()
            ),
            Some(_) => "; the machine's announced end has passed".to_string(),
            None => String::new(),
        };
        if up {
            self.rep.event(
                "remote_safe",
                Some(format!(
                    "checkpoint {seq} is off the machine (on {display}); waited {:.2}s of --remote-stop-timeout {:.0}s{versus}",
                    waited.as_secs_f64(),
                    s.stop_timeout.as_secs_f64()
                )),
                json!({ "seq": seq, "remote": display, "waited_ms": waited.as_millis() as u64 }),
            );
            return None;
        }
        let conflict = u.conflict(seq);
        let why = match &conflict {
            Some(c) => format!("not uploaded: {c} (a conflict: see remote_conflict)"),
            None if idle => "its upload failed".to_string(),
            None => "its upload did not finish in time".to_string(),
        };
        if stopped && s.required {
            self.rep.warn(
                "remote_missing",
                format!(
                    "error: checkpoint {seq} is NOT on {display}: {why} (waited {:.2}s, --remote-stop-timeout {:.0}s{versus}); it is only in {} on this machine; exit {} (--remote-required)",
                    waited.as_secs_f64(),
                    s.stop_timeout.as_secs_f64(),
                    self.store.dir().display(),
                    exit_codes::REMOTE_MISSING
                ),
                json!({ "seq": seq, "remote": display, "waited_ms": waited.as_millis() as u64, "code": exit_codes::REMOTE_MISSING, "conflict": conflict.as_deref().map(crate::remote::redact) }),
            );
            return Some(exit_codes::REMOTE_MISSING);
        }
        self.rep.warn(
            "remote_missing",
            format!(
                "checkpoint {seq} is not on {display}: {why} (waited {:.2}s); it is only in {} on this machine",
                waited.as_secs_f64(),
                self.store.dir().display()
            ),
            json!({ "seq": seq, "remote": display, "waited_ms": waited.as_millis() as u64, "conflict": conflict.as_deref().map(crate::remote::redact) }),
        );
        None
    }
}
