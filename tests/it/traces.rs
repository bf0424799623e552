//! Traces (SPEC 10): with `[telemetry] otlp_endpoint`, a span per webhook and one per SprintHub
//! call, in the webhook's trace, exported as OTLP/HTTP JSON to a receiver running in the test.
//! Without it, nothing is sent; a receiver that hangs or is absent never slows a webhook.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Uri};
use serde_json::{Value, json};
use sprintlink::config::{Scheme, SourceConfig};
use sprintlink::standin::Canned;
use sprintlink::store::{NewEvent, Plan, StoredRequest};

use crate::common::*;

const QUERY_TOKEN: &str = "QRYtok-Tr41-never-in-a-span";
const BODY_MARK: &str = "BODY-DISTINCT-Tr42-never-in-a-span";

/// One export request as the receiver got it.
#[derive(Clone)]
struct Export {
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// An OTLP/HTTP receiver: records every request's raw bytes and answers `200 {}`.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Export>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let got: Arc<Mutex<Vec<Export>>> = Arc::default();
        let sink = got.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(Export {
                    path: uri.path().to_string(),
                    content_type: headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                    body: body.to_vec(),
                });
                ([("content-type", "application/json")], "{}")
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, got }
    }

    fn exports(&self) -> Vec<Export> {
        self.got.lock().unwrap().clone()
    }

    /// Every span received, each decoded from the JSON the receiver got.
    fn spans(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for e in self.exports() {
            let v: Value = serde_json::from_slice(&e.body).expect("an export is JSON");
            for rs in v["resourceSpans"].as_array().expect("resourceSpans") {
                for ss in rs["scopeSpans"].as_array().expect("scopeSpans") {
                    out.extend(ss["spans"].as_array().expect("spans").iter().cloned());
                }
            }
        }
        out
    }

    /// Waits (10 s at most) until some received span satisfies `f`, and returns it.
    async fn wait_for(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        poll(Duration::from_secs(10), async || {
            found = self.spans().into_iter().find(|s| f(s));
            found.is_some()
        })
        .await;
        found.unwrap_or_else(|| panic!("no span {what}; received: {:?}", self.spans()))
    }
}

/// A span attribute as text (`stringValue`, or the decimal string of an `intValue`).
fn attr(span: &Value, key: &str) -> Option<String> {
    let a = span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?;
    let v = &a["value"];
    v["stringValue"]
        .as_str()
        .or_else(|| v["intValue"].as_str())
        .map(str::to_string)
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect()
}

/// A token-in-the-query source, next to the test's usual ones.
fn config_with_telemetry(endpoint: &str) -> impl FnOnce(&mut sprintlink::Config) + Send + 'static {
    let endpoint = endpoint.to_string();
    move |c| {
        c.telemetry.otlp_endpoint = Some(endpoint);
        let mut form = SourceConfig::example("formtool", QUERY_TOKEN);
        form.scheme = Scheme::Token;
        form.token_query = Some("key".into());
        c.sources.push(form);
    }
}

fn event_with_mark(id: &str, object: u64, lead: u64) -> Value {
    let mut e = erp_event(id, object, lead);
    e["data"]["note"] = json!(BODY_MARK);
    e
}

/// Posts a signed erp webhook with extra headers.
async fn post_erp(app: &TestApp, json: &Value, extra: &[(&str, &str)]) -> Resp {
    let raw = json.to_string();
    let mut headers = app.sign(
        "erp",
        raw.as_bytes(),
        unix_ms() / 1000,
        json["id"].as_str().unwrap(),
    );
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    app.post_raw("erp", raw.into_bytes(), &headers).await
}

async fn wait_linked(app: &TestApp, object: u64, lead: u64) {
    let pair = (json!(object), json!(lead));
    wait_until("the pair is linked", Duration::from_secs(10), async || {
        app.hub.linked_pairs().contains(&pair)
    })
    .await;
}

/// No secret, token, credential from a URL, or body byte in anything the receiver got.
fn assert_nothing_secret(receiver: &Receiver) {
    let exports = receiver.exports();
    assert!(!exports.is_empty());
    let secrets = [
        API_TOKEN,
        ADMIN_TOKEN,
        ERP_SECRET,
        ERP_SECRET.trim_start_matches("whsec_"),
        SHOP_SECRET,
        QUERY_TOKEN,
        BODY_MARK,
    ];
    for e in &exports {
        assert_eq!(e.path, "/v1/traces");
        assert_eq!(e.content_type.as_deref(), Some("application/json"));
        let text = String::from_utf8_lossy(&e.body);
        for s in secrets {
            assert!(!text.contains(s), "{s:?} was exported: {text}");
        }
        let v: Value = serde_json::from_slice(&e.body).unwrap();
        let resource = &v["resourceSpans"][0]["resource"];
        assert!(
            resource["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["key"] == "service.name" && a["value"]["stringValue"] == "sprintlink"),
            "{resource}"
        );
        assert_eq!(
            v["resourceSpans"][0]["scopeSpans"][0]["scope"]["name"],
            "sprintlink"
        );
    }
}

async fn an_incoming_trace_is_continued_through_the_link(b: Backend) {
    let receiver = Receiver::start().await;
    let app = TestApp::builder(b)
        .config(config_with_telemetry(&receiver.url))
        .spawn()
        .await;
    let (trace_id, parent_id) = (random_hex(16), random_hex(8));
    let traceparent = format!("00-{trace_id}-{parent_id}-01");
    post_erp(
        &app,
        &event_with_mark("evt_tr1", 7101, 8101),
        &[("traceparent", &traceparent)],
    )
    .await
    .expect(202);
    wait_linked(&app, 7101, 8101).await;

    let webhook = receiver
        .wait_for("for the webhook", |s| {
            attr(s, "sprintlink.event_id").as_deref() == Some("evt_tr1")
        })
        .await;
    assert_eq!(webhook["kind"], 2, "SERVER: {webhook}");
    assert_eq!(webhook["traceId"], trace_id.as_str());
    assert_eq!(webhook["parentSpanId"], parent_id.as_str());
    assert_eq!(attr(&webhook, "sprintlink.source").as_deref(), Some("erp"));
    assert_eq!(
        attr(&webhook, "sprintlink.outcome").as_deref(),
        Some("queued")
    );
    assert_eq!(
        attr(&webhook, "http.response.status_code").as_deref(),
        Some("202")
    );
    assert_eq!(webhook["status"]["code"], 1);
    // The operator sees the trace on the event.
    assert_eq!(app.event("evt_tr1").await["trace_id"], trace_id.as_str());
    let span_id = webhook["spanId"].as_str().unwrap().to_string();
    assert_eq!(span_id.len(), 16);
    assert_ne!(span_id, parent_id);

    let link = receiver
        .wait_for("for the link call", |s| {
            s["parentSpanId"] == span_id.as_str()
                && attr(s, "sprintlink.operation").as_deref() == Some("link")
        })
        .await;
    assert_eq!(link["kind"], 3, "CLIENT: {link}");
    assert_eq!(link["traceId"], trace_id.as_str());
    assert_eq!(
        attr(&link, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(&link, "sprintlink.object_id").as_deref(), Some("7101"));
    assert!(attr(&link, "sprintlink.duration_ms").is_some());
    let start: u64 = link["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u64 = link["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(end >= start && start > 1_600_000_000_000_000_000);

    // A credential in the query string, a rejected request and a malformed traceparent.
    let r = app
        .client
        .post(app.url(&format!("/webhooks/formtool?key={QUERY_TOKEN}")))
        .header("content-type", "application/json")
        .header("traceparent", "00-NOT-A-VALID-TRACEPARENT-01")
        .body(event_with_mark("evt_tr2", 7102, 8102).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        202,
        "a malformed traceparent is never a rejection"
    );
    wait_linked(&app, 7102, 8102).await;
    let fresh = receiver
        .wait_for("for the query-token webhook", |s| {
            attr(s, "sprintlink.event_id").as_deref() == Some("evt_tr2")
        })
        .await;
    assert!(fresh.get("parentSpanId").is_none(), "a new trace: {fresh}");
    assert_ne!(fresh["traceId"], trace_id.as_str());
    let raw = event_with_mark("evt_tr3", 7103, 8103).to_string();
    app.post_raw(
        "erp",
        raw.into_bytes(),
        &[
            ("webhook-id".into(), "evt_tr3".into()),
            ("webhook-timestamp".into(), (unix_ms() / 1000).to_string()),
            ("webhook-signature".into(), "v1,AAAA".into()),
            ("traceparent".into(), traceparent.clone()),
        ],
    )
    .await
    .expect_error(401, "invalid_signature");
    let rejected = receiver
        .wait_for("for the rejected webhook", |s| {
            attr(s, "sprintlink.error_code").as_deref() == Some("invalid_signature")
        })
        .await;
    assert_eq!(
        attr(&rejected, "sprintlink.outcome").as_deref(),
        Some("rejected")
    );
    assert_eq!(
        attr(&rejected, "http.response.status_code").as_deref(),
        Some("401")
    );
    assert_eq!(rejected["traceId"], trace_id.as_str());
    assert_nothing_secret(&receiver);
    let metrics = app.metrics().await;
    assert!(
        !metrics.contains("sprintlink_trace_spans_exported_total 0\n"),
        "{metrics}"
    );
}

async fn without_traceparent_a_fresh_trace_joins_webhook_and_link(b: Backend) {
    let receiver = Receiver::start().await;
    let app = TestApp::builder(b)
        .config(config_with_telemetry(&receiver.url))
        .spawn()
        .await;
    post_erp(&app, &event_with_mark("evt_tr4", 7104, 8104), &[])
        .await
        .expect(202);
    wait_linked(&app, 7104, 8104).await;
    let webhook = receiver
        .wait_for("for the webhook", |s| {
            attr(s, "sprintlink.event_id").as_deref() == Some("evt_tr4")
        })
        .await;
    assert!(webhook.get("parentSpanId").is_none(), "{webhook}");
    let trace_id = webhook["traceId"].as_str().unwrap().to_string();
    assert_eq!(trace_id.len(), 32);
    assert_ne!(trace_id, "0".repeat(32));
    let link = receiver
        .wait_for("for the link call", |s| {
            s["parentSpanId"] == webhook["spanId"]
        })
        .await;
    assert_eq!(link["traceId"], trace_id.as_str());
    assert_eq!(attr(&link, "sprintlink.operation").as_deref(), Some("link"));
    assert_nothing_secret(&receiver);
}

async fn a_replay_keeps_the_stored_trace(b: Backend) {
    let receiver = Receiver::start().await;
    let app = TestApp::builder(b)
        .config(config_with_telemetry(&receiver.url))
        .spawn()
        .await;
    app.hub.script([Canned::new(400, r#"{"msg":"no"}"#)]);
    let (trace_id, parent_id) = (random_hex(16), random_hex(8));
    post_erp(
        &app,
        &erp_event("evt_tr5", 7105, 8105),
        &[("traceparent", &format!("00-{trace_id}-{parent_id}-01"))],
    )
    .await
    .expect(202);
    app.wait_for_state("evt_tr5", "dead").await;
    let refused = receiver
        .wait_for("for the refused link call", |s| {
            s["traceId"] == trace_id.as_str() && s["kind"] == 3
        })
        .await;
    assert_eq!(refused["status"]["code"], 2, "an error: {refused}");
    assert_eq!(attr(&refused, "error.type").as_deref(), Some("rejected"));
    assert_eq!(
        attr(&refused, "http.response.status_code").as_deref(),
        Some("400")
    );
    app.replay("evt_tr5").await;
    wait_linked(&app, 7105, 8105).await;
    let webhook_span = receiver
        .wait_for("for the webhook", |s| s["kind"] == 2)
        .await["spanId"]
        .clone();
    let again = receiver
        .wait_for("for the replayed link call", |s| {
            s["traceId"] == trace_id.as_str()
                && attr(s, "http.response.status_code").as_deref() == Some("200")
        })
        .await;
    assert_eq!(again["parentSpanId"], webhook_span);
    assert_eq!(refused["parentSpanId"], webhook_span);
}

async fn an_event_stored_without_a_trace_still_delivers_in_a_new_trace(b: Backend) {
    let receiver = Receiver::start().await;
    let app = TestApp::builder(b)
        .config(config_with_telemetry(&receiver.url))
        .spawn()
        .await;
    // As a row written before schema version 8 (or with tracing off) has it: no context.
    let store = app.running.as_ref().unwrap().state.store.clone();
    let body = erp_event("evt_tr6", 7106, 8106).to_string();
    store
        .ingest(&[NewEvent {
            source: "erp".into(),
            event_id: "evt_tr6".into(),
            event_type: Some("object.created".into()),
            received_at: unix_ms(),
            request: StoredRequest::json(body),
            object_id: Some("7106".into()),
            plan: Plan::Links(vec!["8106".into()]),
            trace: None,
        }])
        .await
        .unwrap();
    app.running.as_ref().unwrap().state.wake.notify_one();
    wait_linked(&app, 7106, 8106).await;
    let link = receiver
        .wait_for("for the link call", |s| {
            attr(s, "sprintlink.object_id").as_deref() == Some("7106")
        })
        .await;
    assert!(link.get("parentSpanId").is_none(), "a root span: {link}");
    assert_eq!(app.event("evt_tr6").await["trace_id"], Value::Null);
    assert_eq!(link["traceId"].as_str().map(str::len), Some(32));
}

/// A receiver that accepts connections and never answers.
async fn hanging_receiver() -> (String, Arc<Mutex<usize>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted: Arc<Mutex<usize>> = Arc::default();
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            *count.lock().unwrap() += 1;
            held.push(conn);
        }
    });
    (url, accepted)
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

async fn a_receiver_that_never_answers_slows_no_webhook(b: Backend) {
    let (url, accepted) = hanging_receiver().await;
    let app = TestApp::builder(b)
        .config(config_with_telemetry(&url))
        .config(|c| c.telemetry.queue_size = 8)
        .spawn()
        .await;
    post_erp(&app, &erp_event("evt_hang0", 7200, 8200), &[])
        .await
        .expect(202);
    // The exporter is now stuck in its first export (up to export_timeout_ms, 5 s).
    wait_until(
        "the exporter connects",
        Duration::from_secs(5),
        async || *accepted.lock().unwrap() > 0,
    )
    .await;
    let started = Instant::now();
    for i in 1..=50u64 {
        post_erp(
            &app,
            &erp_event(&format!("evt_hang{i}"), 7200 + i, 8200),
            &[],
        )
        .await
        .expect(202);
    }
    let took = started.elapsed();
    eprintln!(
        "50 webhooks with a hanging OTLP receiver ({}): {took:?}",
        b.name()
    );
    assert!(
        took < Duration::from_secs(10),
        "50 webhooks took {took:?} with a hanging receiver"
    );
    wait_linked(&app, 7250, 8200).await;
    let mut metrics = String::new();
    let rose = poll(Duration::from_secs(15), async || {
        metrics = app.metrics().await;
        counter(&metrics, "sprintlink_trace_spans_dropped_total") > 0
            && counter(&metrics, "sprintlink_trace_exports_failed_total") > 0
            && counter(&metrics, "sprintlink_trace_spans_failed_total") > 0
    })
    .await;
    assert!(rose, "{metrics}");
    assert_eq!(
        counter(&metrics, "sprintlink_trace_spans_exported_total"),
        0
    );
}

async fn an_absent_receiver_counts_failed_exports(b: Backend) {
    let url = format!("http://127.0.0.1:{}", free_port());
    let app = TestApp::builder(b)
        .config(config_with_telemetry(&url))
        .spawn()
        .await;
    let started = Instant::now();
    for i in 0..10u64 {
        post_erp(
            &app,
            &erp_event(&format!("evt_abs{i}"), 7300 + i, 8300),
            &[],
        )
        .await
        .expect(202);
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    wait_linked(&app, 7309, 8300).await;
    let mut metrics = String::new();
    let rose = poll(Duration::from_secs(10), async || {
        metrics = app.metrics().await;
        counter(&metrics, "sprintlink_trace_spans_failed_total") > 0
    })
    .await;
    assert!(rose, "{metrics}");
}

async fn without_telemetry_the_receiver_gets_nothing(b: Backend) {
    let receiver = Receiver::start().await;
    let app = TestApp::spawn(b).await;
    assert!(app.config.telemetry.otlp_endpoint.is_none());
    post_erp(
        &app,
        &erp_event("evt_off", 7400, 8400),
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    )
    .await
    .expect(202);
    wait_linked(&app, 7400, 8400).await;
    // Nothing is stored either: the incoming context is not even read.
    assert_eq!(app.event("evt_off").await["trace_id"], Value::Null);
    // Longer than a batch interval: an enabled exporter would have sent by now.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(receiver.exports().is_empty());
    let metrics = app.metrics().await;
    assert_eq!(
        counter(&metrics, "sprintlink_trace_spans_exported_total"),
        0
    );
    assert_eq!(counter(&metrics, "sprintlink_trace_spans_dropped_total"), 0);
}

both_backends!(
    an_incoming_trace_is_continued_through_the_link,
    without_traceparent_a_fresh_trace_joins_webhook_and_link,
    a_replay_keeps_the_stored_trace,
    an_event_stored_without_a_trace_still_delivers_in_a_new_trace,
    a_receiver_that_never_answers_slows_no_webhook,
    an_absent_receiver_counts_failed_exports,
    without_telemetry_the_receiver_gets_nothing,
);
