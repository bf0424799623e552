//! Versioned migrations with the real binary: the version is recorded, a database newer than the
//! binary is refused with one line, and replicas starting together on an older PostgreSQL
//! database migrate it once.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

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
    assert_eq!(schema_versions(&db.url).await, vec![1]);
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
            lines[0].contains("schema version 99") && lines[0].contains("schema version 1"),
            "{}",
            lines[0]
        );
    }
}

both_backends!(migrate_command_and_a_newer_schema);

/// Two replicas start together on a PostgreSQL database in release 0.1.0's layout (tables, no
/// version table): both come up, the migration ran once, and the old rows are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_an_old_postgres_database_migrate_it_once() {
    if skip_pg() {
        println!(
            "SKIPPED two_replicas_on_an_old_postgres_database_migrate_it_once: SPRINTLINK_SKIP_PG=1"
        );
        return;
    }
    let db = TestDb::create(Backend::Postgres).await;
    execute(
        &db.url,
        include_str!("../migrations/postgres/0001_initial.sql"),
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
    assert_eq!(schema_versions(&db.url).await, vec![1], "migrated once");
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE event_id = 'old-1'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
}
