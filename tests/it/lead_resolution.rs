//! Lead resolution end to end, against both storage backends: from the key a sender knows (an
//! email, a phone number) to SprintHub lead ids, through the mapping table or a SprintHub search.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};
use sprintlink::config::{LeadField, LookupKind};

both_backends!(
    table_lookup_links_mapped_keys_and_parks_unknown_ones,
    csv_import_is_all_or_nothing,
    email_keys_are_case_insensitive,
    sprinthub_lookup_keeps_exact_matches_only,
    phone_numbers_compare_by_digits,
    one_search_serves_many_events_for_one_customer,
    negative_cache_expires,
    create_missing_creates_one_lead_for_concurrent_events,
    a_replay_keeps_a_pair_whose_call_is_in_flight,
);

/// `crm` resolves `/data/customer/email` through the mapping table; `hub` and `wa` search
/// SprintHub by email and by WhatsApp number; `new` also creates the lead when none matches.
async fn spawn(
    b: Backend,
    tweak: impl FnOnce(&mut sprintlink::Config) + Send + 'static,
) -> TestApp {
    TestApp::builder(b)
        .config(|c| {
            c.sources.push(lookup_source(
                "crm",
                "/data/customer/email",
                LookupKind::Table,
                None,
            ));
            c.sources.push(lookup_source(
                "hub",
                "/data/customer/email",
                LookupKind::Sprinthub,
                Some(LeadField::Email),
            ));
            c.sources.push(lookup_source(
                "wa",
                "/data/customer/whatsapp",
                LookupKind::Sprinthub,
                Some(LeadField::Whatsapp),
            ));
            let mut new = lookup_source(
                "new",
                "/data/customer/email",
                LookupKind::Sprinthub,
                Some(LeadField::Email),
            );
            new.lead.create_missing = true;
            new.lead.create_fields = BTreeMap::from([
                ("email".to_string(), "/data/customer/email".into()),
                ("firstname".to_string(), "/data/customer/name".into()),
            ]);
            c.sources.push(new);
        })
        .config(tweak)
        .spawn()
        .await
}

fn email_event(id: &str, object_id: i64, email: &str) -> Value {
    customer_event(id, object_id, json!({"email": email}))
}

/// The `(objectId, targetId)` pairs SprintHub linked, sorted.
fn linked(app: &TestApp) -> Vec<(Value, Value)> {
    let mut p = app.hub.linked_pairs();
    p.sort_by_key(|(o, l)| (o.to_string(), l.to_string()));
    p
}

fn searches(app: &TestApp) -> Vec<sprintlink::standin::Received> {
    app.hub.requests_to("/leadsadvanced")
}

async fn table_lookup_links_mapped_keys_and_parks_unknown_ones(b: Backend) {
    let app = spawn(b, |_| {}).await;

    let r = app
        .admin_put(
            "/admin/mappings/crm/ann@example.com",
            &json!({"lead_ids": [17]}),
        )
        .await;
    assert_eq!(
        r.expect(200),
        &json!({"source": "crm", "key": "ann@example.com", "lead_ids": [17]})
    );
    app.put_mapping("crm", "bob@example.com", json!([18, "19"]))
        .await;

    let r = app
        .post_webhook("crm", &email_event("t_1", 501, "ann@example.com"))
        .await;
    assert_eq!(r.expect(202)["status"], "queued");
    app.post_webhook("crm", &email_event("t_2", 502, "bob@example.com"))
        .await
        .expect(202);
    app.wait_for_state("t_1", "delivered").await;
    let d2 = app.wait_for_state("t_2", "delivered").await;
    assert_eq!(d2["links"].as_array().unwrap().len(), 2);
    assert_eq!(
        linked(&app),
        vec![
            (json!(501), json!(17)),
            (json!(502), json!(18)),
            (json!(502), json!(19))
        ]
    );

    // A key nobody mapped yet: parked, with a reason an operator can act on.
    app.post_webhook("crm", &email_event("t_3", 503, "carol@example.com"))
        .await
        .expect(202);
    let parked = app.wait_for_state("t_3", "parked").await;
    let reason = parked["reason"]
        .as_str()
        .expect("a parked event has a reason");
    assert!(
        reason.contains("carol@example.com"),
        "the reason names the key: {reason}"
    );
    assert!(
        reason.contains("/admin/mappings/crm"),
        "the reason says how to fix it: {reason}"
    );
    assert_eq!(parked["links"], json!([]));

    // The operator adds the mapping and replays.
    app.put_mapping("crm", "carol@example.com", json!([20]))
        .await;
    app.replay("t_3").await;
    let d3 = app.wait_for_state("t_3", "delivered").await;
    assert!(d3["reason"].is_null(), "the old reason is gone: {d3}");
    assert!(linked(&app).contains(&(json!(503), json!(20))));
    assert_eq!(app.link_calls().len(), 4);

    // The mapping API round trip.
    let got = app.admin_get("/admin/mappings/crm/bob@example.com").await;
    assert_eq!(got.expect(200)["lead_ids"], json!([18, 19]));
    let del = app
        .admin(
            reqwest::Method::DELETE,
            "/admin/mappings/crm/bob@example.com",
            None,
        )
        .await;
    assert_eq!(del.status, 204);
    app.admin_get("/admin/mappings/crm/bob@example.com")
        .await
        .expect_error(404, "not_found");
    app.admin_put("/admin/mappings/nope/x", &json!({"lead_ids": [1]}))
        .await
        .expect_error(404, "unknown_source");
    app.admin_put("/admin/mappings/crm/x", &json!({"lead_ids": []}))
        .await
        .expect_error(400, "bad_request");
}

async fn csv_import_is_all_or_nothing(b: Backend) {
    let app = spawn(b, |_| {}).await;
    let csv = |body: &str| {
        let body = body.to_string();
        let app = &app;
        async move {
            app.admin(
                reqwest::Method::POST,
                "/admin/mappings/crm",
                Some(("text/csv", body)),
            )
            .await
        }
    };

    let r = csv("key,lead_id\nc1@x.com,31\nC2@X.com,32\n\nc2@x.com,33\n").await;
    assert_eq!(r.expect(200), &json!({"imported": 3}));
    let c2 = app.admin_get("/admin/mappings/crm/c2@x.com").await;
    assert_eq!(c2.expect(200)["lead_ids"], json!([32, 33]));
    // Without a header row too.
    let r = csv("c3@x.com,34\n").await;
    assert_eq!(r.expect(200), &json!({"imported": 1}));

    // A bad line rejects the whole file, naming the line.
    let r = csv("d1@x.com,41\nd2@x.com\nd3@x.com,43\n").await;
    r.expect_error(400, "bad_request");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("line 2"), "the error names line 2: {msg}");
    for key in ["d1@x.com", "d3@x.com"] {
        app.admin_get(&format!("/admin/mappings/crm/{key}"))
            .await
            .expect_error(404, "not_found");
    }
    let r = csv("key,lead_id\ne1@x.com,51\ne2@x.com,not an id,3\n").await;
    r.expect_error(400, "bad_request");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 3")
    );
    app.admin_get("/admin/mappings/crm/e1@x.com")
        .await
        .expect_error(404, "not_found");

    // Other content types are refused, unknown sources too.
    app.admin_post("/admin/mappings/crm", &json!({"c9@x.com": 9}))
        .await
        .expect_error(400, "bad_request");
    app.admin(
        reqwest::Method::POST,
        "/admin/mappings/nope",
        Some(("text/csv", "a,1\n".into())),
    )
    .await
    .expect_error(404, "unknown_source");

    // The imported rows are used.
    app.post_webhook("crm", &email_event("csv_1", 601, "C1@x.com"))
        .await
        .expect(202);
    app.post_webhook("crm", &email_event("csv_2", 602, "c2@x.com"))
        .await
        .expect(202);
    app.wait_for_state("csv_1", "delivered").await;
    app.wait_for_state("csv_2", "delivered").await;
    assert_eq!(
        linked(&app),
        vec![
            (json!(601), json!(31)),
            (json!(602), json!(32)),
            (json!(602), json!(33))
        ]
    );
}

async fn email_keys_are_case_insensitive(b: Backend) {
    let app = spawn(b, |_| {}).await;
    let r = app
        .admin_put(
            "/admin/mappings/crm/Ann@Example.COM",
            &json!({"lead_ids": [17]}),
        )
        .await;
    assert_eq!(r.expect(200)["key"], "ann@example.com");
    let got = app.admin_get("/admin/mappings/crm/aNN@eXAMPLE.com").await;
    assert_eq!(got.expect(200)["lead_ids"], json!([17]));

    app.post_webhook("crm", &email_event("ci_1", 701, "ANN@example.com"))
        .await
        .expect(202);
    app.post_webhook("crm", &email_event("ci_2", 702, "  ann@EXAMPLE.com "))
        .await
        .expect(202);
    app.wait_for_state("ci_1", "delivered").await;
    app.wait_for_state("ci_2", "delivered").await;
    assert_eq!(
        linked(&app),
        vec![(json!(701), json!(17)), (json!(702), json!(17))]
    );
}

async fn sprinthub_lookup_keeps_exact_matches_only(b: Backend) {
    let app = spawn(b, |_| {}).await;
    // The stand-in's search is free text, like SprintHub's: all of these come back for "ann@".
    app.hub
        .add_lead(json!({"id": 17, "email": "Ann@Example.com"}));
    app.hub
        .add_lead(json!({"id": 18, "email": "ann@example.com.br"}));
    app.hub
        .add_lead(json!({"id": 19, "email": "joann@example.com"}));
    app.hub
        .add_lead(json!({"id": 20, "email": "other@example.com"}));

    app.post_webhook("hub", &email_event("h_1", 801, "ann@EXAMPLE.com"))
        .await
        .expect(202);
    app.wait_for_state("h_1", "delivered").await;
    assert_eq!(linked(&app), vec![(json!(801), json!(17))]);

    let s = searches(&app);
    assert_eq!(s.len(), 1);
    assert_eq!(
        s[0].body,
        json!({"query": "{leads{id,email,whatsapp,mobile}}", "search": "ann@example.com", "page": 0, "limit": 15})
    );
    assert_eq!(query_param(&s[0], "apitoken"), Some(API_TOKEN));
    assert_eq!(query_param(&s[0], "i"), Some(INSTANCE));

    // Only look-alikes: parked, nothing created (create_missing is off for this source).
    app.post_webhook("hub", &email_event("h_2", 802, "nn@example.com"))
        .await
        .expect(202);
    let parked = app.wait_for_state("h_2", "parked").await;
    let reason = parked["reason"].as_str().unwrap();
    assert!(reason.contains("nn@example.com"), "{reason}");
    assert!(app.hub.requests_to("/leads").is_empty());
    assert_eq!(app.link_calls().len(), 1);
}

async fn phone_numbers_compare_by_digits(b: Backend) {
    let app = spawn(b, |_| {}).await;
    app.hub
        .add_lead(json!({"id": 40, "whatsapp": "551199990000"}));
    // Contains the same digits, but is another number.
    app.hub
        .add_lead(json!({"id": 41, "whatsapp": "5511999900001"}));
    app.hub
        .add_lead(json!({"id": 43, "whatsapp": "+55 (21) 8888-7777"}));

    app.post_webhook(
        "wa",
        &customer_event("w_1", 901, json!({"whatsapp": "+55 (11) 9999-0000"})),
    )
    .await
    .expect(202);
    app.post_webhook(
        "wa",
        &customer_event("w_2", 902, json!({"whatsapp": "552188887777"})),
    )
    .await
    .expect(202);
    app.wait_for_state("w_1", "delivered").await;
    app.wait_for_state("w_2", "delivered").await;
    assert_eq!(
        linked(&app),
        vec![(json!(901), json!(40)), (json!(902), json!(43))]
    );
    let mut searched: Vec<String> = searches(&app)
        .iter()
        .map(|r| r.body["search"].as_str().unwrap().to_string())
        .collect();
    searched.sort();
    assert_eq!(
        searched,
        ["551199990000", "552188887777"],
        "searched by digits"
    );
}

async fn one_search_serves_many_events_for_one_customer(b: Backend) {
    let app = spawn(b, |_| {}).await;
    app.hub
        .add_lead(json!({"id": 17, "email": "ann@example.com"}));

    // Posted together, so the worker picks them up together.
    let e: Vec<Value> = (0..6)
        .map(|i| email_event(&format!("n_{i}"), 1000 + i, "ann@example.com"))
        .collect();
    let answers = tokio::join!(
        app.post_webhook("hub", &e[0]),
        app.post_webhook("hub", &e[1]),
        app.post_webhook("hub", &e[2]),
        app.post_webhook("hub", &e[3]),
        app.post_webhook("hub", &e[4]),
        app.post_webhook("hub", &e[5]),
    );
    for r in <[Resp; 6]>::from(answers) {
        r.expect(202);
    }
    for i in 0..6 {
        app.wait_for_state(&format!("n_{i}"), "delivered").await;
    }
    assert_eq!(app.link_calls().len(), 6);
    assert!(linked(&app).iter().all(|(_, l)| l == &json!(17)));
    assert_eq!(
        searches(&app).len(),
        1,
        "six events for one customer cost one search"
    );

    let m = app.metrics().await;
    assert!(
        m.contains("# TYPE sprintlink_lead_lookups_total counter"),
        "{m}"
    );
    assert!(
        m.contains("sprintlink_lead_lookups_total{outcome=\"hit\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("sprintlink_lead_lookups_total{outcome=\"cache_hit\"} 5"),
        "{m}"
    );
}

async fn negative_cache_expires(b: Backend) {
    let app = spawn(b, |c| c.lookup.negative_cache_ttl_seconds = 1).await;

    app.post_webhook("hub", &email_event("neg_1", 1101, "dave@example.com"))
        .await
        .expect(202);
    app.wait_for_state("neg_1", "parked").await;
    assert_eq!(searches(&app).len(), 1);
    let first_search = searches(&app)[0].at;

    // The lead now exists, but "not found" is remembered for a second.
    app.hub
        .add_lead(json!({"id": 50, "email": "dave@example.com"}));
    app.post_webhook("hub", &email_event("neg_2", 1102, "dave@example.com"))
        .await
        .expect(202);
    app.wait_for_state("neg_2", "parked").await;
    let s = searches(&app);
    assert_eq!(s.len(), 1, "answered from the negative cache");
    assert!(
        s[1..]
            .iter()
            .all(|r| r.at.duration_since(first_search) >= Duration::from_secs(1))
    );

    // After the TTL, the next resolution asks SprintHub again.
    let ttl_over = Duration::from_millis(1_100).saturating_sub(first_search.elapsed());
    tokio::time::sleep(ttl_over).await;
    app.replay("neg_1").await;
    app.wait_for_state("neg_1", "delivered").await;
    assert_eq!(searches(&app).len(), 2);
    // And the positive answer is cached.
    app.replay("neg_2").await;
    app.wait_for_state("neg_2", "delivered").await;
    assert_eq!(searches(&app).len(), 2);
    assert_eq!(
        linked(&app),
        vec![(json!(1101), json!(50)), (json!(1102), json!(50))]
    );
}

async fn create_missing_creates_one_lead_for_concurrent_events(b: Backend) {
    let app = spawn(b, |_| {}).await;
    let ev = |i: i64| {
        customer_event(
            &format!("cm_{i}"),
            1200 + i,
            json!({"email": "eve@example.com", "name": "Eve"}),
        )
    };
    let e: Vec<Value> = (0..5).map(ev).collect();
    let (r0, r1, r2, r3, r4) = tokio::join!(
        app.post_webhook("new", &e[0]),
        app.post_webhook("new", &e[1]),
        app.post_webhook("new", &e[2]),
        app.post_webhook("new", &e[3]),
        app.post_webhook("new", &e[4]),
    );
    for r in [r0, r1, r2, r3, r4] {
        r.expect(202);
    }
    for i in 0..5 {
        app.wait_for_state(&format!("cm_{i}"), "delivered").await;
    }
    let created = app.hub.requests_to("/leads");
    assert_eq!(created.len(), 1, "one lead for one new customer");
    assert_eq!(
        created[0].body,
        json!({"email": "eve@example.com", "firstname": "Eve"})
    );
    let pairs = linked(&app);
    assert_eq!(pairs.len(), 5);
    let lead = &pairs[0].1;
    assert!(lead.is_number(), "the new lead's id: {lead}");
    assert!(
        pairs.iter().all(|(_, l)| l == lead),
        "all linked to the new lead: {pairs:?}"
    );

    // A later event for the same customer finds the lead; nothing is created again.
    app.post_webhook("new", &ev(5)).await.expect(202);
    app.wait_for_state("cm_5", "delivered").await;
    assert_eq!(app.hub.requests_to("/leads").len(), 1);
    assert!(linked(&app).contains(&(json!(1205), lead.clone())));
    let m = app.metrics().await;
    assert!(
        m.contains("sprintlink_lead_lookups_total{outcome=\"created\"} 1"),
        "{m}"
    );
}

/// A replay that lets a pair go while its call is in flight must keep the pair until the call
/// ends: the call links it at SprintHub, and a linked pair is never sent again, even when a
/// later replay names it once more.
async fn a_replay_keeps_a_pair_whose_call_is_in_flight(b: Backend) {
    let app = spawn(b, |_| {}).await;
    app.put_mapping("crm", "ann@example.com", json!([17])).await;
    app.hub.set_delay(Duration::from_millis(1500));
    app.post_webhook("crm", &email_event("fl_1", 601, "ann@example.com"))
        .await
        .expect(202);
    wait_until("the call for (601, 17) is in flight", TIMEOUT, async || {
        app.hub.max_concurrency() >= 1
    })
    .await;
    assert!(
        app.link_calls().is_empty(),
        "the call ended before the replay"
    );
    // The operator maps the key elsewhere and replays while that call goes on.
    app.put_mapping("crm", "ann@example.com", json!([18])).await;
    app.replay("fl_1").await;
    app.wait_for_state("fl_1", "delivered").await;
    app.hub.set_delay(Duration::ZERO);
    // Mapped back and replayed: (601, 17) was linked by the first call and is not sent again.
    app.put_mapping("crm", "ann@example.com", json!([17])).await;
    app.replay("fl_1").await;
    app.wait_for_state("fl_1", "delivered").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent_17 = app
        .link_calls()
        .iter()
        .filter(|c| c.body["targetId"] == json!(17))
        .count();
    assert_eq!(sent_17, 1, "(601, 17) was sent again after it was linked");
}
