//! Choosing the checkpoint interval: the Young/Daly rule, and `ckpt run --every auto`.
//!
//! With a checkpoint costing `C` of the job's time and failures arriving every `MTBF` on
//! average, the interval that minimises the expected lost time (work redone after a failure
//! plus checkpoint overhead) is about `sqrt(2 * C * MTBF)` (Young 1974, Daly 2006; a good
//! approximation while `C` is much shorter than `MTBF`).
//!
//! For an asynchronous save `C` is the time the job was blocked (copying its state into the
//! snapshot), not the whole save: the background write costs the job little, and the work lost
//! to a failure grows by the save's latency whatever the interval, so the optimum stays
//! `sqrt(2 * C_blocked * MTBF)`. The interval is then kept at least [`ASYNC_HEADROOM`] times
//! the whole save, so the background writer is idle at least half the time.

use std::time::Duration;

/// Shortest interval `--every auto` ever picks (a checkpoint costing microseconds must not
/// turn into a request storm).
pub const AUTO_MIN: Duration = Duration::from_secs(30);
/// Longest interval `--every auto` ever picks.
pub const AUTO_MAX: Duration = Duration::from_secs(6 * 3600);
/// The interval used until a first checkpoint has been measured: conservative (one early
/// checkpoint gives the measurement).
pub const AUTO_INITIAL: Duration = Duration::from_secs(5 * 60);
/// MTBF assumed when none is given and ckpt has seen no failure on the directory.
pub const DEFAULT_MTBF: Duration = Duration::from_secs(24 * 3600);

/// The Young/Daly optimum `sqrt(2 * cost * mtbf)`.
pub fn young_daly(cost: Duration, mtbf: Duration) -> Duration {
    Duration::from_secs_f64((2.0 * cost.as_secs_f64() * mtbf.as_secs_f64()).sqrt())
}

/// `young_daly` clamped to [`AUTO_MIN`, `AUTO_MAX`] (for a save that blocks the job
/// throughout).
pub fn auto_interval(cost: Duration, mtbf: Duration) -> Duration {
    auto_choice(cost, None, mtbf).every
}

/// An asynchronous save's interval is at least this many times its whole duration (it shares
/// the disk, the memory bandwidth and a core with the job; a save requested while the
/// previous one is still writing blocks the job until that one is done).
pub const ASYNC_HEADROOM: u32 = 2;

/// What `--every auto` picks, and the figures behind it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoChoice {
    /// The interval: `max(young_daly, floor)` clamped to [`AUTO_MIN`, `AUTO_MAX`].
    pub every: Duration,
    /// The cost `C` used: the blocked time of an asynchronous save, else the whole save.
    pub cost: Duration,
    /// `sqrt(2 * C * MTBF)`.
    pub young_daly: Duration,
    /// For an asynchronous save: [`ASYNC_HEADROOM`] x its whole duration.
    pub floor: Option<Duration>,
}

/// The `--every auto` interval for a save that took `total` from request to durable, of which
/// the job was blocked for `blocked` (`None`: a foreground save, blocked throughout).
pub fn auto_choice(total: Duration, blocked: Option<Duration>, mtbf: Duration) -> AutoChoice {
    let blocked = blocked.filter(|b| *b < total);
    let cost = blocked.unwrap_or(total).max(Duration::from_millis(1));
    let raw = young_daly(cost, mtbf);
    let floor = blocked.map(|_| total * ASYNC_HEADROOM);
    let every = raw.max(floor.unwrap_or_default()).clamp(AUTO_MIN, AUTO_MAX);
    AutoChoice {
        every,
        cost,
        young_daly: raw,
        floor,
    }
}

/// Where the MTBF of `--every auto` comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MtbfSource {
    /// `--mtbf`.
    Given(Duration),
    /// Learned: run time divided by the failures seen (at least one).
    Learned { run: Duration, failures: u32 },
    /// Nothing known yet: [`DEFAULT_MTBF`].
    Default,
}

impl MtbfSource {
    /// The MTBF value.
    pub fn value(self) -> Duration {
        match self {
            MtbfSource::Given(d) => d,
            MtbfSource::Learned { run, failures } => run / failures.max(1),
            MtbfSource::Default => DEFAULT_MTBF,
        }
    }

    /// Picks the source: `--mtbf` wins; else failures seen over `run` time; else the default.
    pub fn pick(given: Option<Duration>, run: Duration, failures: u32) -> MtbfSource {
        match given {
            Some(d) => MtbfSource::Given(d),
            None if failures > 0 => MtbfSource::Learned { run, failures },
            None => MtbfSource::Default,
        }
    }

    /// For the log.
    pub fn describe(self) -> String {
        match self {
            MtbfSource::Given(d) => format!("MTBF {} (--mtbf)", super::fmt_dur(d)),
            MtbfSource::Learned { run, failures } => format!(
                "MTBF {} (learned: {failures} failure(s) in {} of running)",
                super::fmt_dur(self.value()),
                super::fmt_dur(run)
            ),
            MtbfSource::Default => format!(
                "MTBF {} (default; no failure seen yet, pass --mtbf to set it)",
                super::fmt_dur(DEFAULT_MTBF)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn young_daly_matches_the_formula() {
        // C = 1 s, MTBF = 24 h: sqrt(2 * 86400) = 415.7 s.
        let d = young_daly(Duration::from_secs(1), Duration::from_secs(86400));
        assert!((d.as_secs_f64() - 415.69).abs() < 0.01, "{d:?}");
        assert_eq!(
            auto_interval(Duration::from_micros(1), Duration::from_secs(60)),
            AUTO_MIN
        );
        assert_eq!(
            auto_interval(Duration::from_secs(3600), Duration::from_secs(1 << 30)),
            AUTO_MAX
        );
    }

    #[test]
    fn async_saves_count_their_blocked_time_and_keep_headroom() {
        let day = Duration::from_secs(86400);
        // Foreground: C is the whole save.
        let fg = auto_choice(Duration::from_secs(2), None, day);
        assert_eq!(fg.cost, Duration::from_secs(2));
        assert_eq!(fg.floor, None);
        assert_eq!(fg.every, young_daly(Duration::from_secs(2), day));
        // Asynchronous, 40 ms blocked of 3 s: C = 40 ms -> sqrt(2 x 0.04 x 86400) = 83 s.
        let a = auto_choice(Duration::from_secs(3), Some(Duration::from_millis(40)), day);
        assert_eq!(a.cost, Duration::from_millis(40));
        assert!((a.every.as_secs_f64() - 83.14).abs() < 0.01, "{a:?}");
        assert!(a.every < fg.every);
        // ... but never less than twice the whole save.
        let slow = auto_choice(
            Duration::from_secs(100),
            Some(Duration::from_millis(40)),
            day,
        );
        assert_eq!(slow.every, Duration::from_secs(200));
        assert_eq!(slow.floor, Some(Duration::from_secs(200)));
        // A "blocked" time not shorter than the save is a foreground save.
        let same = auto_choice(Duration::from_secs(2), Some(Duration::from_secs(2)), day);
        assert_eq!(same, fg);
    }

    #[test]
    fn process_age_is_sane() {
        let a = process_age();
        assert!(a < Duration::from_secs(24 * 3600), "{a:?}");
    }

    #[test]
    fn mtbf_source_precedence() {
        let h = Duration::from_secs(3600);
        assert_eq!(MtbfSource::pick(Some(h), h * 5, 2).value(), h);
        assert_eq!(MtbfSource::pick(None, h * 6, 3).value(), h * 2);
        assert_eq!(MtbfSource::pick(None, h, 0).value(), DEFAULT_MTBF);
    }
}

/// How long this process (the supervisor) has been running, from `/proc`.
pub fn process_age() -> Duration {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let start = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Field 22 (starttime), counted after the parenthesised command name.
            let rest = &s[s.rfind(')')? + 2..];
            rest.split_whitespace().nth(19)?.parse::<f64>().ok()
        });
    let up = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    match (start, up) {
        (Some(st), Some(up)) => Duration::from_secs_f64((up - st / ticks).max(0.0)),
        _ => Duration::ZERO,
    }
}

/// `ckpt run --every auto`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoEvery {
    /// `--mtbf`, if given.
    pub mtbf: Option<Duration>,
}

impl super::Run {
    /// After a commit that took `duration_ms`: with `--every auto`, sets the request interval
    /// to the Young/Daly optimum for the measured cost and logs why (when it changes by more
    /// than 10%, and always the first time).
    pub(super) fn auto_adjust(&mut self, duration_ms: u64, blocked_ms: Option<u64>) {
        let Some(auto) = self.cfg.auto_every else {
            return;
        };
        let src = MtbfSource::pick(auto.mtbf, process_age(), self.m.hist.restarts);
        let mtbf = src.value();
        let total = Duration::from_millis(duration_ms);
        let choice = auto_choice(total, blocked_ms.map(Duration::from_millis), mtbf);
        let (every, raw, cost) = (choice.every, choice.young_daly, choice.cost);
        let old = self.m.every;
        let changed = old.is_none_or(|o| {
            let r = every.as_secs_f64() / o.as_secs_f64().max(1e-9);
            !(0.9..=1.1).contains(&r)
        });
        if !changed {
            return;
        }
        self.m.every = Some(every);
        let clamp = match choice.floor {
            Some(f) if every == f => format!(
                " (sqrt(2 x C x MTBF) = {}, raised to {ASYNC_HEADROOM} x the whole background save)",
                super::fmt_dur(raw)
            ),
            _ if every != raw => format!(
                " (sqrt(2 x C x MTBF) = {}, kept within {}..{})",
                super::fmt_dur(raw),
                super::fmt_dur(AUTO_MIN),
                super::fmt_dur(AUTO_MAX)
            ),
            _ => String::new(),
        };
        let what = match choice.floor {
            Some(_) => format!(
                "the time the last save blocked the job; it took {} in all, in the background",
                super::fmt_dur(total)
            ),
            None => "the last save".to_string(),
        };
        self.rep.event(
            "interval",
            Some(format!(
                "--every auto: checkpoint every {} = sqrt(2 x C x MTBF) with C = {} ({what}), {}{clamp}; was {}",
                super::fmt_dur(every),
                super::fmt_dur(cost),
                src.describe(),
                old.map(super::fmt_dur).unwrap_or_else(|| "off".into()),
            )),
            serde_json::json!({
                "every_ms": every.as_millis() as u64,
                "cost_ms": cost.as_millis() as u64,
                "save_ms": duration_ms,
                "blocked_ms": blocked_ms,
                "cost_of": if choice.floor.is_some() { "blocked" } else { "save" },
                "floor_ms": choice.floor.map(|f| f.as_millis() as u64),
                "mtbf_ms": mtbf.as_millis() as u64,
                "mtbf_source": match src { MtbfSource::Given(_) => "given", MtbfSource::Learned { .. } => "learned", MtbfSource::Default => "default" },
                "young_daly_ms": raw.as_millis() as u64,
            }),
        );
    }
}
