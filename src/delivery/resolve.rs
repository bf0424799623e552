//! Lead resolution, a step of delivery: from the key a sender knows (an email, a phone number,
//! its own customer id) to SprintHub lead ids, through the mapping table or a SprintHub search,
//! creating the lead when configured to. Runs in the worker, never in the request path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::backoff::{Next, after_failure};
use super::fleet::Fleet;
use super::ratelimit::RateLimiter;
use crate::alerts::{Alerts, Example};
use crate::config::{AlertKind, Config, LeadField, LookupKind, ObjectRule, SourceConfig};
use crate::mapping::{self, Input, Leads};
use crate::sprinthub::{Failure, SprintHubClient};
use crate::store::{LeadId, ResolveJob, ResolveUpdate, Store, now_ms};
use crate::telemetry::Metrics;
use crate::telemetry::traces::TraceContext;

/// Lead ids found for a key, and when that answer expires.
type CacheEntry = (Vec<String>, Instant);

/// Remembers search results, found and not found, for their TTLs.
struct LookupCache {
    entries: Mutex<HashMap<(LeadField, String), CacheEntry>>,
    ttl: Duration,
    negative_ttl: Duration,
    capacity: usize,
}

impl LookupCache {
    fn get(&self, field: LeadField, key: &str) -> Option<Vec<String>> {
        let entries = self.entries.lock().expect("cache lock");
        entries
            .get(&(field, key.to_string()))
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(ids, _)| ids.clone())
    }

    fn put(&self, field: LeadField, key: &str, ids: Vec<String>) {
        let ttl = if ids.is_empty() {
            self.negative_ttl
        } else {
            self.ttl
        };
        if ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= self.capacity {
            let now = Instant::now();
            entries.retain(|_, (_, exp)| *exp > now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        // A TTL too large for the clock is not cached, rather than a panic (configuration
        // bounds keep TTLs far below that).
        let Some(expires) = Instant::now().checked_add(ttl) else {
            return;
        };
        entries.insert((field, key.to_string()), (ids, expires));
    }
}

pub struct Resolver {
    alerts: Alerts,
    store: Arc<dyn Store>,
    hub: SprintHubClient,
    cfg: Arc<Config>,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
    fleet: Arc<Fleet>,
    cache: LookupCache,
    /// One lock per key being looked up, so concurrent events for one customer make one search
    /// (and, for a new customer, create one lead).
    key_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Resolver {
    pub fn new(
        store: Arc<dyn Store>,
        hub: SprintHubClient,
        cfg: Arc<Config>,
        limiter: Arc<RateLimiter>,
        metrics: Arc<Metrics>,
        alerts: Alerts,
        fleet: Arc<Fleet>,
    ) -> Self {
        let cache = LookupCache {
            entries: Mutex::new(HashMap::new()),
            ttl: Duration::from_secs(cfg.lookup.cache_ttl_seconds),
            negative_ttl: Duration::from_secs(cfg.lookup.negative_cache_ttl_seconds),
            capacity: cfg.lookup.cache_capacity.max(1),
        };
        Resolver {
            alerts,
            store,
            hub,
            cfg,
            limiter,
            metrics,
            fleet,
            cache,
            key_locks: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves one claimed event and records the result. `slot` is the rate-limit slot the
    /// worker took before claiming it: the first SprintHub call waits for it, not for a new one.
    pub async fn run(&self, job: ResolveJob, slot: tokio::time::Instant) {
        let span = tracing::info_span!("resolve", event_id = %job.event_id, source = %job.source);
        let mut pace = Pace {
            slot: Some(slot),
            limiter: &self.limiter,
            fleet: &self.fleet,
            trace: super::stored_trace(job.trace.as_deref()),
        };
        let update = match self.resolve(&job, &mut pace).await {
            // A source that creates its object: the leads are known, the object comes next.
            ResolveUpdate::Links(leads) => {
                match self.cfg.source(&job.source).map(SourceConfig::object_rule) {
                    Some(ObjectRule::Create(spec)) => ResolveUpdate::Create {
                        definition_id: spec.definition_id.to_string(),
                        leads,
                    },
                    _ => ResolveUpdate::Links(leads),
                }
            }
            other => other,
        };
        // An unused slot is handed back (when it is still the last one reserved).
        if let Some(slot) = pace.slot {
            self.limiter.release(&[slot]);
        }
        match &update {
            ResolveUpdate::Links(ids) | ResolveUpdate::Create { leads: ids, .. } => {
                tracing::info!(parent: &span, leads = ?ids, "lead key resolved")
            }
            ResolveUpdate::Parked(r) => {
                tracing::warn!(parent: &span, reason = %r, "event parked");
                self.alerts.report(
                    AlertKind::Parked,
                    Example::event(&job.source, &job.event_id).error(r.clone()),
                );
            }
            ResolveUpdate::Retry { error, .. } => {
                tracing::warn!(parent: &span, error = %error, "lead lookup failed, will retry")
            }
            ResolveUpdate::Dead(r) => {
                tracing::error!(parent: &span, reason = %r, "lead lookup gave up");
                self.alerts.report(
                    AlertKind::Dead,
                    Example::event(&job.source, &job.event_id).error(r.clone()),
                );
            }
        }
        if let Err(e) = self.store.complete_resolve(&job, update, now_ms()).await {
            tracing::error!(parent: &span, error = %e, "could not record the lead resolution");
        }
    }

    async fn resolve(&self, job: &ResolveJob, pace: &mut Pace<'_>) -> ResolveUpdate {
        let Some(source) = self.cfg.source(&job.source) else {
            return ResolveUpdate::Parked(format!(
                "source {:?} is no longer configured",
                job.source
            ));
        };
        let body = match Input::read(&job.request) {
            Ok(v) => v,
            Err(e) => return ResolveUpdate::Parked(format!("the stored body cannot be read: {e}")),
        };
        let mapped = match mapping::map(source, &body) {
            Ok(m) => m,
            Err(reason) => return ResolveUpdate::Parked(reason),
        };
        let key = match mapped.leads {
            Leads::Ids(ids) => return ResolveUpdate::Links(ids),
            Leads::Key(key) => key,
        };
        let lead = &source.lead;
        let result = match (lead.lookup, lead.field) {
            (Some(LookupKind::Sprinthub), Some(field)) => {
                self.via_sprinthub(source, field, &key, &body, pace).await
            }
            _ => self.via_table(source, &key).await,
        };
        match result {
            Ok(ids) if ids.is_empty() => ResolveUpdate::Parked(match lead.lookup {
                Some(LookupKind::Sprinthub) => format!(
                    "no SprintHub lead has {} = {key:?}; create it (or set create_missing) and replay",
                    lead.field.map_or("the key", LeadField::as_str)
                ),
                _ => format!(
                    "no lead mapped to key {key:?} for source {}; add it with PUT /admin/mappings/{}/{{key}} and replay",
                    source.name, source.name
                ),
            }),
            Ok(ids) => ResolveUpdate::Links(ids.into_iter().map(LeadId::new).collect()),
            Err(Lookup::Paused(until)) => ResolveUpdate::Retry {
                due_at: until.unwrap_or_else(|| now_ms().saturating_add(1_000)),
                counted: false,
                error: "delivery is paused; nothing was sent".into(),
            },
            Err(Lookup::Storage(e)) => ResolveUpdate::Retry {
                due_at: now_ms().saturating_add(1_000),
                counted: false,
                error: format!("mapping table unavailable: {e}"),
            },
            Err(Lookup::Hub(failure)) => {
                self.metrics.lookup("error");
                if let Some(kind) = super::alert_kind(&failure) {
                    self.alerts.report(
                        kind,
                        Example::event(&job.source, &job.event_id)
                            .error(format!("lead lookup: {}", failure.describe())),
                    );
                }
                match &failure {
                    Failure::Auth { .. } => {
                        tracing::error!(event_id = %job.event_id, error = %failure.describe(), "SprintHub refused our credentials")
                    }
                    Failure::Misdirected { .. } => {
                        tracing::error!(event_id = %job.event_id, error = %failure.describe(), "SprintHub answered with a redirect; sprinthub.base_url is wrong")
                    }
                    _ => {}
                }
                match after_failure(
                    &failure,
                    job.attempts,
                    job.first_at,
                    now_ms(),
                    &self.cfg.delivery,
                    fastrand::f64(),
                ) {
                    Next::Retry { delay, counted } => ResolveUpdate::Retry {
                        due_at: super::after(now_ms(), delay),
                        counted,
                        error: format!("lead lookup: {}", failure.describe()),
                    },
                    Next::Dead(reason) => ResolveUpdate::Dead(format!("lead lookup: {reason}")),
                }
            }
        }
    }

    async fn via_table(&self, source: &SourceConfig, key: &str) -> Result<Vec<String>, Lookup> {
        let ids = self
            .store
            .mapping_get(&source.name, key)
            .await
            .map_err(|e| Lookup::Storage(e.to_string()))?;
        self.metrics
            .lookup(if ids.is_empty() { "miss" } else { "hit" });
        Ok(ids)
    }

    async fn via_sprinthub(
        &self,
        source: &SourceConfig,
        field: LeadField,
        key: &str,
        body: &Input,
        pace: &mut Pace<'_>,
    ) -> Result<Vec<String>, Lookup> {
        let create = source.lead.create_missing;
        let cached = || {
            let ids = self
                .cache
                .get(field, key)
                .filter(|ids| !ids.is_empty() || !create)?;
            self.metrics.lookup("cache_hit");
            Some(ids)
        };
        if let Some(ids) = cached() {
            return Ok(ids);
        }
        // One lookup per key at a time: events for one customer that arrive together wait for
        // the first answer (and its cache entry) instead of each searching, or each creating.
        let name = format!("{}:{key}", field.as_str());
        let lock = self
            .key_locks
            .lock()
            .expect("lookup lock")
            .entry(name.clone())
            .or_default()
            .clone();
        let result = async {
            let _guard = lock.lock().await;
            if let Some(ids) = cached() {
                return Ok(ids);
            }
            let found = self.search(field, key, pace).await?;
            if !found.is_empty() || !create {
                return Ok(found);
            }
            self.create(source, field, key, body, pace).await
        }
        .await;
        let mut locks = self.key_locks.lock().expect("lookup lock");
        // Only the map's handle and ours are left: nobody else waits for this key.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(&name);
        }
        result
    }

    /// Creates the lead from the event's `create_fields` (and the key itself).
    async fn create(
        &self,
        source: &SourceConfig,
        field: LeadField,
        key: &str,
        body: &Input,
        pace: &mut Pace<'_>,
    ) -> Result<Vec<String>, Lookup> {
        let mut fields = Map::new();
        for (name, reference) in &source.lead.create_fields {
            if let Some(v) = body.get(reference).filter(|v| !v.is_null()) {
                fields.insert(name.clone(), v.clone());
            }
        }
        fields
            .entry(field.as_str().to_string())
            .or_insert_with(|| Value::String(key.to_string()));
        pace.wait().await?;
        let id = self
            .hub
            .create_lead(&Value::Object(fields), pace.trace)
            .await;
        self.fleet.observe(id.as_ref().err()).await;
        let id = id.map_err(Lookup::Hub)?;
        self.metrics.lookup("created");
        let ids = vec![id];
        self.cache.put(field, key, ids.clone());
        Ok(ids)
    }

    async fn search(
        &self,
        field: LeadField,
        key: &str,
        pace: &mut Pace<'_>,
    ) -> Result<Vec<String>, Lookup> {
        pace.wait().await?;
        let leads = self.hub.search_leads(field, key, pace.trace).await;
        self.fleet.observe(leads.as_ref().err()).await;
        let leads = leads.map_err(Lookup::Hub)?;
        let ids: Vec<String> = leads.into_iter().map(|l| l.id).collect();
        self.metrics
            .lookup(if ids.is_empty() { "miss" } else { "hit" });
        self.cache.put(field, key, ids.clone());
        Ok(ids)
    }
}

enum Lookup {
    Storage(String),
    Hub(Failure),
    /// Delivery is paused (until then, if it ends by itself): nothing was sent.
    Paused(Option<crate::store::Millis>),
}

/// The calls of one resolution: the first uses the rate-limit slot reserved before the claim,
/// a second one (creating the lead after a search) waits for a new slot; each call's span is a
/// child of the event's stored trace context.
struct Pace<'a> {
    slot: Option<tokio::time::Instant>,
    limiter: &'a RateLimiter,
    fleet: &'a Fleet,
    trace: Option<TraceContext>,
}

impl Pace<'_> {
    /// Waits for the call's rate-limit slot; refuses it when delivery is paused meanwhile.
    async fn wait(&mut self) -> Result<(), Lookup> {
        match self.slot.take() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => self.limiter.acquire().await,
        }
        match self.fleet.paused_cached() {
            Some(p) => Err(Lookup::Paused(p.until)),
            None => Ok(()),
        }
    }
}
