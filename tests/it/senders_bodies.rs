//! Any sender, no glue code (SPEC 6.1, 6.3, 6.4), on both storage backends: form and multipart
//! bodies, `header:` and `query:` references (also for the worker's lead resolution and for a
//! replay, which read the stored request), bodies stored byte for byte, and who may send
//! (`allow_ips`, `trusted_proxies`).

use crate::common::*;
use serde_json::{Value, json};
use sprintlink::config::{LeadConfig, LookupKind, SourceConfig};

both_backends!(
    a_form_post_with_repeated_and_bracketed_keys_is_linked,
    a_multipart_post_with_a_text_and_a_file_part_is_linked,
    header_references_name_the_event_object_and_lead,
    a_header_lead_key_is_resolved_later_from_the_stored_request,
    query_references_read_the_url_and_nothing_else_is_kept,
    unsupported_types_and_unreadable_forms_are_refused,
    a_body_that_is_not_utf8_is_stored_byte_for_byte_and_replayed,
    allow_ips_admits_and_refuses_the_peer,
    forwarded_for_counts_only_behind_a_trusted_proxy,
);

const FORM: &str = "application/x-www-form-urlencoded";

/// A GitHub-signed source (the signature covers the raw body, whatever its type) reading
/// `object` and `lead` wherever the test says.
fn source(name: &str, object: &str, lead: &str) -> SourceConfig {
    SourceConfig {
        name: name.into(),
        event_id: Some("/id".into()),
        object_id: Some(object.into()),
        lead: LeadConfig {
            id: Some(lead.into()),
            ..Default::default()
        },
        ..shop_source()
    }
}

/// Posts `body` to `/webhooks/{path}` (`path` may carry a query string) as `content_type`,
/// signed for `source`, with these extra headers.
async fn post(
    app: &TestApp,
    source: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    extra: &[(&str, &str)],
) -> Resp {
    let mut req = app
        .client
        .post(app.url(&format!("/webhooks/{path}")))
        .body(body.to_vec());
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    for (k, v) in app.sign(source, body, unix_ms() / 1000, "unused") {
        req = req.header(k, v);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    Resp::from(req.send().await.expect("webhook request")).await
}

/// What the database holds for an event: the raw body, the content type, and the stored
/// headers and query (JSON text).
async fn stored_row(
    app: &TestApp,
    event_id: &str,
) -> (Vec<u8>, Option<String>, Option<String>, Option<String>) {
    const SQL: &str = "SELECT raw_body, content_type, request_headers, request_query FROM events WHERE event_id = ";
    if let Some(path) = app.db.url.strip_prefix("sqlite://") {
        let c = rusqlite::Connection::open(path).unwrap();
        c.query_row(&format!("{SQL}?1"), [event_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap()
    } else {
        use sqlx::{Connection, Row};
        let mut c = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
        let r = sqlx::query(sqlx::AssertSqlSafe(format!("{SQL}$1")))
            .bind(event_id)
            .fetch_one(&mut c)
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    }
}

fn sorted_pairs(app: &TestApp) -> Vec<(Value, Value)> {
    let mut p = pairs(&app.link_calls());
    p.sort_by_key(|(o, l)| (o.to_string(), l.to_string()));
    p
}

/// A PHP-style form: repeated keys become arrays, brackets nest, and pointers read the result.
/// The event document shows the text received, its type, and the object the pointers saw.
async fn a_form_post_with_repeated_and_bracketed_keys_is_linked(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            c.sources
                .push(source("form", "/order/object_id", "/order/leads"))
        })
        .spawn()
        .await;
    let body = "id=f-1&order%5Bobject_id%5D=901&order[leads][]=11&order[leads][]=12&tag=a&tag=b&customer[name]=Ann+Lee";
    let r = post(&app, "form", "form", Some(FORM), body.as_bytes(), &[]).await;
    assert_eq!(r.expect(202)["status"], "queued", "{}", r.text);
    let detail = app.wait_for_state("f-1", "delivered").await;
    assert_eq!(
        sorted_pairs(&app),
        vec![(json!(901), json!(11)), (json!(901), json!(12))]
    );
    assert_eq!(detail["object_id"], "901");
    assert_eq!(detail["body"], body);
    assert_eq!(detail["content_type"], FORM);
    assert_eq!(
        detail["body_json"],
        json!({
            "id": "f-1",
            "order": {"object_id": "901", "leads": ["11", "12"]},
            "tag": ["a", "b"],
            "customer": {"name": "Ann Lee"},
        })
    );
}

/// Multipart: text parts are fields (brackets too), a file part is described, not kept apart.
async fn a_multipart_post_with_a_text_and_a_file_part_is_linked(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| c.sources.push(source("mp", "/object", "/lead")))
        .spawn()
        .await;
    let mut body = Vec::new();
    for (head, content) in [
        ("name=\"id\"", b"mp-1".as_slice()),
        ("name=\"object\"", b"902"),
        ("name=\"lead\"", b"21"),
        (
            "name=\"scan\"; filename=\"order.pdf\"\r\nContent-Type: application/pdf",
            b"%PDF-1.7\x00\xff\xfe binary",
        ),
    ] {
        body.extend_from_slice(b"--sprint-b0undary\r\nContent-Disposition: form-data; ");
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--sprint-b0undary--\r\n");
    let ct = "multipart/form-data; boundary=sprint-b0undary";
    let r = post(&app, "mp", "mp", Some(ct), &body, &[]).await;
    r.expect(202);
    let detail = app.wait_for_state("mp-1", "delivered").await;
    assert_eq!(sorted_pairs(&app), vec![(json!(902), json!(21))]);
    assert_eq!(detail["content_type"], ct);
    assert_eq!(
        detail["body_json"],
        json!({
            "id": "mp-1", "object": "902", "lead": "21",
            "scan": {"filename": "order.pdf", "content_type": "application/pdf", "size": 18},
        })
    );
    assert_eq!(detail["body"], String::from_utf8_lossy(&body).as_ref());
    let (raw, ..) = stored_row(&app, "mp-1").await;
    assert_eq!(raw, body, "stored byte for byte");
}

/// The event id, the object id and the lead id all come from headers (names compared
/// case-insensitively); the body carries nothing of them.
async fn header_references_name_the_event_object_and_lead(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            let mut s = source("hdr", "header:X-Object-Id", "HEADER:x-lead-id");
            s.event_id = Some("header:x-event-id".into());
            s.event_type = Some("header:X-Topic".into());
            s.accept_types = vec!["orders/create".into()];
            c.sources.push(s);
        })
        .spawn()
        .await;
    let headers = [
        ("X-Event-Id", "hdr-1"),
        ("x-object-id", "903"),
        ("X-LEAD-ID", "31"),
        ("X-Topic", "orders/create"),
        ("X-Unreferenced", "not kept"),
    ];
    let r = post(
        &app,
        "hdr",
        "hdr",
        Some("application/json"),
        b"{\"note\":1}",
        &headers,
    )
    .await;
    assert_eq!(r.expect(202)["event_id"], "hdr-1");
    let detail = app.wait_for_state("hdr-1", "delivered").await;
    assert_eq!(detail["event_type"], "orders/create");
    assert_eq!(sorted_pairs(&app), vec![(json!(903), json!(31))]);
    let (_, _, stored_headers, stored_query) = stored_row(&app, "hdr-1").await;
    let stored: Value = serde_json::from_str(&stored_headers.unwrap()).unwrap();
    assert_eq!(
        stored,
        json!({"x-event-id": "hdr-1", "x-object-id": "903", "x-lead-id": "31", "x-topic": "orders/create"}),
        "only the referenced headers are kept"
    );
    assert_eq!(stored_query, None);
    // Another type is ignored, as with a pointer.
    let other = [
        ("X-Event-Id", "hdr-2"),
        ("x-object-id", "1"),
        ("X-Lead-Id", "2"),
        ("X-Topic", "orders/delete"),
    ];
    let r = post(&app, "hdr", "hdr", None, b"{}", &other).await;
    assert_eq!(r.expect(200)["status"], "ignored");
    // A missing header parks the event like a missing pointer.
    let r = post(
        &app,
        "hdr",
        "hdr",
        None,
        b"{}",
        &[("X-Event-Id", "hdr-3"), ("X-Topic", "orders/create")],
    )
    .await;
    let body = r.expect(202);
    assert_eq!(body["status"], "parked");
    assert_eq!(body["reason"], "object id not found at header:x-object-id");
}

/// The lead key comes from a header and is resolved by the worker through the mapping table
/// after the request was answered; a replay after the mapping is added reads it again, from
/// the stored request.
async fn a_header_lead_key_is_resolved_later_from_the_stored_request(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            let mut s = source("keyed", "/object", "/unused");
            s.lead = LeadConfig {
                key: Some("header:X-Customer".into()),
                lookup: Some(LookupKind::Table),
                ..Default::default()
            };
            c.sources.push(s);
        })
        .spawn()
        .await;
    let r = post(
        &app,
        "keyed",
        "keyed",
        None,
        br#"{"id": "k-1", "object": 904}"#,
        &[("X-Customer", "Ann@Example.com")],
    )
    .await;
    assert_eq!(r.expect(202)["status"], "queued");
    let parked = app.wait_for_state("k-1", "parked").await;
    assert!(
        parked["reason"]
            .as_str()
            .unwrap()
            .contains("ann@example.com"),
        "{parked}"
    );
    app.put_mapping("keyed", "ann@example.com", json!([41]))
        .await;
    app.replay("k-1").await;
    app.wait_for_state("k-1", "delivered").await;
    assert_eq!(sorted_pairs(&app), vec![(json!(904), json!(41))]);
}

/// `query:` references read the webhook URL's query string; parameters no reference names
/// (here one that looks like a credential) are not stored.
async fn query_references_read_the_url_and_nothing_else_is_kept(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            let mut s = source("q", "query:obj", "/lead");
            s.event_id = Some("query:delivery".into());
            c.sources.push(s);
        })
        .spawn()
        .await;
    let path = "q?delivery=q-1&obj=905&token=sk_live_DISTINCTIVE_7f3a&obj=999";
    let r = post(&app, "q", path, None, br#"{"lead": 51}"#, &[]).await;
    assert_eq!(r.expect(202)["event_id"], "q-1");
    let detail = app.wait_for_state("q-1", "delivered").await;
    assert_eq!(
        sorted_pairs(&app),
        vec![(json!(905), json!(51))],
        "the first obj counts"
    );
    let (_, _, headers, query) = stored_row(&app, "q-1").await;
    assert_eq!(headers, None);
    let query: Value = serde_json::from_str(&query.unwrap()).unwrap();
    assert_eq!(query, json!({"delivery": "q-1", "obj": "905"}));
    assert!(!detail.to_string().contains("DISTINCTIVE"), "{detail}");
}

/// A type sprintlink does not read is a 415, a form it cannot read a 400 `invalid_body`, a
/// JSON body that does not parse still `invalid_json`; nothing is stored.
async fn unsupported_types_and_unreadable_forms_are_refused(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| c.sources.push(source("form", "/object", "/lead")))
        .spawn()
        .await;
    let cases: [(Option<&str>, &[u8], u16, &str); 6] = [
        (
            Some("text/plain"),
            b"object=1&lead=2",
            415,
            "unsupported_media_type",
        ),
        (
            Some("application/xml"),
            b"<a/>",
            415,
            "unsupported_media_type",
        ),
        (Some(FORM), b"id=x&a=1&a[b]=2", 400, "invalid_body"),
        (Some("multipart/form-data"), b"--x--", 400, "invalid_body"),
        (
            Some("multipart/form-data; boundary=x"),
            b"--x\r\nno end",
            400,
            "invalid_body",
        ),
        (Some("application/json"), b"id=x", 400, "invalid_json"),
    ];
    for (ct, body, status, code) in cases {
        let r = post(&app, "form", "form", ct, body, &[]).await;
        r.expect_error(status, code);
    }
    let deep = format!("id=d&a{}=1", "[x]".repeat(17));
    post(&app, "form", "form", Some(FORM), deep.as_bytes(), &[])
        .await
        .expect_error(400, "invalid_body");
    let wide = vec!["k=v"; 1001].join("&");
    post(&app, "form", "form", Some(FORM), wide.as_bytes(), &[])
        .await
        .expect_error(400, "invalid_body");
    assert!(app.events(None).await.is_empty());
    // An unsigned request of a refused type is a 401 first: the type is checked after the
    // signature headers.
    let r = app
        .client
        .post(app.url("/webhooks/form"))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// A form body with bytes that are not UTF-8 (and a NUL) is stored exactly as received and
/// shown with U+FFFD; a replay with today's configuration maps those stored bytes.
async fn a_body_that_is_not_utf8_is_stored_byte_for_byte_and_replayed(b: Backend) {
    let mut app = TestApp::builder(b)
        .config(|c| c.sources.push(source("raw", "/obj", "/person")))
        .spawn()
        .await;
    let body: &[u8] = b"id=nb-1&obj=906&lead=61&name=Jos\xe9&bin=\x00\xff%FE";
    let r = post(&app, "raw", "raw", Some(FORM), body, &[]).await;
    let answer = r.expect(202);
    assert_eq!(answer["status"], "parked");
    assert_eq!(answer["reason"], "lead id not found at /person");
    let detail = app.event("nb-1").await;
    assert_eq!(detail["body"], String::from_utf8_lossy(body).as_ref());
    assert_eq!(detail["body_json"]["name"], "Jos\u{FFFD}");
    assert_eq!(detail["body_json"]["bin"], "\u{0}\u{FFFD}\u{FFFD}");
    let (raw, ct, ..) = stored_row(&app, "nb-1").await;
    assert_eq!(raw, body, "stored byte for byte");
    assert_eq!(ct.as_deref(), Some(FORM));

    // Today's configuration reads the lead where the sender puts it; the replay maps the
    // stored bytes.
    let s = app
        .config
        .sources
        .iter_mut()
        .find(|s| s.name == "raw")
        .unwrap();
    s.lead.id = Some("/lead".into());
    app.restart().await;
    app.replay("nb-1").await;
    app.wait_for_state("nb-1", "delivered").await;
    assert_eq!(sorted_pairs(&app), vec![(json!(906), json!(61))]);
    let (raw, ..) = stored_row(&app, "nb-1").await;
    assert_eq!(raw, body, "a replay leaves the stored request as it was");
}

/// The tests post from 127.0.0.1: a source that allows it takes the event, one that does not
/// answers 403 `forbidden_address` before the body is read (unsigned, too) and stores nothing.
/// Without `trusted_proxies`, `X-Forwarded-For` changes nothing.
async fn allow_ips_admits_and_refuses_the_peer(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            let mut open = source("open", "/object", "/lead");
            open.allow_ips = vec![
                "10.0.0.0/8".parse().unwrap(),
                "127.0.0.1/32".parse().unwrap(),
            ];
            let mut walled = source("walled", "/object", "/lead");
            walled.allow_ips = vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ];
            c.sources.extend([open, walled]);
        })
        .spawn()
        .await;
    let body = br#"{"id": "ip-1", "object": 907, "lead": 71}"#;
    post(&app, "open", "open", None, body, &[])
        .await
        .expect(202);
    let walled = br#"{"id": "ip-2", "object": 908, "lead": 72}"#;
    post(&app, "walled", "walled", None, walled, &[])
        .await
        .expect_error(403, "forbidden_address");
    post(
        &app,
        "walled",
        "walled",
        None,
        walled,
        &[("X-Forwarded-For", "10.1.2.3")],
    )
    .await
    .expect_error(403, "forbidden_address");
    let unsigned = app
        .client
        .post(app.url("/webhooks/walled"))
        .body("not even signed")
        .send()
        .await
        .unwrap();
    Resp::from(unsigned)
        .await
        .expect_error(403, "forbidden_address");
    app.wait_for_state("ip-1", "delivered").await;
    let ids: Vec<Value> = app
        .events(None)
        .await
        .iter()
        .map(|e| e["event_id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("ip-1")]);
    assert!(app.metrics().await.contains(
        "sprintlink_webhooks_received_total{source=\"walled\",outcome=\"forbidden_address\"} 3"
    ));
}

/// Behind a trusted proxy (the tests' 127.0.0.1), the sender is the right-most
/// `X-Forwarded-For` entry that is not a trusted proxy: an entry a client wrote to the left of
/// the real one does not let it in.
async fn forwarded_for_counts_only_behind_a_trusted_proxy(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            c.server.trusted_proxies = vec![
                "127.0.0.1/32".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ];
            let mut s = source("proxied", "/object", "/lead");
            s.allow_ips = vec!["203.0.113.0/24".parse().unwrap()];
            c.sources.push(s);
        })
        .spawn()
        .await;
    let cases: [(&[&str], u16); 7] = [
        (&["203.0.113.5"], 202),
        (&["198.51.100.1, 203.0.113.5"], 202),
        (&["203.0.113.5, 10.0.0.7"], 202),
        (&["203.0.113.5", "10.0.0.7, 10.0.0.8"], 202),
        (&["203.0.113.5, 198.51.100.1"], 403),
        (&["198.51.100.1"], 403),
        (&[], 403),
    ];
    for (i, (chain, status)) in cases.into_iter().enumerate() {
        let body = format!(r#"{{"id": "xff-{i}", "object": {}, "lead": 81}}"#, 910 + i);
        let mut req = app
            .client
            .post(app.url("/webhooks/proxied"))
            .body(body.clone());
        for (k, v) in app.sign("proxied", body.as_bytes(), unix_ms() / 1000, "x") {
            req = req.header(k, v);
        }
        for hop in chain {
            req = req.header("x-forwarded-for", *hop);
        }
        let r = Resp::from(req.send().await.unwrap()).await;
        if status == 403 {
            r.expect_error(403, "forbidden_address");
        } else {
            r.expect(status);
        }
        if !chain.is_empty() && status == 403 {
            assert!(
                r.body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("198.51.100.1"),
                "{}",
                r.text
            );
        }
    }
    assert_eq!(app.events(None).await.len(), 4);
}
