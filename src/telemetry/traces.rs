//! OpenTelemetry traces over OTLP/HTTP with the JSON encoding (SPEC 10), without an SDK: W3C
//! `traceparent` parsing and formatting, finished span records, and an exporter task that batches
//! them and POSTs `{otlp_endpoint}/v1/traces`.
//!
//! Recording never waits: a finished span goes into a bounded queue with `try_send`; a full queue
//! drops the span and counts it. The exporter sends a batch when it holds `MAX_BATCH` spans or
//! every `BATCH_INTERVAL`; a failed or timed-out export drops its batch and counts it. Sampling
//! follows the parent (an incoming `traceparent` without the sampled flag is continued but not
//! exported), and a trace that starts here is always sampled.
//!
//! A span carries ids, names, outcomes and status codes only: never the API token, a webhook
//! secret, a credential from a URL or a body. Callers choose the attributes; this module knows
//! nothing of routes or storage.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::TelemetryConfig;
use crate::telemetry::Metrics;

/// The most spans in one export request.
pub const MAX_BATCH: usize = 512;
/// How often a partial batch is sent.
pub const BATCH_INTERVAL: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// W3C Trace Context

/// Where a span sits in a trace: what a `traceparent` header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The `sampled` flag: whether spans of this trace are recorded and exported.
    pub sampled: bool,
}

/// Why a `traceparent` value was not used (the request then starts a new trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceparentError {
    #[error("not four dash-separated fields of the W3C lengths")]
    Shape,
    #[error("a field is not lowercase hexadecimal")]
    Hex,
    #[error("version ff is invalid")]
    InvalidVersion,
    #[error("the trace id is all zeros")]
    ZeroTraceId,
    #[error("the parent id is all zeros")]
    ZeroSpanId,
}

/// Lowercase hex of `bytes` into `N * 2` characters.
fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Lowercase hex only: the W3C format forbids uppercase.
fn parse_hex<const N: usize>(bytes: &[u8]) -> Result<[u8; N], TraceparentError> {
    if bytes.len() != N * 2 {
        return Err(TraceparentError::Shape);
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(TraceparentError::Hex),
    };
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Ok(out)
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The OS generator; fastrand if it is unavailable (ids need to be unique, not secret).
    if getrandom::fill(&mut out).is_err() {
        out.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    out
}

/// Random bytes that are not all zero (an all-zero id is invalid).
fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let id = random::<N>();
        if id.iter().any(|b| *b != 0) {
            return id;
        }
    }
}

impl TraceContext {
    /// Parses a `traceparent` header value. Version `00` must be exactly
    /// `00-{32 hex}-{16 hex}-{2 hex}`; a later version (not `ff`) is read by its first four fields,
    /// as the W3C recommendation says, provided what follows them starts with `-`.
    pub fn parse(text: &str) -> Result<TraceContext, TraceparentError> {
        let text = text.trim_matches([' ', '\t']);
        // 2 + 1 + 32 + 1 + 16 + 1 + 2: the length of a version 00 value.
        const LEN: usize = 55;
        let (head, rest) = text
            .as_bytes()
            .split_at_checked(LEN)
            .ok_or(TraceparentError::Shape)?;
        let version: [u8; 1] = parse_hex(&head[0..2])?;
        match version[0] {
            0xff => return Err(TraceparentError::InvalidVersion),
            0x00 if !rest.is_empty() => return Err(TraceparentError::Shape),
            _ if !rest.is_empty() && rest[0] != b'-' => return Err(TraceparentError::Shape),
            _ => {}
        }
        if head[2] != b'-' || head[35] != b'-' || head[52] != b'-' {
            return Err(TraceparentError::Shape);
        }
        let trace_id: [u8; 16] = parse_hex(&head[3..35])?;
        let span_id: [u8; 8] = parse_hex(&head[36..52])?;
        let flags: [u8; 1] = parse_hex(&head[53..55])?;
        if trace_id == [0; 16] {
            return Err(TraceparentError::ZeroTraceId);
        }
        if span_id == [0; 8] {
            return Err(TraceparentError::ZeroSpanId);
        }
        Ok(TraceContext {
            trace_id,
            span_id,
            sampled: flags[0] & 1 == 1,
        })
    }

    /// The `traceparent` value (version 00) naming this span as the parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            lower_hex(&self.trace_id),
            lower_hex(&self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }

    /// A new trace, sampled.
    pub fn root() -> TraceContext {
        TraceContext {
            trace_id: nonzero(),
            span_id: nonzero(),
            sampled: true,
        }
    }

    /// A new span of the same trace, with this one's sampling decision.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: nonzero(),
            ..*self
        }
    }

    pub fn trace_id_hex(&self) -> String {
        lower_hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        lower_hex(&self.span_id)
    }
}

// ---------------------------------------------------------------------------------------------
// Spans

/// OTLP's `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// An attribute value: OTLP's `stringValue` or `intValue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::Str(s.to_string())
    }
}

impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Str(s)
    }
}

impl From<i64> for AttrValue {
    fn from(n: i64) -> Self {
        AttrValue::Int(n)
    }
}

impl From<u16> for AttrValue {
    fn from(n: u16) -> Self {
        AttrValue::Int(i64::from(n))
    }
}

/// A finished span, as it is queued for export.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    /// This span's trace id, span id and sampling decision.
    pub context: TraceContext,
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: SpanKind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// `false`: OTLP status code 2 (error); `true`: 1 (ok).
    pub ok: bool,
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A span being timed: started now, sent to the exporter by [`Span::end`]. Dropped without
/// `end` (a request cancelled midway), it is not exported.
pub struct Span {
    record: SpanRecord,
    started: Instant,
    tracer: Tracer,
}

impl Span {
    /// This span's context: what a child names as its parent.
    pub fn context(&self) -> TraceContext {
        self.record.context
    }

    pub fn set(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        self.record.attributes.push((key, value.into()));
    }

    pub fn set_error(&mut self) {
        self.record.ok = false;
    }

    /// Ends the span now and queues it (when its trace is sampled).
    pub fn end(mut self) {
        let took = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.record.end_unix_nanos = self.record.start_unix_nanos.saturating_add(took);
        let Tracer(tracer) = &self.tracer;
        if let Some(inner) = tracer.as_ref() {
            inner.record(self.record);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The OTLP/HTTP JSON encoding

fn attribute(key: &str, value: &AttrValue) -> Value {
    match value {
        AttrValue::Str(s) => json!({"key": key, "value": {"stringValue": s}}),
        // OTLP/JSON writes 64-bit integers as decimal strings.
        AttrValue::Int(n) => json!({"key": key, "value": {"intValue": n.to_string()}}),
    }
}

/// What the resource of every exported span says about this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub service_name: String,
    pub service_version: String,
}

/// An `ExportTraceServiceRequest` in the OTLP/JSON mapping: lowerCamelCase names, ids as
/// lowercase hex (not base64), times and integers as decimal strings, enums as numbers.
pub fn export_request(resource: &Resource, spans: &[SpanRecord]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": s.context.trace_id_hex(),
                "spanId": s.context.span_id_hex(),
                "name": s.name,
                "kind": s.kind as i32,
                "startTimeUnixNano": s.start_unix_nanos.to_string(),
                "endTimeUnixNano": s.end_unix_nanos.to_string(),
                "attributes": s.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
                "status": {"code": if s.ok { 1 } else { 2 }},
            });
            if let Some(parent) = &s.parent_span_id {
                span["parentSpanId"] = Value::String(lower_hex(parent));
            }
            if s.context.sampled {
                // W3C trace flags in the low byte: sampled.
                span["flags"] = json!(1);
            }
            span
        })
        .collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                attribute("service.name", &AttrValue::Str(resource.service_name.clone())),
                attribute("service.version", &AttrValue::Str(resource.service_version.clone())),
            ]},
            "scopeSpans": [{
                "scope": {"name": "sprintlink", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }]
    })
}

// ---------------------------------------------------------------------------------------------
// The tracer and its exporter

struct Inner {
    tx: mpsc::Sender<SpanRecord>,
    metrics: Arc<Metrics>,
    /// Tells the exporter to send what is queued and stop.
    flush: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    fn record(&self, span: SpanRecord) {
        if !span.context.sampled {
            return;
        }
        if self.tx.try_send(span).is_err() {
            self.metrics.trace_spans("dropped", 1);
        }
    }
}

/// Where spans go. Cheap to clone; disabled (every span ignored, nothing running) unless
/// `[telemetry] otlp_endpoint` is set.
#[derive(Clone, Default)]
pub struct Tracer(Option<Arc<Inner>>);

impl Tracer {
    pub fn disabled() -> Tracer {
        Tracer(None)
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Starts the exporter for `cfg` (nothing when no endpoint is set).
    pub fn start(cfg: &TelemetryConfig, metrics: Arc<Metrics>) -> Result<Tracer, String> {
        let Some(endpoint) = &cfg.otlp_endpoint else {
            return Ok(Tracer::disabled());
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.export_timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.export_timeout_ms))
            .user_agent(concat!("sprintlink/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the OTLP client: {}", e.without_url()))?;
        let (tx, rx) = mpsc::channel(cfg.queue_size);
        let flush = CancellationToken::new();
        let exporter = Exporter {
            client,
            url: format!("{}/v1/traces", endpoint.trim_end_matches('/')),
            resource: Resource {
                service_name: cfg.service_name.clone(),
                service_version: env!("CARGO_PKG_VERSION").to_string(),
            },
            metrics: metrics.clone(),
            failing: false,
        };
        let task = tokio::spawn(exporter.run(rx, flush.clone()));
        Ok(Tracer(Some(Arc::new(Inner {
            tx,
            metrics,
            flush,
            task: Mutex::new(Some(task)),
        }))))
    }

    /// A span starting now with context `context` (its parent, when it has one, in
    /// `parent_span_id`); `None` when tracing is off.
    pub fn span(
        &self,
        name: impl Into<String>,
        kind: SpanKind,
        context: TraceContext,
        parent_span_id: Option<[u8; 8]>,
    ) -> Option<Span> {
        self.0.as_ref()?;
        Some(Span {
            record: SpanRecord {
                context,
                parent_span_id,
                name: name.into(),
                kind,
                start_unix_nanos: unix_nanos(SystemTime::now()),
                end_unix_nanos: 0,
                attributes: Vec::new(),
                ok: true,
            },
            started: Instant::now(),
            tracer: self.clone(),
        })
    }

    /// A span that is a child of `parent` (a new trace when there is none); `None` when tracing
    /// is off.
    pub fn child_span(
        &self,
        name: impl Into<String>,
        kind: SpanKind,
        parent: Option<TraceContext>,
    ) -> Option<Span> {
        self.0.as_ref()?;
        let (context, parent_id) = match parent {
            Some(p) => (p.child(), Some(p.span_id)),
            None => (TraceContext::root(), None),
        };
        self.span(name, kind, context, parent_id)
    }

    /// Sends what is queued and stops the exporter, waiting at most `deadline`; spans recorded
    /// afterwards are dropped (and counted).
    pub async fn shutdown(&self, deadline: Duration) {
        let Some(inner) = &self.0 else { return };
        inner.flush.cancel();
        let task = inner.task.lock().expect("tracer lock").take();
        if let Some(mut task) = task
            && tokio::time::timeout(deadline, &mut task).await.is_err()
        {
            task.abort();
            tracing::warn!("the trace exporter did not finish within its deadline; spans lost");
        }
    }
}

struct Exporter {
    client: reqwest::Client,
    url: String,
    resource: Resource,
    metrics: Arc<Metrics>,
    /// The previous export failed: the next failure is logged at debug level only.
    failing: bool,
}

impl Exporter {
    async fn run(mut self, mut rx: mpsc::Receiver<SpanRecord>, flush: CancellationToken) {
        let mut batch: Vec<SpanRecord> = Vec::with_capacity(MAX_BATCH);
        let mut tick = tokio::time::interval(BATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = flush.cancelled() => break,
                n = rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    if batch.len() >= MAX_BATCH {
                        self.export(&mut batch).await;
                    }
                }
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        self.export(&mut batch).await;
                    }
                }
            }
        }
        // Shutdown: what is queued now goes out (the caller bounds how long this may take).
        rx.close();
        while let Some(span) = rx.recv().await {
            batch.push(span);
            if batch.len() >= MAX_BATCH {
                self.export(&mut batch).await;
            }
        }
        if !batch.is_empty() {
            self.export(&mut batch).await;
        }
    }

    /// One POST of the batch (emptied either way): a failure drops it and is counted.
    async fn export(&mut self, batch: &mut Vec<SpanRecord>) {
        let n = batch.len() as u64;
        let body = export_request(&self.resource, batch);
        batch.clear();
        let sent = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let error = match sent {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(format!("HTTP {}", resp.status().as_u16())),
            Err(e) => Some(e.without_url().to_string()),
        };
        match error {
            None => {
                self.metrics.trace_spans("exported", n);
                if self.failing {
                    tracing::info!("trace export works again");
                }
                self.failing = false;
            }
            Some(error) => {
                self.metrics.trace_spans("failed", n);
                self.metrics.trace_export_failed();
                if self.failing {
                    tracing::debug!(spans = n, error = %error, "trace export failed; batch dropped");
                } else {
                    tracing::warn!(spans = n, error = %error, "trace export failed; batch dropped (further failures are logged at debug level until one succeeds)");
                }
                self.failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W3C_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_w3c_examples() {
        let c = TraceContext::parse(W3C_EXAMPLE).unwrap();
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id_hex(), "00f067aa0ba902b7");
        assert!(c.sampled);
        assert_eq!(c.traceparent(), W3C_EXAMPLE);
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        // Other flag bits are not ours to keep; only `sampled` is read.
        assert!(
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09")
                .unwrap()
                .sampled
        );
    }

    #[test]
    fn refuses_what_the_spec_forbids() {
        use TraceparentError::*;
        let cases = [
            // Uppercase hex.
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                Hex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
                Hex,
            ),
            // All-zero ids.
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                ZeroSpanId,
            ),
            // Version ff.
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                InvalidVersion,
            ),
            // Wrong lengths, separators, trailing data on version 00.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                Shape,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-701",
                Shape,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Shape,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                Shape,
            ),
            ("", Shape),
            (
                "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Hex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                Hex,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(TraceContext::parse(text), Err(want), "{text}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let c = TraceContext::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-next",
        )
        .unwrap();
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            Err(TraceparentError::Shape)
        );
    }

    #[test]
    fn children_keep_the_trace_and_get_a_new_span_id() {
        let root = TraceContext::root();
        assert!(root.sampled && root.trace_id != [0; 16] && root.span_id != [0; 8]);
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_ne!(TraceContext::root().trace_id, root.trace_id);
    }

    #[test]
    fn encodes_the_otlp_json_mapping() {
        let parent = TraceContext::parse(W3C_EXAMPLE).unwrap();
        let span = SpanRecord {
            context: TraceContext {
                span_id: [1, 2, 3, 4, 5, 6, 7, 0xab],
                ..parent
            },
            parent_span_id: Some(parent.span_id),
            name: "POST /webhooks/{source}".into(),
            kind: SpanKind::Server,
            start_unix_nanos: 1_700_000_000_000_000_001,
            end_unix_nanos: 1_700_000_000_500_000_000,
            attributes: vec![
                ("sprintlink.source", "erp".into()),
                ("http.response.status_code", AttrValue::Int(202)),
            ],
            ok: false,
        };
        let resource = Resource {
            service_name: "svc".into(),
            service_version: "1.2.3".into(),
        };
        let v = export_request(&resource, &[span]);
        let rs = &v["resourceSpans"][0];
        assert_eq!(
            rs["resource"]["attributes"][0],
            json!({"key": "service.name", "value": {"stringValue": "svc"}})
        );
        assert_eq!(
            rs["resource"]["attributes"][1],
            json!({"key": "service.version", "value": {"stringValue": "1.2.3"}})
        );
        assert_eq!(rs["scopeSpans"][0]["scope"]["name"], "sprintlink");
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["spanId"], "01020304050607ab");
        assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(s["kind"], 2);
        assert_eq!(s["startTimeUnixNano"], "1700000000000000001");
        assert_eq!(s["endTimeUnixNano"], "1700000000500000000");
        assert_eq!(
            s["attributes"][1],
            json!({"key": "http.response.status_code", "value": {"intValue": "202"}})
        );
        assert_eq!(s["status"], json!({"code": 2}));
        // A root span has no parentSpanId at all.
        let root = SpanRecord {
            parent_span_id: None,
            kind: SpanKind::Client,
            ok: true,
            ..SpanRecord {
                context: parent,
                parent_span_id: None,
                name: "x".into(),
                kind: SpanKind::Internal,
                start_unix_nanos: 1,
                end_unix_nanos: 2,
                attributes: vec![],
                ok: true,
            }
        };
        let v = export_request(&resource, &[root]);
        let s = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert!(s.get("parentSpanId").is_none());
        assert_eq!(s["kind"], 3);
        assert_eq!(s["status"], json!({"code": 1}));
    }

    #[tokio::test]
    async fn a_disabled_tracer_makes_no_spans() {
        let t = Tracer::disabled();
        assert!(!t.enabled());
        assert!(t.child_span("x", SpanKind::Internal, None).is_none());
        t.shutdown(Duration::from_millis(10)).await;
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let metrics = Arc::new(Metrics::new());
        // Nothing listens on port 9 of the loopback: exports fail fast.
        let cfg = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:9".into()),
            queue_size: 2,
            export_timeout_ms: 200,
            ..TelemetryConfig::default()
        };
        let t = Tracer::start(&cfg, metrics.clone()).unwrap();
        for _ in 0..50 {
            t.child_span("x", SpanKind::Internal, None).unwrap().end();
        }
        // Unsampled spans are not queued at all.
        let unsampled = TraceContext {
            sampled: false,
            ..TraceContext::root()
        };
        t.span("y", SpanKind::Internal, unsampled, None)
            .unwrap()
            .end();
        assert!(metrics.trace_span_count("dropped") >= 48);
        t.shutdown(Duration::from_secs(5)).await;
        let failed = metrics.trace_span_count("failed");
        assert!((1..=2).contains(&failed), "{failed}");
        assert_eq!(
            metrics.trace_span_count("dropped") + failed,
            50,
            "every sampled span is counted once"
        );
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_queued() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let got: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        let sink = got.clone();
        let app =
            axum::Router::new().fallback(move |uri: axum::http::Uri, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    sink.lock().unwrap().push((uri.path().to_string(), v));
                    "{}"
                }
            });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let metrics = Arc::new(Metrics::new());
        let cfg = TelemetryConfig {
            otlp_endpoint: Some(format!("{endpoint}/")),
            ..TelemetryConfig::default()
        };
        let t = Tracer::start(&cfg, metrics.clone()).unwrap();
        let parent = TraceContext::root();
        for _ in 0..3 {
            t.child_span("x", SpanKind::Client, Some(parent))
                .unwrap()
                .end();
        }
        // Well before the batch interval: only the flush can have sent them.
        t.shutdown(Duration::from_secs(5)).await;
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "one request");
        assert_eq!(got[0].0, "/v1/traces");
        let spans = &got[0].1["resourceSpans"][0]["scopeSpans"][0]["spans"];
        assert_eq!(spans.as_array().map(Vec::len), Some(3));
        assert_eq!(spans[0]["traceId"], parent.trace_id_hex());
        assert_eq!(spans[0]["parentSpanId"], parent.span_id_hex());
        assert_eq!(metrics.trace_span_count("exported"), 3);
        // After shutdown, spans are dropped and counted, never sent.
        t.child_span("late", SpanKind::Internal, None)
            .unwrap()
            .end();
        assert_eq!(metrics.trace_span_count("dropped"), 1);
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in ".{0,80}") {
            let _ = TraceContext::parse(&text);
        }

        #[test]
        fn format_then_parse_round_trips(
            trace in proptest::array::uniform16(any::<u8>()),
            span in proptest::array::uniform8(any::<u8>()),
            sampled in any::<bool>(),
        ) {
            prop_assume!(trace != [0; 16] && span != [0; 8]);
            let c = TraceContext { trace_id: trace, span_id: span, sampled };
            prop_assert_eq!(TraceContext::parse(&c.traceparent()), Ok(c));
        }

        #[test]
        fn near_valid_values_never_panic(
            cut in 0usize..60,
            c in proptest::char::any(),
        ) {
            let mut s = W3C_EXAMPLE.to_string();
            let at = cut.min(s.len());
            s.insert(at, c);
            let _ = TraceContext::parse(&s);
        }
    }
}
