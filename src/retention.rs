//! Retention (SPEC section 9): a task beside the worker that, every `retention.interval`, blanks
//! the bodies of delivered events (`retention.bodies`), deletes delivered events
//! (`retention.delivered`) and dead, parked or discarded ones (`retention.failed`), then gives the freed
//! space back to the file system (SQLite). It works in steps of at most `BATCH` events, one short
//! transaction each, and pauses between them for three times as long as the step took, so ingest
//! and delivery keep at least three quarters of the database's time while millions of rows go.
//! A store may end a step early to keep it short (SQLite stops each after a few milliseconds of
//! the writer's time), so a rule is done when a step removes nothing, not when one comes back
//! short. What a deletion keeps so that no guarantee breaks is the store's part
//! (`Store::prune_failed`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;
use crate::store::{Millis, Store, StoreError, now_ms};
use crate::telemetry::Metrics;

/// Events per transaction, at most.
pub const BATCH: i64 = 500;
/// The shortest pause between two batches.
const MIN_PAUSE: Duration = Duration::from_millis(20);
/// Pages (4 KiB) given back to the file system per step of the incremental vacuum, at most
/// (2 MiB); the store also ends a step once it has held the writer for a few milliseconds.
const RECLAIM_PAGES: i64 = 512;

/// What one pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub bodies: u64,
    pub delivered: u64,
    pub failed: u64,
}

pub struct Pruner {
    store: Arc<dyn Store>,
    policy: RetentionConfig,
    metrics: Arc<Metrics>,
}

#[derive(Clone, Copy)]
enum Rule {
    Bodies,
    Delivered,
    Failed,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::Bodies => "bodies",
            Rule::Delivered => "delivered",
            Rule::Failed => "failed",
        }
    }
}

impl Pruner {
    pub fn new(store: Arc<dyn Store>, policy: RetentionConfig, metrics: Arc<Metrics>) -> Self {
        Pruner {
            store,
            policy,
            metrics,
        }
    }

    /// Prunes at start and then every `interval` until `shutdown`; without any retention rule
    /// it returns at once.
    pub async fn run(self, shutdown: CancellationToken) {
        if !self.policy.prunes() {
            return;
        }
        loop {
            match self.pass(&shutdown).await {
                Ok(p) if p != Pass::default() => tracing::info!(
                    bodies_removed = p.bodies,
                    delivered_deleted = p.delivered,
                    failed_deleted = p.failed,
                    "retention pass"
                ),
                Ok(_) => {}
                Err(StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "retention pass failed; trying again next interval")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.policy.interval) => {}
            }
        }
    }

    /// One pass of every rule that is set, each until nothing older than its limit is left,
    /// then the space given back. Stops early (with what it did) on `shutdown`.
    pub async fn pass(&self, shutdown: &CancellationToken) -> Result<Pass, StoreError> {
        let mut pass = Pass::default();
        let now = now_ms();
        let rules = [
            (Rule::Bodies, self.policy.bodies),
            (Rule::Delivered, self.policy.delivered),
            (Rule::Failed, self.policy.failed),
        ];
        for (rule, keep) in rules {
            let Some(keep) = keep else { continue };
            let before = now.saturating_sub(keep.as_millis() as Millis);
            let n = self.drain(rule, before, shutdown).await?;
            match rule {
                Rule::Bodies => pass.bodies = n,
                Rule::Delivered => pass.delivered = n,
                Rule::Failed => pass.failed = n,
            }
        }
        if pass.delivered + pass.failed + pass.bodies > 0 {
            while !shutdown.is_cancelled() {
                let started = Instant::now();
                let more = self.store.reclaim_space(RECLAIM_PAGES).await?;
                if !more {
                    break;
                }
                pause(started, shutdown).await;
            }
        }
        Ok(pass)
    }

    /// Steps of one rule until one removes nothing.
    async fn drain(
        &self,
        rule: Rule,
        before: Millis,
        shutdown: &CancellationToken,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            let now = now_ms();
            let n = match rule {
                Rule::Bodies => self.store.remove_bodies(before, now, BATCH).await?,
                Rule::Delivered => self.store.prune_delivered(before, now, BATCH).await?,
                Rule::Failed => self.store.prune_failed(before, now, BATCH).await?,
            };
            total += n;
            self.metrics.pruned(rule.name(), n);
            if n == 0 {
                break;
            }
            pause(started, shutdown).await;
        }
        Ok(total)
    }
}

/// Waits three times as long as the step that started at `started` took (at least `MIN_PAUSE`).
async fn pause(started: Instant, shutdown: &CancellationToken) {
    let wait = (started.elapsed() * 3).max(MIN_PAUSE);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}
