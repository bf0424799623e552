//! The outbound token bucket: at most `rate` calls per second with a burst of one, shared by
//! every call this replica makes to SprintHub. On PostgreSQL the rate is this replica's share of
//! the deployment's limit, set again every second by [`super::fleet`].
//!
//! The worker takes its slots *before* it claims jobs ([`RateLimiter::reserve`]), and claims no
//! more jobs than it holds slots for within a short horizon: a claimed job never waits out its
//! lease in this queue (which would let the job be claimed and sent a second time).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct RateLimiter {
    unlimited: bool,
    state: Mutex<Bucket>,
}

struct Bucket {
    interval: Duration,
    next: Instant,
}

impl RateLimiter {
    /// `rate <= 0` means unlimited.
    pub fn new(rate: f64) -> Self {
        RateLimiter {
            unlimited: rate <= 0.0,
            state: Mutex::new(Bucket {
                interval: Self::spacing(rate),
                next: Instant::now(),
            }),
        }
    }

    fn spacing(rate: f64) -> Duration {
        if rate > 0.0 {
            Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX / 4)
        } else {
            Duration::ZERO
        }
    }

    /// A new rate (this replica's share) for slots not yet reserved; ignored when unlimited.
    pub fn set_rate(&self, rate: f64) {
        if self.unlimited || rate <= 0.0 {
            return;
        }
        self.state.lock().expect("rate limiter lock").interval = Self::spacing(rate);
    }

    fn interval(&self) -> Option<Duration> {
        (!self.unlimited).then(|| self.state.lock().expect("rate limiter lock").interval)
    }

    /// Waits for the next free slot.
    pub async fn acquire(&self) {
        if self.unlimited {
            return;
        }
        let at = {
            let mut b = self.state.lock().expect("rate limiter lock");
            let now = Instant::now();
            let at = b.next.max(now);
            b.next = at + b.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }

    /// Reserves up to `max` slots, in order, that start no later than `horizon` from now; none
    /// when the next free slot is later than that. Each caller waits until its slot.
    pub fn reserve(&self, max: usize, horizon: Duration) -> Vec<Instant> {
        let now = Instant::now();
        if self.unlimited {
            return vec![now; max];
        }
        let mut b = self.state.lock().expect("rate limiter lock");
        let mut at = b.next.max(now);
        let mut slots = Vec::new();
        while slots.len() < max && at <= now + horizon {
            slots.push(at);
            at += b.interval;
        }
        if !slots.is_empty() {
            b.next = at;
        }
        slots
    }

    /// Hands back the tail of a reservation that went unused, if nothing was reserved after it
    /// (otherwise those slots simply pass unused).
    pub fn release(&self, unused: &[Instant]) {
        let (Some(interval), Some(first), Some(last)) =
            (self.interval(), unused.first(), unused.last())
        else {
            return;
        };
        let mut b = self.state.lock().expect("rate limiter lock");
        if b.next == *last + interval {
            b.next = *first;
        }
    }

    /// The earliest moment at which [`reserve`](Self::reserve) with this `horizon` finds a slot.
    pub fn ready_at(&self, horizon: Duration) -> Instant {
        let now = Instant::now();
        if self.unlimited {
            return now;
        }
        let next = self.state.lock().expect("rate limiter lock").next;
        next.checked_sub(horizon).unwrap_or(now).max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_calls_evenly() {
        let rl = RateLimiter::new(10.0);
        let start = Instant::now();
        for _ in 0..21 {
            rl.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_is_unlimited() {
        let rl = RateLimiter::new(0.0);
        let start = Instant::now();
        for _ in 0..1000 {
            rl.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_stay_within_the_horizon_and_unused_ones_come_back() {
        let rl = RateLimiter::new(2.0);
        let start = Instant::now();
        let h = Duration::from_secs(1);
        let slots = rl.reserve(8, h);
        // 0, 0.5 s and 1 s: no reserved slot is further away than the horizon.
        assert_eq!(
            slots,
            vec![
                start,
                start + Duration::from_millis(500),
                start + Duration::from_secs(1)
            ]
        );
        assert!(rl.reserve(8, h).is_empty(), "the bucket is booked up");
        assert_eq!(rl.ready_at(h), start + Duration::from_millis(500));
        // The last two went unused: they are free again.
        rl.release(&slots[1..]);
        assert_eq!(rl.ready_at(h), start);
        assert_eq!(rl.reserve(1, h), vec![start + Duration::from_millis(500)]);
        // A release that is not the tail any more changes nothing.
        let a = rl.reserve(1, h);
        assert_eq!(a, vec![start + Duration::from_secs(1)]);
        let b = rl.reserve(1, Duration::from_secs(10));
        assert_eq!(b, vec![start + Duration::from_millis(1500)]);
        rl.release(&a);
        assert_eq!(rl.reserve(1, h), Vec::<Instant>::new());
        assert_eq!(RateLimiter::new(0.0).reserve(3, h).len(), 3);
    }
}
