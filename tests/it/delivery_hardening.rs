//! Delivery against a SprintHub that misbehaves (audit, issue 11): a slow outbound rate must not
//! make leases expire and pairs go out twice; redirects are not followed; answers are read only
//! up to a bound; NUL bytes in an answer do not stop a link from being recorded; and a GitHub
//! delivery replayed with a new `X-GitHub-Delivery` is not a new event.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{Value, json};
use sprintlink::config::{LeadField, SprintHubConfig};
use sprintlink::sprinthub::{Failure, SprintHubClient};
use sprintlink::standin::Canned;

/// One replica, a slow outbound rate (1/s), eight slots and a lease shorter than eight calls'
/// worth of waiting: every pair is still sent exactly once.
async fn slow_rate_never_sends_a_pair_twice(backend: Backend) {
    let app = TestApp::builder(backend)
        .config(|c| {
            c.sprinthub.rate_limit_per_second = 1.0;
            c.sprinthub.concurrency = 8;
            c.sprinthub.timeout_ms = 1_000;
            c.delivery.lease_seconds = 6;
        })
        .spawn()
        .await;
    for i in 0..16 {
        app.post_webhook("erp", &erp_event(&format!("slow-{i}"), 9100 + i, 5))
            .await
            .expect(202);
    }
    wait_until(
        "all 16 events are delivered",
        Duration::from_secs(45),
        async || app.events(Some("delivered")).await.len() == 16,
    )
    .await;
    // A job whose lease ran out while it waited would be sent again after its takeover.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut sent: HashMap<String, usize> = HashMap::new();
    for (object, lead) in pairs(&app.link_calls()) {
        *sent.entry(format!("{object}->{lead}")).or_default() += 1;
    }
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "pairs sent more than once: {twice:?}");
    assert_eq!(sent.len(), 16, "every pair sent: {sent:?}");
}

/// A raw fake whose link endpoint redirects to a page that answers 200.
async fn redirecting_hub() -> RawHub {
    let hub = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let h = hub.clone();
    let raw = RawHub::start(move |call| {
        if call.path == "/landing" {
            RawAnswer::json(200, r#"{"id": 1, "data": {"id": 1, "leads": []}}"#)
        } else {
            RawAnswer::redirect(302, &format!("{}/landing", h.get().unwrap()))
        }
    })
    .await;
    hub.set(raw.url.clone()).unwrap();
    raw
}

/// A 302 from SprintHub (a wrong base_url) is not followed and not taken for success: the link
/// stays pending, retried slowly like a credentials error.
async fn redirect_is_not_followed_for_links(backend: Backend) {
    let raw = redirecting_hub().await;
    let url = raw.url.clone();
    let app = TestApp::builder(backend)
        .config(move |c| c.sprinthub.base_url = url)
        .spawn()
        .await;
    app.post_webhook("erp", &erp_event("redir-1", 4401, 8))
        .await
        .expect(202);
    let detail = app.wait_for_retry_scheduled("redir-1").await;
    let link = &detail["links"][0];
    assert_eq!(link["state"], "pending", "{detail}");
    let attempt = &link["attempts"][0];
    assert_eq!(attempt["status_code"], 302, "{detail}");
    let error = attempt["error"].as_str().unwrap_or("");
    assert!(
        error.contains("base_url"),
        "error names the setting: {error}"
    );
    let at = parse_rfc3339(attempt["at"].as_str().unwrap());
    let next = parse_rfc3339(link["next_attempt_at"].as_str().unwrap());
    assert!(
        next - at >= 59_000,
        "a redirect is retried slowly (>= 60 s), not in {} ms",
        next - at
    );
    let calls = raw.calls();
    assert!(
        calls.iter().all(|c| c.path != "/landing"),
        "the redirect was followed: {calls:?}"
    );
    assert_eq!(calls.len(), 1, "{calls:?}");
    let m = app.metrics().await;
    assert!(
        m.contains("sprintlink_delivery_attempts_total{outcome=\"redirect\"} 1"),
        "{m}"
    );
}

fn client_for(url: &str) -> SprintHubClient {
    let cfg = SprintHubConfig {
        base_url: url.into(),
        instance: INSTANCE.into(),
        api_token: sprintlink::config::Secret::new(API_TOKEN),
        timeout_ms: 2_000,
        ..Default::default()
    };
    SprintHubClient::new(&cfg).unwrap()
}

/// The lead search and lead creation do not follow redirects either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_is_not_followed_for_lead_search_and_create() {
    let raw = redirecting_hub().await;
    let client = client_for(&raw.url);
    let search = client.search_leads(LeadField::Email, "a@b.com", None).await;
    assert!(
        matches!(&search, Err(f @ Failure::Misdirected { status: 302, .. }) if f.describe().contains("base_url")),
        "{search:?}"
    );
    let create = client.create_lead(&json!({"email": "a@b.com"}), None).await;
    assert!(
        matches!(create, Err(Failure::Misdirected { status: 302, .. })),
        "{create:?}"
    );
    assert!(raw.calls().iter().all(|c| c.path != "/landing"));
}

/// A link answered 200 with an endless body is linked on its status, quickly, without reading
/// the body to its end.
async fn huge_link_answer_is_linked_on_its_status(backend: Backend) {
    let raw = RawHub::start(|_| RawAnswer::Stream {
        status: 200,
        total: 200_000_000,
    })
    .await;
    let url = raw.url.clone();
    let app = TestApp::builder(backend)
        .config(move |c| c.sprinthub.base_url = url)
        .spawn()
        .await;
    let started = Instant::now();
    app.post_webhook("erp", &erp_event("huge-1", 4402, 9))
        .await
        .expect(202);
    let detail = app.wait_for_state("huge-1", "delivered").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(raw.calls().len(), 1, "one call");
    let excerpt = detail["links"][0]["attempts"][0]["response_excerpt"]
        .as_str()
        .unwrap_or("");
    assert!(
        excerpt.starts_with("xxxx") && excerpt.len() <= 2048,
        "excerpt from the first bytes: {} bytes",
        excerpt.len()
    );
    // The client stopped reading: only what the sockets buffer was written, not 200 MB.
    assert!(
        raw.written() < 64 * 1024 * 1024,
        "{} bytes of the answer were read",
        raw.written()
    );
}

/// A search answer larger than the bound is a transient failure, not "no lead found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_search_answer_is_a_transient_failure() {
    let raw = RawHub::start(|_| RawAnswer::Stream {
        status: 200,
        total: 200_000_000,
    })
    .await;
    let client = client_for(&raw.url);
    let started = Instant::now();
    let search = client.search_leads(LeadField::Email, "a@b.com", None).await;
    assert!(
        matches!(search, Err(Failure::Transient { .. })),
        "{search:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        raw.written() < 64 * 1024 * 1024,
        "{} bytes of the answer were read",
        raw.written()
    );
    // A search answer that is not JSON at all is transient too.
    let bad = RawHub::start(|_| RawAnswer::json(200, "<html>oops</html>")).await;
    let search = client_for(&bad.url)
        .search_leads(LeadField::Email, "a@b.com", None)
        .await;
    assert!(
        matches!(search, Err(Failure::Transient { .. })),
        "{search:?}"
    );
}

/// A 2xx answer holding NUL bytes is recorded linked (PostgreSQL text cannot hold U+0000), after
/// exactly one call, with a safe excerpt.
async fn nul_in_answer_is_still_linked(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.hub
        .script([Canned::new(200, "{\"id\": 1, \"note\": \"a\u{0}b\u{0}\"}")]);
    app.post_webhook("erp", &erp_event("nul-1", 4403, 10))
        .await
        .expect(202);
    let detail = app.wait_for_state("nul-1", "delivered").await;
    assert_eq!(detail["links"][0]["state"], "linked");
    assert_eq!(app.link_calls().len(), 1, "exactly one call");
    let excerpt = detail["links"][0]["attempts"][0]["response_excerpt"]
        .as_str()
        .unwrap_or("");
    assert!(!excerpt.contains('\u{0}'), "{excerpt:?}");
    assert!(excerpt.contains("a\u{FFFD}b"), "{excerpt:?}");
}

/// The same GitHub-signed body posted again under a new X-GitHub-Delivery (which the signature
/// does not cover) is a duplicate; a different body is a new event.
async fn github_replay_with_new_delivery_id_is_duplicate(backend: Backend) {
    let app = TestApp::builder(backend)
        .config(|c| {
            let mut gh = shop_source();
            gh.name = "gh".into();
            gh.event_id = None;
            c.sources.push(gh);
        })
        .spawn()
        .await;
    let body = json!({"object": 4404, "lead": 11}).to_string().into_bytes();
    let now = unix_ms() / 1000;
    let first = app
        .post_raw("gh", body.clone(), &app.sign("gh", &body, now, "d-first"))
        .await;
    let first = first.expect(202).clone();
    assert_eq!(first["status"], "queued");
    let replay = app
        .post_raw(
            "gh",
            body.clone(),
            &app.sign("gh", &body, now, "d-replayed"),
        )
        .await;
    let replay = replay.expect(200).clone();
    assert_eq!(replay["status"], "duplicate", "{replay}");
    assert_eq!(replay["event_id"], first["event_id"]);
    let other = json!({"object": 4405, "lead": 11}).to_string().into_bytes();
    let fresh = app
        .post_raw("gh", other.clone(), &app.sign("gh", &other, now, "d-other"))
        .await;
    let fresh: Value = fresh.expect(202).clone();
    assert_eq!(fresh["status"], "queued");
    assert_ne!(fresh["event_id"], first["event_id"]);
}

both_backends!(
    slow_rate_never_sends_a_pair_twice,
    redirect_is_not_followed_for_links,
    huge_link_answer_is_linked_on_its_status,
    nul_in_answer_is_still_linked,
    github_replay_with_new_delivery_id_is_duplicate,
);
