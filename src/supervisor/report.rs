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
    /// `DIR/.ckpt/events.jsonl`.
    log_path: PathBuf,
    /// Its size as far as this reporter knows (what it found plus what it wrote).
    log_bytes: u64,
    /// Rotate above this size ([`ROTATE_BYTES`]; smaller in unit tests).
    rotate_bytes: u64,
    /// How many times each rate-limited event happened (see [`RATE_LIMITED`]).
    counts: std::collections::HashMap<&'static str, u64>,
    status_path: PathBuf,
    quiet: bool,
    json: bool,
    /// stderr is a terminal that takes a window title: the live status goes there. Never
    /// inline: the job writes to the same terminal, and a status line redrawn under it ends
    /// up glued to the front of the job's next line of output.
    title: bool,
    /// The terminal's own title was saved (pushed) and the window shows ours.
    titled: bool,
}

/// Terminal types known to take a window title (OSC 2) and to ignore the title stack
/// requests (CSI 22/23 t) they do not know.
const TITLE_TERMS: &[&str] = &[
    "xterm",
    "screen",
    "tmux",
    "rxvt",
    "alacritty",
    "foot",
    "kitty",
    "wezterm",
    "vte",
    "konsole",
    "gnome",
    "iterm",
    "st-",
];

/// Whether `term` (the value of `TERM`) takes a window title.
pub fn term_takes_title(term: &str) -> bool {
    TITLE_TERMS.iter().any(|p| term.starts_with(p))
}

/// Writes `s` to stderr in one `write(2)`, so that output of the job on the same terminal
/// or pipe cannot land inside it (`eprintln!` may split a line into several writes).
fn to_stderr(s: &str) {
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// `text` made safe for a title sequence: control characters dropped, at most 120 characters.
fn title_text(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(120).collect()
}

/// Rotate the event log above this size (the old one becomes `events.jsonl.1`): when the
/// supervisor starts and whenever a write takes it past this size.
const ROTATE_BYTES: u64 = 16 << 20;

/// Events a job can cause at any rate (its messages): each is logged (event log and stderr)
/// the first N times, then only at the powers of two of its count, which is then recorded
/// (`count`) and shown. A job flooding messages cannot grow the log or the terminal without
/// bound.
const RATE_LIMITED: &[(&str, u64)] = &[
    ("hello", 256),
    ("save_failed", 10),
    ("remote_conflict", 10),
    ("bad_message", 10),
    ("bad_hello", 10),
    ("bad_control", 10),
];

/// Opens (creating, 0600) the event log for appending, a regular file only: a FIFO planted
/// there must not block the supervisor, a symlink must not redirect its writes.
fn open_log(path: &std::path::Path) -> std::io::Result<File> {
    crate::store::io::open_checked(
        path,
        OpenOptions::new().create(true).append(true).mode(0o600),
    )
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.live(None);
    }
}

impl Reporter {
    pub fn new(private: PathBuf, quiet: bool, json: bool) -> Reporter {
        let path = private.join("events.jsonl");
        if std::fs::symlink_metadata(&path)
            .map(|m| m.is_file() && m.len() > ROTATE_BYTES)
            .unwrap_or(false)
        {
            let _ = std::fs::rename(&path, private.join("events.jsonl.1"));
        }
        let mut opened = open_log(&path);
        if opened.as_ref().is_err_and(crate::store::io::is_not_regular) {
            // A FIFO, symlink or directory planted in place of the log: moved aside (never
            // deleted, never opened: a FIFO would block every reader of the log), then a new
            // log is started.
            let aside = private.join(format!(
                "events.jsonl.not-regular.{}",
                crate::store::token()
            ));
            if std::fs::rename(&path, &aside).is_ok() {
                to_stderr(&format!(
                    "ckpt: warning: {} was not a regular file; moved aside to {}\n",
                    crate::store::display_path(&path),
                    crate::store::display_path(&aside)
                ));
                opened = open_log(&path);
            }
        }
        let log = match opened {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                to_stderr(&format!(
                    "ckpt: warning: not writing the event log {}: {e}\n",
                    crate::store::display_path(&path)
                ));
                None
            }
        };
        let log_bytes = log
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        use std::io::IsTerminal;
        let title = std::io::stderr().is_terminal()
            && !quiet
            && !json
            && std::env::var("TERM").is_ok_and(|t| term_takes_title(&t));
        Reporter {
            log,
            log_path: path,
            log_bytes,
            rotate_bytes: ROTATE_BYTES,
            counts: std::collections::HashMap::new(),
            status_path: private.join("status.json"),
            quiet,
            json,
            title,
            titled: false,
        }
    }

    /// Opens the event log again (its directory was deleted and made again).
    pub fn reopen(&mut self) {
        if let Some(dir) = self.status_path.parent() {
            self.log = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dir.join("events.jsonl"))
                .ok();
        }
    }

    /// Logs a human line (unless quiet) and appends the event.
    pub fn event(&mut self, event: &str, human: Option<String>, fields: Value) {
        let mut human = human;
        let mut obj = json!({ "t_ms": now_ms(), "event": event });
        if let Some(&(name, free)) = RATE_LIMITED.iter().find(|(n, _)| *n == event) {
            let n = self.counts.entry(name).or_insert(0);
            *n += 1;
            let n = *n;
            if n > free {
                if !n.is_power_of_two() {
                    return;
                }
                obj["count"] = json!(n);
                human = human.map(|h| {
                    format!(
                        "{h} [{event} number {n}; from now on only every power of two is shown]"
                    )
                });
            }
        }
        if let (Some(map), Value::Object(extra)) = (obj.as_object_mut(), fields) {
            map.extend(extra);
        }
        if self.json {
            to_stderr(&format!("{obj}\n"));
        } else if let (Some(h), false) = (&human, self.quiet) {
            // Messages carry the job's words: never raw terminal escape sequences.
            to_stderr(&format!("ckpt: {}\n", crate::store::escape_lines(h)));
        }
        if let Some(f) = &mut self.log {
            let mut line = obj.to_string();
            line.push('\n');
            if f.write_all(line.as_bytes()).is_ok() {
                self.log_bytes += line.len() as u64;
            }
            if self.log_bytes > self.rotate_bytes {
                self.rotate();
            }
        }
    }

    /// Moves the event log to `events.jsonl.1` (replacing an older one) and starts a new one.
    fn rotate(&mut self) {
        let old = self.log_path.with_extension("jsonl.1");
        if std::fs::rename(&self.log_path, &old).is_ok() {
            self.log = open_log(&self.log_path).ok();
            self.log_bytes = 0;
        } else {
            // Cannot rotate (read-only?): stop growing it rather than fill the disk.
            self.log = None;
        }
    }

    /// Shows the live status in the terminal's window title (terminals that take one; a
    /// no-op otherwise); `None` gives the terminal its own title back.
    pub fn live(&mut self, text: Option<String>) {
        if !self.title {
            return;
        }
        match text {
            Some(t) => {
                // The first time, save the terminal's title first (xterm's title stack).
                let save = if self.titled { "" } else { "\x1b[22;0t" };
                to_stderr(&format!("{save}\x1b]2;{}\x07", title_text(&t)));
                self.titled = true;
            }
            None if self.titled => {
                // Empty it (for terminals without the stack), then restore the saved one.
                to_stderr("\x1b]2;\x07\x1b[23;0t");
                self.titled = false;
            }
            None => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_log_is_rotated_while_running() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rep = Reporter::new(tmp.path().to_path_buf(), true, false);
        rep.rotate_bytes = 4096;
        for i in 0..1000 {
            rep.event(
                "committed",
                None,
                json!({ "seq": i, "pad": "x".repeat(100) }),
            );
        }
        let cur = std::fs::metadata(tmp.path().join("events.jsonl"))
            .unwrap()
            .len();
        let old = std::fs::metadata(tmp.path().join("events.jsonl.1"))
            .unwrap()
            .len();
        assert!(cur <= 4096 + 200, "events.jsonl is {cur} bytes");
        assert!(old <= 4096 + 200, "events.jsonl.1 is {old} bytes");
        // The newest event is in the current file.
        let text = std::fs::read_to_string(tmp.path().join("events.jsonl")).unwrap();
        assert!(text.contains("\"seq\":999"), "{text}");
    }

    #[test]
    fn job_caused_warnings_are_rate_limited_with_a_count() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rep = Reporter::new(tmp.path().to_path_buf(), true, false);
        for _ in 0..1000 {
            rep.warn("save_failed", "disk full".into(), json!({}));
        }
        let text = std::fs::read_to_string(tmp.path().join("events.jsonl")).unwrap();
        let counts: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter_map(|v| v["count"].as_u64())
            .collect();
        // 10 plain lines, then 16, 32, ..., 512.
        assert_eq!(text.lines().count(), 10 + 6);
        assert_eq!(counts, vec![16, 32, 64, 128, 256, 512]);
    }

    #[test]
    fn a_fifo_event_log_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("events.jsonl");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut rep = Reporter::new(tmp.path().to_path_buf(), true, false);
        rep.event("start", None, json!({}));
        // Moved aside, and a regular log started.
        assert!(std::fs::symlink_metadata(&p).unwrap().is_file());
        let aside: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("not-regular"))
            .collect();
        assert_eq!(aside.len(), 1);
    }
}
