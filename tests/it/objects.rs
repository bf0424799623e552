//! Creating the custom object, then linking it (`[sources.object]`, SPEC section 7), against both
//! storage backends and the stand-in SprintHub: the order of work (leads, creation, links), the
//! failure classes of a creation, lost answers marked `unknown`, at most one object per event
//! across retries, replays, replicas and `kill -9`; and the two integrator commands.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sprintlink::config::{
    DefinitionId, FieldValue, LeadConfig, LeadField, LookupKind, ObjectSpec, SourceConfig,
};
use sprintlink::signature::Verifier;
use sprintlink::standin::{Canned, ObjectAnswer, StandIn};

use crate::common::*;

both_backends!(
    creates_the_object_from_pointer_and_literal_fields_then_links_it,
    reads_the_new_id_from_id_or_data_id,
    finds_or_creates_the_lead_before_creating_the_object,
    an_event_without_a_lead_is_parked_before_anything_is_created,
    a_503_then_a_200_creates_one_object,
    a_400_makes_the_event_dead_with_the_attempt_recorded,
    a_dropped_answer_is_marked_unknown_and_created_again,
    a_replay_reuses_the_created_object,
    a_restart_reuses_the_created_object,
    a_replay_during_the_creation_creates_nothing_more,
    a_timed_out_creation_is_unknown_and_a_2xx_without_id_is_dead,
);

const DEF: &str = "42";
const CREATE: &str = "/customobjects/objects/42";

/// `loja`: a shop that cannot create objects; sprintlink creates a "Pedido" (definition 42)
/// from `/id` and `/total`, with a literal `canal`, and links it to the lead at `/lead`.
fn loja() -> SourceConfig {
    SourceConfig {
        name: "loja".into(),
        accept_types: vec![],
        object_id: None,
        object: Some(ObjectSpec {
            definition_id: DefinitionId::parse(DEF).unwrap(),
            fields: BTreeMap::from([
                ("pedido".to_string(), FieldValue::Reference("/id".into())),
                ("valor".to_string(), FieldValue::Reference("/total".into())),
                ("cupom".to_string(), FieldValue::Reference("/coupon".into())),
                ("canal".to_string(), FieldValue::Literal(json!("loja"))),
            ]),
        }),
        lead: LeadConfig {
            id: Some("/lead".into()),
            ..Default::default()
        },
        ..erp_source()
    }
}

/// `clientes`: like `loja`, but the lead is found by the customer's email in SprintHub, and
/// created when there is none.
fn clientes() -> SourceConfig {
    SourceConfig {
        name: "clientes".into(),
        lead: LeadConfig {
            key: Some("/customer/email".into()),
            lookup: Some(LookupKind::Sprinthub),
            field: Some(LeadField::Email),
            create_missing: true,
            create_fields: BTreeMap::from([("email".to_string(), "/customer/email".into())]),
            ..Default::default()
        },
        ..loja()
    }
}

async fn spawn(b: Backend) -> TestApp {
    TestApp::builder(b)
        .config(|c| {
            c.sources.push(loja());
            c.sources.push(clientes());
        })
        .spawn()
        .await
}

fn order(id: &str, lead: impl Into<Value>) -> Value {
    json!({"id": id, "total": 149.9, "lead": lead.into()})
}

/// The object document of an event; asserts it has one.
fn object_of(detail: &Value) -> &Value {
    let o = &detail["object"];
    assert!(o.is_object(), "no object in {detail}");
    o
}

fn outcomes(detail: &Value) -> Vec<String> {
    object_of(detail)["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap().to_string())
        .collect()
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn creates_the_object_from_pointer_and_literal_fields_then_links_it(b: Backend) {
    let app = spawn(b).await;
    let r = app.post_webhook("loja", &order("ord_1", 8473)).await;
    assert_eq!(r.expect(202)["status"], "queued");
    let detail = app.wait_for_state("ord_1", "delivered").await;
    let creations = app.hub.creations();
    assert_eq!(creations.len(), 1);
    assert_eq!(creations[0].path, CREATE);
    // A reference that finds nothing (`/coupon`) leaves its field out.
    assert_eq!(
        creations[0].body,
        json!({"pedido": "ord_1", "valor": 149.9, "canal": "loja"})
    );
    let object = object_of(&detail);
    let id = object["object_id"]
        .as_str()
        .expect("the id is stored")
        .to_string();
    assert_eq!(object["state"], "created");
    assert_eq!(object["definition_id"], DEF);
    assert_eq!(outcomes(&detail), ["created"]);
    assert_eq!(object["attempts"][0]["status_code"], 200);
    assert_eq!(detail["object_id"], id.as_str());
    assert_eq!(
        pairs(&app.link_calls()),
        vec![(json!(id.parse::<u64>().unwrap()), json!(8473))]
    );
    assert_eq!(detail["links"][0]["state"], "linked");
    let m = app.metrics().await;
    assert_eq!(
        metric(&m, "sprintlink_object_creations_total{outcome=\"created\"}"),
        1
    );
    // The dashboard's event page shows the object and its attempts.
    let page = app.admin_get("/ui/events/ord_1").await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert!(page.text.contains("id=\"object\""), "{}", page.text);
    assert!(
        page.text.contains(&format!("id=\"object-id\">{id}<")),
        "{}",
        page.text
    );
    // The OpenAPI document describes it.
    let spec = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let schemas = &spec["components"]["schemas"];
    assert!(schemas["ObjectDoc"].is_object(), "no ObjectDoc schema");
    assert!(schemas["EventDetail"]["properties"]["object"].is_object());
    // An event whose sender sends the object id has no object document.
    app.post_webhook("erp", &erp_event("evt_1", 5001, 8473))
        .await
        .expect(202);
    let plain = app.wait_for_state("evt_1", "delivered").await;
    assert!(plain["object"].is_null(), "{plain}");
}

async fn reads_the_new_id_from_id_or_data_id(b: Backend) {
    let app = spawn(b).await;
    app.hub.set_flat_ids(true);
    app.post_webhook("loja", &order("ord_flat", 1))
        .await
        .expect(202);
    let flat = app.wait_for_state("ord_flat", "delivered").await;
    app.hub.set_flat_ids(false);
    app.post_webhook("loja", &order("ord_nested", 2))
        .await
        .expect(202);
    let nested = app.wait_for_state("ord_nested", "delivered").await;
    for d in [&flat, &nested] {
        assert!(object_of(d)["object_id"].as_str().is_some(), "{d}");
    }
    assert_ne!(
        object_of(&flat)["object_id"],
        object_of(&nested)["object_id"]
    );
    assert_eq!(app.link_calls().len(), 2);
}

async fn finds_or_creates_the_lead_before_creating_the_object(b: Backend) {
    let app = spawn(b).await;
    app.hub
        .add_lead(json!({"id": 77, "email": "ann@example.com"}));
    let known = json!({"id": "ord_ann", "total": 10, "customer": {"email": "Ann@Example.com"}});
    let new = json!({"id": "ord_bob", "total": 20, "customer": {"email": "bob@example.com"}});
    app.post_webhook("clientes", &known).await.expect(202);
    app.wait_for_state("ord_ann", "delivered").await;
    app.post_webhook("clientes", &new).await.expect(202);
    let bob = app.wait_for_state("ord_bob", "delivered").await;
    // The order of work, as SprintHub saw it: search (and create the lead), create the object,
    // link it.
    let paths: Vec<String> = app.hub.received().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            "/leadsadvanced",
            CREATE,
            LINK,
            "/leadsadvanced",
            "/leads",
            CREATE,
            LINK
        ],
        "{paths:?}"
    );
    let bob_lead = app.hub.requests_to("/leads");
    assert_eq!(bob_lead[0].body["email"], "bob@example.com");
    let links = app.link_calls();
    assert_eq!(links[0].body["targetId"], 77);
    let bob_object = object_of(&bob)["object_id"].as_str().unwrap().to_string();
    assert_eq!(links[1].body["objectId"].to_string(), bob_object);
    assert_ne!(links[1].body["targetId"], 77);
}

async fn an_event_without_a_lead_is_parked_before_anything_is_created(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            c.sources.push(loja());
            let mut no_create = clientes();
            no_create.lead.create_missing = false;
            c.sources.push(no_create);
        })
        .spawn()
        .await;
    let r = app
        .post_webhook("loja", &json!({"id": "ord_x", "total": 1}))
        .await;
    assert_eq!(r.expect(202)["status"], "parked");
    let nobody = json!({"id": "ord_y", "total": 1, "customer": {"email": "nobody@example.com"}});
    app.post_webhook("clientes", &nobody).await.expect(202);
    let parked = app.wait_for_state("ord_y", "parked").await;
    assert!(
        parked["reason"]
            .as_str()
            .unwrap()
            .contains("nobody@example.com")
    );
    let x = app.event("ord_x").await;
    assert_eq!(x["state"], "parked");
    assert!(x["object"].is_null(), "{x}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.hub.creations().is_empty(), "nothing may be created");
    assert!(app.link_calls().is_empty());
}

async fn a_503_then_a_200_creates_one_object(b: Backend) {
    let app = spawn(b).await;
    app.hub
        .script_objects([ObjectAnswer::Canned(Canned::new(503, r#"{"msg":"busy"}"#))]);
    app.post_webhook("loja", &order("ord_2", 8473))
        .await
        .expect(202);
    let detail = app.wait_for_state("ord_2", "delivered").await;
    let statuses: Vec<u16> = app.hub.creations().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 200], "one refused, one created");
    assert_eq!(outcomes(&detail), ["failed", "created"]);
    assert_eq!(object_of(&detail)["attempts"][0]["status_code"], 503);
    assert_eq!(app.link_calls().len(), 1);
}

async fn a_400_makes_the_event_dead_with_the_attempt_recorded(b: Backend) {
    let app = spawn(b).await;
    app.hub.script_objects([ObjectAnswer::Canned(Canned::new(
        400,
        r#"{"msg":"field valor must be a number"}"#,
    ))]);
    app.post_webhook("loja", &order("ord_3", 8473))
        .await
        .expect(202);
    let detail = app.wait_for_state("ord_3", "dead").await;
    let object = object_of(&detail);
    assert_eq!(object["state"], "dead");
    assert!(object["object_id"].is_null());
    assert_eq!(outcomes(&detail), ["failed"]);
    let attempt = &object["attempts"][0];
    assert_eq!(attempt["status_code"], 400);
    assert!(
        attempt["response_excerpt"]
            .as_str()
            .unwrap()
            .contains("must be a number")
    );
    assert!(
        detail["reason"]
            .as_str()
            .unwrap()
            .starts_with("object creation:"),
        "{detail}"
    );
    assert_eq!(app.hub.creations().len(), 1, "a 400 is not retried");
    assert!(app.link_calls().is_empty());
    // A replay tries again (the definition may have been fixed meanwhile).
    app.replay("ord_3").await;
    let again = app.wait_for_state("ord_3", "delivered").await;
    assert_eq!(outcomes(&again), ["failed", "created"]);
}

async fn a_dropped_answer_is_marked_unknown_and_created_again(b: Backend) {
    let app = spawn(b).await;
    app.hub.script_objects([ObjectAnswer::Drop]);
    app.post_webhook("loja", &order("ord_4", 8473))
        .await
        .expect(202);
    let detail = app.wait_for_state("ord_4", "delivered").await;
    assert_eq!(outcomes(&detail), ["unknown", "created"]);
    let lost = &object_of(&detail)["attempts"][0];
    assert!(lost["status_code"].is_null());
    assert!(
        lost["error"].as_str().unwrap().contains("answer lost"),
        "{lost}"
    );
    // SprintHub now holds two objects for this event; only the recorded one is linked.
    assert_eq!(app.hub.creations().len(), 2);
    let id = object_of(&detail)["object_id"]
        .as_str()
        .unwrap()
        .to_string();
    let links = app.link_calls();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].body["objectId"].to_string(), id);
    let m = app.metrics().await;
    assert_eq!(
        metric(&m, "sprintlink_object_creations_total{outcome=\"unknown\"}"),
        1
    );
    assert_eq!(
        metric(&m, "sprintlink_object_creations_total{outcome=\"created\"}"),
        1
    );
}

async fn a_replay_reuses_the_created_object(b: Backend) {
    let app = spawn(b).await;
    // The object is created; its link is refused for good.
    app.hub
        .script([Canned::new(422, r#"{"msg":"lead archived"}"#)]);
    app.post_webhook("loja", &order("ord_5", 8473))
        .await
        .expect(202);
    let dead = app.wait_for_state("ord_5", "dead").await;
    let id = object_of(&dead)["object_id"].as_str().unwrap().to_string();
    app.replay("ord_5").await;
    let detail = app.wait_for_state("ord_5", "delivered").await;
    assert_eq!(object_of(&detail)["object_id"], id.as_str());
    assert_eq!(app.hub.creations().len(), 1, "the replay created nothing");
    let objects: Vec<String> = app
        .link_calls()
        .iter()
        .map(|r| r.body["objectId"].to_string())
        .collect();
    assert_eq!(objects, [id.clone(), id]);
    // Replaying a delivered event sends nothing.
    app.replay("ord_5").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.hub.creations().len(), 1);
    assert_eq!(app.link_calls().len(), 2);
}

async fn a_restart_reuses_the_created_object(b: Backend) {
    let mut app = spawn(b).await;
    // SprintHub creates the object; every link fails for now.
    app.hub.script((0..3).map(|_| Canned::new(503, "{}")));
    app.post_webhook("loja", &order("ord_6", 8473))
        .await
        .expect(202);
    wait_until("the object is created", TIMEOUT, async || {
        object_of(&app.event("ord_6").await)["state"] == "created"
    })
    .await;
    app.restart().await;
    app.wait_for_state("ord_6", "delivered").await;
    assert_eq!(app.hub.creations().len(), 1);
}

async fn a_replay_during_the_creation_creates_nothing_more(b: Backend) {
    let app = spawn(b).await;
    app.hub.set_object_delay(Duration::from_millis(800));
    app.post_webhook("loja", &order("ord_7", 8473))
        .await
        .expect(202);
    wait_until("the creation is in flight", TIMEOUT, async || {
        app.hub.creations_in_flight() == 1
    })
    .await;
    app.replay("ord_7").await;
    app.wait_for_state("ord_7", "delivered").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.hub.creations().len(),
        1,
        "the replay waited for the creation"
    );
    assert_eq!(app.link_calls().len(), 1);
}

async fn a_timed_out_creation_is_unknown_and_a_2xx_without_id_is_dead(b: Backend) {
    let app = spawn(b).await;
    // Longer than sprinthub.timeout_ms (2 s): the answer is lost to a timeout.
    app.hub.set_object_delay(Duration::from_millis(2_500));
    app.post_webhook("loja", &order("ord_8", 8473))
        .await
        .expect(202);
    wait_until("the first creation arrives", TIMEOUT, async || {
        !app.hub.creations().is_empty()
    })
    .await;
    app.hub.set_object_delay(Duration::ZERO);
    let detail = app.wait_for_state("ord_8", "delivered").await;
    assert_eq!(outcomes(&detail), ["unknown", "created"]);
    assert!(
        object_of(&detail)["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timeout"),
        "{detail}"
    );
    // A 2xx without an id: perhaps created, but nothing can be linked; not tried again.
    app.hub
        .script_objects([ObjectAnswer::Canned(Canned::new(201, r#"{"ok":true}"#))]);
    app.post_webhook("loja", &order("ord_9", 8473))
        .await
        .expect(202);
    let dead = app.wait_for_state("ord_9", "dead").await;
    assert_eq!(outcomes(&dead), ["failed"]);
    let attempt = &object_of(&dead)["attempts"][0];
    assert_eq!(attempt["status_code"], 201);
    assert!(
        attempt["response_excerpt"]
            .as_str()
            .unwrap()
            .contains("no id in the answer"),
        "{attempt}"
    );
    assert_eq!(app.hub.creations().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// The real binary: several replicas on one PostgreSQL database, and kill -9 while creating.

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ADMIN: &str = "objects-admin-token-0123456789";

fn write_config(dir: &Path, port: u16, storage: &str, hub: &str, concurrency: usize) -> PathBuf {
    let path = dir.join(format!("sprintlink-{port}.toml"));
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_timeout_ms = 2000
[storage]
url = "{storage}"
[sprinthub]
base_url = "{hub}"
instance = "crash"
api_token = "tok-objects-test"
timeout_ms = 1000
concurrency = {concurrency}
rate_limit_per_second = 0
[delivery]
initial_backoff_ms = 50
max_backoff_ms = 500
lease_seconds = 6
[admin]
token = "{ADMIN}"
[[sources]]
name = "loja"
scheme = "standard-webhooks"
secrets = ["{SECRET}"]
event_id = "/id"
[sources.object]
definition_id = 42
fields = {{ pedido = "/id", valor = "/total", canal = {{ value = "loja" }} }}
[sources.lead]
id = "/lead"
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Posts orders `from..from + count` to `bases` round-robin; returns the ids that got a 202.
/// Stops at the first connection error (the service was killed).
async fn post_orders(bases: &[String], from: u64, count: u64) -> Vec<String> {
    let v = Verifier::from_source(&SourceConfig::example("loja", SECRET));
    let client = reqwest::Client::new();
    let mut acked = Vec::new();
    for n in from..from + count {
        let id = format!("ord-{n}");
        let body = json!({"id": id, "total": n, "lead": n % 5 + 1}).to_string();
        let now = unix_ms() / 1000;
        let mut req = client
            .post(format!("{}/webhooks/loja", bases[n as usize % bases.len()]))
            .header("content-type", "application/json");
        for (k, val) in v.sign(body.as_bytes(), now, &id) {
            req = req.header(k, val);
        }
        match req.body(body).send().await {
            Ok(r) if r.status() == 202 => acked.push(id),
            Ok(r) => panic!("unexpected answer {}", r.status()),
            Err(_) => break,
        }
    }
    acked
}

/// Creation requests per order id, as the stand-in received them.
fn creations_per_order(hub: &StandIn) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for r in hub.creations() {
        *n.entry(r.body["pedido"].as_str().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    n
}

/// Waits until the admin API shows each of `ids` delivered.
async fn wait_delivered(base: &str, ids: &[String], within: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    loop {
        let mut delivered = 0;
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{base}/admin/events?state=delivered&limit=500");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page: Value = client
                .get(url)
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            delivered += page["events"].as_array().map_or(0, Vec::len);
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        if delivered >= ids.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {delivered} of {} acknowledged orders delivered",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(sl_skip_pg, ignore = "SPRINTLINK_SKIP_PG=1: no PostgreSQL")]
async fn two_replicas_on_postgres_never_create_an_events_object_twice() {
    let db = TestDb::create(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let hub = StandIn::start().await.unwrap();
    hub.set_object_delay(Duration::from_millis(10));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let config = write_config(dir.path(), port, &db.url, &hub.url(), 4);
        replicas.push(Process::serve(&config, port).await);
    }
    let bases: Vec<String> = replicas.iter().map(|r| r.base.clone()).collect();
    let acked = post_orders(&bases, 0, 200).await;
    assert_eq!(acked.len(), 200);
    wait_delivered(&bases[0], &acked, Duration::from_secs(60)).await;
    let per_order = creations_per_order(&hub);
    let twice: Vec<_> = per_order.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "replicas: {} orders, {} creations, {} orders created twice",
        acked.len(),
        hub.creations().len(),
        twice.len()
    );
    assert_eq!(per_order.len(), 200);
    assert!(twice.is_empty(), "objects created twice: {twice:?}");
    assert_eq!(hub.linked_pairs().len(), 200);
    drop(replicas);
    drop(db);
}

/// The events whose creation is marked "being sent" in the database, i.e. was in flight when
/// the process died (a row stays marked until it is claimed again, after its lease).
fn in_flight_in(db_path: &Path) -> std::collections::BTreeSet<(i64, i64)> {
    let conn = rusqlite::Connection::open(db_path).unwrap();
    let mut st = conn
        .prepare("SELECT event_pk, sending_at FROM objects WHERE sending_at IS NOT NULL")
        .unwrap();
    st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_while_creating_makes_at_most_the_in_flight_objects_twice() {
    let rounds: u64 = std::env::var("SPRINTLINK_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let hub = StandIn::start().await.unwrap();
    // Long enough that creations are in flight at each kill.
    hub.set_object_delay(Duration::from_millis(40));
    let port = free_port();
    let db_path = dir.path().join("objects.db");
    let storage = format!("sqlite://{}", db_path.display());
    let config = write_config(dir.path(), port, &storage, &hub.url(), 8);
    let mut acked = Vec::new();
    let mut in_flight_at_kills = Vec::new();
    let mut ever_in_flight = std::collections::BTreeSet::new();
    for round in 0..rounds {
        let mut svc = Process::serve(&config, port).await;
        let base = vec![svc.base.clone()];
        let poster = tokio::spawn(async move { post_orders(&base, round * 1000, 40).await });
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..400))).await;
        svc.kill9();
        acked.extend(poster.await.unwrap());
        // Only the creations this kill cut off: earlier ones may still be marked.
        let marked = in_flight_in(&db_path);
        in_flight_at_kills.push(marked.difference(&ever_in_flight).count());
        ever_in_flight.extend(marked);
    }
    let svc = Process::serve(&config, port).await;
    wait_delivered(&svc.base, &acked, Duration::from_secs(60)).await;
    let per_order = creations_per_order(&hub);
    let twice = per_order.values().filter(|n| **n > 1).count();
    let extra: usize = per_order.values().map(|n| n - 1).sum();
    let in_flight: usize = in_flight_at_kills.iter().sum();
    println!(
        "objects kill -9: {rounds} rounds, {} orders acknowledged, all delivered; creations in flight at each kill {in_flight_at_kills:?} (total {in_flight}); {twice} orders ended with two objects ({extra} extra objects)",
        acked.len()
    );
    assert!(
        acked.len() > rounds as usize,
        "too few orders to mean anything"
    );
    for id in &acked {
        assert!(per_order.contains_key(id), "{id} was never created");
    }
    assert!(
        extra <= in_flight,
        "{extra} extra objects, but only {in_flight} creations were in flight at the kills"
    );
    // Every order's object is linked once it was recorded (the extra ones never are).
    let client = reqwest::Client::new();
    let r: Value = client
        .get(format!("{}/metrics", svc.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| json!(t))
        .unwrap();
    assert!(
        r.as_str()
            .unwrap()
            .contains("sprintlink_object_creations_total")
    );
}

// ---------------------------------------------------------------------------------------------
// The integrator commands against the stand-in.

fn pedido_definition() -> Value {
    json!({"id": 42, "name": "Pedido", "fields": [
        {"label": "Pedido", "alias": "pedido", "type": "text", "required": true},
        {"label": "Valor", "alias": "valor", "type": "number", "required": true},
        {"label": "Canal", "alias": "canal", "type": "text", "required": false},
    ]})
}

const CLI_TOKEN: &str = "tok-cli-DISTINCT-9f3";

fn cli_config(dir: &Path, hub: &str, object: &str) -> PathBuf {
    let path = dir.join("sprintlink.toml");
    let text = format!(
        r#"
[sprinthub]
base_url = "{hub}"
instance = "acme"
api_token = "{CLI_TOKEN}"
[[sources]]
name = "loja"
scheme = "standard-webhooks"
secrets = ["{SECRET}"]
{object}
[sources.lead]
id = "/lead"
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str], config: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sprintlink"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("SPRINTLINK_CONFIG")
        .output()
        .expect("run sprintlink");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD_OBJECT: &str = "[sources.object]\ndefinition_id = 42\nfields = { pedido = \"/id\", valor = \"/total\", canal = { value = \"loja\" } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sprinthub_definitions_lists_ids_aliases_types_and_required_flags() {
    let hub = StandIn::start().await.unwrap();
    hub.require_token(CLI_TOKEN);
    hub.add_definition(pedido_definition());
    let dir = tempfile::tempdir().unwrap();
    let config = cli_config(dir.path(), &hub.url(), GOOD_OBJECT);
    let (code, out, err) =
        tokio::task::spawn_blocking(move || run(&["sprinthub", "definitions"], &config))
            .await
            .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("definition_id = 42"), "{out}");
    assert!(out.contains("\"Pedido\""), "{out}");
    let pedido = out
        .lines()
        .find(|l| l.trim_start().starts_with("pedido"))
        .unwrap();
    assert!(
        pedido.contains("text") && pedido.contains("required"),
        "{pedido}"
    );
    let canal = out
        .lines()
        .find(|l| l.trim_start().starts_with("canal"))
        .unwrap();
    assert!(canal.contains("optional"), "{canal}");
    assert!(!format!("{out}{err}").contains(CLI_TOKEN));
    let calls = hub.requests_to("/customobjects/def");
    assert_eq!(calls.len(), 1);
    // A token the instance refuses: one line, exit 1, the token not shown.
    let other = StandIn::start().await.unwrap();
    other.require_token("another-token");
    let config = cli_config(dir.path(), &other.url(), GOOD_OBJECT);
    let (code, out, err) =
        tokio::task::spawn_blocking(move || run(&["sprinthub", "definitions"], &config))
            .await
            .unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(!format!("{out}{err}").contains(CLI_TOKEN));
    assert_eq!(
        query_param(&calls[0], "query"),
        Some("{definitions{id,name,fields{label,alias,type,required}}}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_names_each_problem_on_one_line() {
    let hub = StandIn::start().await.unwrap();
    hub.require_token(CLI_TOKEN);
    hub.add_definition(pedido_definition());
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("valid", GOOD_OBJECT.to_string(), vec![]),
        (
            "unknown definition",
            GOOD_OBJECT.replace("definition_id = 42", "definition_id = 43"),
            vec![
                "sources.loja.object.definition_id: instance \"acme\" has no custom object definition 43",
            ],
        ),
        (
            "unknown alias",
            GOOD_OBJECT.replace("canal =", "kanal ="),
            vec![
                "sources.loja.object.fields.kanal: definition 42 (Pedido) has no field with this alias",
            ],
        ),
        (
            "unmapped required field",
            GOOD_OBJECT.replace("valor = \"/total\", ", ""),
            vec![
                "sources.loja.object.fields: definition 42 (Pedido) requires field valor (Valor), which is not mapped",
            ],
        ),
    ];
    for (what, object, expected) in cases {
        let config = cli_config(dir.path(), &hub.url(), &object);
        let (code, out, err) =
            tokio::task::spawn_blocking(move || run(&["check-config", "--online"], &config))
                .await
                .unwrap();
        assert!(
            !format!("{out}{err}").contains(CLI_TOKEN),
            "{what}: token shown"
        );
        if expected.is_empty() {
            assert_eq!(code, 0, "{what}: {out}{err}");
            continue;
        }
        assert_eq!(code, 1, "{what}: {out}{err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
        assert_eq!(lines.len(), expected.len(), "{what}: {err}");
        for (line, want) in lines.iter().zip(&expected) {
            assert!(
                line.starts_with(want),
                "{what}: {line:?} should start with {want:?}"
            );
        }
    }
    // A token the instance does not accept.
    let other = StandIn::start().await.unwrap();
    other.require_token("another-token");
    let config = cli_config(dir.path(), &other.url(), GOOD_OBJECT);
    let (code, out, err) =
        tokio::task::spawn_blocking(move || run(&["check-config", "--online"], &config))
            .await
            .unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("SprintHub refused the token or the instance \"acme\" (HTTP 401)"),
        "{err}"
    );
    assert!(!format!("{out}{err}").contains(CLI_TOKEN));
    // Offline, the same configuration is valid: only --online asks SprintHub.
    let config = cli_config(dir.path(), &other.url(), GOOD_OBJECT);
    let (code, _, err) = tokio::task::spawn_blocking(move || run(&["check-config"], &config))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn object_id_and_object_are_exclusive_and_one_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let both = cli_config(
        dir.path(),
        "http://127.0.0.1:9",
        &format!("object_id = \"/o\"\n{GOOD_OBJECT}"),
    );
    let (code, _, err) = run(&["check-config"], &both);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "sources.loja: set either object_id (the sender created the object) or [sources.object] (sprintlink creates it), not both"
    );
    let neither = cli_config(dir.path(), "http://127.0.0.1:9", "");
    let (code, _, err) = run(&["check-config"], &neither);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "sources.loja: set object_id (where the sender put the object's id) or [sources.object] (sprintlink creates the object)"
    );
}
