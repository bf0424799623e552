//! Versioned migrations with the real binary: the version is recorded, a database newer than the
//! binary is refused with one line, and replicas starting together on an older PostgreSQL
//! database migrate it once.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn config_file(dir: &Path, port: u16, storage: &str) -> std::path::PathBuf {
    let path = dir.join(format!("sprintlink-{port}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_timeout_ms = 2000
[storage]
url = "{storage}"
[sprinthub]
base_url = "http://127.0.0.1:9"
instance = "migrations"
api_token = "tok-migrations-test"
"#
        ),
    )
    .unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sprintlink(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sprintlink"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs")
}

/// The schema versions this binary applies, in order.
const VERSIONS: &[i64] = &[1, 3, 4, 6];

async fn schema_versions(url: &str) -> Vec<i64> {
    use sqlx::Connection;
    if let Some(path) = url.strip_prefix("sqlite://") {
        let c = rusqlite::Connection::open(path).unwrap();
        let mut st = c
            .prepare("SELECT version FROM schema_version ORDER BY version")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar("SELECT version FROM schema_version ORDER BY version")
            .fetch_all(&mut c)
            .await
            .unwrap()
    }
}

async fn execute(url: &str, sql: &str) {
    use sqlx::Connection;
    if let Some(path) = url.strip_prefix("sqlite://") {
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch(sql).unwrap();
    } else {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
    }
}

/// `migrate --dry-run` lists without writing, `migrate` applies and records, and a database
/// that a newer release migrated is refused by `serve` and `migrate` with one line naming both
/// versions, exit 1.
async fn migrate_command_and_a_newer_schema(b: Backend) {
    let db = TestDb::create(b).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), free_port(), &db.url);
    let config = config.to_str().unwrap();

    let dry = sprintlink(&["migrate", "--config", config, "--dry-run"]);
    assert!(dry.status.success(), "{dry:?}");
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(out.contains("pending: 0001 initial"), "{out}");
    let applied = sprintlink(&["migrate", "--config", config]);
    assert!(applied.status.success(), "{applied:?}");
    assert!(String::from_utf8_lossy(&applied.stdout).contains("applied: 0001 initial"));
    assert_eq!(schema_versions(&db.url).await, VERSIONS.to_vec());
    let again = sprintlink(&["migrate", "--config", config, "--dry-run"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 migration(s) pending"));

    execute(
        &db.url,
        "INSERT INTO schema_version (version, name, applied_at) VALUES (99, 'from the future', 0)",
    )
    .await;
    for args in [
        vec!["serve", "--config", config],
        vec!["migrate", "--config", config],
    ] {
        let started = Instant::now();
        let out = sprintlink(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("schema version"))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].contains("schema version 99")
                && lines[0].contains(&format!("schema version {})", VERSIONS.last().unwrap())),
            "{}",
            lines[0]
        );
    }
}

/// Two replicas start together on a PostgreSQL database in release 0.1.0's layout (tables, no
/// version table): both come up, the migration ran once, and the old rows are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(sl_skip_pg, ignore = "SPRINTLINK_SKIP_PG=1: no PostgreSQL")]
async fn two_replicas_on_an_old_postgres_database_migrate_it_once() {
    let db = TestDb::create(Backend::Postgres).await;
    execute(
        &db.url,
        include_str!("../../migrations/postgres/0001_initial.sql"),
    )
    .await;
    execute(
        &db.url,
        "INSERT INTO events (source, event_id, received_at, state, body) VALUES ('erp', 'old-1', 1, 'parked', '{}')",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let mut children: Vec<_> = ports
        .iter()
        .map(|p| {
            let config = config_file(dir.path(), *p, &db.url);
            Command::new(env!("CARGO_BIN_EXE_sprintlink"))
                .args(["serve", "--config"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let client = reqwest::Client::new();
    for p in ports {
        let url = format!("http://127.0.0.1:{p}/readyz");
        wait_until(
            "both replicas are ready",
            Duration::from_secs(30),
            async || {
                client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            },
        )
        .await;
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(
        schema_versions(&db.url).await,
        VERSIONS.to_vec(),
        "migrated once"
    );
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE event_id = 'old-1'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

/// The fixture sources of `tests/fixtures/make-0.1.0.sh`, with the same names and pointers.
fn fixture_sources() -> Vec<sprintlink::config::SourceConfig> {
    use sprintlink::config::{LeadConfig, LeadField, LookupKind, Scheme, Secret, SourceConfig};
    let mut erp = SourceConfig::example("erp", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    erp.event_type = Some("/type".into());
    erp.accept_types = vec!["object.created".into()];
    let gh = SourceConfig {
        name: "gh".into(),
        scheme: Scheme::Github,
        secrets: vec![Secret::new("fixture-github-secret")],
        event_id: None,
        event_type: None,
        accept_types: vec![],
        object_id: Some("/object/id".into()),
        lead: LeadConfig {
            key: Some("/customer/email".into()),
            lookup: Some(LookupKind::Sprinthub),
            field: Some(LeadField::Email),
            ..Default::default()
        },
        ..erp.clone()
    };
    let crm = SourceConfig {
        name: "crm".into(),
        scheme: Scheme::Stripe,
        secrets: vec![Secret::new("whsec_fixture_stripe_secret")],
        event_id: None,
        event_type: Some("/type".into()),
        accept_types: vec![],
        object_id: Some("/data/object/id".into()),
        lead: LeadConfig {
            key: Some("/data/object/customer".into()),
            lookup: Some(LookupKind::Table),
            ..Default::default()
        },
        ..erp.clone()
    };
    vec![erp, gh, crm]
}

/// A copy of the 0.1.0 fixture for `b`: the SQLite file copied, or the PostgreSQL dump loaded
/// into a fresh database (psql, without the `\restrict` lines only psql 17 understands).
async fn fixture_copy(b: Backend, db: &TestDb, dir: &Path) -> String {
    match b {
        Backend::Sqlite => {
            let path = dir.join("v0.1.0.sqlite");
            std::fs::copy(
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v0.1.0.sqlite"),
                &path,
            )
            .unwrap();
            format!("sqlite://{}", path.display())
        }
        Backend::Postgres => {
            let dump = std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/v0.1.0.postgres.sql"
            ))
            .unwrap();
            let dump: String = dump
                .lines()
                .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
                .map(|l| format!("{l}\n"))
                .collect();
            let mut child = Command::new("psql")
                .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url, "-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("psql runs");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(dump.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success(), "the dump loads");
            db.url.clone()
        }
    }
}

/// Today's service on a copy of a database written by release 0.1.0: it is migrated in place
/// (version recorded), every event, link, attempt and mapping reads back as 0.1.0 showed it,
/// and the pending work completes.
async fn a_database_of_release_0_1_0_is_upgraded_in_place(b: Backend) {
    let scratch = TestDb::create(b).await;
    let dir = tempfile::tempdir().unwrap();
    let url = fixture_copy(b, &scratch, dir.path()).await;
    let expected: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/v0.1.0.expected.json")).unwrap();
    let app_url = url.clone();
    let app = TestApp::builder(b)
        .config(move |c| {
            c.storage.url = sprintlink::config::Secret::new(app_url);
            c.sources = fixture_sources();
        })
        .spawn()
        .await;
    assert_eq!(schema_versions(&url).await, VERSIONS.to_vec());

    for e in expected["events"].as_array().unwrap() {
        let (source, id) = (
            e["source"].as_str().unwrap(),
            e["event_id"].as_str().unwrap(),
        );
        let got = app
            .admin_get(&format!(
                "/admin/events/{}?source={source}",
                encode_path(id)
            ))
            .await;
        let got = got.expect(200);
        for key in ["state", "object_id", "reason", "event_type"] {
            assert_eq!(got[key], e[key], "{source}/{id}: {key}");
        }
        // 0.1.0 stored the body as JSON text, without a content type: it reads back as the
        // text it was, and as the JSON the references see.
        let text = got["body"].as_str().expect("body is the received text");
        let parsed: serde_json::Value = serde_json::from_str(text).expect("an old body is JSON");
        assert!(parsed.is_object(), "{source}/{id}: {text}");
        assert_eq!(got["body_json"], parsed, "{source}/{id}: body_json");
        assert_eq!(
            got["content_type"],
            serde_json::Value::Null,
            "{source}/{id}"
        );
        let links: Vec<_> = got["links"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["object_id"].clone(),
                    l["lead_id"].clone(),
                    l["state"].clone(),
                    l["attempts"].as_array().unwrap().len(),
                )
            })
            .collect();
        let want: Vec<_> = e["links"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["object_id"].clone(),
                    l["lead_id"].clone(),
                    l["state"].clone(),
                    l["attempts"].as_u64().unwrap() as usize,
                )
            })
            .collect();
        assert_eq!(links, want, "{source}/{id}: links");
    }
    for m in expected["mappings"].as_array().unwrap() {
        let (source, key) = (m["source"].as_str().unwrap(), m["key"].as_str().unwrap());
        let got = app
            .admin_get(&format!("/admin/mappings/{source}/{}", encode_path(key)))
            .await;
        assert_eq!(got.expect(200)["lead_ids"], m["lead_ids"], "{source}/{key}");
    }

    // Pending work completes: 0.1.0 scheduled the retries a day out; replaying the queued
    // events makes them due now. The lead search that had failed now finds its lead.
    app.hub
        .add_lead(serde_json::json!({"id": 2099, "email": "slow@example.com"}));
    let r = app
        .admin_post("/admin/replay", &serde_json::json!({"state": "queued"}))
        .await;
    assert_eq!(r.expect(202)["replayed"], 6);
    let queued: Vec<&serde_json::Value> = expected["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["state"] == "queued")
        .collect();
    assert_eq!(queued.len(), 6);
    for e in queued {
        let (source, id) = (
            e["source"].as_str().unwrap(),
            e["event_id"].as_str().unwrap(),
        );
        wait_until(
            &format!("{source}/{id} is delivered"),
            Duration::from_secs(20),
            async || {
                app.admin_get(&format!(
                    "/admin/events/{}?source={source}",
                    encode_path(id)
                ))
                .await
                .body["state"]
                    == "delivered"
            },
        )
        .await;
    }
    drop(scratch);
}

both_backends!(
    migrate_command_and_a_newer_schema,
    a_database_of_release_0_1_0_is_upgraded_in_place,
);
