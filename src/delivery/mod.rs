//! The delivery worker: claims due links (and lead resolutions) from storage under a lease,
//! calls SprintHub outside any transaction, and records each outcome through a group-commit
//! writer. Concurrency and the outbound rate are bounded for the whole deployment (see
//! [`fleet`]), and nothing is claimed or sent while delivery is paused.

pub mod backoff;
pub mod fleet;
pub mod objects;
pub mod ratelimit;
pub mod resolve;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::alerts::{Alerts, Example};
use crate::batch::Batcher;
use crate::config::{AlertKind, Config};
use crate::sprinthub::{Failure, SprintHubClient};
use crate::store::{Attempt, Completion, LinkId, LinkJob, LinkUpdate, Store, now_ms};
use crate::telemetry::Metrics;
use backoff::{Next, after_failure};
use fleet::Fleet;
use objects::Creator;
use ratelimit::RateLimiter;
use resolve::Resolver;

/// Longest idle sleep between polls when nothing is due (other replicas may add work).
/// A duration in milliseconds, saturating at `i64::MAX` instead of wrapping.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The timestamp `d` after `now`, saturating instead of overflowing.
pub(crate) fn after(now: crate::store::Millis, d: Duration) -> crate::store::Millis {
    now.saturating_add(millis(d))
}

/// The trace context stored with an event, parsed; `None` (the call starts a new trace) for an
/// event stored without one, or a value that does not parse.
pub(crate) fn stored_trace(text: Option<&str>) -> Option<crate::telemetry::traces::TraceContext> {
    crate::telemetry::traces::TraceContext::parse(text?).ok()
}

const IDLE_POLL: Duration = Duration::from_millis(500);
/// How long a busy worker waits to gather free slots before claiming.
const CLAIM_GATHER: Duration = Duration::from_millis(5);
/// The furthest ahead a claimed job's rate-limit slot may lie (a quarter of the lease at most):
/// the worker claims only as many jobs as it can start within this time, so no job sits in
/// the rate limiter until its lease runs out.
const CLAIM_HORIZON: Duration = Duration::from_secs(1);

pub struct Worker {
    store: Arc<dyn Store>,
    hub: SprintHubClient,
    cfg: Arc<Config>,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    completer: Batcher<Completion, ()>,
    alerts: Alerts,
    resolver: Resolver,
    creator: Creator,
    fleet: Arc<Fleet>,
    /// Jobs whose call is in progress, so a forced shutdown can hand them back.
    in_flight: Mutex<HashMap<LinkId, i64>>,
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        hub: SprintHubClient,
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
        alerts: Alerts,
        fleet: Arc<Fleet>,
    ) -> Arc<Self> {
        let limiter = fleet.limiter();
        let s = store.clone();
        let completer = Batcher::spawn(256, move |items: Arc<[Completion]>| {
            let s = s.clone();
            async move {
                let n = items.len();
                s.complete_links(&items, now_ms()).await?;
                Ok(vec![(); n])
            }
        });
        let resolver = Resolver::new(
            store.clone(),
            hub.clone(),
            cfg.clone(),
            limiter.clone(),
            metrics.clone(),
            alerts.clone(),
            fleet.clone(),
        );
        let creator = Creator::new(
            store.clone(),
            hub.clone(),
            cfg.clone(),
            metrics.clone(),
            alerts.clone(),
            fleet.clone(),
        );
        Arc::new(Worker {
            creator,
            store,
            hub,
            cfg,
            limiter,
            metrics,
            wake,
            completer,
            alerts,
            resolver,
            fleet,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// Runs until `shutdown` is cancelled, then lets in-flight calls finish for at most `drain`
    /// and hands back the leases of any still running.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, drain: Duration) {
        let permits = Arc::new(Semaphore::new(self.cfg.sprinthub.concurrency));
        let lease_ms = millis(Duration::from_secs(self.cfg.delivery.lease_seconds));
        let horizon = CLAIM_HORIZON.min(Duration::from_millis(lease_ms as u64 / 4));
        let mut tasks = JoinSet::new();
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(self.fleet.clone().run(heartbeat_stop.clone()));
        self.store.listen(self.wake.clone());
        loop {
            while tasks.try_join_next().is_some() {}
            // Paused (by an operator, or after throttling): claim nothing; look again each tick.
            if let Some(p) = self.fleet.paused().await {
                let left = p.until.map_or(fleet::PAUSED_TICK, |u| {
                    Duration::from_millis((u - now_ms()).clamp(1, 250) as u64)
                });
                tokio::select! {
                    _ = tokio::time::sleep(left) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let first = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = shutdown.cancelled() => break,
            };
            // Under load, wait a moment for a quarter of the slots to free up, so that one claim
            // (one write) serves several links instead of one.
            let batch = (self.cfg.sprinthub.concurrency / 4).max(1);
            if batch > 1 && permits.available_permits() + 1 < batch {
                let more = permits.clone().acquire_many_owned((batch - 1) as u32);
                if let Ok(Ok(p)) = tokio::time::timeout(CLAIM_GATHER, more).await {
                    // Only this loop acquires permits, so releasing and re-taking them below is safe.
                    drop(p);
                }
            }
            let mut held = vec![first];
            while let Ok(p) = permits.clone().try_acquire_owned() {
                held.push(p);
            }
            // This replica's share of the deployment's concurrency.
            let room = self.fleet.room();
            if room == 0 {
                drop(held);
                // No share at all changes only with a heartbeat; a full share when a call ends.
                let wait = if self.fleet.has_share() { 20 } else { 250 };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            held.truncate(room);
            // Rate tokens before claims: wait until a slot is near, then claim no more jobs than
            // there are slots within the horizon. A claimed job starts its call within that
            // horizon, far inside its lease, so it is never claimed (and sent) a second time.
            let ready = self.limiter.ready_at(horizon);
            if ready > tokio::time::Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(ready) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            let slots = self.limiter.reserve(held.len(), horizon);
            if slots.is_empty() {
                // A lead lookup took the slot meanwhile.
                continue;
            }
            held.truncate(slots.len());
            let mut slots = slots.into_iter();
            let now = now_ms();
            let limit = held.len() as i64;
            let jobs = match self
                .store
                .claim_links(now, now.saturating_add(lease_ms), limit)
                .await
            {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming links failed; retrying in 1 s");
                    self.limiter.release(slots.as_slice());
                    drop(held);
                    tokio::select! { _ = tokio::time::sleep(Duration::from_secs(1)) => {}, _ = shutdown.cancelled() => break }
                    continue;
                }
            };
            let mut started = 0;
            for job in jobs {
                let permit = held.pop().expect("claimed no more than the permits held");
                let slot = slots.next().expect("one slot per permit");
                self.in_flight
                    .lock()
                    .expect("in-flight lock")
                    .insert(job.link_id, job.lease);
                let me = self.clone();
                let stop = shutdown.clone();
                let call = self.fleet.start_call();
                tasks.spawn(async move {
                    me.deliver(job, slot, stop).await;
                    drop((permit, call));
                });
                started += 1;
            }
            // Object creations next: their links wait for them.
            if !held.is_empty() {
                let spare = held.len() as i64;
                match self
                    .store
                    .claim_objects(now, now.saturating_add(lease_ms), spare)
                    .await
                {
                    Ok(jobs) => {
                        for job in jobs {
                            let permit = held.pop().expect("claimed no more than the permits held");
                            let slot = slots.next().expect("one slot per permit");
                            let me = self.clone();
                            let stop = shutdown.clone();
                            let call = self.fleet.start_call();
                            tasks.spawn(async move {
                                me.creator.run(job, slot, stop).await;
                                drop((permit, call));
                            });
                            started += 1;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming object creations failed"),
                }
            }
            if !held.is_empty() {
                let spare = held.len() as i64;
                match self
                    .store
                    .claim_resolves(now, now.saturating_add(lease_ms), spare)
                    .await
                {
                    Ok(jobs) => {
                        for job in jobs {
                            let permit = held.pop().expect("claimed no more than the permits held");
                            let slot = slots.next().expect("one slot per permit");
                            let me = self.clone();
                            let call = self.fleet.start_call();
                            tasks.spawn(async move {
                                me.resolver.run(job, slot).await;
                                drop((permit, call));
                            });
                            started += 1;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming lead resolutions failed"),
                }
            }
            // Slots not used by a claimed job are handed back.
            self.limiter.release(slots.as_slice());
            drop(held);
            if started == 0 {
                let wait = match self.store.next_due().await {
                    Ok(Some(due)) => Duration::from_millis(
                        (due - now_ms()).clamp(5, IDLE_POLL.as_millis() as i64) as u64,
                    ),
                    _ => IDLE_POLL,
                };
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
        // Draining: no new claims; in-flight calls get until the deadline.
        let drained =
            tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tasks.abort_all();
            let left: Vec<(LinkId, i64)> = self
                .in_flight
                .lock()
                .expect("in-flight lock")
                .drain()
                .collect();
            let releases: Vec<Completion> = left
                .into_iter()
                .map(|(link_id, lease)| Completion {
                    link_id,
                    lease,
                    attempt: None,
                    update: LinkUpdate::Release,
                })
                .collect();
            if !releases.is_empty() {
                tracing::info!(
                    count = releases.len(),
                    "releasing leases of unfinished deliveries"
                );
                if let Err(e) = self.store.complete_links(&releases, now_ms()).await {
                    tracing::warn!(error = %e, "could not release leases; they expire by themselves");
                }
            }
        }
        // Nothing is in flight any more: this replica's share goes to the others now.
        heartbeat_stop.cancel();
        let _ = heartbeat.await;
    }

    /// One attempt for one link, at its rate-limit `slot`, and its record.
    async fn deliver(&self, job: LinkJob, slot: tokio::time::Instant, shutdown: CancellationToken) {
        let (source, event_id) = job.events.first().cloned().unwrap_or_default();
        let span = tracing::info_span!(
            "deliver",
            event_id = %event_id,
            source = %source,
            events = job.events.len(),
            object_id = %job.object_id,
            lead_id = %job.lead_id,
            link = job.link_id.0
        );
        let _enter = span.enter();
        drop(_enter);
        // A call not yet started when shutdown comes is handed back, not begun.
        let go = tokio::select! {
            _ = tokio::time::sleep_until(slot) => true,
            _ = shutdown.cancelled() => false,
        };
        // Paused meanwhile (throttling seen by another call): handed back, not sent.
        let go = go && self.fleet.paused_cached().is_none();
        let completion = if !go {
            Completion {
                link_id: job.link_id,
                lease: job.lease,
                attempt: None,
                update: LinkUpdate::Release,
            }
        } else {
            let at = now_ms();
            let start = Instant::now();
            let trace = stored_trace(job.trace.as_deref());
            let result = self.hub.link(&job.object_id, &job.lead_id, trace).await;
            let took = start.elapsed();
            self.fleet.observe(result.as_ref().err()).await;
            let duration_ms = took.as_millis() as i64;
            let (attempt, update) = match result {
                Ok(ok) => {
                    self.metrics.attempt("success", took);
                    self.metrics.link("linked");
                    tracing::info!(parent: &span, status = ok.status, "linked");
                    (
                        Attempt {
                            at,
                            status_code: Some(i64::from(ok.status)),
                            error: None,
                            response_excerpt: ok.excerpt,
                            duration_ms,
                        },
                        LinkUpdate::Linked,
                    )
                }
                Err(failure) => {
                    self.metrics.attempt(failure.class(), took);
                    let example = || {
                        Example::event(&source, &event_id)
                            .pair(&job.object_id, &job.lead_id)
                            .error(failure.describe())
                    };
                    if let Some(kind) = alert_kind(&failure) {
                        self.alerts.report(kind, example());
                    }
                    let attempt = Attempt {
                        at,
                        status_code: failure.status().map(i64::from),
                        error: Some(failure.describe()),
                        response_excerpt: failure.excerpt().map(str::to_string),
                        duration_ms,
                    };
                    let next = after_failure(
                        &failure,
                        job.attempts,
                        job.first_queued_at,
                        now_ms(),
                        &self.cfg.delivery,
                        fastrand::f64(),
                    );
                    let update = match next {
                        Next::Retry { delay, counted } => {
                            if matches!(failure, Failure::Auth { .. }) {
                                tracing::error!(parent: &span, error = %failure.describe(), "SprintHub refused our credentials");
                            } else if matches!(failure, Failure::Misdirected { .. }) {
                                tracing::error!(parent: &span, error = %failure.describe(), "SprintHub answered with a redirect; sprinthub.base_url is wrong");
                            } else {
                                tracing::warn!(parent: &span, error = %failure.describe(), retry_in_ms = delay.as_millis() as u64, "link attempt failed");
                            }
                            LinkUpdate::Retry {
                                due_at: after(now_ms(), delay),
                                counted,
                                error: failure.describe(),
                            }
                        }
                        Next::Dead(reason) => {
                            self.metrics.link("dead");
                            self.alerts.report(
                                AlertKind::Dead,
                                Example::event(&source, &event_id)
                                    .pair(&job.object_id, &job.lead_id)
                                    .error(reason.clone()),
                            );
                            tracing::error!(parent: &span, error = %reason, "link is dead");
                            LinkUpdate::Dead { error: reason }
                        }
                    };
                    (attempt, update)
                }
            };
            Completion {
                link_id: job.link_id,
                lease: job.lease,
                attempt: Some(attempt),
                update,
            }
        };
        if let Err(e) = self.completer.submit(completion).await {
            // The lease runs out and the link is claimed again: at least once, never lost.
            tracing::error!(parent: &span, error = %e, "could not record the attempt");
        }
        self.in_flight
            .lock()
            .expect("in-flight lock")
            .remove(&job.link_id);
    }
}

/// The alert a failed SprintHub call is worth on its own, if any (a dead link is told apart).
pub(crate) fn alert_kind(failure: &Failure) -> Option<AlertKind> {
    match failure {
        Failure::Auth { .. } => Some(AlertKind::Credentials),
        Failure::Throttled { .. } => Some(AlertKind::Throttled),
        _ => None,
    }
}

#[cfg(test)]
mod arithmetic {
    use super::*;

    #[test]
    fn durations_saturate_instead_of_wrapping() {
        assert_eq!(millis(Duration::from_secs(60)), 60_000);
        assert_eq!(millis(Duration::from_secs(u64::MAX)), i64::MAX);
        assert_eq!(after(1_000, Duration::from_millis(5)), 1_005);
        assert_eq!(after(i64::MAX - 1, Duration::from_secs(1)), i64::MAX);
        assert_eq!(after(now_ms(), Duration::MAX), i64::MAX);
    }
}
