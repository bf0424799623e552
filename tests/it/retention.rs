//! Retention and backup (SPEC section 9): bodies blanked, then delivered events deleted, dead and
//! parked ones kept until `retention.failed` is set; a pair linked by a deleted event is never
//! sent again; recent ids are still deduplicated; `sprintlink backup` copies a database that is
//! being written to, and `serve` starts on the copy. Durations are a second long.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sprintlink::config::Secret;
use sprintlink::standin::Canned;

use crate::common::*;

const SECOND: Duration = Duration::from_secs(1);

/// The admin document of an event, or `None` once it is gone (404).
async fn find(app: &TestApp, event_id: &str) -> Option<Value> {
    let r = app
        .admin_get(&format!("/admin/events/{}", encode_path(event_id)))
        .await;
    match r.status.as_u16() {
        200 => Some(r.body),
        404 => None,
        s => panic!("GET /admin/events/{event_id}: {s} {}", r.text),
    }
}

/// The value of one sample of `/metrics`, if it is there.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn sqlite_path(app: &TestApp) -> String {
    app.db.url.strip_prefix("sqlite://").unwrap().to_string()
}

/// Bodies go first (the document says so, the body is null, the response excerpts are gone),
/// then the delivered event itself; dead and parked events stay while `failed` is unset and go
/// once it is set. On SQLite the freed pages go back to the file system.
async fn bodies_then_delivered_events_go_and_failed_ones_wait_for_their_rule(b: Backend) {
    let mut app = TestApp::builder(b)
        .config(|c| {
            c.retention.bodies = Some(SECOND);
            c.retention.delivered = Some(4 * SECOND);
            c.retention.interval = SECOND;
        })
        .spawn()
        .await;
    app.hub.script([Canned::new(400, r#"{"msg":"no"}"#)]);
    app.post_webhook("erp", &erp_event("evt_dead", 900, 901))
        .await
        .expect(202);
    app.wait_for_state("evt_dead", "dead").await;
    let parked = json!({"id": "evt_parked", "type": "object.created", "data": {"object_id": 700}});
    app.post_webhook("erp", &parked).await.expect(202);
    app.post_webhook("erp", &erp_event("evt_done", 1, 2))
        .await
        .expect(202);
    let delivered = app.wait_for_state("evt_done", "delivered").await;
    if delivered["body_removed_at"].is_null() {
        assert_eq!(delivered["body_json"]["id"], "evt_done", "{delivered}");
    }

    let mut doc = Value::Null;
    wait_until("the body is removed", TIMEOUT, async || {
        doc = find(&app, "evt_done").await.expect("still there");
        !doc["body_removed_at"].is_null()
    })
    .await;
    assert!(doc["body"].is_null(), "{doc}");
    assert!(doc["body_json"].is_null(), "{doc}");
    parse_rfc3339(doc["body_removed_at"].as_str().unwrap());
    assert_eq!(doc["state"], "delivered");
    let link = &doc["links"][0];
    assert_eq!(link["state"], "linked");
    for a in link["attempts"].as_array().unwrap() {
        assert!(a["response_excerpt"].is_null(), "{a}");
    }
    // The dashboard says so too, instead of showing an empty body.
    let page = app
        .client
        .get(app.url("/ui/events/evt_done"))
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Body removed by retention"), "{page}");

    wait_until(
        "the delivered event is deleted",
        Duration::from_secs(20),
        async || find(&app, "evt_done").await.is_none(),
    )
    .await;
    let m = app.metrics().await;
    assert_eq!(
        sample(&m, "sprintlink_pruned_events_total{rule=\"delivered\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "sprintlink_pruned_events_total{rule=\"bodies\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(
        sample(&m, "sprintlink_storage_bytes").is_some_and(|v| v > 0.0),
        "{m}"
    );

    // `failed` is unset: dead and parked events are kept, bodies and all.
    let dead = find(&app, "evt_dead").await.expect("dead event kept");
    assert_eq!(dead["state"], "dead");
    assert_eq!(dead["body_json"]["id"], "evt_dead");
    assert_eq!(
        find(&app, "evt_parked").await.expect("parked kept")["state"],
        "parked"
    );

    if b == Backend::Sqlite {
        let path = sqlite_path(&app);
        let c = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mode: i64 = c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, 2, "incremental auto-vacuum");
        wait_until("freed pages are given back", TIMEOUT, async || {
            let free: i64 = c
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap();
            free == 0
        })
        .await;
    }

    app.config.retention.failed = Some(SECOND);
    app.restart().await;
    wait_until(
        "dead and parked events are deleted",
        Duration::from_secs(20),
        async || find(&app, "evt_dead").await.is_none() && find(&app, "evt_parked").await.is_none(),
    )
    .await;
    let m = app.metrics().await;
    assert_eq!(
        sample(&m, "sprintlink_pruned_events_total{rule=\"failed\"}"),
        Some(2.0),
        "{m}"
    );
}

/// Event A links pair P and is deleted; event B names P again: delivered at once, and SprintHub
/// got exactly one call for P.
async fn a_pair_linked_by_a_deleted_event_is_never_sent_again(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            c.retention.delivered = Some(SECOND);
            c.retention.interval = SECOND;
        })
        .spawn()
        .await;
    app.post_webhook("erp", &erp_event("evt_a", 10, 20))
        .await
        .expect(202);
    app.wait_for_state("evt_a", "delivered").await;
    wait_until("event A is deleted", Duration::from_secs(20), async || {
        find(&app, "evt_a").await.is_none()
    })
    .await;
    app.post_webhook("erp", &erp_event("evt_b", 10, 20))
        .await
        .expect(202);
    let b_doc = app.wait_for_state("evt_b", "delivered").await;
    assert_eq!(b_doc["links"][0]["state"], "linked");
    assert_eq!(
        b_doc["links"][0]["attempts"].as_array().map(Vec::len),
        Some(0),
        "the attempts of a pair no event named were deleted, and B made none: {b_doc}"
    );
    assert_eq!(pairs(&app.link_calls()), vec![(json!(10), json!(20))]);
}

/// Only events older than the retention are forgotten: a sender retrying a recent id is still
/// answered `duplicate`, and nothing is sent twice.
async fn a_recent_event_id_is_still_deduplicated(b: Backend) {
    let app = TestApp::builder(b)
        .config(|c| {
            c.retention.bodies = Some(SECOND);
            c.retention.delivered = Some(Duration::from_secs(3600));
            c.retention.interval = SECOND;
        })
        .spawn()
        .await;
    let event = erp_event("evt_recent", 30, 40);
    app.post_webhook("erp", &event).await.expect(202);
    app.wait_for_state("evt_recent", "delivered").await;
    // A pass ran after the delivery (it removed the body) and kept the event.
    wait_until("a pass removed the body", TIMEOUT, async || {
        !find(&app, "evt_recent").await.unwrap()["body_removed_at"].is_null()
    })
    .await;
    let again = app.post_webhook("erp", &event).await;
    assert_eq!(again.expect(200)["status"], "duplicate");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.link_calls().len(), 1);
}

both_backends!(
    bodies_then_delivered_events_go_and_failed_ones_wait_for_their_rule,
    a_pair_linked_by_a_deleted_event_is_never_sent_again,
    a_recent_event_id_is_still_deduplicated,
);

// ---------------------------------------------------------------------------------------------
// The command line

fn config_file(dir: &Path, storage: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("sprintlink.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[storage]
url = "{storage}"
[sprinthub]
base_url = "http://127.0.0.1:9"
instance = "retention"
api_token = "tok-retention-test"
{extra}
"#
        ),
    )
    .unwrap();
    path
}

fn sprintlink(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sprintlink"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs")
}

fn integrity(path: &Path) -> String {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

/// Backups taken while webhooks keep arriving: each copy passes `PRAGMA integrity_check`, and
/// `serve` on the last one finds every event acknowledged (202) before that backup started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_webhooks_arrive_holds_every_acknowledged_event() {
    let mut app = TestApp::spawn(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &app.db.url, "");
    let acked: Mutex<Vec<(String, Instant)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let post = async {
        let mut i = 0u32;
        while !stop.load(Ordering::Relaxed) && i < 5_000 {
            i += 1;
            let id = format!("evt_live_{i}");
            let r = app.post_webhook("erp", &erp_event(&id, 5000 + i, 7)).await;
            if r.status == 202 {
                acked.lock().unwrap().push((id, Instant::now()));
            }
        }
    };
    let backups = async {
        let mut taken = Vec::new();
        for n in 0..3 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let to = dir.path().join(format!("copy-{n}.db"));
            let started = Instant::now();
            let args = [
                "backup".to_string(),
                "--config".to_string(),
                config.display().to_string(),
                "--to".to_string(),
                to.display().to_string(),
            ];
            let out = tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                sprintlink(&args)
            })
            .await
            .unwrap();
            assert!(out.status.success(), "{out:?}");
            taken.push((to, started));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        taken
    };
    let ((), taken) = tokio::join!(post, backups);
    let acked = acked.into_inner().unwrap();
    for (to, _) in &taken {
        assert_eq!(integrity(to), "ok", "{}", to.display());
    }
    let (last, started) = taken.last().unwrap().clone();
    let before: Vec<&String> = acked
        .iter()
        .filter(|(_, at)| *at < started)
        .map(|(id, _)| id)
        .collect();
    assert!(
        before.len() >= 5,
        "the load ran: {} acknowledged",
        before.len()
    );
    assert!(
        acked.len() > before.len(),
        "webhooks were acknowledged while and after the backup ran"
    );

    app.stop().await;
    app.config.storage.url = Secret::new(format!("sqlite://{}", last.display()));
    app.restart().await;
    let ids: Vec<String> = {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/admin/events?limit=500&cursor={c}"),
                None => "/admin/events?limit=500".to_string(),
            };
            let page = app.admin_get(&path).await.expect(200).clone();
            for e in page["events"].as_array().unwrap() {
                all.push(e["event_id"].as_str().unwrap().to_string());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        all
    };
    for id in before {
        assert!(
            ids.contains(id),
            "{id} was acknowledged before the backup but is not in it"
        );
    }
}

/// `backup` never overwrites a file, and on PostgreSQL it exits 1 naming `pg_dump`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_refuses_an_existing_file() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &app.db.url, "");
    let to = dir.path().join("there.db");
    std::fs::write(&to, b"keep me").unwrap();
    let out = sprintlink(&[
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&to).unwrap(), b"keep me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(sl_skip_pg, ignore = "SPRINTLINK_SKIP_PG=1: no PostgreSQL")]
async fn backup_on_postgres_exits_1_naming_pg_dump() {
    let db = TestDb::create(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &db.url, "");
    let to = dir.path().join("copy.db");
    let out = sprintlink(&[
        "backup",
        "--config",
        config.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pg_dump"),
        "{out:?}"
    );
    assert!(!to.exists());
}

#[test]
fn check_config_rejects_an_unreadable_duration_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "sqlite://unused.db",
        "[retention]\ndelivered = \"3 days\"\nbodies = \"7d\"\n",
    );
    let out = sprintlink(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("retention")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("retention.delivered: \"3 days\""),
        "{err}"
    );
    let fine = config_file(
        dir.path(),
        "sqlite://unused.db",
        "[retention]\ndelivered = \"30d\"\nfailed = \"180d\"\nbodies = \"7d\"\ninterval = \"1h\"\n",
    );
    let out = sprintlink(&["check-config", "--config", fine.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
}

/// A database of release 0.1.0, migrated: switched to incremental auto-vacuum (the one-time
/// VACUUM), and every delivered event has a delivery time (its last attempt, or its arrival).
#[test]
fn an_old_sqlite_database_is_converted_for_retention() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sqlite");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v0.1.0.sqlite"),
        &path,
    )
    .unwrap();
    let c = rusqlite::Connection::open(&path).unwrap();
    let mode: i64 = c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, 0, "the fixture predates incremental auto-vacuum");
    drop(c);
    let config = config_file(dir.path(), &format!("sqlite://{}", path.display()), "");
    let out = sprintlink(&["migrate", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let c = rusqlite::Connection::open(&path).unwrap();
    let mode: i64 = c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, 2);
    let (delivered, timed): (i64, i64) = c
        .query_row(
            "SELECT COUNT(*), COUNT(delivered_at) FROM events WHERE state = 'delivered'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(delivered > 0);
    assert_eq!(delivered, timed);
    let undelivered: i64 = c
        .query_row(
            "SELECT COUNT(delivered_at) FROM events WHERE state <> 'delivered'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(undelivered, 0);
    assert_eq!(integrity(&path), "ok");
}
