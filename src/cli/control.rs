//! `ckpt status`, `ckpt checkpoint`, `ckpt stop`: talk to a running supervisor through its
//! control socket (`docs/protocol.md`, "Control socket").

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{parse_duration, DirArg};
use crate::exit::ErrKind;
use crate::store::Store;
use crate::supervisor::control::{self, Request};
use crate::supervisor::{fmt_bytes, fmt_dur, Fatal};

/// Show what a running supervisor and its job are doing.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Print the supervisor's answer as JSON (with --watch: one JSON object per line).
    #[arg(long)]
    pub json: bool,
    /// Keep showing the status, refreshed every DURATION (default 2s), until the supervisor
    /// exits (exit 0) or Ctrl-C. On a terminal the screen is redrawn, like watch(1).
    #[arg(long, short = 'w', value_name = "DURATION", num_args = 0..=1, default_missing_value = "2s", value_parser = parse_duration)]
    pub watch: Option<Duration>,
}

/// Ask the job for a checkpoint now.
#[derive(Debug, clap::Args)]
pub struct CheckpointArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Return only once the checkpoint is durable (or say why it failed).
    #[arg(long)]
    pub wait: bool,
    /// With --wait, give up after this long (exit 75).
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Checkpoint, stop the job, and let the supervisor exit 75 ("run me again").
#[derive(Debug, clap::Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Stop at once with SIGKILL, without a checkpoint (work since the last one is lost).
    #[arg(long)]
    pub no_checkpoint: bool,
    /// Return at once instead of waiting for the supervisor to exit.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for the supervisor to exit.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

/// Where the control socket of a supervisor on `store` is: `control_socket` of
/// `.ckpt/status.json` (read as a regular file only: a FIFO there must not hang the client),
/// else `.ckpt/control.sock`.
fn socket_path(store: &Store) -> std::path::PathBuf {
    let private = store.private();
    crate::store::io::read_small(&private.join("status.json"), 1 << 20)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["control_socket"].as_str().map(std::path::PathBuf::from))
        .unwrap_or_else(|| private.join("control.sock"))
}

/// Whether the supervisor that gave the `status` answer `v` serves `store`'s directory (the
/// same directory by device and inode). A copied directory keeps the original's
/// `status.json`, which leads to the original's supervisor: that one must not be stopped
/// or asked for checkpoints on behalf of the copy.
fn check_serves(store: &Store, v: &Value) -> Result<(), Fatal> {
    use std::os::unix::fs::MetadataExt;
    let Some(theirs) = v["dir"].as_str() else {
        return Ok(()); // an answer without `dir`: nothing to compare
    };
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let ours = id(store.dir());
    if ours.is_some() && ours == id(std::path::Path::new(theirs)) {
        return Ok(());
    }
    Err(Fatal::new(ErrKind::NotRunning, format!(
            "no ckpt supervisor is running on {}: the supervisor its .ckpt/status.json leads to (pid {}) serves {}, another directory (is {} a copy?)",
            crate::store::display_path(store.dir()),
            v["supervisor_pid"],
            crate::store::escape(theirs),
            crate::store::display_path(store.dir())
        )))
}

fn call(dir: &DirArg, req: &Request, timeout: Option<Duration>) -> Result<Value, Fatal> {
    let store = Store::new(&dir.dir);
    let path = socket_path(&store);
    if !matches!(req, Request::Status {}) {
        // Make sure first that the socket leads to this directory's supervisor.
        call_at(
            &store,
            &path,
            &Request::Status {},
            Some(Duration::from_secs(10)),
        )?;
    }
    call_at(&store, &path, req, timeout)
}

fn call_at(
    store: &Store,
    path: &std::path::Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Value, Fatal> {
    let answer = control::call(path, req, timeout).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
                "no ckpt supervisor is running on {} (no one listens on {})",
                store.dir().display(),
                path.display()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "permission denied on {}; hint: run as the user who started `ckpt run`",
                path.display()
            ),
            std::io::ErrorKind::UnexpectedEof => control::ENDED.to_string(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "the supervisor on {} did not answer in time",
                store.dir().display()
            ),
            _ => format!(
                "cannot talk to the supervisor on {} ({}): {e}",
                store.dir().display(),
                path.display()
            ),
        };
        Fatal::new(ErrKind::NotRunning, why)
    })?;
    if answer["ok"] != Value::Bool(true) {
        let e = answer["error"]
            .as_str()
            .unwrap_or("unknown error")
            .to_string();
        let kind = match answer["code"].as_str() {
            Some("no_client") => ErrKind::NoClient,
            Some("ended") => ErrKind::NotRunning,
            _ => ErrKind::TryAgain,
        };
        return Err(Fatal::new(kind, e));
    }
    if matches!(req, Request::Status {}) {
        check_serves(store, &answer)?;
    }
    Ok(answer)
}

fn secs(v: &Value) -> Option<Duration> {
    v.as_f64()
        .filter(|s| *s >= 0.0)
        .map(Duration::from_secs_f64)
}

pub fn status(a: StatusArgs) -> Result<i32, Fatal> {
    let v = call(&a.dir, &Request::Status {}, Some(Duration::from_secs(10)))?;
    let Some(every) = a.watch else {
        if a.json {
            println!("{v}");
        } else {
            print!("{}", crate::store::escape_lines(&render_status(&v)));
        }
        return Ok(0);
    };
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal() && !a.json;
    let every = every.max(Duration::from_millis(100));
    let mut v = v;
    loop {
        let mut out = std::io::stdout().lock();
        let shown = if a.json {
            writeln!(out, "{v}")
        } else if tty {
            // Home, clear, then the status (as watch(1) does).
            write!(
                out,
                "\x1b[H\x1b[2J{}",
                crate::store::escape_lines(&render_status(&v))
            )
        } else {
            writeln!(out, "{}", crate::store::escape_lines(&render_status(&v)))
        };
        if shown.and_then(|_| out.flush()).is_err() {
            return Ok(0); // stdout closed (e.g. `| head`)
        }
        drop(out);
        std::thread::sleep(every);
        v = match call(&a.dir, &Request::Status {}, Some(Duration::from_secs(10))) {
            Ok(v) => v,
            Err(e) if e.kind == ErrKind::NotRunning => {
                eprintln!("ckpt: the supervisor on {} has exited", a.dir.dir.display());
                return Ok(0);
            }
            Err(e) => return Err(e),
        };
    }
}

/// The human form of a `status` answer (several lines, each ending in a newline).
fn render_status(v: &Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    macro_rules! line {
        ($($t:tt)*) => {{ let _ = writeln!(s, $($t)*); }};
    }
    let restarts = v["restarts"].as_u64().unwrap_or(0);
    line!(
        "supervisor pid {} on {}: {} (up {}, {} restart{})",
        v["supervisor_pid"],
        v["dir"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        secs(&v["uptime_seconds"]).map(fmt_dur).unwrap_or_default(),
        restarts,
        if restarts == 1 { "" } else { "s" }
    );
    let cmd: Vec<&str> = v["command"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    line!("  command:         {}", cmd.join(" "));
    if let Some(j) = v["job"].as_object() {
        let mut line = format!(
            "pid {}, up {}",
            j["pid"],
            secs(&j["uptime_seconds"]).map(fmt_dur).unwrap_or_default()
        );
        if let Some(step) = j["step"].as_u64() {
            line.push_str(&format!(", step {step}"));
        }
        let clients = j["clients"].as_array().map(|a| a.len()).unwrap_or(0);
        line.push_str(&if clients == 0 {
            ", no client announced".to_string()
        } else {
            format!(
                ", {clients} client(s), last heard {} ago",
                secs(&j["last_progress_seconds_ago"])
                    .map(fmt_dur)
                    .unwrap_or_default()
            )
        });
        line!("  job:             {line}");
        if let Some(n) = secs(&j["next_request_in_seconds"]) {
            line!("  next request in: {}", fmt_dur(n));
        }
    }
    match v["last_checkpoint"].as_object() {
        Some(c) => line!(
            "  last checkpoint: {}{}, {}, {} ago{}",
            c["seq"],
            c["step"]
                .as_u64()
                .map(|s| format!(" at step {s}"))
                .unwrap_or_default(),
            fmt_bytes(c["bytes"].as_u64().unwrap_or(0)),
            secs(&c["age_seconds"]).map(fmt_dur).unwrap_or_default(),
            c["duration_ms"]
                .as_u64()
                .map(|d| format!(", saved in {d} ms"))
                .unwrap_or_default()
        ),
        None => line!(
            "  last checkpoint: none committed in this run{}",
            v["newest_seq"]
                .as_u64()
                .map(|s| format!(" (resumed from {s})"))
                .unwrap_or_default()
        ),
    }
    if let Some(r) = v["remote"].as_object() {
        let mut line = format!(
            "{}: newest uploaded {}",
            crate::store::escape(r["url"].as_str().unwrap_or("?")),
            r["newest_uploaded"]
                .as_u64()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "none yet".into())
        );
        if let Some(l) = r["last_upload"].as_object() {
            line.push_str(&format!(
                " (last: {} in {} ms, {}/s, lag {} ms)",
                fmt_bytes(l["bytes"].as_u64().unwrap_or(0)),
                l["duration_ms"],
                fmt_bytes(l["bytes_per_s"].as_u64().unwrap_or(0)),
                l["lag_ms"]
            ));
        }
        if let Some(u) = r["uploading"].as_u64() {
            line.push_str(&format!(", uploading {u}"));
        }
        if let Some(b) = r["behind_ms"].as_u64() {
            line.push_str(&format!(
                ", newest local checkpoint waiting {} ms to get off the machine",
                b
            ));
        }
        if let Some(f) = r["failed"].as_u64() {
            line.push_str(&format!(", upload of {f} failed"));
        }
        line!("  remote:          {line}");
    }
    if let Some(t) = v["tree"].as_object() {
        line!(
            "  job tree:        {} process(es), {} CPU, {} resident",
            t["processes"],
            secs(&t["cpu_seconds"]).map(fmt_dur).unwrap_or_default(),
            fmt_bytes(t["rss_bytes"].as_u64().unwrap_or(0))
        );
    }
    s
}

pub fn checkpoint(a: CheckpointArgs) -> Result<i32, Fatal> {
    let v = call(
        &a.dir,
        &Request::Checkpoint { wait: a.wait },
        Some(if a.wait {
            a.timeout
        } else {
            crate::supervisor::control::BUSY_ANSWER_TIMEOUT + Duration::from_secs(10)
        }),
    )?;
    if a.json {
        println!("{v}");
    } else if let Some(c) = v["checkpoint"].as_object() {
        eprintln!(
            "ckpt: checkpoint {} is durable{} ({})",
            c["seq"],
            c["step"]
                .as_u64()
                .map(|s| format!(" at step {s}"))
                .unwrap_or_default(),
            fmt_bytes(c["bytes"].as_u64().unwrap_or(0))
        );
    } else {
        eprintln!("ckpt: checkpoint requested");
    }
    Ok(0)
}

/// Whether `pid` is alive and not a zombie (an exited supervisor whose parent has not reaped
/// it yet is done).
fn running(pid: i32) -> bool {
    match procfs::process::Process::new(pid).and_then(|p| p.stat()) {
        Ok(stat) => stat.state != 'Z' && stat.state != 'X',
        Err(_) => false,
    }
}

pub fn stop(a: StopArgs) -> Result<i32, Fatal> {
    let v = match call(
        &a.dir,
        &Request::Stop {
            checkpoint: !a.no_checkpoint,
        },
        // The supervisor answers within its own bounds (a loop busy with a CRIU dump is
        // waited for up to BUSY_ANSWER_TIMEOUT), then says it is stuck.
        Some(crate::supervisor::control::BUSY_ANSWER_TIMEOUT + Duration::from_secs(10)),
    ) {
        Ok(v) => v,
        // What a stop asks for happened anyway: nothing runs on the directory any more.
        Err(e) if e.kind == ErrKind::NotRunning && e.msg == control::ENDED => {
            eprintln!(
                "ckpt: the supervisor on {} ended before acting on the stop (the job finished or stopped meanwhile; `ckpt log` says which)",
                a.dir.dir.display()
            );
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    let pid = v["supervisor_pid"].as_i64().unwrap_or(0) as i32;
    let will_checkpoint = v["will_checkpoint"].as_bool().unwrap_or(true);
    if a.no_wait {
        eprintln!(
            "ckpt: supervisor {pid} is stopping{}",
            if will_checkpoint {
                ""
            } else {
                " without taking a checkpoint"
            }
        );
        return Ok(0);
    }
    let deadline = Instant::now() + a.timeout;
    while running(pid) {
        if Instant::now() > deadline {
            return Err(Fatal::new(
                ErrKind::TryAgain,
                format!(
                    "supervisor {pid} is still running after {}",
                    fmt_dur(a.timeout)
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // What the stop left: the supervisor's own last word in the event log.
    let store = crate::store::Store::new(&a.dir.dir);
    let last = super::history::last_event(&store.private(), &["stopped", "stalled"]);
    let commits = last.as_ref().and_then(|e| e["commits"].as_u64());
    let seq = last.as_ref().and_then(|e| e["seq"].as_u64()).unwrap_or(0);
    let from = if seq > 0 {
        format!("checkpoint {seq}")
    } else {
        "the start".into()
    };
    if commits == Some(0) || !will_checkpoint {
        eprintln!("ckpt: supervisor {pid} stopped; no checkpoint was taken in this run: the next `ckpt run` resumes from {from}");
    } else {
        eprintln!(
            "ckpt: supervisor {pid} stopped; run the same `ckpt run` again to resume (from {from})"
        );
    }
    Ok(0)
}
