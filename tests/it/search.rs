//! Admin search (SPEC 10): the `object_id`, `lead_id`, `since`, `until` and `q` filters of
//! `GET /admin/events` and `POST /admin/replay`; `POST /admin/events/{id}/discard` and the
//! `discarded` state; `sprintlink_oldest_pending_seconds`.

use std::time::Duration;

use serde_json::{Value, json};
use sprintlink::config::LookupKind;
use sprintlink::standin::Canned;

use crate::common::*;

both_backends!(
    each_filter_alone_and_with_state_and_source,
    a_bad_filter_is_a_bad_request,
    replay_takes_the_same_filters,
    a_discarded_event_sends_nothing_for_its_pairs,
    discard_refuses_a_delivered_event_and_a_missing_reason,
    oldest_pending_is_the_age_of_a_stalled_link,
);

/// The ids of a page of `GET /admin/events?{query}`, sorted.
async fn ids(app: &TestApp, query: &str) -> Vec<String> {
    let r = app
        .admin_get(&format!("/admin/events?limit=500&{query}"))
        .await;
    let mut ids: Vec<String> = r.expect(200)["events"]
        .as_array()
        .expect("events is a list")
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn list(ids: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// The value of an unlabelled gauge, or of one labelled sample given with its labels.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
        .parse()
        .unwrap()
}

async fn spawn(b: Backend) -> TestApp {
    TestApp::builder(b)
        .config(|c| {
            c.sources.push(lookup_source(
                "crm",
                "/data/customer/email",
                LookupKind::Table,
                None,
            ));
        })
        .spawn()
        .await
}

async fn post_shop(app: &TestApp, id: &str, object: i64, lead: i64) {
    let body = json!({"id": id, "object": object, "lead": lead});
    app.post_webhook("shop", &body).await.expect(202);
}

async fn each_filter_alone_and_with_state_and_source(b: Backend) {
    let app = spawn(b).await;
    app.put_mapping("crm", "ann@example.com", json!([7])).await;
    // Received in this order, a few milliseconds apart, so `since`/`until` can cut between them.
    let posts: [(&str, i64, i64); 3] = [("ord-1", 100, 1), ("ord-2", 100, 2), ("inv-1", 200, 1)];
    for (id, object, lead) in posts {
        app.post_webhook("erp", &erp_event(id, object, lead))
            .await
            .expect(202);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    post_shop(&app, "ord-1", 100, 3).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    app.post_webhook(
        "crm",
        &customer_event("c-1", 300, json!({"email": "Ann@Example.com"})),
    )
    .await
    .expect(202);
    for id in ["ord-2", "inv-1", "c-1"] {
        app.wait_for_state(id, "delivered").await;
    }
    wait_until(
        "every event delivered",
        Duration::from_secs(10),
        async || app.events(Some("delivered")).await.len() == 5,
    )
    .await;

    // object_id
    assert_eq!(
        ids(&app, "object_id=100").await,
        list(&["ord-1", "ord-1", "ord-2"])
    );
    assert_eq!(
        ids(&app, "object_id=100&source=erp").await,
        list(&["ord-1", "ord-2"])
    );
    assert_eq!(
        ids(&app, "object_id=100&source=shop").await,
        list(&["ord-1"])
    );
    assert_eq!(
        ids(&app, "object_id=100&state=delivered").await,
        list(&["ord-1", "ord-1", "ord-2"])
    );
    assert!(ids(&app, "object_id=100&state=dead").await.is_empty());
    assert!(ids(&app, "object_id=999").await.is_empty());

    // lead_id: events with a link to that lead
    assert_eq!(ids(&app, "lead_id=1").await, list(&["inv-1", "ord-1"]));
    assert_eq!(
        ids(&app, "lead_id=1&source=shop").await,
        Vec::<String>::new()
    );
    assert_eq!(ids(&app, "lead_id=3").await, list(&["ord-1"]));
    assert_eq!(ids(&app, "lead_id=7&state=delivered").await, list(&["c-1"]));
    assert!(ids(&app, "lead_id=7&state=queued").await.is_empty());

    // since / until on received_at (since inclusive, until exclusive)
    let all = app.events(None).await;
    let at = |id: &str, source: &str| {
        all.iter()
            .find(|e| e["event_id"] == id && e["source"] == source)
            .map(|e| e["received_at"].as_str().unwrap().to_string())
            .unwrap()
    };
    let t2 = at("ord-2", "erp");
    let since = format!("since={}", encode_path(&t2));
    let until = format!("until={}", encode_path(&t2));
    assert_eq!(
        ids(&app, &since).await,
        list(&["ord-2", "inv-1", "ord-1", "c-1"])
    );
    assert_eq!(
        ids(&app, &format!("{since}&source=erp")).await,
        list(&["ord-2", "inv-1"])
    );
    assert_eq!(ids(&app, &until).await, list(&["ord-1"]));
    let t_inv = at("inv-1", "erp");
    let window = format!("{since}&until={}", encode_path(&t_inv));
    assert_eq!(ids(&app, &window).await, list(&["ord-2"]));
    assert_eq!(
        ids(&app, &format!("{window}&state=delivered&source=erp")).await,
        list(&["ord-2"])
    );
    // An offset means the same instant: ord-2's time written two hours ahead.
    let ms = parse_rfc3339(&t2);
    let ahead = chrono_free_offset(ms, 2);
    assert_eq!(
        ids(&app, &format!("until={}", encode_path(&ahead))).await,
        list(&["ord-1"])
    );

    // q: an event id prefix (no wildcard: `%` and `_` are themselves) ...
    assert_eq!(
        ids(&app, "q=ord-").await,
        list(&["ord-1", "ord-1", "ord-2"])
    );
    assert_eq!(
        ids(&app, "q=ord-&source=erp").await,
        list(&["ord-1", "ord-2"])
    );
    assert_eq!(ids(&app, "q=ord-2&state=delivered").await, list(&["ord-2"]));
    assert_eq!(ids(&app, "q=inv-1").await, list(&["inv-1"]));
    assert!(ids(&app, "q=ord%25").await.is_empty());
    assert!(ids(&app, "q=o_d").await.is_empty());
    // ... or a lead key of a mapping table: the events linked to the leads it maps to
    // (compared as the lookup compares it: emails in lower case).
    assert_eq!(ids(&app, "q=ann%40example.com").await, list(&["c-1"]));
    assert_eq!(ids(&app, "q=Ann%40Example.com").await, list(&["c-1"]));
    assert!(ids(&app, "q=ann%40example.com&source=erp").await.is_empty());
    assert!(ids(&app, "q=nobody%40example.com").await.is_empty());

    // Pages of a filtered list follow the cursor.
    let r = app.admin_get("/admin/events?q=ord-&limit=2").await;
    let page = r.expect(200).clone();
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let r = app
        .admin_get(&format!("/admin/events?q=ord-&limit=2&cursor={cursor}"))
        .await;
    let rest = r.expect(200);
    assert_eq!(rest["events"].as_array().unwrap().len(), 1);
    assert_eq!(rest["events"][0]["event_id"], "ord-1");
    assert_eq!(rest["events"][0]["source"], "erp");
}

/// `ms` as RFC 3339 written with a `+HH:00` offset.
fn chrono_free_offset(ms: i64, hours: i64) -> String {
    let local = ms + hours * 3_600_000;
    let utc = sprintlink::http::admin::rfc3339(local);
    format!("{}+{hours:02}:00", utc.trim_end_matches('Z'))
}

async fn a_bad_filter_is_a_bad_request(b: Backend) {
    let app = TestApp::spawn(b).await;
    for q in [
        "since=yesterday",
        "until=2026-02-30T00:00:00Z",
        "since=2026-01-01",
        "until=2026-01-01T00:00:00%2B0100",
    ] {
        app.admin_get(&format!("/admin/events?{q}"))
            .await
            .expect_error(400, "bad_request");
    }
    app.admin_post("/admin/replay", &json!({"since": "not a time"}))
        .await
        .expect_error(400, "bad_request");
    app.admin_post("/admin/replay", &json!({"state": "delivered"}))
        .await
        .expect_error(400, "bad_request");
    // Empty fields (what a dashboard form sends) filter nothing.
    app.admin_get("/admin/events?since=&until=&q=&object_id=&lead_id=")
        .await
        .expect(200);
}

async fn replay_takes_the_same_filters(b: Backend) {
    let app = TestApp::spawn(b).await;
    // Four permanent refusals: four dead events.
    app.hub
        .script((0..4).map(|_| Canned::new(400, r#"{"msg":"customobject is not linkable yet"}"#)));
    for (id, object, lead) in [
        ("r-1", 500, 1),
        ("r-2", 500, 2),
        ("r-3", 501, 1),
        ("x-1", 502, 1),
    ] {
        app.post_webhook("erp", &erp_event(id, object, lead))
            .await
            .expect(202);
        app.wait_for_state(id, "dead").await;
    }
    let replayed = app
        .admin_post(
            "/admin/replay",
            &json!({"state": "dead", "object_id": "500"}),
        )
        .await;
    assert_eq!(replayed.expect(202)["replayed"], 2);
    app.wait_for_state("r-1", "delivered").await;
    app.wait_for_state("r-2", "delivered").await;
    assert_eq!(app.event_state("r-3").await.as_deref(), Some("dead"));

    let replayed = app
        .admin_post("/admin/replay", &json!({"lead_id": "1", "q": "x-"}))
        .await;
    assert_eq!(replayed.expect(202)["replayed"], 1);
    app.wait_for_state("x-1", "delivered").await;
    assert_eq!(app.event_state("r-3").await.as_deref(), Some("dead"));
    let far = "2999-01-01T00:00:00Z";
    let replayed = app
        .admin_post("/admin/replay", &json!({"since": far}))
        .await;
    assert_eq!(replayed.expect(202)["replayed"], 0);
    assert_eq!(app.event_state("r-3").await.as_deref(), Some("dead"));
}

async fn discard(app: &TestApp, id: &str, source: Option<&str>) -> Value {
    let path = match source {
        Some(s) => format!("/admin/events/{}/discard?source={s}", encode_path(id)),
        None => format!("/admin/events/{}/discard", encode_path(id)),
    };
    app.admin_post(&path, &json!({"reason": "sent by mistake"}))
        .await
        .expect(200)
        .clone()
}

fn linked_to(app: &TestApp, object: i64, lead: i64) -> usize {
    app.hub
        .linked_pairs()
        .iter()
        .filter(|(o, l)| *o == json!(object) && *l == json!(lead))
        .count()
}

async fn a_discarded_event_sends_nothing_for_its_pairs(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.hub.set_down(true);
    // d-a alone wants (600, 61); d-b and live-b both want (601, 62); d-c wants (602, 63) and a
    // new event names that pair after the discard.
    app.post_webhook("erp", &erp_event("d-a", 600, 61))
        .await
        .expect(202);
    app.post_webhook("erp", &erp_event("d-b", 601, 62))
        .await
        .expect(202);
    app.post_webhook("erp", &erp_event("live-b", 601, 62))
        .await
        .expect(202);
    app.post_webhook("erp", &erp_event("d-c", 602, 63))
        .await
        .expect(202);
    // Each pair was tried (and refused) at least once: it is in the retry loop.
    wait_until("every pair tried", Duration::from_secs(10), async || {
        let calls = app.link_calls();
        [600, 601, 602]
            .iter()
            .all(|o| calls.iter().any(|c| c.body["objectId"] == json!(o)))
    })
    .await;
    let d = discard(&app, "d-a", None).await;
    assert_eq!(d["state"], "discarded");
    assert_eq!(d["reason"], "sent by mistake");
    discard(&app, "d-b", Some("erp")).await;
    discard(&app, "d-c", None).await;
    let metrics = app.metrics().await;
    assert_eq!(
        gauge(&metrics, "sprintlink_events{state=\"discarded\"}"),
        3.0
    );
    // A call claimed just before a discard has had its answer (503) by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.hub.set_down(false);

    // The pair another live event wants is still linked, for that event.
    app.wait_for_state("live-b", "delivered").await;
    assert_eq!(linked_to(&app, 601, 62), 1);
    // Retries back off 500 ms at most: two seconds is several rounds of the worker.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        linked_to(&app, 600, 61),
        0,
        "a discarded event's pair was sent"
    );
    assert_eq!(
        linked_to(&app, 602, 63),
        0,
        "a discarded event's pair was sent"
    );
    for id in ["d-a", "d-b", "d-c"] {
        assert_eq!(
            app.event_state(id).await.as_deref(),
            Some("discarded"),
            "{id}"
        );
    }
    assert_eq!(
        ids(&app, "state=discarded").await,
        list(&["d-a", "d-b", "d-c"])
    );

    // A new event naming the held pair wants it: it is sent, for that event only.
    app.post_webhook("erp", &erp_event("live-c", 602, 63))
        .await
        .expect(202);
    app.wait_for_state("live-c", "delivered").await;
    assert_eq!(linked_to(&app, 602, 63), 1);
    assert_eq!(app.event_state("d-c").await.as_deref(), Some("discarded"));

    // A replay brings a discarded event back, and links it.
    app.replay("d-a").await;
    app.wait_for_state("d-a", "delivered").await;
    assert_eq!(linked_to(&app, 600, 61), 1);
    let replayed = app
        .admin_post("/admin/replay", &json!({"state": "discarded", "q": "d-b"}))
        .await;
    assert_eq!(replayed.expect(202)["replayed"], 1);
    app.wait_for_state("d-b", "delivered").await;
    // Linked once, never again.
    assert_eq!(linked_to(&app, 601, 62), 1);
    let metrics = app.metrics().await;
    assert_eq!(
        gauge(&metrics, "sprintlink_events{state=\"discarded\"}"),
        1.0
    );
    let openapi = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(openapi.contains("\"discarded\""));
    assert!(openapi.contains("/admin/events/{event_id}/discard"));
}

async fn discard_refuses_a_delivered_event_and_a_missing_reason(b: Backend) {
    let app = TestApp::spawn(b).await;
    app.post_webhook("erp", &erp_event("done", 700, 1))
        .await
        .expect(202);
    app.wait_for_state("done", "delivered").await;
    app.admin_post("/admin/events/done/discard", &json!({"reason": "late"}))
        .await
        .expect_error(409, "conflict");
    app.admin_post("/admin/events/nope/discard", &json!({"reason": "x"}))
        .await
        .expect_error(404, "not_found");
    app.hub.set_down(true);
    app.post_webhook("erp", &erp_event("p", 701, 1))
        .await
        .expect(202);
    app.admin_post("/admin/events/p/discard", &json!({}))
        .await
        .expect_error(400, "bad_request");
    app.admin_post("/admin/events/p/discard", &json!({"reason": "  "}))
        .await
        .expect_error(400, "bad_request");
    assert_eq!(app.event_state("p").await.as_deref(), Some("queued"));
}

async fn oldest_pending_is_the_age_of_a_stalled_link(b: Backend) {
    let app = TestApp::spawn(b).await;
    assert_eq!(
        gauge(&app.metrics().await, "sprintlink_oldest_pending_seconds"),
        0.0
    );
    app.hub.set_down(true);
    app.post_webhook("erp", &erp_event("stalled", 800, 1))
        .await
        .expect(202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let age = gauge(&app.metrics().await, "sprintlink_oldest_pending_seconds");
    assert!((1.4..60.0).contains(&age), "oldest pending {age}");
    // A discarded event's pair waits for nobody: at once, or, when the discard met the pair's
    // call in flight, as soon as that call's outcome is recorded.
    discard(&app, "stalled", None).await;
    wait_until(
        "the discarded pair stops counting",
        Duration::from_secs(15),
        async || gauge(&app.metrics().await, "sprintlink_oldest_pending_seconds") == 0.0,
    )
    .await;
    app.replay("stalled").await;
    app.hub.set_down(false);
    app.wait_for_state("stalled", "delivered").await;
    assert_eq!(
        gauge(&app.metrics().await, "sprintlink_oldest_pending_seconds"),
        0.0
    );
}
