//! The deployment as one sender toward SprintHub: the stored pause (operator or throttling) that
//! every replica obeys, and, on PostgreSQL, each replica's share of the rate limit and of the
//! concurrency.
//!
//! Shares come from heartbeats, not from a per-call round trip: every second each replica writes
//! its row in `delivery_replicas` and reads the live ones (seen within `lease_seconds`), in the
//! order they joined. Its rank `r` among `n` gives it `rate / n` calls per second and
//! `ceil((concurrency - r) / n)` slots (zero when `r >= concurrency`), which add up to exactly the
//! configured totals. A replica that joins others takes no share for [`JOIN_GRACE`], long
//! enough for every other replica to have shrunk its own (one that finds itself alone starts at
//! once); joining ranks last, so nobody else's share grows meanwhile. A crashed replica stops being live after the lease and its share goes to the rest.
//! A replica that cannot write its heartbeat for half a lease stops calling (others may already
//! have taken its share).

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::ratelimit::RateLimiter;
use crate::config::Config;
use crate::sprinthub::Failure;
use crate::store::{Millis, Pause, PauseReason, Store, now_ms};
use crate::telemetry::Metrics;

/// How often the heartbeat runs and how long a read of the stored pause is trusted.
pub const TICK: Duration = Duration::from_secs(1);
/// How often a paused replica reads the stored pause again.
pub const PAUSED_TICK: Duration = Duration::from_millis(250);
/// How long a new replica waits before taking its share: more than a tick and a slow heartbeat.
pub const JOIN_GRACE: Duration = Duration::from_millis(2_500);
/// The pause a throttling answer sets: SprintHub's 60 s, plus the time other replicas may take
/// to read it, so each of them waits at least 60 s too.
pub const THROTTLE_HOLD: Duration = Duration::from_secs(61);

/// What `GET /admin/delivery` shows of the fleet, as this replica last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetView {
    pub replicas: usize,
    pub in_flight: i64,
}

pub struct Fleet {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    id: String,
    rate: f64,
    concurrency: usize,
    lease: Duration,
    limiter: Arc<RateLimiter>,
    /// This replica's concurrency share: all of it on a backend with one replica.
    share: AtomicUsize,
    /// Calls (tasks holding a slot) running on this replica.
    in_flight: AtomicUsize,
    /// Live replicas and the calls the others reported in flight at the last heartbeat.
    replicas: AtomicUsize,
    others_in_flight: AtomicI64,
    /// The stored pause as last read, and when.
    pause: Mutex<(Option<Instant>, Option<Pause>)>,
}

impl Fleet {
    pub fn new(store: Arc<dyn Store>, cfg: &Config, metrics: Arc<Metrics>) -> Arc<Self> {
        let mut id = [0u8; 8];
        let _ = getrandom::fill(&mut id);
        Arc::new(Fleet {
            store,
            metrics,
            id: hex::encode(id),
            rate: cfg.sprinthub.rate_limit_per_second,
            concurrency: cfg.sprinthub.concurrency,
            lease: Duration::from_secs(cfg.delivery.lease_seconds),
            limiter: Arc::new(RateLimiter::new(cfg.sprinthub.rate_limit_per_second)),
            // None until the first heartbeat says how many replicas share the limits.
            share: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            replicas: AtomicUsize::new(1),
            others_in_flight: AtomicI64::new(0),
            pause: Mutex::new((None, None)),
        })
    }

    /// This replica's rate limiter (its share of the deployment's rate).
    pub fn limiter(&self) -> Arc<RateLimiter> {
        self.limiter.clone()
    }

    /// How many more calls this replica may start now.
    pub fn room(&self) -> usize {
        self.share
            .load(Ordering::Relaxed)
            .saturating_sub(self.in_flight.load(Ordering::Relaxed))
    }

    /// Whether this replica may make calls at all (a share of the concurrency).
    pub fn has_share(&self) -> bool {
        self.share.load(Ordering::Relaxed) > 0
    }

    /// Counts a call (or a task that makes calls) as in flight until the guard drops.
    pub fn start_call(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn view(&self) -> FleetView {
        FleetView {
            replicas: self.replicas.load(Ordering::Relaxed).max(1),
            in_flight: self.others_in_flight.load(Ordering::Relaxed)
                + self.in_flight.load(Ordering::Relaxed) as i64,
        }
    }

    /// The pause in force, reading storage at most once per [`TICK`] (every [`PAUSED_TICK`]
    /// while paused, so a resume takes effect quickly on every replica); a failed read keeps
    /// the last known state.
    pub async fn paused(&self) -> Option<Pause> {
        let fresh = {
            let cached = self.pause.lock().expect("pause lock");
            let ttl = if cached.1.is_some_and(|p| p.holds(now_ms())) {
                PAUSED_TICK
            } else {
                TICK
            };
            cached.0.is_some_and(|at| at.elapsed() < ttl)
        };
        if !fresh {
            match self.store.delivery_pause().await {
                Ok(p) => self.remember(p),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the delivery pause; keeping the last known state")
                }
            }
        }
        self.paused_cached()
    }

    /// The pause in force as last read (no storage access): checked right before each call.
    pub fn paused_cached(&self) -> Option<Pause> {
        let now = now_ms();
        let p = self.pause.lock().expect("pause lock").1;
        let p = p.filter(|p| p.holds(now));
        self.metrics.set_paused(p.is_some());
        p
    }

    fn remember(&self, p: Option<Pause>) {
        *self.pause.lock().expect("pause lock") = (Some(Instant::now()), p);
        self.metrics
            .set_paused(p.is_some_and(|p| p.holds(now_ms())));
    }

    /// Looks at a call's outcome: a throttling answer pauses the whole deployment.
    pub async fn observe(&self, failure: Option<&Failure>) {
        if !matches!(failure, Some(Failure::Throttled { .. })) {
            return;
        }
        let now = now_ms();
        let until = super::after(now, THROTTLE_HOLD);
        tracing::warn!(
            pause_seconds = THROTTLE_HOLD.as_secs(),
            "SprintHub is throttling us; pausing every call of every replica"
        );
        {
            let mut cached = self.pause.lock().expect("pause lock");
            let keep = cached
                .1
                .is_some_and(|p| p.holds(now) && p.until.is_none_or(|u| u >= until));
            if !keep {
                cached.1 = Some(Pause {
                    reason: PauseReason::Throttled,
                    until: Some(until),
                });
            }
        }
        self.metrics.set_paused(true);
        if let Err(e) = self.store.throttle_pause(until, now).await {
            tracing::warn!(error = %e, "could not store the throttling pause; other replicas learn of it from their own calls");
        }
    }

    /// An operator's pause, until `until` or until resumed.
    pub async fn pause(&self, until: Option<Millis>) -> crate::store::Result<()> {
        let p = Pause {
            reason: PauseReason::Operator,
            until,
        };
        self.store.set_delivery_pause(Some(p), now_ms()).await?;
        self.remember(Some(p));
        Ok(())
    }

    pub async fn resume(&self) -> crate::store::Result<()> {
        self.store.set_delivery_pause(None, now_ms()).await?;
        self.remember(None);
        Ok(())
    }

    /// The heartbeat: every [`TICK`], reads the stored pause, records this replica and
    /// recomputes its shares (on a backend with one replica the configured limits are this
    /// replica's). Removes this replica's row once `stopped` is cancelled.
    pub async fn run(self: Arc<Self>, stopped: CancellationToken) {
        let lease_ms = super::millis(self.lease);
        let mut last_ok = Instant::now();
        let mut first = true;
        let mut shared = true;
        loop {
            // The stored pause is read at least once per tick even while the worker waits for
            // slots, so calls about to start see another replica's throttling pause in time.
            self.paused().await;
            let now = now_ms();
            let in_flight = self.in_flight.load(Ordering::Relaxed) as i64;
            let beat = if shared {
                self.store
                    .heartbeat(&self.id, in_flight, now, now.saturating_sub(lease_ms))
                    .await
            } else {
                Ok(None)
            };
            match beat {
                Ok(None) => {
                    // One replica: every slot is this one's.
                    shared = false;
                    self.share.store(self.concurrency, Ordering::Relaxed);
                }
                Ok(Some(live)) => {
                    last_ok = Instant::now();
                    let n = live.len().max(1);
                    let me = live.iter().position(|r| r.id == self.id);
                    let joined = me.map_or(now, |i| live[i].joined_at);
                    // Alone, nobody has a share to shrink first: no wait.
                    let settled = n == 1 || now.saturating_sub(joined) >= super::millis(JOIN_GRACE);
                    let (share, rate) = match me {
                        Some(rank) if settled => {
                            (shares(self.concurrency, n, rank), self.rate / n as f64)
                        }
                        _ => (0, self.rate / n as f64),
                    };
                    if first || share != self.share.load(Ordering::Relaxed) {
                        tracing::info!(
                            replicas = n,
                            concurrency_share = share,
                            rate_share = rate,
                            "fleet shares"
                        );
                    }
                    first = false;
                    self.share.store(share, Ordering::Relaxed);
                    self.limiter.set_rate(rate);
                    self.replicas.store(n, Ordering::Relaxed);
                    let others: i64 = live
                        .iter()
                        .filter(|r| r.id != self.id)
                        .map(|r| r.in_flight)
                        .sum();
                    self.others_in_flight.store(others, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fleet heartbeat failed");
                    if last_ok.elapsed() > self.lease / 2 {
                        // Others may count this replica as gone and take its share.
                        self.share.store(0, Ordering::Relaxed);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stopped.cancelled() => break,
            }
        }
        if !shared {
            return;
        }
        if let Err(e) = self.store.leave(&self.id).await {
            tracing::warn!(error = %e, "could not remove this replica's heartbeat; it expires after the lease");
        }
    }
}

/// A call slot taken with [`Fleet::start_call`].
pub struct InFlight(Arc<Fleet>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The concurrency share of the replica at `rank` among `n`: the slots `k < total` with
/// `k mod n == rank`, so the shares add up to `total` and none is negative.
pub fn shares(total: usize, n: usize, rank: usize) -> usize {
    let n = n.max(1);
    if rank >= total {
        0
    } else {
        (total - rank).div_ceil(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_shares_add_up_to_the_total() {
        for total in 1..20 {
            for n in 1..10 {
                let sum: usize = (0..n).map(|r| shares(total, n, r)).sum();
                assert_eq!(sum, total, "total {total} over {n}");
                // A replica joining (ranking last) never makes an earlier one's share grow.
                for r in 0..n {
                    assert!(shares(total, n + 1, r) <= shares(total, n, r));
                }
            }
        }
        assert_eq!(
            (0..3).map(|r| shares(2, 3, r)).collect::<Vec<_>>(),
            [1, 1, 0]
        );
    }
}
