//! Logs, metrics and traces (`traces`). Metrics live in one `Metrics` value per app (so tests in one process do
//! not share counters) and are rendered in the Prometheus text format. Every label set is
//! bounded: sources come from the configuration, outcomes from fixed lists.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::store::{EventState, LinkState, Stats};

pub mod traces;

/// Sets up `tracing`: `RUST_LOG` filtering (default `info`), and JSON lines when
/// `SPRINTLINK_LOG_FORMAT=json`. Safe to call twice (the second call does nothing).
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    // The client's fast in-memory retries are detail: the worker logs each attempt's outcome.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,reqwest_retry=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

struct Histogram {
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: LATENCY_BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let wrap = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{} {sum}", wrap(labels));
        let _ = writeln!(out, "{name}_count{} {count}", wrap(labels));
    }
}

#[derive(Default)]
struct Counters(Mutex<BTreeMap<Vec<String>, u64>>);

impl Counters {
    fn inc(&self, labels: &[&str]) {
        self.add(labels, 1);
    }

    fn add(&self, labels: &[&str], n: u64) {
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        *self.0.lock().expect("metrics lock").entry(key).or_default() += n;
    }

    fn get(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        self.0
            .lock()
            .expect("metrics lock")
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, names: &[&str]) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (values, n) in self.0.lock().expect("metrics lock").iter() {
            let labels: Vec<String> = names
                .iter()
                .zip(values)
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = writeln!(out, "{name}{{{}}} {n}", labels.join(","));
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The service's counters and histograms.
pub struct Metrics {
    webhooks: Counters,
    links: Counters,
    attempts: Counters,
    lookups: Counters,
    creations: Counters,
    pruned: Counters,
    alerts: Counters,
    /// Trace spans by what became of them: exported, failed (their batch's export failed),
    /// dropped (the exporter's queue was full).
    trace_spans: Counters,
    trace_export_failures: AtomicU64,
    ingest: Histogram,
    delivery: Histogram,
    /// Whether delivery is paused for the deployment, as this replica last read it.
    paused: std::sync::atomic::AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            webhooks: Counters::default(),
            links: Counters::default(),
            attempts: Counters::default(),
            lookups: Counters::default(),
            creations: Counters::default(),
            pruned: Counters::default(),
            alerts: Counters::default(),
            trace_spans: Counters::default(),
            trace_export_failures: AtomicU64::new(0),
            ingest: Histogram::new(),
            delivery: Histogram::new(),
            paused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// `outcome`: queued, parked, duplicate, ignored, or the error code of a rejection.
    pub fn webhook(&self, source: &str, outcome: &str, took: Duration) {
        self.webhooks.inc(&[source, outcome]);
        self.ingest.observe(took);
    }

    pub fn webhook_count(&self, source: &str, outcome: &str) -> u64 {
        self.webhooks.get(&[source, outcome])
    }

    /// `outcome`: success, transient, throttled, auth_error, redirect, rejected.
    pub fn attempt(&self, outcome: &str, took: Duration) {
        self.attempts.inc(&[outcome]);
        self.delivery.observe(took);
    }

    /// `outcome`: linked or dead.
    pub fn link(&self, outcome: &str) {
        self.links.inc(&[outcome]);
    }

    /// `outcome`: hit, miss, cache_hit, cache_miss_negative, created, error.
    pub fn lookup(&self, outcome: &str) {
        self.lookups.inc(&[outcome]);
    }

    pub fn lookup_count(&self, outcome: &str) -> u64 {
        self.lookups.get(&[outcome])
    }

    /// One object creation attempt: created, failed, or unknown (the answer was lost).
    pub fn object_creation(&self, outcome: crate::domain::CreationOutcome) {
        self.creations.inc(&[outcome.as_str()]);
    }

    /// `rule`: bodies (bodies removed), delivered or failed (events deleted).
    pub fn pruned(&self, rule: &str, n: u64) {
        if n > 0 || self.pruned.get(&[rule]) == 0 {
            self.pruned.add(&[rule], n);
        }
    }

    pub fn pruned_count(&self, rule: &str) -> u64 {
        self.pruned.get(&[rule])
    }

    /// One alert notification (or, for `dropped`, one report that found the alerter's queue
    /// full): `outcome` is sent, failed (every try failed) or dropped.
    pub fn alert(&self, kind: &str, outcome: &str) {
        self.alerts.inc(&[kind, outcome]);
    }

    pub fn alert_count(&self, kind: &str, outcome: &str) -> u64 {
        self.alerts.get(&[kind, outcome])
    }

    /// `n` trace spans that were `exported`, `failed` or `dropped`.
    pub fn trace_spans(&self, outcome: &str, n: u64) {
        self.trace_spans.add(&[outcome], n);
    }

    pub fn trace_span_count(&self, outcome: &str) -> u64 {
        self.trace_spans.get(&[outcome])
    }

    /// One OTLP export request that failed (error answer, no answer, or timeout).
    pub fn trace_export_failed(&self) {
        self.trace_export_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Delivery paused (by an operator or after throttling) or running.
    pub fn set_paused(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
    }

    /// The Prometheus text exposition, with storage figures read just now.
    pub fn render(&self, stats: Option<&Stats>) -> String {
        let mut out = String::with_capacity(4096);
        self.webhooks.render(
            &mut out,
            "sprintlink_webhooks_received_total",
            "Webhooks received, by source and outcome.",
            &["source", "outcome"],
        );
        self.links.render(
            &mut out,
            "sprintlink_links_total",
            "Links that reached a final state.",
            &["outcome"],
        );
        self.attempts.render(
            &mut out,
            "sprintlink_delivery_attempts_total",
            "Calls to SprintHub's link and object creation endpoints, by outcome.",
            &["outcome"],
        );
        self.lookups.render(
            &mut out,
            "sprintlink_lead_lookups_total",
            "Lead resolutions, by outcome.",
            &["outcome"],
        );
        self.creations.render(
            &mut out,
            "sprintlink_object_creations_total",
            "Custom object creation attempts, by outcome (unknown: sent, answer lost).",
            &["outcome"],
        );
        self.pruned.render(
            &mut out,
            "sprintlink_pruned_events_total",
            "What retention removed: events deleted (rule delivered or failed), bodies blanked (rule bodies).",
            &["rule"],
        );
        self.alerts.render(
            &mut out,
            "sprintlink_alerts_total",
            "Alert notifications by kind and outcome (sent; failed: every try failed; dropped: the alerter's queue was full).",
            &["kind", "outcome"],
        );
        // One counter per outcome, as the names say; each is 0 until it happens (and without
        // `[telemetry]`), so a rule on it needs no `absent()`.
        for (outcome, help) in [
            ("exported", "Trace spans the OTLP receiver accepted."),
            (
                "dropped",
                "Trace spans dropped because the exporter's queue was full.",
            ),
            (
                "failed",
                "Trace spans dropped because their batch's export failed or timed out.",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP sprintlink_trace_spans_{outcome}_total {help}\n# TYPE sprintlink_trace_spans_{outcome}_total counter\nsprintlink_trace_spans_{outcome}_total {}",
                self.trace_spans.get(&[outcome])
            );
        }
        let _ = writeln!(
            out,
            "# HELP sprintlink_trace_exports_failed_total OTLP export requests that failed or timed out (their spans are counted as failed).\n# TYPE sprintlink_trace_exports_failed_total counter\nsprintlink_trace_exports_failed_total {}",
            self.trace_export_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP sprintlink_ingest_duration_seconds Time to verify, parse and commit a webhook.\n# TYPE sprintlink_ingest_duration_seconds histogram"
        );
        self.ingest
            .render(&mut out, "sprintlink_ingest_duration_seconds", "");
        let _ = writeln!(
            out,
            "# HELP sprintlink_delivery_duration_seconds Duration of one call to SprintHub.\n# TYPE sprintlink_delivery_duration_seconds histogram"
        );
        self.delivery
            .render(&mut out, "sprintlink_delivery_duration_seconds", "");
        let _ = writeln!(
            out,
            "# HELP sprintlink_storage_up Whether storage answered this scrape.\n# TYPE sprintlink_storage_up gauge"
        );
        let _ = writeln!(out, "sprintlink_storage_up {}", u8::from(stats.is_some()));
        if let Some(bytes) = stats.and_then(|s| s.storage_bytes) {
            let _ = writeln!(
                out,
                "# HELP sprintlink_storage_bytes What the database takes on disk (SQLite: file and write-ahead log; PostgreSQL: pg_database_size).\n# TYPE sprintlink_storage_bytes gauge\nsprintlink_storage_bytes {bytes}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP sprintlink_delivery_paused Whether delivery is paused for the deployment (operator or throttling).\n# TYPE sprintlink_delivery_paused gauge\nsprintlink_delivery_paused {}",
            u8::from(self.paused.load(std::sync::atomic::Ordering::Relaxed))
        );
        if let Some(s) = stats {
            let _ = writeln!(
                out,
                "# HELP sprintlink_queue_depth Links, lead resolutions and object creations waiting to be done.\n# TYPE sprintlink_queue_depth gauge\nsprintlink_queue_depth {}",
                s.queue_depth
            );
            let _ = writeln!(
                out,
                "# HELP sprintlink_dead_links Links that gave up, waiting for a replay.\n# TYPE sprintlink_dead_links gauge\nsprintlink_dead_links {}",
                s.dead_links
            );
            // 0 when nothing waits; a clock step back never shows a negative age.
            let age_ms = s
                .oldest_pending_at
                .map_or(0, |at| (crate::store::now_ms() - at).max(0));
            let _ = writeln!(
                out,
                "# HELP sprintlink_oldest_pending_seconds Age of the oldest link, lead resolution or object creation still waiting (0 when none).\n# TYPE sprintlink_oldest_pending_seconds gauge\nsprintlink_oldest_pending_seconds {:.3}",
                age_ms as f64 / 1000.0
            );
            let _ = writeln!(
                out,
                "# HELP sprintlink_events Stored events by state.\n# TYPE sprintlink_events gauge"
            );
            for state in EventState::ALL {
                let n = s
                    .events_by_state
                    .iter()
                    .find(|(k, _)| *k == state)
                    .map_or(0, |(_, n)| *n);
                let _ = writeln!(out, "sprintlink_events{{state=\"{state}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "# HELP sprintlink_links Stored links by state.\n# TYPE sprintlink_links gauge"
            );
            for state in LinkState::ALL {
                let n = s
                    .links_by_state
                    .iter()
                    .find(|(k, _)| *k == state)
                    .map_or(0, |(_, n)| *n);
                let _ = writeln!(out, "sprintlink_links{{state=\"{state}\"}} {n}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::new();
        m.webhook("erp", "queued", Duration::from_millis(2));
        m.webhook("erp", "queued", Duration::from_millis(20));
        m.attempt("success", Duration::from_millis(3));
        m.link("linked");
        m.pruned("delivered", 500);
        m.pruned("delivered", 20);
        let stats = Stats {
            queue_depth: 4,
            dead_links: 1,
            storage_bytes: Some(8192),
            ..Default::default()
        };
        let text = m.render(Some(&stats));
        assert!(
            text.contains(
                "sprintlink_webhooks_received_total{source=\"erp\",outcome=\"queued\"} 2"
            )
        );
        assert!(text.contains("sprintlink_ingest_duration_seconds_bucket{le=\"0.0025\"} 1"));
        assert!(text.contains("sprintlink_ingest_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("sprintlink_ingest_duration_seconds_count 2"));
        assert!(text.contains("sprintlink_links_total{outcome=\"linked\"} 1"));
        assert!(text.contains("sprintlink_queue_depth 4"));
        assert!(text.contains("sprintlink_dead_links 1"));
        assert!(text.contains("sprintlink_oldest_pending_seconds 0.000"));
        let old = Stats {
            oldest_pending_at: Some(crate::store::now_ms() - 90_000),
            storage_bytes: Some(8192),
            ..Default::default()
        };
        let text = m.render(Some(&old));
        let age: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("sprintlink_oldest_pending_seconds "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!((90.0..100.0).contains(&age), "{age}");
        assert!(text.contains("sprintlink_events{state=\"queued\"} 0"));
        assert!(text.contains("sprintlink_pruned_events_total{rule=\"delivered\"} 520"));
        assert!(text.contains("sprintlink_storage_bytes 8192"));
    }
}
