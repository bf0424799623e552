//! Alerts (SPEC 10) to a local receiver: a notification for each kind the stand-in can provoke,
//! coalescing, a failing receiver that costs ingest nothing, the slack and json bodies, one
//! notification from a fleet of two, a storage fault, and `sprintlink alert-test`.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::{Value, json};
use sprintlink::config::{AlertFormat, AlertKind, AlertTarget};
use sprintlink::signature::Verifier;
use sprintlink::standin::Canned;

use crate::common::*;

const ALERT_SECRET: &str = "whsec_c2VjcmV0LWZvci1hbGVydHMtb25seS0xMjM0NTY=";
/// The part of a webhook URL that is its secret: never printed.
const SECRET_PATH: &str = "/services/T0/B0/s3cr3tPathPart";

/// What a receiver got: headers and the raw body.
#[derive(Clone)]
struct Got {
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a notification is JSON")
    }
}

/// A local alert receiver answering `status` to every POST.
#[derive(Clone)]
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Got>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    async fn start(status: u16) -> Receiver {
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(status));
        let (g, s) = (got.clone(), status.clone());
        let app =
            axum::Router::new().fallback(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (g, s) = (g.clone(), s.clone());
                async move {
                    g.lock().unwrap().push(Got {
                        headers,
                        body: body.to_vec(),
                    });
                    axum::http::StatusCode::from_u16(s.load(Ordering::SeqCst)).unwrap()
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}{SECRET_PATH}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { url, got, status }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.got()
            .iter()
            .map(Got::json)
            .filter(|v| v["kind"] == kind)
            .collect()
    }

    async fn wait_for_kind(&self, kind: &str) -> Value {
        let me = self.clone();
        wait_until(
            &format!("a {kind} notification"),
            Duration::from_secs(20),
            async || !me.of_kind(kind).is_empty(),
        )
        .await;
        self.of_kind(kind).remove(0)
    }
}

fn json_target(url: &str, on: &[AlertKind]) -> AlertTarget {
    let mut t = AlertTarget::new(url, AlertFormat::Json, Some(ALERT_SECRET));
    t.on = on.to_vec();
    t.min_interval = Duration::from_secs(3600);
    t
}

/// The Standard Webhooks verifier the service uses for its own senders, keyed for alerts.
fn alert_verifier() -> Verifier {
    Verifier::from_source(&sprintlink::config::SourceConfig::example(
        "alerts",
        ALERT_SECRET,
    ))
}

fn throttled() -> Canned {
    Canned::new(401, r#"{"msg": "Too many requests, slow down"}"#)
}

async fn each_kind_reaches_a_local_receiver(b: Backend) {
    let rx = Receiver::start(200).await;
    let url = rx.url.clone();
    let app = TestApp::builder(b)
        .config(move |c| {
            let mut t = json_target(&url, &AlertKind::ALL);
            t.backlog_age = Duration::from_secs(1);
            c.alerts = vec![t];
        })
        .spawn()
        .await;

    // dead: a 400 is final.
    app.hub
        .script([Canned::new(400, r#"{"msg": "bad object"}"#)]);
    app.post_webhook("erp", &erp_event("evt_dead", 10, 20))
        .await
        .expect(202);
    let dead = rx.wait_for_kind("dead").await;
    assert_eq!(dead["count"], 1);
    assert_eq!(dead["examples"][0]["event_id"], "evt_dead");
    assert_eq!(dead["examples"][0]["object_id"], "10");
    assert_eq!(dead["examples"][0]["lead_id"], "20");
    assert!(
        dead["examples"][0]["error"]
            .as_str()
            .unwrap()
            .contains("HTTP 400"),
        "{dead}"
    );

    // parked at ingest: no lead.
    let no_lead = json!({"id": "evt_park", "type": "object.created", "data": {"object_id": 7}});
    app.post_webhook("erp", &no_lead).await.expect(202);
    let parked = rx.wait_for_kind("parked").await;
    assert_eq!(parked["examples"][0]["event_id"], "evt_park");
    assert_eq!(parked["examples"][0]["source"], "erp");

    // credentials: a plain 401, then success.
    app.hub
        .script([Canned::new(401, r#"{"msg": "invalid token"}"#)]);
    app.post_webhook("erp", &erp_event("evt_auth", 11, 21))
        .await
        .expect(202);
    let creds = rx.wait_for_kind("credentials").await;
    assert_eq!(creds["examples"][0]["event_id"], "evt_auth");

    // throttled: SprintHub's 401 "too many requests"; the link then waits a minute, pending,
    // which with backlog_age = 1s is also a backlog.
    app.hub.script([throttled()]);
    app.post_webhook("erp", &erp_event("evt_slow", 12, 22))
        .await
        .expect(202);
    let thr = rx.wait_for_kind("throttled").await;
    assert_eq!(thr["examples"][0]["event_id"], "evt_slow");
    let backlog = rx.wait_for_kind("backlog").await;
    assert!(
        backlog["examples"][0]["error"]
            .as_str()
            .unwrap()
            .contains("backlog_age 1s"),
        "{backlog}"
    );

    // Every notification is signed, has the SPEC's shape and holds neither token nor body.
    let verifier = alert_verifier();
    for g in rx.got() {
        let v = g.json();
        assert_eq!(v["type"], "sprintlink.alert");
        assert!(v["count"].as_u64().is_some_and(|n| n >= 1), "{v}");
        assert!(v["at"].as_str().is_some_and(|a| a.ends_with('Z')), "{v}");
        verifier
            .verify(&g.headers, &g.body, unix_ms() / 1000)
            .unwrap_or_else(|e| panic!("the signature verifies: {e:?}"));
        let text = String::from_utf8_lossy(&g.body);
        assert!(!text.contains(API_TOKEN), "{text}");
        assert!(!text.contains("object.created"), "no event body: {text}");
    }
    let metrics = app.metrics().await;
    for kind in ["dead", "parked", "credentials", "throttled", "backlog"] {
        assert!(
            metrics.contains(&format!(
                "sprintlink_alerts_total{{kind=\"{kind}\",outcome=\"sent\"}} 1"
            )),
            "{kind}: {metrics}"
        );
    }
    assert!(
        !captured_logs().contains("s3cr3tPathPart"),
        "the target URL is never logged"
    );
}

/// A database that cannot commit: the webhook gets its 503 and a `storage` notification says
/// what failed, naming the event but holding no body.
async fn a_storage_fault_is_announced(b: Backend) {
    let rx = Receiver::start(200).await;
    let url = rx.url.clone();
    let app = TestApp::builder(b)
        .config(move |c| c.alerts = vec![json_target(&url, &[AlertKind::Storage])])
        .spawn()
        .await;
    app.post_webhook("erp", &erp_event("evt_before", 30, 40))
        .await
        .expect(202);
    let fault = StorageFault::begin(&app.db.url).await;
    app.post_webhook("erp", &erp_event("evt_lost_commit", 31, 41))
        .await
        .expect_error(503, "unavailable");
    let storage = rx.wait_for_kind("storage").await;
    fault.end().await;
    let example = &storage["examples"][0];
    assert_eq!(example["event_id"], "evt_lost_commit", "{storage}");
    assert_eq!(example["source"], "erp", "{storage}");
    assert!(
        example["error"]
            .as_str()
            .is_some_and(|e| e.contains("could not be committed")),
        "{storage}"
    );
    let text = serde_json::to_string(&storage).unwrap();
    assert!(!text.contains("object.created"), "no event body: {text}");
    assert!(rx.of_kind("dead").is_empty() && rx.of_kind("parked").is_empty());
    // The service recovers by itself, and the notification is counted as sent.
    wait_until("readiness recovers", Duration::from_secs(30), async || {
        app.is_ready().await
    })
    .await;
    app.post_webhook("erp", &erp_event("evt_after", 32, 42))
        .await
        .expect(202);
    app.wait_for_state("evt_after", "delivered").await;
    assert!(
        app.metrics()
            .await
            .contains("sprintlink_alerts_total{kind=\"storage\",outcome=\"sent\"} 1")
    );
}

async fn several_deads_in_one_interval_are_one_notification(b: Backend) {
    let rx = Receiver::start(200).await;
    let url = rx.url.clone();
    let app = TestApp::builder(b)
        .config(move |c| c.alerts = vec![json_target(&url, &[AlertKind::Dead])])
        .spawn()
        .await;
    let rejected = Canned::new(400, r#"{"msg": "no"}"#);
    app.hub
        .script([rejected.clone(), rejected.clone(), rejected]);
    for i in 0..3 {
        app.post_webhook("erp", &erp_event(&format!("evt_c{i}"), 100 + i, 200 + i))
            .await
            .expect(202);
    }
    for i in 0..3 {
        app.wait_for_state(&format!("evt_c{i}"), "dead").await;
    }
    let first = rx.wait_for_kind("dead").await;
    // A second notification, if the coalescing were broken, would follow within a tick.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = rx.of_kind("dead");
    assert_eq!(all.len(), 1, "one notification per interval: {all:?}");
    assert_eq!(first["count"], 3, "{first}");
    assert_eq!(first["examples"].as_array().unwrap().len(), 3, "{first}");
}

async fn a_failing_receiver_does_not_slow_ingest(b: Backend) {
    let rx = Receiver::start(500).await;
    let url = rx.url.clone();
    let app = TestApp::builder(b)
        .config(move |c| {
            let mut t = json_target(&url, &[AlertKind::Parked]);
            t.min_interval = Duration::from_secs(1);
            c.alerts = vec![t];
        })
        .spawn()
        .await;
    let n = 60;
    for i in 0..n {
        let no_lead =
            json!({"id": format!("evt_f{i}"), "type": "object.created", "data": {"object_id": i}});
        let r = app.post_webhook("erp", &no_lead).await;
        assert_eq!(r.expect(202)["status"], "parked", "event {i}");
    }
    assert_eq!(app.events(Some("parked")).await.len(), n as usize);
    // The receiver was tried (three times per notification) and the notification given up.
    wait_until(
        "a failed alert is counted",
        Duration::from_secs(20),
        async || {
            app.metrics()
                .await
                .contains("sprintlink_alerts_total{kind=\"parked\",outcome=\"failed\"}")
        },
    )
    .await;
    assert!(rx.got().len() >= 3, "tried a few times: {}", rx.got().len());
    assert!(
        !captured_logs().contains("s3cr3tPathPart"),
        "the target URL is never logged"
    );
}

async fn slack_is_one_text(b: Backend) {
    let rx = Receiver::start(200).await;
    let url = rx.url.clone();
    let app = TestApp::builder(b)
        .config(move |c| {
            let mut t = AlertTarget::new(&url, AlertFormat::Slack, None);
            t.on = vec![AlertKind::Parked];
            c.alerts = vec![t];
        })
        .spawn()
        .await;
    let no_lead = json!({"id": "evt_slack", "type": "object.created", "data": {"object_id": 9}});
    app.post_webhook("erp", &no_lead).await.expect(202);
    let me = rx.clone();
    wait_until(
        "a slack notification",
        Duration::from_secs(20),
        async || !me.got().is_empty(),
    )
    .await;
    let got = rx.got().remove(0);
    assert!(
        got.headers.get("webhook-signature").is_none(),
        "slack is not signed"
    );
    let v = got.json();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.keys().collect::<Vec<_>>(), vec!["text"], "{v}");
    let text = v["text"].as_str().unwrap();
    assert!(
        text.contains("[parked]") && text.contains("erp/evt_slack"),
        "{text}"
    );
    assert!(text.contains(INSTANCE), "{text}");
}

both_backends!(
    a_storage_fault_is_announced,
    each_kind_reaches_a_local_receiver,
    several_deads_in_one_interval_are_one_notification,
    a_failing_receiver_does_not_slow_ingest,
    slack_is_one_text,
);

/// Two replicas on one PostgreSQL database both see the same aging backlog: one notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(sl_skip_pg, ignore = "SPRINTLINK_SKIP_PG=1: no PostgreSQL")]
async fn a_fleet_of_two_announces_once() {
    let rx = Receiver::start(200).await;
    let url = rx.url.clone();
    let app = TestApp::builder(Backend::Postgres)
        .config(move |c| {
            let mut t = json_target(&url, &[AlertKind::Backlog]);
            t.backlog_age = Duration::from_secs(1);
            c.alerts = vec![t];
        })
        .spawn()
        .await;
    let second = sprintlink::start(app.config.clone())
        .await
        .expect("a second replica starts");
    // Throttled: the link waits a minute, pending, older than backlog_age on both replicas.
    app.hub.script([throttled()]);
    app.post_webhook("erp", &erp_event("evt_fleet", 1, 2))
        .await
        .expect(202);
    rx.wait_for_kind("backlog").await;
    // Both replicas measure every 0.5 s: a second notification would come within this.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        rx.of_kind("backlog").len(),
        1,
        "{:?}",
        rx.of_kind("backlog")
    );
    second.stop().await;
}

fn alert_config(dir: &std::path::Path, targets: &str) -> std::path::PathBuf {
    let path = dir.join("sprintlink.toml");
    let text = format!(
        r#"[storage]
url = "sqlite://{}/x.db"
[sprinthub]
instance = "acme"
api_token = "api-token-value-123"
[[sources]]
name = "erp"
scheme = "standard-webhooks"
secrets = ["{ERP_SECRET}"]
object_id = "/data/object_id"
[sources.lead]
id = "/data/lead_id"
{targets}
"#,
        dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_test_sends_to_every_target_and_says_what_each_answered() {
    let ok = Receiver::start(200).await;
    let broken = Receiver::start(500).await;
    let dir = tempfile::tempdir().unwrap();
    let path = alert_config(
        dir.path(),
        &format!(
            "[[alerts]]\nurl = \"env:ALERT_URL\"\nformat = \"slack\"\n\n[[alerts]]\nurl = \"{}\"\nformat = \"json\"\nsecret = \"{ALERT_SECRET}\"\n",
            broken.url
        ),
    );
    let run = |url: String, path: std::path::PathBuf| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sprintlink"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("ALERT_URL", url)
            .args(["alert-test", "--config"])
            .arg(path)
            .output()
            .expect("run sprintlink")
    };
    let (u, p) = (ok.url.clone(), path.clone());
    let out = tokio::task::spawn_blocking(move || run(u, p))
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "one target failed: {text}");
    let origin = ok.url.trim_end_matches(SECRET_PATH);
    assert!(
        text.contains(&format!("alerts[0] (slack, {origin}): HTTP 200")),
        "{text}"
    );
    assert!(text.contains("alerts[1] (json, "), "{text}");
    assert!(text.contains("HTTP 500"), "{text}");
    assert!(!text.contains("s3cr3tPathPart"), "no URL secret: {text}");
    assert_eq!(ok.got().len(), 1);
    let test_note = ok.got()[0].json();
    assert!(
        test_note["text"]
            .as_str()
            .unwrap()
            .contains("test notification"),
        "{test_note}"
    );
    let signed = broken.got().remove(0);
    alert_verifier()
        .verify(&signed.headers, &signed.body, unix_ms() / 1000)
        .expect("the json test notification is signed");

    // Both answer now: exit 0.
    broken.status.store(204, Ordering::SeqCst);
    let out = tokio::task::spawn_blocking(move || run(ok.url.clone(), path))
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
