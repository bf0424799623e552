//! Alerts (SPEC 10): a person is told when something needs them. Ingest, the worker and the
//! readiness check report what happened through a bounded channel (`try_send`: reporting never
//! waits; a full channel drops the report and counts it). The alerter task coalesces reports per
//! target and kind: at most one notification per `min_interval` window, the count summed, a few
//! examples kept. Each notification is tried a few times and then dropped (counted). In a fleet
//! the replica whose claim of the (target, kind, window) row wins sends; the others stand down.

pub mod notify;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AlertKind, AlertTarget, Config};
use crate::domain::{LeadId, ObjectId};
use crate::store::{Store, now_ms};
use crate::telemetry::Metrics;
use notify::Notification;

/// Reports waiting for the alerter; beyond this they are dropped (and counted).
const QUEUE: usize = 1024;
/// Examples kept per notification.
pub const MAX_EXAMPLES: usize = 5;
/// Characters kept of each example field.
const MAX_FIELD_CHARS: usize = 200;
/// A quiet kind's first report waits this long for others of a burst to join it.
const GATHER: Duration = Duration::from_secs(1);
/// How often pending notifications are looked at.
const TICK: Duration = Duration::from_millis(200);
/// How often the backlog is measured (more often when a `backlog_age` is shorter).
const BACKLOG_CHECK: Duration = Duration::from_secs(30);

/// What one report is about: never a token, a secret or a body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Example {
    pub source: Option<String>,
    pub event_id: Option<String>,
    pub object_id: Option<String>,
    pub lead_id: Option<String>,
    pub error: Option<String>,
}

impl Example {
    pub fn event(source: &str, event_id: &str) -> Example {
        Example {
            source: Some(source.to_string()),
            event_id: Some(event_id.to_string()),
            ..Default::default()
        }
    }

    pub fn pair(mut self, object_id: &ObjectId, lead_id: &LeadId) -> Example {
        self.object_id = Some(object_id.to_string());
        self.lead_id = Some(lead_id.to_string());
        self
    }

    pub fn error(mut self, error: impl Into<String>) -> Example {
        self.error = Some(error.into());
        self
    }

    /// Each field cut to `MAX_FIELD_CHARS` (an error text may quote an answer).
    fn clipped(mut self) -> Example {
        for f in [
            &mut self.source,
            &mut self.event_id,
            &mut self.object_id,
            &mut self.lead_id,
            &mut self.error,
        ] {
            if let Some(s) = f
                && s.chars().count() > MAX_FIELD_CHARS
            {
                *s = s.chars().take(MAX_FIELD_CHARS).collect::<String>() + "…";
            }
        }
        self
    }

    /// `source/event_id object O lead L: error`, the parts that are known.
    pub fn line(&self) -> String {
        let mut out = String::new();
        match (&self.source, &self.event_id) {
            (Some(s), Some(e)) => out.push_str(&format!("{s}/{e}")),
            (Some(s), None) => out.push_str(s),
            (None, Some(e)) => out.push_str(e),
            (None, None) => {}
        }
        if let Some(o) = &self.object_id {
            out.push_str(&format!(" object {o}"));
        }
        if let Some(l) = &self.lead_id {
            out.push_str(&format!(" lead {l}"));
        }
        if let Some(e) = &self.error {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(e);
        }
        out.trim().to_string()
    }
}

struct Report {
    kind: AlertKind,
    example: Example,
}

struct Inner {
    tx: mpsc::Sender<Report>,
    /// The kinds some target wants (`AlertKind::bit`): others are not even queued.
    wanted: u8,
    metrics: Arc<Metrics>,
}

/// Where the service reports what a person should hear about. Cheap to clone; `report` never
/// waits.
#[derive(Clone, Default)]
pub struct Alerts(Option<Arc<Inner>>);

impl Alerts {
    /// No targets: every report is ignored.
    pub fn disabled() -> Alerts {
        Alerts(None)
    }

    pub fn report(&self, kind: AlertKind, example: Example) {
        let Some(inner) = &self.0 else { return };
        if inner.wanted & kind.bit() == 0 {
            return;
        }
        if inner.tx.try_send(Report { kind, example }).is_err() {
            inner.metrics.alert(kind.as_str(), "dropped");
        }
    }
}

/// Starts the alerter for `config.alerts` (nothing when there are none). It stops with
/// `shutdown`; what it has not sent by then is not sent.
pub fn start(
    config: &Config,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Alerts {
    if config.alerts.is_empty() {
        return Alerts::disabled();
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    let wanted = config
        .alerts
        .iter()
        .flat_map(|t| t.on.iter())
        .fold(0u8, |m, k| m | k.bit());
    let alerter = Alerter {
        targets: config
            .alerts
            .iter()
            .cloned()
            .map(|target| TargetState {
                target: Arc::new(target),
                slots: HashMap::new(),
            })
            .collect(),
        instance: config.sprinthub.instance.clone(),
        store,
        metrics: metrics.clone(),
        client: notify::client(),
    };
    tokio::spawn(alerter.run(rx, shutdown));
    Alerts(Some(Arc::new(Inner {
        tx,
        wanted,
        metrics,
    })))
}

/// Reports of one kind for one target, not sent yet.
struct Pending {
    count: u64,
    examples: Vec<Example>,
    since: Instant,
}

#[derive(Default)]
struct Slot {
    pending: Option<Pending>,
    /// The window whose notification this replica sent or saw claimed (start, Unix ms).
    last_window: Option<i64>,
    /// A notification of this slot is being delivered: further reports wait for the next one.
    sending: Arc<AtomicBool>,
}

struct TargetState {
    target: Arc<AlertTarget>,
    slots: HashMap<AlertKind, Slot>,
}

struct Alerter {
    targets: Vec<TargetState>,
    instance: String,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
}

impl Alerter {
    async fn run(mut self, mut rx: mpsc::Receiver<Report>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let backlog_every = self
            .targets
            .iter()
            .filter(|t| t.target.wants(AlertKind::Backlog))
            .map(|t| (t.target.backlog_age / 2).max(Duration::from_millis(500)))
            .min()
            .map(|d| d.min(BACKLOG_CHECK));
        let mut next_backlog = Instant::now() + backlog_every.unwrap_or(BACKLOG_CHECK);
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => self.add(r.kind, r.example.clipped()),
                    None => break,
                },
                _ = tick.tick() => {
                    if let Some(every) = backlog_every && Instant::now() >= next_backlog {
                        next_backlog = Instant::now() + every;
                        self.check_backlog().await;
                    }
                    self.flush();
                }
                _ = shutdown.cancelled() => break,
            }
        }
    }

    fn add(&mut self, kind: AlertKind, example: Example) {
        for t in self.targets.iter_mut().filter(|t| t.target.wants(kind)) {
            let slot = t.slots.entry(kind).or_default();
            let p = slot.pending.get_or_insert_with(|| Pending {
                count: 0,
                examples: Vec::new(),
                since: Instant::now(),
            });
            if kind == AlertKind::Backlog {
                // A condition, not a series of events: the latest measurement says it.
                p.count = 1;
                p.examples = vec![example.clone()];
            } else {
                p.count += 1;
                if p.examples.len() < MAX_EXAMPLES {
                    p.examples.push(example.clone());
                }
            }
        }
    }

    /// Measures the oldest pending item; one report per target whose `backlog_age` it passed.
    /// A store that does not answer is itself worth a notification.
    async fn check_backlog(&mut self) {
        let oldest = match tokio::time::timeout(
            Duration::from_secs(5),
            self.store.oldest_pending_at(),
        )
        .await
        {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "measuring the backlog failed");
                self.add(
                    AlertKind::Storage,
                    Example::default().error(format!("measuring the backlog failed: {e}")),
                );
                return;
            }
            Err(_) => {
                self.add(
                    AlertKind::Storage,
                    Example::default().error("measuring the backlog took longer than 5 s"),
                );
                return;
            }
        };
        let Some(oldest) = oldest else { return };
        let age = Duration::from_millis(now_ms().saturating_sub(oldest).max(0) as u64);
        for i in 0..self.targets.len() {
            let t = &self.targets[i].target;
            if t.wants(AlertKind::Backlog) && age > t.backlog_age {
                let example = Example::default().error(format!(
                    "the oldest pending link or resolution has waited {} (backlog_age {})",
                    human(age),
                    human(t.backlog_age)
                ));
                // The latest measurement replaces the last; the wait for a burst runs on.
                let slot = self.targets[i].slots.entry(AlertKind::Backlog).or_default();
                let since = slot.pending.as_ref().map_or_else(Instant::now, |p| p.since);
                slot.pending = Some(Pending {
                    count: 1,
                    examples: vec![example.clipped()],
                    since,
                });
            }
        }
    }

    /// Sends what is due: a pending notification whose burst has gathered, unless this window's
    /// was already sent (then it waits for the next window).
    fn flush(&mut self) {
        let now = now_ms();
        for (index, t) in self.targets.iter_mut().enumerate() {
            let interval = i64::try_from(t.target.min_interval.as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            let window = now - now.rem_euclid(interval);
            for (kind, slot) in t.slots.iter_mut() {
                let ready = slot
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.since.elapsed() >= GATHER.min(t.target.min_interval));
                if !ready
                    || slot.last_window == Some(window)
                    || slot.sending.load(Ordering::Acquire)
                {
                    continue;
                }
                let Some(p) = slot.pending.take() else {
                    continue;
                };
                slot.last_window = Some(window);
                slot.sending.store(true, Ordering::Release);
                let n = Notification {
                    kind: *kind,
                    count: p.count,
                    examples: p.examples,
                    at: now,
                    instance: self.instance.clone(),
                    test: false,
                };
                let job = Send {
                    target_index: index as i64,
                    target: t.target.clone(),
                    window,
                    store: self.store.clone(),
                    metrics: self.metrics.clone(),
                    client: self.client.clone(),
                    sending: slot.sending.clone(),
                };
                tokio::spawn(job.run(n));
            }
        }
    }
}

/// One notification on its way: the fleet claim, then the tries.
struct Send {
    target_index: i64,
    target: Arc<AlertTarget>,
    window: i64,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    sending: Arc<AtomicBool>,
}

impl Send {
    async fn run(self, n: Notification) {
        let kind = n.kind.as_str();
        let claim = tokio::time::timeout(
            Duration::from_secs(5),
            self.store
                .claim_alert_slot(self.target_index, kind, self.window),
        )
        .await;
        let mine = match claim {
            Ok(Ok(mine)) => mine,
            // Storage trouble must still be told (a storage alert most of all): send.
            Ok(Err(e)) => {
                tracing::warn!(kind, error = %e, "could not claim the alert slot; sending anyway");
                true
            }
            Err(_) => {
                tracing::warn!(
                    kind,
                    "claiming the alert slot took too long; sending anyway"
                );
                true
            }
        };
        if mine {
            match notify::deliver(&self.client, &self.target, &n).await {
                Ok(status) => {
                    self.metrics.alert(kind, "sent");
                    tracing::info!(kind, count = n.count, target = %self.target.origin(), status, "alert sent");
                }
                Err(e) => {
                    self.metrics.alert(kind, "failed");
                    tracing::warn!(kind, count = n.count, target = %self.target.origin(), error = %e, tries = notify::TRIES, "alert not delivered; dropped");
                }
            }
        } else {
            tracing::debug!(
                kind,
                "another replica announces this window's alert; standing down"
            );
        }
        self.sending.store(false, Ordering::Release);
    }
}

/// `17m`, `2h`, `90s`: the largest whole unit.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86_400 && s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_example_line_shows_what_is_known_and_is_clipped() {
        let e = Example::event("erp", "evt_1")
            .pair(&"42".into(), &"7".into())
            .error("rejected: HTTP 400");
        assert_eq!(e.line(), "erp/evt_1 object 42 lead 7: rejected: HTTP 400");
        assert_eq!(Example::default().error("disk full").line(), "disk full");
        let long = Example::default().error("x".repeat(1000)).clipped();
        assert_eq!(long.error.unwrap().chars().count(), MAX_FIELD_CHARS + 1);
    }

    #[test]
    fn durations_read_as_the_largest_unit() {
        assert_eq!(human(Duration::from_secs(45)), "45s");
        assert_eq!(human(Duration::from_secs(17 * 60 + 5)), "17m");
        assert_eq!(human(Duration::from_secs(2 * 3600 + 60)), "2h1m");
        assert_eq!(human(Duration::from_secs(86_400 * 3)), "3d");
    }
}
