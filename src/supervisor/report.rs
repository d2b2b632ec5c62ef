//! What the supervisor tells people: plain log lines on stderr, and an append-only event log
//! of JSON lines in `DIR/.ckpt/events.jsonl` (one object per event, `t_ms` and `event`
//! always present; the shapes are listed in `docs/protocol.md`). Also `DIR/.ckpt/status.json`,
//! rewritten atomically on every state change, for tools and the demo.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::store::manifest::now_ms;

/// Where events go.
pub struct Reporter {
    log: Option<File>,
    status_path: PathBuf,
    quiet: bool,
    json: bool,
    /// stderr is a terminal: keep a live status line at the bottom.
    tty: bool,
    /// The status line currently drawn, if any.
    live: Option<String>,
}

/// Rotate the event log above this size (the old one becomes `events.jsonl.1`).
const ROTATE_BYTES: u64 = 16 << 20;

impl Reporter {
    pub fn new(private: PathBuf, quiet: bool, json: bool) -> Reporter {
        let path = private.join("events.jsonl");
        if std::fs::metadata(&path)
            .map(|m| m.len() > ROTATE_BYTES)
            .unwrap_or(false)
        {
            let _ = std::fs::rename(&path, private.join("events.jsonl.1"));
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ok();
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal()
            && !quiet
            && !json
            && std::env::var_os("TERM").is_some_and(|t| t != "dumb");
        Reporter {
            log,
            status_path: private.join("status.json"),
            quiet,
            json,
            tty,
            live: None,
        }
    }

    /// Logs a human line (unless quiet) and appends the event.
    pub fn event(&mut self, event: &str, human: Option<String>, fields: Value) {
        let mut obj = json!({ "t_ms": now_ms(), "event": event });
        if let (Some(map), Value::Object(extra)) = (obj.as_object_mut(), fields) {
            map.extend(extra);
        }
        if self.json {
            eprintln!("{obj}");
        } else if let (Some(h), false) = (&human, self.quiet) {
            if self.live.is_some() {
                eprint!("\r\x1b[K");
            }
            eprintln!("ckpt: {h}");
            if let Some(l) = &self.live {
                eprint!("{l}");
            }
        }
        if let Some(f) = &mut self.log {
            let mut line = obj.to_string();
            line.push('\n');
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// Redraws the live status line (terminals only; a no-op otherwise).
    pub fn live(&mut self, text: Option<String>) {
        if !self.tty {
            return;
        }
        match text {
            Some(t) => {
                let t: String = t.chars().take(120).collect();
                eprint!("\r\x1b[K{t}");
                self.live = Some(t);
            }
            None => {
                if self.live.take().is_some() {
                    eprint!("\r\x1b[K");
                }
            }
        }
    }

    /// A warning: always shown, even with `--quiet`.
    pub fn warn(&mut self, event: &str, human: String, fields: Value) {
        let q = self.quiet;
        self.quiet = false;
        self.event(event, Some(format!("warning: {human}")), fields);
        self.quiet = q;
    }

    /// Rewrites `status.json` (temp file + rename; not fsynced: it is advisory).
    pub fn status(&self, status: &Value) {
        let tmp = self
            .status_path
            .with_extension(format!("tmp.{}", std::process::id()));
        let ok = crate::store::io::write_owner_only(&tmp, format!("{status}\n").as_bytes()).is_ok();
        if ok {
            let _ = std::fs::rename(&tmp, &self.status_path);
        }
    }
}
