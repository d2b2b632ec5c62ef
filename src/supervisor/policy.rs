//! Restart policy: pure functions of the run's history, unit-tested without processes.

use std::time::Duration;

/// The restart rules of `ckpt run`.
#[derive(Debug, Clone)]
pub struct Policy {
    /// First backoff delay (`--backoff MIN..MAX`).
    pub backoff_min: Duration,
    /// Largest backoff delay.
    pub backoff_max: Duration,
    /// Give up after this many failures in a row with no new checkpoint between them.
    pub max_failures: u32,
    /// Give up after this many restarts in all (`--max-restarts`), progress or not.
    pub max_restarts: Option<u32>,
}

/// What the supervisor remembers of past failures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Restarts done so far.
    pub restarts: u32,
    /// Failures in a row without a new checkpoint.
    pub failures_without_progress: u32,
}

/// What to do after the job failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Relaunch after this delay.
    Restart { delay: Duration },
    /// Stop trying; the reason is for the user.
    GiveUp { reason: String },
}

impl Policy {
    /// Decides after a failure. `progress`: a new checkpoint was committed since the failed
    /// launch started. `jitter` is uniform in [0, 1).
    pub fn on_failure(&self, h: &mut History, progress: bool, jitter: f64) -> Decision {
        if progress {
            h.failures_without_progress = 1;
        } else {
            h.failures_without_progress += 1;
        }
        if !progress && h.failures_without_progress >= self.max_failures {
            return Decision::GiveUp {
                reason: format!(
                    "the job failed {} times in a row without committing a new checkpoint (crash loop); hint: fix the job, or raise --max-failures",
                    h.failures_without_progress
                ),
            };
        }
        if let Some(max) = self.max_restarts {
            if h.restarts >= max {
                return Decision::GiveUp {
                    reason: format!("reached --max-restarts {max}"),
                };
            }
        }
        h.restarts += 1;
        Decision::Restart {
            delay: self.delay(h.failures_without_progress, jitter),
        }
    }

    /// "Equal jitter" exponential backoff: the n-th failure in a row waits between half and
    /// all of min(max, min * 2^(n-1)).
    pub fn delay(&self, nth: u32, jitter: f64) -> Duration {
        let exp = nth.saturating_sub(1).min(30);
        let full = self
            .backoff_min
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Policy {
        Policy {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_failures: 3,
            max_restarts: None,
        }
    }

    #[test]
    fn gives_up_only_without_progress() {
        let mut h = History::default();
        assert!(matches!(
            p().on_failure(&mut h, false, 0.0),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            p().on_failure(&mut h, false, 0.0),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            p().on_failure(&mut h, false, 0.0),
            Decision::GiveUp { .. }
        ));
        // A job that keeps making progress is never abandoned for crashing often.
        let mut h = History::default();
        for _ in 0..1000 {
            assert!(matches!(
                p().on_failure(&mut h, true, 0.5),
                Decision::Restart { .. }
            ));
        }
    }

    #[test]
    fn backoff_grows_and_is_capped_and_resets_on_progress() {
        let pol = p();
        assert_eq!(pol.delay(1, 1.0), Duration::from_secs(1));
        assert_eq!(pol.delay(3, 1.0), Duration::from_secs(4));
        assert_eq!(pol.delay(30, 1.0), Duration::from_secs(60));
        assert_eq!(pol.delay(3, 0.0), Duration::from_secs(2));
        let mut h = History::default();
        pol.on_failure(&mut h, false, 0.0);
        pol.on_failure(&mut h, true, 0.0);
        assert_eq!(h.failures_without_progress, 1);
    }

    #[test]
    fn max_restarts_is_a_hard_cap() {
        let pol = Policy {
            max_restarts: Some(2),
            ..p()
        };
        let mut h = History::default();
        assert!(matches!(
            pol.on_failure(&mut h, true, 0.0),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            pol.on_failure(&mut h, true, 0.0),
            Decision::Restart { .. }
        ));
        assert!(matches!(
            pol.on_failure(&mut h, true, 0.0),
            Decision::GiveUp { .. }
        ));
    }
}
