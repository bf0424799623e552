//! The router driven with `Router::oneshot`, without a socket, a worker or a SprintHub: the
//! cheap edge cases of the HTTP surface (fallbacks, refusals before any storage write, the admin
//! gate). Everything that needs delivery runs end to end in `tests/it/`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{AppState, build_app};
use crate::config::{Config, Secret, SourceConfig};
use crate::telemetry::Metrics;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The router over a fresh SQLite store in `dir`, with one Standard Webhooks source `erp`.
async fn router(dir: &tempfile::TempDir, admin_token: &str) -> Router {
    let url = format!("sqlite://{}/t.db", dir.path().display());
    let mut config = Config::for_local(&url, "http://127.0.0.1:9");
    config.sources.push(SourceConfig::example("erp", SECRET));
    config.admin.token = Secret::new(admin_token);
    let store = crate::store::open(&url).await.unwrap();
    let state = AppState::new(
        Arc::new(config),
        store,
        Arc::new(Metrics::new()),
        Arc::new(Notify::new()),
        CancellationToken::new(),
    )
    .unwrap();
    build_app(Arc::new(state))
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, header::HeaderMap, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 22).await.unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, json)
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn fallbacks_and_refusals_answer_json_codes() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(&dir, "").await;
    let event = r#"{"id":"e1","type":"object.created","data":{"object_id":1,"lead_id":2}}"#;
    let cases = [
        (get("/nowhere"), 404, "not_found"),
        (get("/webhooks/erp"), 405, "method_not_allowed"),
        (post_json("/webhooks/nope", event), 404, "unknown_source"),
        (post_json("/webhooks/erp", event), 401, "missing_signature"),
        (
            Request::post("/webhooks/erp")
                .header("webhook-id", "msg_1")
                .header("webhook-timestamp", crate::store::now_ms() / 1000)
                .header("webhook-signature", "v1,AAAA")
                .body(Body::from(event))
                .unwrap(),
            401,
            "invalid_signature",
        ),
        (
            Request::post("/webhooks/erp")
                .header("webhook-id", "msg_1")
                .header("webhook-timestamp", "1000")
                .header("webhook-signature", "v1,AAAA")
                .body(Body::from(event))
                .unwrap(),
            401,
            "timestamp_out_of_tolerance",
        ),
        // The admin API is off without a token: it does not exist.
        (get("/admin/events"), 404, "not_found"),
    ];
    for (req, status, code) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let (got, _, body) = call(&app, req).await;
        assert_eq!(got.as_u16(), status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
    }
    // Nothing of that was stored.
    let resp = app.clone().oneshot(get("/metrics")).await.unwrap();
    let text = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&text);
    for state in crate::domain::EventState::ALL {
        let line = format!("sprintlink_events{{state=\"{state}\"}} 0");
        assert!(text.contains(&line), "{line} missing from\n{text}");
    }
}

#[tokio::test]
async fn the_admin_gate_challenges_and_checks_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(&dir, "admin-oneshot-token").await;
    let (status, headers, body) = call(&app, get("/admin/events")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    let wrong = Request::get("/admin/events")
        .header(header::AUTHORIZATION, "Bearer nope")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, wrong).await.0, StatusCode::UNAUTHORIZED);
    let right = Request::get("/admin/events?state=nonsense")
        .header(header::AUTHORIZATION, "Bearer admin-oneshot-token")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = call(&app, right).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "bad_request");
    let list = Request::get("/admin/events?state=dead")
        .header(header::AUTHORIZATION, "Bearer admin-oneshot-token")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = call(&app, list).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["events"], serde_json::json!([]));
}

#[tokio::test]
async fn operational_routes_answer_without_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(&dir, "").await;
    let (status, _, body) = call(&app, get("/healthz")).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, serde_json::json!({"status": "ok"}))
    );
    let (status, headers, doc) = call(&app, get("/openapi.json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    for path in [
        "/webhooks/{source}",
        "/admin/events",
        "/healthz",
        "/readyz",
        "/admin/delivery",
        "/admin/delivery/pause",
        "/admin/delivery/resume",
        "/ui/delivery/pause",
        "/ui/delivery/resume",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} is not described");
    }
    // The pause's body is optional: an empty POST pauses until resumed.
    let pause = &doc["paths"]["/admin/delivery/pause"]["post"];
    assert_ne!(pause["requestBody"]["required"], true, "{pause}");
    let status = &doc["components"]["schemas"]["DeliveryStatus"];
    for field in [
        "paused",
        "paused_until",
        "reason",
        "rate_limit_per_second",
        "concurrency",
        "in_flight",
        "replicas",
    ] {
        assert!(
            status["required"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == field),
            "{field} is not required in {status}"
        );
    }
}
