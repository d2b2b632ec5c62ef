//! `ckpt log` and `ckpt stats`: what happened, from the event log `DIR/.ckpt/events.jsonl`
//! (and its rotated predecessor `events.jsonl.1`).

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::DirArg;
use crate::store::Store;
use crate::supervisor::{fmt_dur, Fatal};

/// Show the event log.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Keep printing new events as they are written (until interrupted).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print the raw JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Only the last N events.
    #[arg(long, short = 'n', value_name = "N")]
    pub lines: Option<usize>,
    /// Only the events of `--remote` (uploads with their size, duration, throughput and lag
    /// behind the commit, failures, skips, retention, restores, stops' waits), then a
    /// one-line summary as `ckpt stats` gives it.
    #[arg(long)]
    pub uploads: bool,
}

/// The events of `--remote` (`ckpt log --uploads`).
pub fn is_remote_event(e: &Value) -> bool {
    let n = e["event"].as_str().unwrap_or("");
    n == "uploaded" || n.starts_with("upload_") || n.starts_with("remote")
}

/// Summarise the run: overhead, lost work, restarts, goodput, and a suggested interval.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

fn log_paths(dir: &DirArg) -> Result<(PathBuf, PathBuf), Fatal> {
    let store = Store::new(&dir.dir);
    let p = store.private().join("events.jsonl");
    if !p.exists() {
        return Err(Fatal::usage(format!(
            "no event log at {}; hint: is {} a directory used by `ckpt run`?",
            p.display(),
            store.dir().display()
        )));
    }
    Ok((store.private().join("events.jsonl.1"), p))
}

/// Opens an event log file (a regular file only: a FIFO or symlink planted there must not
/// hang or redirect `ckpt log`/`ckpt stats`).
fn open_log(p: &std::path::Path) -> Result<std::fs::File, Fatal> {
    crate::store::io::open_read(p).map_err(|e| {
        Fatal::io(format!(
            "cannot read {}: {e}",
            crate::store::display_path(p)
        ))
    })
}

fn read_events(dir: &DirArg) -> Result<Vec<Value>, Fatal> {
    let (old, cur) = log_paths(dir)?;
    let mut out = Vec::new();
    for p in [old, cur] {
        let f = match open_log(&p) {
            Ok(f) => f,
            Err(_) if std::fs::symlink_metadata(&p).is_err() => continue,
            Err(e) => return Err(e),
        };
        // Line by line: one line that is not UTF-8 or not JSON is skipped, not the file.
        let mut r = BufReader::new(f);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                        out.push(v);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Fatal::io(format!(
                        "cannot read {}: {e}",
                        crate::store::display_path(&p)
                    )))
                }
            }
        }
    }
    Ok(out)
}

/// The newest event named one of `names` in the last MiB of `private/events.jsonl`
/// (opened without following a link or blocking on a FIFO).
pub fn last_event(private: &std::path::Path, names: &[&str]) -> Option<Value> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(private.join("events.jsonl"))
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    f.seek(SeekFrom::Start(meta.len().saturating_sub(1 << 20)))
        .ok()?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut buf).ok()?;
    String::from_utf8_lossy(&buf)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"].as_str().is_some_and(|n| names.contains(&n)))
}

/// One event as a human line: UTC time, event name, then its fields as key=value.
pub fn human(e: &Value) -> String {
    let t = e["t_ms"].as_u64().unwrap_or(0);
    let when = super::fmt_utc_ms(t, true);
    let mut line = format!("{when}  {:<16}", e["event"].as_str().unwrap_or("?"));
    if let Some(obj) = e.as_object() {
        for (k, v) in obj {
            if k == "t_ms" || k == "event" {
                continue;
            }
            match v {
                Value::String(s) => line.push_str(&format!(" {k}={s:?}")),
                Value::Null => {}
                _ => line.push_str(&format!(" {k}={v}")),
            }
        }
    }
    // The log is written by the supervisor but holds the job's words (messages, errors):
    // never let them reach the terminal as escape sequences.
    crate::store::escape(&line)
}

pub fn log(a: LogArgs) -> Result<i32, Fatal> {
    let all = read_events(&a.dir)?;
    let keep = |e: &Value| !a.uploads || is_remote_event(e);
    let events: Vec<&Value> = all.iter().filter(|e| keep(e)).collect();
    let skip = a.lines.map(|n| events.len().saturating_sub(n)).unwrap_or(0);
    for e in &events[skip..] {
        println!("{}", if a.json { e.to_string() } else { human(e) });
    }
    if a.uploads && !a.follow && !a.json {
        println!("{}", upload_summary_line(&compute_stats(&all)["remote"]));
    }
    if !a.follow {
        return Ok(0);
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let (_, cur) = log_paths(&a.dir)?;
    let mut f = open_log(&cur)?;
    let mut pos = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let mut partial = String::new();
    loop {
        let len = std::fs::metadata(&cur).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            // Rotated: start over on the new file.
            f = open_log(&cur)?;
            pos = 0;
        }
        if len > pos {
            let _ = f.seek(SeekFrom::Start(pos));
            let mut r = BufReader::new(&f);
            loop {
                let mut l = String::new();
                match r.read_line(&mut l) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        pos += n as u64;
                        partial.push_str(&l);
                        if partial.ends_with('\n') {
                            if let Some(e) = serde_json::from_str::<Value>(partial.trim_end())
                                .ok()
                                .filter(|e| keep(e))
                            {
                                println!("{}", if a.json { e.to_string() } else { human(&e) });
                                let _ = std::io::Write::flush(&mut std::io::stdout());
                            }
                            partial.clear();
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The figures of `ckpt stats`, from a list of events.
pub fn compute_stats(events: &[Value]) -> Value {
    let t = |e: &Value| e["t_ms"].as_u64().unwrap_or(0);
    let (Some(first), Some(last)) = (events.first(), events.last()) else {
        return json!({ "events": 0 });
    };
    let wall_ms = t(last).saturating_sub(t(first));
    let mut ckpt_ms = 0u64;
    let mut ckpt_known = 0u64;
    let mut commits = 0u64;
    let mut failures = 0u64;
    let mut lost_ms = 0u64;
    let mut backoff_ms = 0u64;
    let mut restarts = 0u64;
    let mut launches = 0u64;
    let mut stops = 0u64;
    let mut lost_each = Vec::new();
    let mut no_progress_commits = 0u64;
    let mut requests = 0u64;
    let mut unanswered = 0u64;
    // --remote: uploads (count, bytes, time, lag behind the commit), failures, restores.
    let (mut uploads, mut up_bytes, mut up_ms, mut up_failed, mut up_skipped) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut lags = Vec::new();
    let mut newest_uploaded: Option<u64> = None;
    let mut remote_url: Option<String> = None;
    let (mut restores, mut restore_bytes, mut restore_ms) = (0u64, 0u64, 0u64);
    let (mut stops_safe, mut stops_missing, mut remote_invalid) = (0u64, 0u64, 0u64);
    let mut last_upload_t: Option<u64> = None;
    // Per launch: when it started and when it last committed.
    let mut launch_t = None;
    let mut last_commit_t: Option<u64> = None;
    for e in events {
        match e["event"].as_str().unwrap_or("") {
            "launch" => {
                launches += 1;
                launch_t = Some(t(e));
                last_commit_t = None;
            }
            "committed" => {
                commits += 1;
                // A checkpoint not beyond the one its launch restored (a job that saves the
                // same step and crashes) saves no work: it does not shorten the loss.
                if e["progress"].as_bool() != Some(false) {
                    last_commit_t = Some(t(e));
                } else {
                    no_progress_commits += 1;
                }
                if let Some(d) = e["duration_ms"].as_u64() {
                    ckpt_ms = ckpt_ms.saturating_add(d);
                    ckpt_known += 1;
                }
            }
            "exit" => {
                let failed = e["exit"].as_i64().unwrap_or(0) != 0;
                if failed {
                    failures += 1;
                    let since = last_commit_t.or(launch_t).unwrap_or(t(e));
                    let lost = t(e).saturating_sub(since);
                    lost_ms = lost_ms.saturating_add(lost);
                    lost_each.push(lost);
                }
            }
            "restart" => {
                restarts += 1;
                backoff_ms = backoff_ms.saturating_add(e["delay_ms"].as_u64().unwrap_or(0));
            }
            "uploaded" => {
                uploads += 1;
                up_bytes = up_bytes.saturating_add(e["bytes"].as_u64().unwrap_or(0));
                up_ms = up_ms.saturating_add(e["duration_ms"].as_u64().unwrap_or(0));
                if let Some(l) = e["lag_ms"].as_u64() {
                    lags.push(l);
                }
                newest_uploaded = newest_uploaded.max(e["seq"].as_u64());
                remote_url = e["remote"].as_str().map(String::from).or(remote_url);
                last_upload_t = Some(t(e));
            }
            "upload_present" => newest_uploaded = newest_uploaded.max(e["seq"].as_u64()),
            "upload_failed" => up_failed += 1,
            "upload_skipped" => {
                up_skipped += e["seqs"].as_array().map(|a| a.len() as u64).unwrap_or(1)
            }
            "remote_restored" => {
                restores += 1;
                restore_bytes = restore_bytes.saturating_add(e["bytes"].as_u64().unwrap_or(0));
                restore_ms = restore_ms.saturating_add(e["duration_ms"].as_u64().unwrap_or(0));
            }
            "remote_invalid" => remote_invalid += 1,
            "remote_safe" => stops_safe += 1,
            "remote_missing" => stops_missing += 1,
            "remote" => remote_url = e["remote"].as_str().map(String::from).or(remote_url),
            "stopped" => stops += 1,
            "request" => requests += 1,
            "unanswered" => unanswered = unanswered.max(e["unanswered"].as_u64().unwrap_or(1)),
            _ => {}
        }
    }
    let pct = |x: u64| {
        if wall_ms > 0 {
            100.0 * x as f64 / wall_ms as f64
        } else {
            0.0
        }
    };
    let useful = wall_ms.saturating_sub(lost_ms.saturating_add(ckpt_ms).saturating_add(backoff_ms));
    let mean_ckpt = if ckpt_known > 0 {
        Some(ckpt_ms as f64 / ckpt_known as f64)
    } else {
        None
    };
    let mtbf_ms = if failures > 0 {
        Some(wall_ms as f64 / failures as f64)
    } else {
        None
    };
    // Young/Daly: the interval that minimises expected overhead + lost work.
    let suggested = match (mean_ckpt, mtbf_ms) {
        (Some(c), Some(m)) => Some((2.0 * c * m).sqrt() / 1000.0),
        _ => None,
    };
    let remote =
        remote_url.is_some() || uploads + up_failed + restores + stops_safe + stops_missing > 0;
    let remote = remote.then(|| {
        lags.sort_unstable();
        json!({
            "url": remote_url,
            "uploads": uploads,
            "upload_failed_attempts": up_failed,
            "uploads_skipped": up_skipped,
            "bytes_uploaded": up_bytes,
            "upload_seconds": up_ms as f64 / 1000.0,
            "upload_bytes_per_s": (up_bytes * 1000).checked_div(up_ms),
            "lag_ms_median": lags.get(lags.len() / 2),
            "lag_ms_max": lags.last(),
            "lag_ms_last": events.iter().rev().find(|e| e["event"] == "uploaded").and_then(|e| e["lag_ms"].as_u64()),
            "newest_uploaded": newest_uploaded,
            "last_upload_seconds_ago": last_upload_t.map(|u| t(last).saturating_sub(u) as f64 / 1000.0),
            "restores": restores,
            "bytes_restored": restore_bytes,
            "restore_seconds": restore_ms as f64 / 1000.0,
            "remote_invalid": remote_invalid,
            "stops_uploaded": stops_safe,
            "stops_not_uploaded": stops_missing,
        })
    });
    json!({
        "remote": remote,
        "events": events.len(),
        "wall_seconds": wall_ms as f64 / 1000.0,
        "launches": launches,
        "restarts": restarts,
        "failures": failures,
        "stops": stops,
        "checkpoints": commits,
        "checkpoints_without_progress": no_progress_commits,
        "requests": requests,
        "unanswered_requests": unanswered,
        "checkpoint_seconds": ckpt_ms as f64 / 1000.0,
        "checkpoint_overhead_percent": pct(ckpt_ms),
        "mean_checkpoint_ms": mean_ckpt,
        "lost_work_seconds": lost_ms as f64 / 1000.0,
        "lost_work_per_failure_seconds": lost_each.iter().map(|l| *l as f64 / 1000.0).collect::<Vec<_>>(),
        "backoff_seconds": backoff_ms as f64 / 1000.0,
        "goodput_percent": pct(useful),
        "mtbf_seconds": mtbf_ms.map(|m| m / 1000.0),
        "suggested_interval_seconds": suggested,
    })
}

/// The one-line upload summary of `ckpt stats` and `ckpt log --uploads`.
pub fn upload_summary_line(r: &Value) -> String {
    if r.is_null() {
        return "uploads:            none (no --remote in this log)".into();
    }
    let ms = |v: &Value| {
        v.as_u64()
            .map(|x| format!("{x} ms"))
            .unwrap_or_else(|| "-".into())
    };
    let mut line = format!(
        "uploads:            {} to {} ({} in {:.2}s, {}/s); lag behind the commit: median {}, max {}, last {}; newest uploaded {}",
        r["uploads"],
        crate::store::escape(r["url"].as_str().unwrap_or("?")),
        crate::supervisor::fmt_bytes(r["bytes_uploaded"].as_u64().unwrap_or(0)),
        r["upload_seconds"].as_f64().unwrap_or(0.0),
        crate::supervisor::fmt_bytes(r["upload_bytes_per_s"].as_u64().unwrap_or(0)),
        ms(&r["lag_ms_median"]),
        ms(&r["lag_ms_max"]),
        ms(&r["lag_ms_last"]),
        r["newest_uploaded"].as_u64().map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
    );
    for (k, what) in [
        ("upload_failed_attempts", "failed attempt(s)"),
        ("uploads_skipped", "skipped (a newer one went instead)"),
        ("restores", "remote restore(s)"),
        ("remote_invalid", "remote checkpoint(s) refused"),
        (
            "stops_uploaded",
            "stop(s) with the final checkpoint off the machine",
        ),
        (
            "stops_not_uploaded",
            "stop(s) with the final checkpoint NOT off the machine",
        ),
    ] {
        if r[k].as_u64().unwrap_or(0) > 0 {
            line.push_str(&format!("; {} {what}", r[k]));
        }
    }
    line
}

pub fn stats(a: StatsArgs) -> Result<i32, Fatal> {
    let s = compute_stats(&read_events(&a.dir)?);
    if a.json {
        println!("{s}");
        return Ok(0);
    }
    let d = |k: &str| {
        s[k].as_f64()
            .map(|x| fmt_dur(Duration::from_secs_f64(x.max(0.0))))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "wall time:          {}  ({} launches, {} restarts, {} failures, {} stops)",
        d("wall_seconds"),
        s["launches"],
        s["restarts"],
        s["failures"],
        s["stops"]
    );
    println!(
        "checkpoints:        {} taking {} ({:.2}% overhead{})",
        s["checkpoints"],
        d("checkpoint_seconds"),
        s["checkpoint_overhead_percent"].as_f64().unwrap_or(0.0),
        s["mean_checkpoint_ms"]
            .as_f64()
            .map(|m| format!(", {m:.0} ms each on average"))
            .unwrap_or_default()
    );
    if s["checkpoints_without_progress"].as_u64().unwrap_or(0) > 0 {
        println!(
            "                    {} of them not beyond the step their launch restored (no progress)",
            s["checkpoints_without_progress"]
        );
    }
    if s["unanswered_requests"].as_u64().unwrap_or(0) > 0 {
        println!(
            "requests:           {} sent, {} got no checkpoint (see `ckpt log`: event unanswered)",
            s["requests"], s["unanswered_requests"]
        );
    }
    let each: Vec<String> = s["lost_work_per_failure_seconds"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_f64())
                .map(|x| fmt_dur(Duration::from_secs_f64(x)))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "work lost:          {}{}",
        d("lost_work_seconds"),
        if each.is_empty() {
            String::new()
        } else {
            format!(" ({})", each.join(", "))
        }
    );
    println!("waiting to restart: {}", d("backoff_seconds"));
    println!(
        "goodput:            {:.1}% of the wall time was useful work",
        s["goodput_percent"].as_f64().unwrap_or(0.0)
    );
    if !s["remote"].is_null() {
        println!("{}", upload_summary_line(&s["remote"]));
    }
    match s["suggested_interval_seconds"].as_f64() {
        Some(i) => println!(
            "suggested --every:  {} (Young/Daly: sqrt(2 x checkpoint cost x MTBF {}))",
            fmt_dur(Duration::from_secs_f64(i)),
            d("mtbf_seconds")
        ),
        None => println!("suggested --every:  needs at least one failure and one timed checkpoint"),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_add_up() {
        let ev = |t: u64, e: &str, extra: Value| {
            let mut v = json!({ "t_ms": t, "event": e });
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        let events = vec![
            ev(0, "start", json!({})),
            ev(0, "launch", json!({})),
            ev(10_000, "committed", json!({ "duration_ms": 1000 })),
            ev(15_000, "exit", json!({ "exit": 137 })),
            ev(15_000, "restart", json!({ "delay_ms": 1000 })),
            ev(16_000, "launch", json!({})),
            ev(20_000, "exit", json!({ "exit": 0 })),
        ];
        let s = compute_stats(&events);
        assert_eq!(s["failures"], 1);
        assert_eq!(s["lost_work_seconds"], 5.0);
        assert_eq!(s["checkpoint_overhead_percent"], 5.0);
        assert_eq!(s["goodput_percent"], 65.0);
        // sqrt(2 * 1000 ms * 20000 ms) = 6324.6 ms
        assert!((s["suggested_interval_seconds"].as_f64().unwrap() - 6.3245).abs() < 1e-3);
    }
}
