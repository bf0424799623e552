//! The retry schedule: what a failed call means for its link, and when to try again.
//! Pure functions of the failure, the attempt count and the configuration.

use std::time::Duration;

use crate::config::DeliveryConfig;
use crate::sprinthub::Failure;
use crate::store::Millis;

/// SprintHub's own rate limiting asks for at least this pause.
pub const THROTTLE_PAUSE: Duration = Duration::from_secs(60);

/// The next decision after a failure.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Retry { delay: Duration, counted: bool },
    Dead(String),
}

/// Exponential backoff with "equal jitter": between half and all of `initial * 2^(n-1)`,
/// capped at `max`. `n` is the number of failures so far (1 for the first); `rand01` in [0, 1).
pub fn backoff(n: u32, initial: Duration, max: Duration, rand01: f64) -> Duration {
    let exp = n.saturating_sub(1).min(32);
    let base = initial.saturating_mul(1u32 << exp.min(31)).min(max);
    let half = base / 2;
    half + half.mul_f64(rand01.clamp(0.0, 1.0))
}

/// Decides what a failure means for a job that had `attempts` counted failures before and was
/// first queued at `first_queued_at`.
pub fn after_failure(
    failure: &Failure,
    attempts: i64,
    first_queued_at: Millis,
    now: Millis,
    cfg: &DeliveryConfig,
    rand01: f64,
) -> Next {
    let initial = Duration::from_millis(cfg.initial_backoff_ms);
    let max = Duration::from_millis(cfg.max_backoff_ms);
    let n = u32::try_from(attempts + 1).unwrap_or(u32::MAX);
    let (delay, counted) = match failure {
        Failure::Permanent { status, .. } => {
            return Next::Dead(format!("SprintHub rejected the request with HTTP {status}"));
        }
        Failure::Transient { retry_after, .. } => (
            retry_after
                .map(|r| r.min(max))
                .unwrap_or_else(|| backoff(n, initial, max, rand01)),
            true,
        ),
        // Throttling and a wrong token are not the link's fault: they do not use up attempts,
        // but max_age still bounds them.
        Failure::Throttled { retry_after, .. } => (
            retry_after
                .map(|r| r.min(max))
                .unwrap_or_default()
                .max(THROTTLE_PAUSE),
            false,
        ),
        Failure::Auth { .. } | Failure::Misdirected { .. } => (
            backoff(n, initial, max, rand01)
                .max(THROTTLE_PAUSE)
                .min(max.max(THROTTLE_PAUSE)),
            false,
        ),
    };
    if counted && attempts + 1 >= i64::from(cfg.max_attempts) {
        return Next::Dead(format!(
            "gave up after {} attempts: {}",
            attempts + 1,
            failure.describe()
        ));
    }
    let max_age_ms = (cfg.max_age_hours * 3_600_000.0) as i64;
    if now.saturating_sub(first_queued_at) >= max_age_ms {
        return Next::Dead(format!(
            "still failing after max_age_hours = {}: {}",
            cfg.max_age_hours,
            failure.describe()
        ));
    }
    Next::Retry { delay, counted }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            max_attempts: 5,
            initial_backoff_ms: 1000,
            max_backoff_ms: 10_000,
            max_age_hours: 1.0,
            lease_seconds: 60,
        }
    }

    fn transient(retry_after: Option<Duration>) -> Failure {
        Failure::Transient {
            status: Some(503),
            retry_after,
            error: "HTTP 503".into(),
            excerpt: None,
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let s = Duration::from_secs;
        assert_eq!(backoff(1, s(1), s(10), 0.0), Duration::from_millis(500));
        assert!(backoff(1, s(1), s(10), 0.999_999) < s(1));
        assert_eq!(backoff(3, s(1), s(10), 0.0), s(2));
        assert_eq!(backoff(10, s(1), s(10), 0.0), s(5));
        assert!(backoff(100, s(1), s(10), 0.5) <= s(10));
        for n in 1..40 {
            let d = backoff(n, s(1), s(10), 0.7);
            assert!(d >= Duration::from_millis(500) && d <= s(10), "{n}: {d:?}");
        }
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let c = cfg();
        assert_eq!(
            after_failure(&transient(Some(Duration::from_secs(3))), 0, 0, 0, &c, 0.5),
            Next::Retry {
                delay: Duration::from_secs(3),
                counted: true
            }
        );
        assert_eq!(
            after_failure(&transient(Some(Duration::from_secs(999))), 0, 0, 0, &c, 0.5),
            Next::Retry {
                delay: Duration::from_secs(10),
                counted: true
            }
        );
    }

    #[test]
    fn throttling_waits_a_minute_and_does_not_count() {
        let f = Failure::Throttled {
            retry_after: None,
            excerpt: None,
        };
        assert_eq!(
            after_failure(&f, 4, 0, 0, &cfg(), 0.5),
            Next::Retry {
                delay: THROTTLE_PAUSE,
                counted: false
            }
        );
        let auth = Failure::Auth {
            status: 401,
            excerpt: None,
        };
        assert!(matches!(
            after_failure(&auth, 4, 0, 0, &cfg(), 0.5),
            Next::Retry { counted: false, .. }
        ));
    }

    #[test]
    fn permanent_max_attempts_and_max_age_kill() {
        let c = cfg();
        let p = Failure::Permanent {
            status: 400,
            excerpt: None,
        };
        assert!(matches!(after_failure(&p, 0, 0, 0, &c, 0.5), Next::Dead(m) if m.contains("400")));
        assert!(matches!(
            after_failure(&transient(None), 3, 0, 0, &c, 0.5),
            Next::Retry { .. }
        ));
        assert!(
            matches!(after_failure(&transient(None), 4, 0, 0, &c, 0.5), Next::Dead(m) if m.contains("5 attempts"))
        );
        assert!(
            matches!(after_failure(&transient(None), 0, 0, 3_600_000, &c, 0.5), Next::Dead(m) if m.contains("max_age"))
        );
        let f = Failure::Throttled {
            retry_after: None,
            excerpt: None,
        };
        assert!(matches!(
            after_failure(&f, 0, 0, 3_600_000, &c, 0.5),
            Next::Dead(_)
        ));
    }
}
