//! The service end to end, over HTTP, against both storage backends: signed webhooks in, links
//! at the SprintHub stand-in out, and what the admin API shows in between.

use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};
use sprintlink::config::Secret;
use sprintlink::standin::Canned;

both_backends!(
    happy_path_links_the_exact_body,
    duplicate_event_id_is_acknowledged_once,
    same_pair_from_two_events_is_sent_once,
    ignored_types_are_not_stored,
    parked_events_wait_with_a_reason,
    transient_503_then_success_records_two_attempts,
    retry_after_is_honoured,
    sprinthub_throttling_waits_at_least_a_minute,
    permanent_400_is_dead_at_once_then_replay_links,
    max_attempts_then_dead,
    rate_limit_is_held,
    concurrency_is_held,
    retries_survive_a_restart,
    bad_input_is_rejected_with_json_errors,
    api_token_never_leaks,
    admin_api_requires_its_token,
    admin_list_paginates_and_filters,
    bulk_replay_by_state_and_source,
    event_document_pages_its_links,
    oversized_and_control_char_ids_are_refused,
    bulk_replay_is_bounded_with_a_cursor,
    admin_rejections_are_json_errors,
    failed_admin_auth_is_throttled_per_address,
    dashboard_sessions_are_server_side,
    dashboard_posts_authenticate_before_reading_bodies,
);

/// A query-string-free link body, as SPEC section 1 spells it.
fn link_body(object_id: Value, target_id: Value) -> Value {
    json!({"objectId": object_id, "linkType": "lead", "targetId": target_id, "amount": 1})
}

async fn happy_path_links_the_exact_body(b: Backend) {
    let app = TestApp::spawn(b).await;

    let r = app
        .post_webhook("erp", &erp_event("evt_1", 123, 8473))
        .await;
    assert_eq!(
        r.expect(202),
        &json!({"event_id": "evt_1", "status": "queued"})
    );
    let detail = app.wait_for_state("evt_1", "delivered").await;

    let calls = app.link_calls();
    assert_eq!(calls.len(), 1, "one call to SprintHub");
    assert_eq!(calls[0].body, link_body(json!(123), json!(8473)));
    assert_eq!(query_param(&calls[0], "apitoken"), Some(API_TOKEN));
    assert_eq!(query_param(&calls[0], "i"), Some(INSTANCE));

    assert_eq!(detail["event_id"], "evt_1");
    assert_eq!(detail["source"], "erp");
    assert_eq!(detail["object_id"], "123");
    assert_eq!(detail["body_json"], erp_event("evt_1", 123, 8473));
    assert_eq!(detail["body"], erp_event("evt_1", 123, 8473).to_string());
    assert_eq!(detail["content_type"], "application/json");
    let received_at = parse_rfc3339(detail["received_at"].as_str().unwrap());
    assert!(
        (unix_ms() - received_at).abs() < 60_000,
        "received_at is now"
    );
    let links = detail["links"].as_array().unwrap();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0]["object_id"], "123");
    assert_eq!(links[0]["lead_id"], "8473");
    assert_eq!(links[0]["state"], "linked");
    let attempts = links[0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["status_code"], 200);
    assert!(attempts[0]["error"].is_null());
    parse_rfc3339(attempts[0]["at"].as_str().unwrap());

    // Digit strings go out as numbers, other ids as given; a list of leads makes one call each.
    app.post_webhook("erp", &erp_event("evt_2", "124", json!([8474, "8475"])))
        .await
        .expect(202);
    app.post_webhook("erp", &erp_event("evt_3", "obj-x", "lead-y"))
        .await
        .expect(202);
    // The second source, another signature scheme.
    app.post_webhook("shop", &json!({"id": "s_1", "object": 125, "lead": 8476}))
        .await
        .expect(202);
    app.wait_for_state("evt_2", "delivered").await;
    app.wait_for_state("evt_3", "delivered").await;
    app.wait_for_state("s_1", "delivered").await;
    let mut got: Vec<String> = app
        .link_calls()
        .iter()
        .map(|r| r.body.to_string())
        .collect();
    got.sort();
    let mut want: Vec<String> = [
        link_body(json!(123), json!(8473)),
        link_body(json!(124), json!(8474)),
        link_body(json!(124), json!(8475)),
        link_body(json!("obj-x"), json!("lead-y")),
        link_body(json!(125), json!(8476)),
    ]
    .iter()
    .map(Value::to_string)
    .collect();
    want.sort();
    assert_eq!(got, want);

    // The operator's view of the same run.
    let metrics = app.metrics().await;
    for needle in [
        "sprintlink_webhooks_received_total{source=\"erp\",outcome=\"queued\"} 3",
        "sprintlink_webhooks_received_total{source=\"shop\",outcome=\"queued\"} 1",
        "sprintlink_links_total{outcome=\"linked\"} 5",
        "sprintlink_delivery_attempts_total{outcome=\"success\"} 5",
        "sprintlink_queue_depth 0",
        "sprintlink_dead_links 0",
        "sprintlink_ingest_duration_seconds_count 4",
        "sprintlink_delivery_duration_seconds_count 5",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

async fn duplicate_event_id_is_acknowledged_once(b: Backend) {
    let app = TestApp::spawn(b).await;
    let ev = erp_event("evt_dup", 200, 300);

    app.post_webhook("erp", &ev).await.expect(202);
    let again = app.post_webhook("erp", &ev).await;
    assert_eq!(
        again.expect(200),
        &json!({"event_id": "evt_dup", "status": "duplicate"})
    );
    app.wait_for_state("evt_dup", "delivered").await;
    // After delivery too, and even with another body: the id decides.
    let later = app
        .post_webhook("erp", &erp_event("evt_dup", 201, 301))
        .await;
    assert_eq!(later.expect(200)["status"], "duplicate");

    // The same id from another source is another event.
    app.post_webhook(
        "shop",
        &json!({"id": "evt_dup", "object": 202, "lead": 302}),
    )
    .await
    .expect(202);
    let shop = app.admin_get("/admin/events/evt_dup?source=shop").await;
    assert_eq!(shop.expect(200)["source"], "shop");
    // Without ?source the id is ambiguous, and the API says so.
    app.admin_get("/admin/events/evt_dup")
        .await
        .expect_error(409, "conflict");
    wait_until("the shop event is delivered", TIMEOUT, async || {
        app.admin_get("/admin/events/evt_dup?source=shop")
            .await
            .body["state"]
            == "delivered"
    })
    .await;

    let mut got = pairs(&app.link_calls());
    got.sort_by_key(|p| p.0.to_string());
    assert_eq!(
        got,
        vec![(json!(200), json!(300)), (json!(202), json!(302))],
        "one call per event, none for the duplicates"
    );
    assert_eq!(app.events(None).await.len(), 2);
    let m = app.metrics().await;
    assert!(
        m.contains("sprintlink_webhooks_received_total{source=\"erp\",outcome=\"duplicate\"} 2")
    );
}

async fn same_pair_from_two_events_is_sent_once(b: Backend) {
    let app = TestApp::spawn(b).await;
    // A slow SprintHub keeps the first call in flight while the second event arrives.
    app.hub.set_delay(Duration::from_millis(300));

    app.post_webhook("erp", &erp_event("evt_a", 500, 600))
        .await
        .expect(202);
    app.post_webhook("erp", &erp_event("evt_b", 500, 600))
        .await
        .expect(202);
    let a = app.wait_for_state("evt_a", "delivered").await;
    let bb = app.wait_for_state("evt_b", "delivered").await;
    assert_eq!(a["links"][0]["state"], "linked");
    assert_eq!(bb["links"][0]["state"], "linked");
    assert_eq!(
        app.link_calls().len(),
        1,
        "one delivery for the shared pair"
    );

    // Once linked, a pair is never sent again: a third event is delivered without a call.
    app.hub.set_delay(Duration::ZERO);
    let r = app
        .post_webhook("erp", &erp_event("evt_c", "500", "600"))
        .await;
    r.expect(202);
    app.wait_for_state("evt_c", "delivered").await;
    // A replay of a delivered event sends nothing either.
    app.replay("evt_a").await;
    app.wait_for_state("evt_a", "delivered").await;
    // Something else goes through afterwards, so the worker has certainly looked at the queue.
    app.post_webhook("erp", &erp_event("evt_d", 501, 601))
        .await
        .expect(202);
    app.wait_for_state("evt_d", "delivered").await;
    assert_eq!(
        pairs(&app.link_calls()),
        vec![(json!(500), json!(600)), (json!(501), json!(601))]
    );
}

async fn ignored_types_are_not_stored(b: Backend) {
    let app = TestApp::spawn(b).await;
    let mut ev = erp_event("evt_ign", 1, 2);
    ev["type"] = json!("object.updated");
    let r = app.post_webhook("erp", &ev).await;
    assert_eq!(r.expect(200), &json!({"status": "ignored"}));
    // No type at all is not an accepted type either.
    let mut untyped = erp_event("evt_untyped", 1, 2);
    untyped.as_object_mut().unwrap().remove("type");
    assert_eq!(
        app.post_webhook("erp", &untyped).await.expect(200),
        &json!({"status": "ignored"})
    );

    assert!(app.events(None).await.is_empty(), "nothing stored");
    app.admin_get("/admin/events/evt_ign")
        .await
        .expect_error(404, "not_found");
    // The worker is running: an accepted event is delivered, the ignored ones never were.
    app.post_webhook("erp", &erp_event("evt_ok", 3, 4))
        .await
        .expect(202);
    app.wait_for_state("evt_ok", "delivered").await;
    assert_eq!(pairs(&app.link_calls()), vec![(json!(3), json!(4))]);
    let m = app.metrics().await;
    assert!(m.contains("sprintlink_webhooks_received_total{source=\"erp\",outcome=\"ignored\"} 2"));
}

async fn parked_events_wait_with_a_reason(b: Backend) {
    let app = TestApp::spawn(b).await;

    let no_lead = json!({"id": "evt_nolead", "type": "object.created", "data": {"object_id": 700}});
    let r = app.post_webhook("erp", &no_lead).await;
    let body = r.expect(202);
    assert_eq!(body["event_id"], "evt_nolead");
    assert_eq!(body["status"], "parked");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("/data/lead_id"),
        "reason names what is missing: {reason}"
    );

    let no_object = json!({"id": "evt_noobj", "type": "object.created", "data": {"lead_id": 5}});
    let r = app.post_webhook("erp", &no_object).await;
    assert_eq!(r.expect(202)["status"], "parked");
    assert!(
        r.body["reason"]
            .as_str()
            .unwrap()
            .contains("/data/object_id")
    );

    let parked = app.events(Some("parked")).await;
    let ids: Vec<&str> = parked
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["evt_noobj", "evt_nolead"]);
    assert!(parked.iter().all(|e| e["state"] == "parked"));
    assert_eq!(parked[1]["object_id"], "700");
    assert!(
        parked[1]["reason"]
            .as_str()
            .unwrap()
            .contains("/data/lead_id")
    );
    let detail = app.event("evt_nolead").await;
    assert_eq!(detail["state"], "parked");
    assert_eq!(detail["links"], json!([]));

    // They stay parked while other work flows past them.
    app.post_webhook("erp", &erp_event("evt_ok", 3, 4))
        .await
        .expect(202);
    app.wait_for_state("evt_ok", "delivered").await;
    assert_eq!(app.link_calls().len(), 1);
    assert_eq!(
        app.event_state("evt_nolead").await.as_deref(),
        Some("parked")
    );
    let m = app.metrics().await;
    assert!(m.contains("sprintlink_webhooks_received_total{source=\"erp\",outcome=\"parked\"} 2"));
    assert!(m.contains("sprintlink_events{state=\"parked\"} 2"));
}

async fn transient_503_then_success_records_two_attempts(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.hub.script([Canned::new(503, r#"{"msg":"busy"}"#)]);

    app.post_webhook("erp", &erp_event("evt_503", 10, 20))
        .await
        .expect(202);
    let detail = app.wait_for_state("evt_503", "delivered").await;

    let link = &detail["links"][0];
    assert_eq!(link["state"], "linked");
    let attempts = link["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{detail}");
    assert_eq!(attempts[0]["status_code"], 503);
    assert!(attempts[0]["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(
        attempts[0]["response_excerpt"]
            .as_str()
            .unwrap()
            .contains("busy")
    );
    assert_eq!(attempts[1]["status_code"], 200);
    assert!(attempts[1]["error"].is_null());
    let (t0, t1) = (
        parse_rfc3339(attempts[0]["at"].as_str().unwrap()),
        parse_rfc3339(attempts[1]["at"].as_str().unwrap()),
    );
    assert!(t1 >= t0);

    let calls = app.link_calls();
    assert_eq!(
        calls.iter().map(|c| c.status).collect::<Vec<_>>(),
        vec![503, 200]
    );
    assert_eq!(
        calls[0].body, calls[1].body,
        "the retry sends the same request"
    );
    let m = app.metrics().await;
    assert!(m.contains("sprintlink_delivery_attempts_total{outcome=\"transient\"} 1"));
    assert!(m.contains("sprintlink_delivery_attempts_total{outcome=\"success\"} 1"));
}

async fn retry_after_is_honoured(b: Backend) {
    // The maximum backoff caps Retry-After, so it must be above the second asked for here.
    let app = TestApp::builder(b)
        .config(|c| c.delivery.max_backoff_ms = 5_000)
        .spawn()
        .await;
    app.hub
        .script([Canned::new(429, r#"{"msg":"slow down"}"#).header("Retry-After", "1")]);

    app.post_webhook("erp", &erp_event("evt_429", 11, 21))
        .await
        .expect(202);
    app.wait_for_state("evt_429", "delivered").await;

    let calls = app.link_calls();
    assert_eq!(
        calls.iter().map(|c| c.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    let gap = calls[1].at.duration_since(calls[0].at);
    assert!(
        gap >= Duration::from_millis(950),
        "the retry came {gap:?} after a 429 with Retry-After: 1"
    );
}

async fn sprinthub_throttling_waits_at_least_a_minute(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.hub
        .script([Canned::new(401, r#"{"msg":"Too many requests"}"#)]);

    app.post_webhook("erp", &erp_event("evt_thr", 12, 22))
        .await
        .expect(202);
    let detail = app.wait_for_retry_scheduled("evt_thr").await;
    let now = unix_ms();
    assert_eq!(detail["state"], "queued");
    let link = &detail["links"][0];
    assert_eq!(link["state"], "pending");
    assert_eq!(link["attempts"][0]["status_code"], 401);
    let next = parse_rfc3339(
        link["next_attempt_at"]
            .as_str()
            .expect("next_attempt_at is set"),
    );
    assert!(
        next >= now + 55_000,
        "throttled: next attempt in {} ms, expected at least 60 s",
        next - now
    );
    assert_eq!(app.link_calls().len(), 1);
    // The throttling answer paused every call of the deployment (SPEC section 8); an operator
    // lifts that pause here so the next scenario is sent.
    let d = app.admin_get("/admin/delivery").await.expect(200).clone();
    assert_eq!(
        (&d["paused"], &d["reason"]),
        (&json!(true), &json!("throttled"))
    );
    app.admin(reqwest::Method::POST, "/admin/delivery/resume", None)
        .await
        .expect(200);

    // Any other 401/403 is a credentials problem: retried (it may be fixed), not dead, slowly.
    app.hub.script([Canned::new(403, r#"{"msg":"forbidden"}"#)]);
    app.post_webhook("erp", &erp_event("evt_403", 13, 23))
        .await
        .expect(202);
    let detail = app.wait_for_retry_scheduled("evt_403").await;
    let now = unix_ms();
    let link = &detail["links"][0];
    assert_eq!(link["state"], "pending");
    assert_eq!(link["attempts"][0]["status_code"], 403);
    let next = parse_rfc3339(link["next_attempt_at"].as_str().unwrap());
    assert!(next > now + 1_000, "an auth failure is not retried at once");

    let m = app.metrics().await;
    assert!(
        m.contains("sprintlink_delivery_attempts_total{outcome=\"throttled\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("sprintlink_delivery_attempts_total{outcome=\"auth_error\"} 1"),
        "{m}"
    );
    assert!(m.contains("sprintlink_queue_depth 2"), "{m}");
}

async fn permanent_400_is_dead_at_once_then_replay_links(b: Backend) {
    let app = TestApp::spawn(b).await;
    let long = format!(
        r#"{{"msg":"objectId 900 does not exist","pad":"{}"}}"#,
        "x".repeat(5000)
    );
    app.hub.script([Canned::new(400, &long)]);

    app.post_webhook("erp", &erp_event("evt_400", 900, 901))
        .await
        .expect(202);
    let detail = app.wait_for_state("evt_400", "dead").await;
    let link = &detail["links"][0];
    assert_eq!(link["state"], "dead");
    let attempts = link["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "dead at once, no retry");
    assert_eq!(attempts[0]["status_code"], 400);
    let excerpt = attempts[0]["response_excerpt"].as_str().unwrap();
    assert!(
        excerpt.starts_with(r#"{"msg":"objectId 900 does not exist""#),
        "{excerpt}"
    );
    assert!(
        excerpt.len() <= 2048,
        "the excerpt is at most 2 KiB, got {}",
        excerpt.len()
    );
    assert!(
        excerpt.len() >= 1024,
        "the excerpt keeps the first 2 KiB, got {}",
        excerpt.len()
    );
    assert!(link["next_attempt_at"].is_null());
    let dead: Vec<Value> = app.events(Some("dead")).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["event_id"], "evt_400");
    let m = app.metrics().await;
    assert!(m.contains("sprintlink_dead_links 1"), "{m}");
    assert!(
        m.contains("sprintlink_links_total{outcome=\"dead\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("sprintlink_delivery_attempts_total{outcome=\"rejected\"} 1"),
        "{m}"
    );
    assert_eq!(app.link_calls().len(), 1);

    // The operator fixed it on SprintHub's side; the replay links it.
    let r = app.replay("evt_400").await;
    assert_eq!(r["event_id"], "evt_400");
    let detail = app.wait_for_state("evt_400", "delivered").await;
    let attempts = detail["links"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "the history is kept across the replay");
    assert_eq!(attempts[1]["status_code"], 200);
    assert_eq!(
        app.link_calls()
            .iter()
            .map(|c| c.status)
            .collect::<Vec<_>>(),
        vec![400, 200]
    );
    assert!(app.metrics().await.contains("sprintlink_dead_links 0"));
}

async fn max_attempts_then_dead(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| c.delivery.max_attempts = 3)
        .spawn()
        .await;
    app.hub.set_down(true);

    app.post_webhook("erp", &erp_event("evt_max", 30, 40))
        .await
        .expect(202);
    let detail = app.wait_for_state("evt_max", "dead").await;
    let attempts = detail["links"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a["status_code"] == 503));
    assert_eq!(detail["links"][0]["state"], "dead");

    // Dead is final until a replay: no fourth call, even after the longest backoff.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let calls = app.link_calls();
    assert_eq!(calls.len(), 3, "exactly max_attempts calls");
    assert!(calls.iter().all(|c| c.status == 503));

    // Replay gives a fresh budget.
    app.hub.set_down(false);
    app.replay("evt_max").await;
    app.wait_for_state("evt_max", "delivered").await;
    assert_eq!(app.link_calls().len(), 4);
}

async fn rate_limit_is_held(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            c.sprinthub.rate_limit_per_second = 20.0;
            c.sprinthub.concurrency = 8;
        })
        .spawn()
        .await;
    for e in 0..4 {
        let leads: Vec<i64> = (0..10).map(|l| 1000 + l).collect();
        app.post_webhook(
            "erp",
            &erp_event(&format!("evt_rl{e}"), 70 + e, json!(leads)),
        )
        .await
        .expect(202);
    }
    for e in 0..4 {
        app.wait_for_state(&format!("evt_rl{e}"), "delivered").await;
    }
    let calls = app.link_calls();
    assert_eq!(calls.len(), 40);
    let first = calls.iter().map(|c| c.at).min().unwrap();
    let last = calls.iter().map(|c| c.at).max().unwrap();
    let span = last.duration_since(first);
    // 40 calls at 20 per second, with a burst of one: 39 intervals of 50 ms, 1.95 s (less
    // some jitter in when the stand-in saw them). Unlimited, or with a burst of 20, it is ~1 s
    // or less.
    assert!(
        span >= Duration::from_millis(1800),
        "40 calls at 20/s took only {span:?}"
    );
}

async fn concurrency_is_held(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| c.sprinthub.concurrency = 3)
        .spawn()
        .await;
    app.hub.set_delay(Duration::from_millis(100));
    // Five links per event, so work is waiting however slowly the events arrive.
    for e in 0..4 {
        let leads: Vec<i64> = (0..5).map(|l| 9000 + l).collect();
        app.post_webhook(
            "erp",
            &erp_event(&format!("evt_c{e}"), 80 + e, json!(leads)),
        )
        .await
        .expect(202);
    }
    for e in 0..4 {
        app.wait_for_state(&format!("evt_c{e}"), "delivered").await;
    }
    assert_eq!(app.link_calls().len(), 20);
    let max = app.hub.max_concurrency();
    assert!(
        max <= 3,
        "{max} calls in flight at once with concurrency = 3"
    );
    assert!(
        max > 1,
        "calls were made one at a time (max {max}); concurrency is not used"
    );
}

async fn retries_survive_a_restart(b: Backend) {
    let mut app = TestApp::builder(b)
        .config(|c| {
            c.delivery.initial_backoff_ms = 1_000;
            c.delivery.max_backoff_ms = 2_000;
        })
        .spawn()
        .await;
    app.hub.script([
        Canned::new(503, r#"{"msg":"down"}"#),
        Canned::new(503, r#"{"msg":"down"}"#),
    ]);
    app.post_webhook("erp", &erp_event("evt_rs", 50, 60))
        .await
        .expect(202);
    wait_until("SprintHub saw the first attempt", TIMEOUT, async || {
        !app.link_calls().is_empty()
    })
    .await;

    // Stopped in the middle of the retry schedule...
    app.stop().await;
    assert!(
        app.hub.linked_pairs().is_empty(),
        "not linked before the restart"
    );
    let before = app.link_calls().len();
    assert!(before < 3);

    // ...and a new process on the same database picks it up.
    app.restart().await;
    let detail = app.wait_for_state("evt_rs", "delivered").await;
    let attempts = detail["links"][0]["attempts"].as_array().unwrap();
    assert_eq!(
        attempts
            .iter()
            .map(|a| a["status_code"].clone())
            .collect::<Vec<_>>(),
        vec![json!(503), json!(503), json!(200)],
        "attempts from both processes are recorded"
    );
    assert_eq!(app.hub.linked_pairs(), vec![(json!(50), json!(60))]);
    assert_eq!(app.link_calls().len(), 3);
}

async fn bad_input_is_rejected_with_json_errors(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| c.server.max_body_bytes = 4096)
        .spawn()
        .await;
    let body = erp_event("evt_bad", 1, 2).to_string();
    let now = unix_ms() / 1000;
    let good = app.sign("erp", body.as_bytes(), now, "evt_bad");

    // No signature headers at all.
    app.post_raw("erp", body.clone().into_bytes(), &[])
        .await
        .expect_error(401, "missing_signature");
    // Signed for another body.
    let other = app.sign("erp", b"{\"x\":1}", now, "evt_bad");
    app.post_raw("erp", body.clone().into_bytes(), &other)
        .await
        .expect_error(401, "invalid_signature");
    // Tampered body, right headers.
    let tampered = body.replace("\"lead_id\":2", "\"lead_id\":3");
    assert_ne!(tampered, body);
    app.post_raw("erp", tampered.into_bytes(), &good)
        .await
        .expect_error(401, "invalid_signature");
    // Signed an hour ago.
    let old = app.sign("erp", body.as_bytes(), now - 3600, "evt_bad");
    app.post_raw("erp", body.clone().into_bytes(), &old)
        .await
        .expect_error(401, "timestamp_out_of_tolerance");
    // Signed correctly, but not JSON.
    let junk = b"{not json".to_vec();
    let junk_sig = app.sign("erp", &junk, now, "evt_junk");
    app.post_raw("erp", junk, &junk_sig)
        .await
        .expect_error(400, "invalid_json");
    // No such source.
    app.post_raw("nope", body.clone().into_bytes(), &good)
        .await
        .expect_error(404, "unknown_source");
    // Larger than server.max_body_bytes.
    let big = json!({"id": "evt_big", "type": "object.created",
        "data": {"object_id": 1, "lead_id": 2, "pad": "y".repeat(5000)}})
    .to_string();
    let big_sig = app.sign("erp", big.as_bytes(), now, "evt_big");
    app.post_raw("erp", big.into_bytes(), &big_sig)
        .await
        .expect_error(413, "payload_too_large");
    // The GitHub-signed source fails closed the same way.
    let shop = json!({"id": "s_bad", "object": 1, "lead": 2}).to_string();
    app.post_raw("shop", shop.clone().into_bytes(), &[])
        .await
        .expect_error(401, "missing_signature");
    let wrong = vec![(
        "X-Hub-Signature-256".to_string(),
        format!("sha256={}", "0".repeat(64)),
    )];
    app.post_raw("shop", shop.into_bytes(), &wrong)
        .await
        .expect_error(401, "invalid_signature");

    assert!(app.events(None).await.is_empty(), "nothing was stored");
    // The same body with the right headers is accepted: the rejections were about the input.
    app.post_raw("erp", body.into_bytes(), &good)
        .await
        .expect(202);
    app.wait_for_state("evt_bad", "delivered").await;
    assert_eq!(app.link_calls().len(), 1);
    let m = app.metrics().await;
    assert!(
        m.contains(
            "sprintlink_webhooks_received_total{source=\"erp\",outcome=\"invalid_signature\"} 2"
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "sprintlink_webhooks_received_total{source=\"_unknown\",outcome=\"unknown_source\"} 1"
        ),
        "{m}"
    );
}

/// The places where `needle` occurs in `text`, with some context.
fn around(text: &str, needle: &str) -> String {
    text.match_indices(needle)
        .map(|(i, _)| {
            let from = text.floor_char_boundary(i.saturating_sub(120));
            let to = text.ceil_char_boundary((i + 60).min(text.len()));
            format!("...{}...", &text[from..to])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every admin answer an operator could look at, as one text.
async fn everything_an_operator_sees(app: &TestApp) -> String {
    let mut seen = String::new();
    for path in [
        "/admin/events?limit=500",
        "/admin/events?state=queued",
        "/admin/events?state=dead",
        "/admin/events?state=delivered",
        "/admin/events?state=parked",
        "/readyz",
        "/healthz",
    ] {
        seen.push_str(&app.admin_get(path).await.text);
    }
    for e in app.events(None).await {
        let id = e["event_id"].as_str().unwrap();
        seen.push_str(
            &app.admin_get(&format!("/admin/events/{}", encode_path(id)))
                .await
                .text,
        );
    }
    seen.push_str(&app.metrics().await);
    seen
}

async fn api_token_never_leaks(b: Backend) {
    // `+`, `/` and `=` (as in a base64 token) are percent-encoded in the query string, so a
    // scrubber that only knows the raw form would miss the URL that reqwest's errors quote.
    const SECRET: &str = "tok-SECRET-4f9a+/=";
    let leaks = |text: &str| text.contains("SECRET-4f9a");

    // A SprintHub that fails in every way, quoting the token back where it can.
    let app = TestApp::builder(b)
        .config(|c| {
            c.sprinthub.api_token = Secret::new(SECRET);
            c.sprinthub.timeout_ms = 500;
            c.delivery.max_attempts = 2;
        })
        .spawn()
        .await;
    app.hub.script([
        Canned::new(
            500,
            &format!(r#"{{"msg":"internal error, apitoken={SECRET}"}}"#),
        ),
        Canned::new(
            422,
            &format!(r#"{{"msg":"invalid request for token {SECRET}"}}"#),
        ),
    ]);
    app.post_webhook("erp", &erp_event("evt_t1", 4242001, 2))
        .await
        .expect(202);
    let t1 = app.wait_for_state("evt_t1", "dead").await;
    let excerpts: Vec<&str> = t1["links"][0]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["response_excerpt"].as_str())
        .collect();
    assert_eq!(excerpts.len(), 2, "{t1}");
    assert!(
        excerpts[0].contains("internal error"),
        "the excerpt is kept, scrubbed: {t1}"
    );

    app.hub.script([Canned::new(
        401,
        &format!(r#"{{"msg":"invalid token {SECRET}"}}"#),
    )]);
    app.post_webhook("erp", &erp_event("evt_t2", 4242002, 4))
        .await
        .expect(202);
    wait_until("the refused attempt is recorded", TIMEOUT, async || {
        app.event("evt_t2").await["links"][0]["attempts"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .await;

    // A call that times out (reqwest's timeout error quotes the URL).
    app.hub.set_delay(Duration::from_millis(1_500));
    app.post_webhook("erp", &erp_event("evt_t3", 4242003, 6))
        .await
        .expect(202);
    wait_until("the timed-out attempt is recorded", TIMEOUT, async || {
        app.event("evt_t3").await["links"][0]["attempts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["status_code"].is_null()))
    })
    .await;
    app.hub.set_delay(Duration::ZERO);
    // The token really was sent, so a leak had something to leak.
    assert!(
        app.link_calls()
            .iter()
            .all(|c| query_param(c, "apitoken") == Some(SECRET))
    );

    // Nothing listening at SprintHub's address at all.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = TestApp::builder(b)
        .config(move |c| {
            c.sprinthub.api_token = Secret::new(SECRET);
            c.sprinthub.base_url = format!("http://127.0.0.1:{closed_port}");
            c.delivery.max_attempts = 2;
        })
        .spawn()
        .await;
    refused
        .post_webhook("erp", &erp_event("evt_t4", 4242004, 8))
        .await
        .expect(202);
    let t4 = refused.wait_for_state("evt_t4", "dead").await;
    let attempts = t4["links"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a["status_code"].is_null()));
    assert!(
        attempts
            .iter()
            .all(|a| a["error"].as_str().is_some_and(|e| !e.is_empty())),
        "a connection failure is described: {t4}"
    );

    for (name, a) in [("failing", &app), ("refused", &refused)] {
        let seen = everything_an_operator_sees(a).await;
        assert!(
            seen.contains("evt_t"),
            "the admin API showed the events ({name})"
        );
        assert!(
            !leaks(&seen),
            "the API token leaked through the admin API or /metrics ({name}):\n{}",
            around(&seen, "SECRET-4f9a")
        );
    }
    let logs = captured_logs();
    assert!(
        logs.contains("object_id=4242004") && logs.contains("link is dead"),
        "the failures were logged (log capture works)"
    );
    let leaked: Vec<&str> = logs.lines().filter(|l| leaks(l)).collect();
    assert!(
        leaked.is_empty(),
        "the API token leaked into the logs:\n{}",
        leaked.join("\n")
    );
}

async fn admin_api_requires_its_token(b: Backend) {
    let app = TestApp::spawn(b).await;
    let url = app.url("/admin/events");

    let none = app.client.get(&url).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert!(none.headers().contains_key("www-authenticate"));
    let body: Value = none.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    let wrong = app
        .client
        .get(&url)
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let prefix = app
        .client
        .get(&url)
        .bearer_auth(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])
        .send()
        .await
        .unwrap();
    assert_eq!(
        prefix.status(),
        401,
        "a prefix of the token is not the token"
    );
    let basic = app
        .client
        .get(&url)
        .basic_auth("admin", Some(ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
    for (method, path) in [
        (reqwest::Method::POST, "/admin/replay"),
        (reqwest::Method::POST, "/admin/events/x/replay"),
        (reqwest::Method::PUT, "/admin/mappings/erp/k"),
        (reqwest::Method::GET, "/admin/events/x"),
    ] {
        let r = app
            .client
            .request(method.clone(), app.url(path))
            .header("content-type", "application/json")
            .body(r#"{"lead_ids":[1]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} {path} without the token");
    }
    app.admin_get("/admin/events").await.expect(200);

    // With no admin token configured, the admin API is not there at all.
    let off = TestApp::builder(b)
        .config(|c| c.admin.token = Secret::new(""))
        .spawn()
        .await;
    let r = off
        .client
        .get(off.url("/admin/events"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let r = off
        .client
        .get(off.url("/admin/events"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Webhooks still work without the admin API.
    off.post_webhook("erp", &erp_event("evt_off", 1, 2))
        .await
        .expect(202);
}

async fn admin_list_paginates_and_filters(b: Backend) {
    let app = TestApp::spawn(b).await;
    for i in 1..=7 {
        app.post_webhook("erp", &erp_event(&format!("evt_p{i}"), i, 100))
            .await
            .expect(202);
    }
    let page = |cursor: Option<String>, extra: &'static str| {
        let app = &app;
        async move {
            let mut path = format!("/admin/events?limit=3{extra}");
            if let Some(c) = cursor {
                path.push_str(&format!("&cursor={}", encode_path(&c)));
            }
            let r = app.admin_get(&path).await;
            let body = r.expect(200).clone();
            let ids: Vec<String> = body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["event_id"].as_str().unwrap().to_string())
                .collect();
            let next = body["next_cursor"].as_str().map(str::to_string);
            assert!(body["next_cursor"].is_null() || next.is_some());
            (ids, next, body)
        }
    };

    let (p1, c1, body) = page(None, "").await;
    assert_eq!(p1, ["evt_p7", "evt_p6", "evt_p5"], "newest first");
    for e in body["events"].as_array().unwrap() {
        for field in ["event_id", "source", "state", "received_at", "object_id"] {
            assert!(!e[field].is_null(), "{field} missing in {e}");
        }
        parse_rfc3339(e["received_at"].as_str().unwrap());
    }
    // New events arrive while the operator pages: no repeats, no gaps.
    app.post_webhook("erp", &erp_event("evt_p8", 8, 100))
        .await
        .expect(202);
    let (p2, c2, _) = page(c1, "").await;
    assert_eq!(p2, ["evt_p4", "evt_p3", "evt_p2"]);
    app.post_webhook("erp", &erp_event("evt_p9", 9, 100))
        .await
        .expect(202);
    let (p3, c3, _) = page(c2, "").await;
    assert_eq!(p3, ["evt_p1"]);
    assert!(c3.is_none(), "the last page has no next_cursor");
    let (fresh, _, _) = page(None, "").await;
    assert_eq!(fresh, ["evt_p9", "evt_p8", "evt_p7"]);

    // Filters: a second source and some parked events.
    for i in 1..=2 {
        app.post_webhook(
            "shop",
            &json!({"id": format!("s_{i}"), "object": i, "lead": 200}),
        )
        .await
        .expect(202);
    }
    app.post_webhook("shop", &json!({"id": "s_parked", "object": 3}))
        .await
        .expect(202);
    app.post_webhook(
        "erp",
        &json!({"id": "evt_parked", "type": "object.created", "data": {"object_id": 4}}),
    )
    .await
    .expect(202);

    let ids = |events: Vec<Value>| -> Vec<String> {
        events
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(app.events(Some("parked")).await),
        ["evt_parked", "s_parked"]
    );
    let shop = app.admin_get("/admin/events?source=shop&limit=500").await;
    let shop: Vec<Value> = shop.expect(200)["events"].as_array().unwrap().clone();
    assert!(shop.iter().all(|e| e["source"] == "shop"));
    assert_eq!(ids(shop), ["s_parked", "s_2", "s_1"]);
    let both = app
        .admin_get("/admin/events?source=shop&state=parked")
        .await;
    assert_eq!(
        ids(both.expect(200)["events"].as_array().unwrap().clone()),
        ["s_parked"]
    );

    // Paging through a filter visits each matching event exactly once.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let (ids, next, _) = page(cursor, "&source=erp").await;
        seen.extend(ids);
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(seen.len() <= 20, "paging does not end");
    }
    let mut want: Vec<String> = (1..=9).rev().map(|i| format!("evt_p{i}")).collect();
    want.insert(0, "evt_parked".into());
    assert_eq!(seen, want);

    for bad in [
        "/admin/events?state=bogus",
        "/admin/events?limit=0",
        "/admin/events?limit=100000",
        "/admin/events?cursor=not-a-cursor",
    ] {
        app.admin_get(bad).await.expect_error(400, "bad_request");
    }
    app.admin_get("/admin/events/no-such-event")
        .await
        .expect_error(404, "not_found");
}

async fn bulk_replay_by_state_and_source(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.hub.script([
        Canned::new(400, r#"{"msg":"no"}"#),
        Canned::new(400, r#"{"msg":"no"}"#),
        Canned::new(400, r#"{"msg":"no"}"#),
    ]);
    app.post_webhook("erp", &erp_event("evt_b1", 1001, 1))
        .await
        .expect(202);
    app.post_webhook("erp", &erp_event("evt_b2", 1002, 1))
        .await
        .expect(202);
    app.post_webhook("shop", &json!({"id": "s_b3", "object": 1003, "lead": 1}))
        .await
        .expect(202);
    app.post_webhook(
        "erp",
        &json!({"id": "evt_bp", "type": "object.created", "data": {"object_id": 1004}}),
    )
    .await
    .expect(202);
    app.wait_for_state("evt_b1", "dead").await;
    app.wait_for_state("evt_b2", "dead").await;
    app.wait_for_state("s_b3", "dead").await;
    assert_eq!(app.link_calls().len(), 3);

    let r = app
        .admin_post("/admin/replay", &json!({"state": "dead", "source": "erp"}))
        .await;
    assert_eq!(r.expect(202), &json!({"replayed": 2, "next_cursor": null}));
    app.wait_for_state("evt_b1", "delivered").await;
    app.wait_for_state("evt_b2", "delivered").await;
    assert_eq!(
        app.event_state("s_b3").await.as_deref(),
        Some("dead"),
        "other sources untouched"
    );
    assert_eq!(
        app.event_state("evt_bp").await.as_deref(),
        Some("parked"),
        "other states untouched"
    );
    let linked = app.hub.linked_pairs();
    assert_eq!(linked.len(), 2);
    assert!(!linked.contains(&(json!(1003), json!(1))));

    // Without a source, every dead event.
    let r = app
        .admin_post("/admin/replay", &json!({"state": "dead"}))
        .await;
    assert_eq!(r.expect(202), &json!({"replayed": 1, "next_cursor": null}));
    app.wait_for_state("s_b3", "delivered").await;
    assert_eq!(app.link_calls().len(), 6);

    for bad in [json!({"state": "delivered"}), json!({"bogus": 1})] {
        app.admin_post("/admin/replay", &bad)
            .await
            .expect_error(400, "bad_request");
    }
}

/// Every log line about an event's delivery names the event and its source (the pair it shares
/// with other events is named too), and the request path logs the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_log_lines_name_the_event_and_source() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    app.hub.script([Canned::new(503, r#"{"msg":"busy"}"#)]);
    app.post_webhook("erp", &erp_event("evt-logged-77", 424_242, 17))
        .await
        .expect(202);
    app.wait_for_state("evt-logged-77", "delivered").await;
    let logs = captured_logs();
    let about: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("object_id=424242"))
        .collect();
    let named = |what: &str| {
        about.iter().any(|l| {
            l.contains(what) && l.contains("event_id=evt-logged-77") && l.contains("source=erp")
        })
    };
    assert!(
        named("link attempt failed"),
        "no failed-attempt line naming the event:\n{}",
        about.join("\n")
    );
    assert!(
        named("linked"),
        "no linked line naming the event:\n{}",
        about.join("\n")
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("event queued") && l.contains("event_id=evt-logged-77"))
    );
    assert!(
        !logs.contains(API_TOKEN),
        "the API token reached a log line"
    );
}

/// An event's links come a page at a time: every link once, in order, then no cursor; a
/// malformed page request is a 400 in the JSON error format.
async fn event_document_pages_its_links(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.post_webhook("erp", &erp_event("many", 77, json!([1, 2, 3, 4, 5])))
        .await
        .expect(202);
    app.wait_for_state("many", "delivered").await;
    let whole = app.event("many").await;
    assert_eq!(whole["links"].as_array().unwrap().len(), 5);
    assert_eq!(whole["next_links_cursor"], Value::Null);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => "/admin/events/many?links_limit=2".to_string(),
            Some(c) => format!("/admin/events/many?links_limit=2&links_cursor={c}"),
        };
        let r = app.admin_get(&path).await;
        let page = r.expect(200).clone();
        pages += 1;
        let links = page["links"].as_array().unwrap();
        assert!(links.len() <= 2, "{page}");
        seen.extend(links.iter().map(|l| l["lead_id"].clone()));
        match page["next_links_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 10, "the cursor never ends");
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        vec![json!("1"), json!("2"), json!("3"), json!("4"), json!("5")]
    );
    app.admin_get("/admin/events/many?links_limit=0")
        .await
        .expect_error(400, "bad_request");
    app.admin_get("/admin/events/many?links_cursor=zz")
        .await
        .expect_error(400, "bad_request");
}

/// Posts `json` signed with a fixed, header-safe message id (the body's ids may hold bytes no
/// header can carry).
async fn post_signed(app: &TestApp, json: &Value) -> Resp {
    let raw = json.to_string();
    let headers = app.sign("erp", raw.as_bytes(), unix_ms() / 1000, "msg_ids");
    app.post_raw("erp", raw.into_bytes(), &headers).await
}

async fn oversized_and_control_char_ids_are_refused(b: Backend) {
    let app = TestApp::spawn(b).await;
    // Event ids: over 256 bytes, or with a control character, are refused and nothing is kept.
    post_signed(&app, &erp_event(&"e".repeat(257), 1, 2))
        .await
        .expect_error(400, "invalid_event_id");
    post_signed(&app, &erp_event("evt_\u{0}nul", 1, 2))
        .await
        .expect_error(400, "invalid_event_id");
    post_signed(&app, &erp_event("evt_\nnl", 1, 2))
        .await
        .expect_error(400, "invalid_event_id");
    // Object and lead ids PostgreSQL cannot store (NUL) or that carry control characters.
    post_signed(&app, &erp_event("evt_obj_nul", "o\u{0}1", 2))
        .await
        .expect_error(400, "invalid_id");
    post_signed(&app, &erp_event("evt_lead_nul", 1, json!([2, "l\u{1b}3"])))
        .await
        .expect_error(400, "invalid_id");
    assert!(app.events(None).await.is_empty(), "nothing was stored");

    // Within the caps and clean: accepted as before (256 bytes exactly is allowed).
    let at_cap = "e".repeat(256);
    post_signed(&app, &erp_event(&at_cap, 1, 2))
        .await
        .expect(202);

    // Too long an object id, lead id, or too many lead ids: stored, parked with a reason, and
    // the oversized value is not kept as the event's object id.
    let long_obj = "o".repeat(257);
    let body = post_signed(&app, &erp_event("evt_long_obj", long_obj.as_str(), 2))
        .await
        .expect(202)
        .clone();
    assert_eq!(body["status"], "parked", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("256"), "{body}");
    let ev = app.event("evt_long_obj").await;
    assert!(ev["object_id"].is_null(), "{ev}");

    let body = post_signed(&app, &erp_event("evt_long_lead", 1, "l".repeat(257)))
        .await
        .expect(202)
        .clone();
    assert_eq!(body["status"], "parked", "{body}");

    let many: Vec<u64> = (1..=101).collect();
    let body = post_signed(&app, &erp_event("evt_many", 1, json!(many)))
        .await
        .expect(202)
        .clone();
    assert_eq!(body["status"], "parked", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("100"), "{body}");
    let hundred: Vec<u64> = (1..=100).collect();
    post_signed(&app, &erp_event("evt_hundred", 1, json!(hundred)))
        .await
        .expect(202);
    app.wait_for_state("evt_hundred", "delivered").await;
    assert!(app.link_calls().len() >= 100);
}

// ------------------------------------------------------------------ admin and dashboard hardening

/// A client that shows redirects instead of following them, from a chosen loopback address.
fn raw_client(from: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Signs in through the login form; returns the `Set-Cookie` header and the session value.
async fn ui_login(app: &TestApp, client: &reqwest::Client) -> (String, String) {
    let r = client
        .post(app.url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={ADMIN_TOKEN}&next=%2Fui"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "login");
    let set = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("the login sets a cookie")
        .to_string();
    let value = set
        .strip_prefix("sprintlink_ui=")
        .and_then(|v| v.split(';').next())
        .expect("the session cookie")
        .to_string();
    assert!(!value.is_empty());
    (set, value)
}

/// `GET /ui` with this session: the status, and the page's CSRF token when it is there.
async fn ui_overview(
    app: &TestApp,
    client: &reqwest::Client,
    session: &str,
) -> (u16, String, Option<String>) {
    let r = client
        .get(app.url("/ui"))
        .header("cookie", format!("sprintlink_ui={session}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let loc = location(&r);
    let text = r.text().await.unwrap();
    let csrf = text
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(str::to_string);
    (status, loc, csrf)
}

async fn bulk_replay_is_bounded_with_a_cursor(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.hub
        .script((0..5).map(|_| Canned::new(400, r#"{"msg":"no"}"#)));
    for i in 1..=5 {
        app.post_webhook("erp", &erp_event(&format!("evt_c{i}"), 2000 + i, 1))
            .await
            .expect(202);
    }
    for i in 1..=5 {
        app.wait_for_state(&format!("evt_c{i}"), "dead").await;
    }
    // Two per call: three calls walk the five dead events, each answer saying where to go on.
    let mut cursor: Option<String> = None;
    let mut total = 0;
    let mut calls = 0;
    loop {
        let mut req = json!({"state": "dead", "limit": 2});
        if let Some(c) = &cursor {
            req["cursor"] = json!(c);
        }
        let r = app.admin_post("/admin/replay", &req).await;
        let body = r.expect(202).clone();
        calls += 1;
        let n = body["replayed"].as_u64().unwrap();
        assert!(n <= 2, "{body}");
        total += n;
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                assert!(body["next_cursor"].is_null(), "{body}");
                break;
            }
        }
        assert!(calls < 10, "the cursor walk does not end");
    }
    assert_eq!(total, 5);
    assert_eq!(calls, 3);
    for i in 1..=5 {
        app.wait_for_state(&format!("evt_c{i}"), "delivered").await;
    }
    // Nothing left: one call, nothing replayed, no cursor.
    let r = app.admin_post("/admin/replay", &json!({})).await;
    assert_eq!(r.expect(202), &json!({"replayed": 0, "next_cursor": null}));
    for bad in [
        json!({"limit": 0}),
        json!({"limit": 501}),
        json!({"cursor": "not-a-cursor"}),
    ] {
        app.admin_post("/admin/replay", &bad)
            .await
            .expect_error(400, "bad_request");
    }
}

async fn admin_rejections_are_json_errors(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| c.server.max_body_bytes = 4096)
        .spawn()
        .await;
    let put = reqwest::Method::PUT;
    let post = reqwest::Method::POST;
    // A JSON body sent as something else.
    app.admin(
        put.clone(),
        "/admin/mappings/erp/k",
        Some(("text/plain", r#"{"lead_ids":[1]}"#.into())),
    )
    .await
    .expect_error(415, "unsupported_media_type");
    app.admin(post.clone(), "/admin/replay", None)
        .await
        .expect_error(415, "unsupported_media_type");
    // A CSV import sent as JSON (the import's answer stays the 400 it always was).
    app.admin(
        post.clone(),
        "/admin/mappings/erp",
        Some(("application/json", "{}".into())),
    )
    .await
    .expect_error(400, "bad_request");
    // Not JSON, or not the expected shape.
    app.admin(
        put.clone(),
        "/admin/mappings/erp/k",
        Some(("application/json", "{not json".into())),
    )
    .await
    .expect_error(400, "bad_request");
    app.admin(
        put.clone(),
        "/admin/mappings/erp/k",
        Some(("application/json", r#"{"lead_ids":"x"}"#.into())),
    )
    .await
    .expect_error(400, "bad_request");
    // Larger than server.max_body_bytes, for JSON and for CSV.
    let big = format!(r#"{{"lead_ids":[1],"pad":"{}"}}"#, "y".repeat(5000));
    app.admin(
        put.clone(),
        "/admin/mappings/erp/k",
        Some(("application/json", big)),
    )
    .await
    .expect_error(413, "payload_too_large");
    let csv = "a@b.com,1\n".repeat(1000);
    app.admin(post.clone(), "/admin/mappings/erp", Some(("text/csv", csv)))
        .await
        .expect_error(413, "payload_too_large");
    // Path and query parse errors.
    app.admin_get("/admin/events?limit=abc")
        .await
        .expect_error(400, "bad_request");
    // Still fine when right.
    app.admin(
        put,
        "/admin/mappings/erp/k",
        Some(("application/json", r#"{"lead_ids":[1]}"#.into())),
    )
    .await
    .expect(200);
}

async fn failed_admin_auth_is_throttled_per_address(b: Backend) {
    let app = TestApp::spawn(b).await;
    let here = raw_client("127.0.0.1");
    let url = app.url("/admin/events");
    // Successes are not counted.
    for _ in 0..15 {
        let r = here
            .get(&url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Ten failures (the default admin.failed_auth_limit) are answered 401, the dashboard's and the
    // login form's included...
    for i in 0..10 {
        let r = match i % 3 {
            0 => here.get(&url).bearer_auth("guess").send().await.unwrap(),
            1 => here
                .get(app.url("/ui"))
                .bearer_auth("guess")
                .send()
                .await
                .unwrap(),
            _ => here
                .post(app.url("/ui/login"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("token=guess")
                .send()
                .await
                .unwrap(),
        };
        assert_eq!(r.status(), 401, "failure {i}");
    }
    // ...then every token check from that address is 429, the right token included.
    for token in ["guess", ADMIN_TOKEN] {
        let r = Resp::from(here.get(&url).bearer_auth(token).send().await.unwrap()).await;
        r.expect_error(429, "too_many_requests");
        let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=300).contains(&wait), "Retry-After {wait}");
    }
    let login = here
        .post(app.url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 429, "the login form is throttled too");
    // Another address is not.
    let other = raw_client("127.0.0.2");
    let r = other
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = other.get(&url).bearer_auth("guess").send().await.unwrap();
    assert_eq!(r.status(), 401);
}

async fn dashboard_sessions_are_server_side(b: Backend) {
    let mut app = TestApp::spawn(b).await;
    let client = raw_client("127.0.0.1");
    // `Secure` by default, even over plain HTTP.
    let (set, first) = ui_login(&app, &client).await;
    assert!(set.contains("; Secure"), "{set}");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(!first.contains(ADMIN_TOKEN));
    let (status, _, csrf) = ui_overview(&app, &client, &first).await;
    assert_eq!(status, 200);
    let csrf = csrf.expect("the page carries the logout form's CSRF token");

    // Logging out revokes the session on the server: the old cookie no longer signs in.
    let second = ui_login(&app, &client).await.1;
    assert_ne!(first, second);
    let r = client
        .post(app.url("/ui/logout"))
        .header("cookie", format!("sprintlink_ui={first}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/ui/login");
    let (status, loc, _) = ui_overview(&app, &client, &first).await;
    assert_eq!(status, 303, "a revoked session is signed out");
    assert!(loc.starts_with("/ui/login"), "{loc}");
    assert_eq!(
        ui_overview(&app, &client, &second).await.0,
        200,
        "other sessions stay"
    );

    // Session keys are per process: a restart signs everybody out.
    app.restart().await;
    let (status, loc, _) = ui_overview(&app, &client, &second).await;
    assert_eq!(status, 303, "a session of the previous process");
    assert!(loc.starts_with("/ui/login"), "{loc}");

    // Plain-HTTP development: admin.secure_cookies = false.
    let dev = TestApp::builder(b)
        .config(|c| c.admin.secure_cookies = false)
        .spawn()
        .await;
    let (set, _) = ui_login(&dev, &client).await;
    assert!(!set.contains("Secure"), "{set}");
    // ...but behind an https proxy the cookie is Secure anyway.
    let r = client
        .post(dev.url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body(format!("token={ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.contains("; Secure"), "{set}");
}

async fn dashboard_posts_authenticate_before_reading_bodies(b: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn(b).await;
    // Nobody signed in, a body announced as 1 MB of which only a little ever comes: answered at
    // once (to the login page), without waiting for the body.
    for path in ["/ui/logout", "/ui/events/x/replay"] {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: 1000000\r\n\r\ncsrf=",
            app.addr
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer before the body was sent"))
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 303"), "{path}: {answer}");
        assert!(answer.contains("/ui/login"), "{path}: {answer}");
    }
    // Signed in, the forms' bodies are small and capped (8 KiB).
    let client = raw_client("127.0.0.1");
    let big = format!("csrf={}", "a".repeat(20_000));
    for path in ["/ui/logout", "/ui/events/x/replay"] {
        let r = client
            .post(app.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        Resp::from(r).await.expect_error(413, "payload_too_large");
    }
    let r = client
        .post(app.url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", "a".repeat(20_000)))
        .send()
        .await
        .unwrap();
    Resp::from(r).await.expect_error(413, "payload_too_large");
    // A small form still works.
    let r = client
        .post(app.url("/ui/logout"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
}
