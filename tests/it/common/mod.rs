//! The integration harness: starts the real service on port 0 with a fresh database (a SQLite
//! file in a temporary directory, or a PostgreSQL database of its own) and a SprintHub stand-in,
//! and talks to it over HTTP the way a sender and an operator do.
//!
//! Every scenario is an `async fn(Backend)`; `both_backends!` instantiates it once per backend,
//! as `sqlite::<name>` and `postgres::<name>`. PostgreSQL is expected at
//! `postgres://postgres@127.0.0.1:5432` (override with `SPRINTLINK_TEST_PG_URL`, a server URL
//! without a database); when it cannot be reached the PostgreSQL tests fail, unless
//! `SPRINTLINK_SKIP_PG=1` is set at build time: then they are compiled ignored, and reported so.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sprintlink::config::{Config, LeadConfig, LeadField, LookupKind, Scheme, Secret, SourceConfig};
use sprintlink::signature::Verifier;
use sprintlink::standin::{Received, StandIn};
use sprintlink::{Running, start};

pub const ADMIN_TOKEN: &str = "admin-test-token";
pub const API_TOKEN: &str = "tok-test-7c21";
pub const INSTANCE: &str = "acme";
pub const ERP_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const SHOP_SECRET: &str = "shop-github-secret";
pub const LINK: &str = "/customobjects/link";

/// Instantiates each scenario for both storage backends.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[cfg_attr(sl_skip_pg, ignore = "SPRINTLINK_SKIP_PG=1: no PostgreSQL")]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )+
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

fn pg_server_url() -> String {
    std::env::var("SPRINTLINK_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
        .trim_end_matches('/')
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Databases

/// A database for one test. A PostgreSQL database is dropped when this is dropped, also when the
/// test panics.
pub struct TestDb {
    pub url: String,
    kind: DbKind,
}

enum DbKind {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    /// A file in a directory the caller owns (the benchmark's phase directories).
    SqliteFile,
    Postgres {
        name: String,
    },
    /// Kept after the run (`BENCH_KEEP=1`).
    Kept,
}

static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

impl TestDb {
    /// A database for one process of the benchmark: SQLite as `sprintlink.db` in `dir`.
    pub async fn create_in(backend: Backend, dir: &std::path::Path) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}", dir.join("sprintlink.db").display()),
                kind: DbKind::SqliteFile,
            },
            Backend::Postgres => TestDb::create(backend).await,
        }
    }

    /// Leaves the database in place for inspection.
    pub fn keep(mut self) {
        self.kind = DbKind::Kept;
    }

    pub async fn create(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}/t.db", dir.path().display());
                TestDb {
                    url,
                    kind: DbKind::Sqlite(dir),
                }
            }
            Backend::Postgres => {
                let server = pg_server_url();
                let admin = connect_pg_admin(&server).await;
                SWEPT.get_or_init(|| sweep_stale(&admin)).await;
                // The creation time is in the name, so a later run can sweep what a killed
                // run left behind.
                let name = format!(
                    "sl_test_{}_{:016x}",
                    unix_secs(),
                    fastrand::u64(..) & 0x7fff_ffff_ffff_ffff
                );
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}"));
                admin.close().await;
                TestDb {
                    url: format!("{server}/{name}"),
                    kind: DbKind::Postgres { name },
                }
            }
        }
    }
}

/// Whether the PostgreSQL server of the tests answers (the benchmark reports a row instead of
/// panicking when it does not).
pub async fn pg_reachable() -> Result<(), String> {
    let server = pg_server_url();
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&format!("{server}/postgres"))
        .await
        .map(|_| ())
        .map_err(|e| format!("PostgreSQL at {server}: {e}"))
}

async fn connect_pg_admin(server: &str) -> sqlx::PgPool {
    let url = format!("{server}/postgres");
    match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
    {
        Ok(p) => p,
        Err(e) => panic!(
            "PostgreSQL is not reachable at {server} ({e}). Start it, point SPRINTLINK_TEST_PG_URL \
             at one, or set SPRINTLINK_SKIP_PG=1 to skip the PostgreSQL half of the suite."
        ),
    }
}

/// Drops `sl_test_*` databases that earlier, killed runs left behind (older than an hour).
async fn sweep_stale(admin: &sqlx::PgPool) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'sl\\_test\\_%'")
            .fetch_all(admin)
            .await
            .unwrap_or_default();
    let cutoff = unix_secs().saturating_sub(3600);
    for name in names {
        let created = name
            .strip_prefix("sl_test_")
            .and_then(|r| r.split('_').next())
            .and_then(|t| t.parse::<u64>().ok());
        if created.is_some_and(|t| t < cutoff) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(admin)
            .await;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let DbKind::Postgres { name } = &self.kind else {
            return;
        };
        let name = name.clone();
        let server = pg_server_url();
        // Drop may run inside the test's runtime (or while it unwinds): do the cleanup on a
        // thread of its own with a runtime of its own, and wait for it.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let url = format!("{server}/postgres");
                if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(&url)
                    .await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        });
        let _ = done.join();
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Logs

/// Everything the service logged in this test binary (all tests share one subscriber).
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs a global subscriber that formats log lines the way the service does and keeps them,
/// so tests can check what would reach an operator's log. Debug level, minus the noisiest crates.
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = LogSink(buf.clone());
        let filter = tracing_subscriber::EnvFilter::new(
            "debug,sqlx=warn,hyper=info,hyper_util=info,h2=info,tower=info",
        );
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .try_init();
        buf
    });
}

pub fn captured_logs() -> String {
    LOGS.get()
        .map(|b| String::from_utf8_lossy(&b.lock().unwrap()).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// The source most scenarios post to: Standard Webhooks, ids and types in the body.
pub fn erp_source() -> SourceConfig {
    SourceConfig::example("erp", ERP_SECRET)
}

/// A second source, GitHub-signed, with a flatter body: `{"id", "object", "lead"}`.
pub fn shop_source() -> SourceConfig {
    SourceConfig {
        name: "shop".into(),
        scheme: Scheme::Github,
        secrets: vec![Secret::new(SHOP_SECRET)],
        event_id: Some("/id".into()),
        event_type: None,
        accept_types: vec![],
        object_id: Some("/object".into()),
        object: None,
        lead: LeadConfig {
            id: Some("/lead".into()),
            ..Default::default()
        },
        ..SourceConfig::example("shop", SHOP_SECRET)
    }
}

/// A source that resolves `/data/customer/<field>` through a lookup.
pub fn lookup_source(
    name: &str,
    key_pointer: &str,
    lookup: LookupKind,
    field: Option<LeadField>,
) -> SourceConfig {
    SourceConfig {
        name: name.into(),
        lead: LeadConfig {
            key: Some(key_pointer.into()),
            lookup: Some(lookup),
            field,
            ..Default::default()
        },
        ..erp_source()
    }
}

/// The test defaults: fast retries, no rate limit, a lease that respects the timeout.
pub fn test_config(storage_url: &str, hub_url: &str) -> Config {
    let mut c = Config::for_local(storage_url, hub_url);
    c.server.shutdown_timeout_ms = 5_000;
    c.sprinthub.instance = INSTANCE.into();
    c.sprinthub.api_token = Secret::new(API_TOKEN);
    c.sprinthub.timeout_ms = 2_000;
    c.sprinthub.concurrency = 8;
    c.sprinthub.rate_limit_per_second = 0.0;
    c.delivery.max_attempts = 12;
    c.delivery.initial_backoff_ms = 50;
    c.delivery.max_backoff_ms = 500;
    c.delivery.lease_seconds = 7;
    c.admin.token = Secret::new(ADMIN_TOKEN);
    c.sources = vec![erp_source(), shop_source()];
    c
}

// ---------------------------------------------------------------------------------------------
// The app

type Tweak = Box<dyn FnOnce(&mut Config) + Send>;

pub struct TestAppBuilder {
    backend: Backend,
    tweaks: Vec<Tweak>,
}

impl TestAppBuilder {
    /// Changes the configuration before the service starts.
    pub fn config(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(f));
        self
    }

    pub async fn spawn(self) -> TestApp {
        capture_logs();
        let hub = StandIn::start().await.expect("stand-in starts");
        let db = TestDb::create(self.backend).await;
        let mut config = test_config(&db.url, &hub.url());
        for t in self.tweaks {
            t(&mut config);
        }
        assert!(
            config.delivery.lease_seconds * 1000 >= config.sprinthub.timeout_ms + 5_000,
            "test config: lease_seconds must be at least timeout_ms/1000 + 5"
        );
        let verifiers = config
            .sources
            .iter()
            .map(|s| (s.name.clone(), Verifier::from_source(s)))
            .collect();
        let running = start(config.clone()).await.expect("the service starts");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        TestApp {
            addr: running.addr,
            hub,
            client,
            admin_token: config.admin.token.expose().to_string(),
            running: Some(running),
            config,
            verifiers,
            db,
        }
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub hub: StandIn,
    pub client: reqwest::Client,
    pub admin_token: String,
    pub running: Option<Running>,
    pub config: Config,
    verifiers: HashMap<String, Verifier>,
    /// Declared last: dropped after the service was told to stop.
    pub db: TestDb,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.shutdown.cancel();
        }
    }
}

/// A response: status and JSON body (`Null` when the body is not JSON).
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
    pub text: String,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    pub async fn from(r: reqwest::Response) -> Resp {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            body,
            text,
            headers,
        }
    }

    /// Asserts the status and returns the body.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        &self.body
    }

    /// Asserts the contract's error shape and code.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) {
        self.expect(status);
        assert_eq!(
            self.body["error"]["code"], code,
            "error code; body: {}",
            self.text
        );
        let msg = self.body["error"]["message"].as_str();
        assert!(
            msg.is_some_and(|m| !m.is_empty()),
            "error.message must be a non-empty string; body: {}",
            self.text
        );
        assert_eq!(
            self.body.as_object().map(|o| o.len()),
            Some(1),
            "only `error` at the top level; body: {}",
            self.text
        );
    }
}

impl TestApp {
    pub fn builder(backend: Backend) -> TestAppBuilder {
        TestAppBuilder {
            backend,
            tweaks: Vec::new(),
        }
    }

    pub async fn spawn(backend: Backend) -> TestApp {
        Self::builder(backend).spawn().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops the service (draining as on SIGTERM) and starts a new one on the same database
    /// and the same stand-in.
    pub async fn restart(&mut self) {
        self.stop().await;
        let running = start(self.config.clone())
            .await
            .expect("the service starts again");
        self.addr = running.addr;
        self.running = Some(running);
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(10), r.stop())
                .await
                .expect("the service stops within 10 s");
        }
    }

    // --- the sender's side ---

    /// The signature headers `source` expects for `body`, at time `ts` with delivery id `id`.
    pub fn sign(&self, source: &str, body: &[u8], ts: i64, id: &str) -> Vec<(String, String)> {
        self.verifiers
            .get(source)
            .unwrap_or_else(|| panic!("no source {source} in the test config"))
            .sign(body, ts, id)
    }

    /// Posts `json` to `/webhooks/{source}`, signed as that source's sender would sign it now.
    pub async fn post_webhook(&self, source: &str, json: &Value) -> Resp {
        let raw = json.to_string();
        let id = json["id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("msg_{:x}", fastrand::u64(..)));
        let headers = self.sign(source, raw.as_bytes(), unix_ms() / 1000, &id);
        self.post_raw(source, raw.into_bytes(), &headers).await
    }

    /// Posts bytes with exactly these headers (plus `content-type: application/json`).
    pub async fn post_raw(
        &self,
        source: &str,
        body: Vec<u8>,
        headers: &[(String, String)],
    ) -> Resp {
        let mut req = self
            .client
            .post(self.url(&format!("/webhooks/{source}")))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        Resp::from(req.send().await.expect("webhook request")).await
    }

    // --- the operator's side ---

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> Resp {
        let mut req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(&self.admin_token);
        if let Some((ct, b)) = body {
            req = req.header("content-type", ct).body(b);
        }
        Resp::from(req.send().await.expect("admin request")).await
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        self.admin(reqwest::Method::GET, path, None).await
    }

    pub async fn admin_post(&self, path: &str, json: &Value) -> Resp {
        self.admin(
            reqwest::Method::POST,
            path,
            Some(("application/json", json.to_string())),
        )
        .await
    }

    pub async fn admin_put(&self, path: &str, json: &Value) -> Resp {
        self.admin(
            reqwest::Method::PUT,
            path,
            Some(("application/json", json.to_string())),
        )
        .await
    }

    /// `PUT /admin/mappings/{source}/{key}` with these lead ids; asserts 200.
    pub async fn put_mapping(&self, source: &str, key: &str, lead_ids: Value) {
        let r = self
            .admin_put(
                &format!("/admin/mappings/{source}/{}", encode_path(key)),
                &json!({ "lead_ids": lead_ids }),
            )
            .await;
        r.expect(200);
    }

    /// `POST /admin/events/{id}/replay`; asserts 202.
    pub async fn replay(&self, event_id: &str) -> Value {
        let r = self
            .admin_post(
                &format!("/admin/events/{}/replay", encode_path(event_id)),
                &json!({}),
            )
            .await;
        r.expect(202).clone()
    }

    /// Every event in this state (all when `None`), newest first.
    pub async fn events(&self, state: Option<&str>) -> Vec<Value> {
        let path = match state {
            Some(s) => format!("/admin/events?limit=500&state={s}"),
            None => "/admin/events?limit=500".to_string(),
        };
        let r = self.admin_get(&path).await;
        r.expect(200)["events"]
            .as_array()
            .cloned()
            .expect("events is a list")
    }

    /// `GET /admin/events/{id}`; asserts 200.
    pub async fn event(&self, event_id: &str) -> Value {
        let r = self
            .admin_get(&format!("/admin/events/{}", encode_path(event_id)))
            .await;
        r.expect(200).clone()
    }

    /// The event's state, or `None` while it does not exist.
    pub async fn event_state(&self, event_id: &str) -> Option<String> {
        let r = self
            .admin_get(&format!("/admin/events/{}", encode_path(event_id)))
            .await;
        (r.status == StatusCode::OK).then(|| r.body["state"].as_str().unwrap_or("").to_string())
    }

    /// Waits until the event is in `state` (10 s at most) and returns its detail.
    pub async fn wait_for_state(&self, event_id: &str, state: &str) -> Value {
        let mut last = None;
        let ok = poll(Duration::from_secs(10), async || {
            last = self.event_state(event_id).await;
            last.as_deref() == Some(state)
        })
        .await;
        assert!(
            ok,
            "event {event_id} did not become {state} within 10 s (last state: {last:?}); detail: {}",
            self.admin_get(&format!("/admin/events/{}", encode_path(event_id)))
                .await
                .text
        );
        self.event(event_id).await
    }

    /// Waits until the event's first link has a failed attempt and its retry is scheduled, and
    /// returns the detail. ("Scheduled" is `next_attempt_at` after the last attempt: the detail is
    /// read in several statements, so for a moment it can show a new attempt next to the link
    /// row as it was before that attempt.)
    pub async fn wait_for_retry_scheduled(&self, event_id: &str) -> Value {
        let mut detail = Value::Null;
        let ok = poll(TIMEOUT, async || {
            detail = self.event(event_id).await;
            let link = &detail["links"][0];
            let last_at = link["attempts"]
                .as_array()
                .and_then(|a| a.last())
                .and_then(|a| a["at"].as_str())
                .map(parse_rfc3339);
            let next = link["next_attempt_at"].as_str().map(parse_rfc3339);
            matches!((last_at, next), (Some(at), Some(n)) if n > at)
        })
        .await;
        assert!(ok, "no retry was scheduled for {event_id}: {detail}");
        detail
    }

    /// Whether `/readyz` answers 200 now.
    pub async fn is_ready(&self) -> bool {
        self.client
            .get(self.url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    }

    pub async fn metrics(&self) -> String {
        let r = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics request");
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    /// What the stand-in's link endpoint received.
    pub fn link_calls(&self) -> Vec<Received> {
        self.hub.requests_to(LINK)
    }
}

/// Percent-encodes a path segment.
pub fn encode_path(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// Polls `f` every 20 ms until it answers true or `timeout` passes; says whether it did.
pub async fn poll(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `f` until it answers true; panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, f: impl AsyncFnMut() -> bool) {
    if !poll(timeout, f).await {
        panic!("timed out after {timeout:?} waiting until {what}");
    }
}

/// A standard 10 s for things that should take milliseconds.
pub const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Bodies and time

/// An `erp` event: `{"id", "type": "object.created", "data": {"object_id", "lead_id"}}`.
pub fn erp_event(id: &str, object_id: impl Into<Value>, lead_id: impl Into<Value>) -> Value {
    json!({
        "id": id,
        "type": "object.created",
        "data": {"object_id": object_id.into(), "lead_id": lead_id.into()},
    })
}

/// An event for a lookup source: the customer's fields under `/data/customer`.
pub fn customer_event(id: &str, object_id: impl Into<Value>, customer: Value) -> Value {
    json!({
        "id": id,
        "type": "object.created",
        "data": {"object_id": object_id.into(), "customer": customer},
    })
}

/// Unix milliseconds from the admin API's `YYYY-MM-DDTHH:MM:SS[.mmm]Z`.
pub fn parse_rfc3339(s: &str) -> i64 {
    let parts = s.strip_suffix('Z').and_then(|s| s.split_once('T'));
    let (date, time) = parts.unwrap_or_else(|| panic!("not an RFC 3339 UTC time: {s:?}"));
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|p| p.parse().unwrap()).collect();
    let ms: i64 = format!("{frac:0<3}")[..3].parse().unwrap();
    let (y, m, day) = (d[0], d[1], d[2]);
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000) + ms
}

/// The link calls' request bodies as `(objectId, targetId)`.
pub fn pairs(calls: &[Received]) -> Vec<(Value, Value)> {
    calls
        .iter()
        .map(|r| (r.body["objectId"].clone(), r.body["targetId"].clone()))
        .collect()
}

/// A query parameter of a received call.
pub fn query_param<'a>(r: &'a Received, name: &str) -> Option<&'a str> {
    r.query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// A raw SprintHub fake, for answers the stand-in cannot give: redirects to a page that answers
// 200, and answers far larger than anything SprintHub sends, streamed without end.

/// What the raw fake answers to one request.
#[derive(Debug, Clone)]
pub enum RawAnswer {
    /// `status` with these headers and this body (Content-Length is added).
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// `status` with a declared Content-Length of `total` bytes, streamed in 64 KiB chunks
    /// until the client stops reading (or `total` bytes were sent).
    Stream { status: u16, total: u64 },
}

/// One request the raw fake received.
#[derive(Debug, Clone)]
pub struct RawCall {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub body: Vec<u8>,
}

/// A one-connection-per-request HTTP/1.1 server on 127.0.0.1 whose answers a closure decides.
#[derive(Clone)]
pub struct RawHub {
    pub url: String,
    calls: Arc<Mutex<Vec<RawCall>>>,
    /// Body bytes written to clients, across every answer.
    pub written: Arc<std::sync::atomic::AtomicU64>,
}

impl RawHub {
    pub async fn start(answer: impl Fn(&RawCall) -> RawAnswer + Send + Sync + 'static) -> RawHub {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls: Arc<Mutex<Vec<RawCall>>> = Arc::default();
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let answer = Arc::new(answer);
        let (c, w) = (calls.clone(), written.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (calls, written, answer) = (c.clone(), w.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let mut words = head.split_whitespace();
                    let method = words.next().unwrap_or("").to_string();
                    let target = words.next().unwrap_or("").to_string();
                    let length = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + length {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let call = RawCall {
                        method,
                        path: target.split('?').next().unwrap_or("").to_string(),
                        body: buf[head_end..head_end + length].to_vec(),
                    };
                    let reply = answer(&call);
                    calls.lock().unwrap().push(call);
                    match reply {
                        RawAnswer::Full {
                            status,
                            headers,
                            body,
                        } => {
                            let mut out = format!("HTTP/1.1 {status} X\r\n");
                            for (k, v) in headers {
                                out.push_str(&format!("{k}: {v}\r\n"));
                            }
                            out.push_str(&format!(
                                "content-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            ));
                            let mut bytes = out.into_bytes();
                            bytes.extend_from_slice(&body);
                            let _ = sock.write_all(&bytes).await;
                        }
                        RawAnswer::Stream { status, total } => {
                            let head = format!(
                                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n"
                            );
                            if sock.write_all(head.as_bytes()).await.is_err() {
                                return;
                            }
                            let piece = vec![b'x'; 64 * 1024];
                            let mut sent = 0u64;
                            while sent < total {
                                let n = (total - sent).min(piece.len() as u64) as usize;
                                if sock.write_all(&piece[..n]).await.is_err() {
                                    return;
                                }
                                sent += n as u64;
                                written.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        RawHub {
            url,
            calls,
            written,
        }
    }

    pub fn calls(&self) -> Vec<RawCall> {
        self.calls.lock().unwrap().clone()
    }

    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl RawAnswer {
    pub fn json(status: u16, body: &str) -> RawAnswer {
        RawAnswer::Full {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.as_bytes().to_vec(),
        }
    }
    pub fn redirect(status: u16, location: &str) -> RawAnswer {
        RawAnswer::Full {
            status,
            headers: vec![("location".into(), location.into())],
            body: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary, as its own process (kill -9, replicas, signals)

/// A free loopback port, for a process that binds it itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `sprintlink serve --config FILE` as a process of its own, ready (`/readyz` 200) when
/// returned; killed with SIGKILL when dropped.
pub struct Process {
    pub child: std::process::Child,
    pub base: String,
}

impl Process {
    pub async fn serve(config: &std::path::Path, port: u16) -> Process {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_sprintlink"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start sprintlink");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await
                && r.status() == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "service on {port} did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Process { child, base }
    }

    /// SIGKILL (std's kill on Unix): no drain, no lease release.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How each backend is made to fail without disturbing other tests: SQLite is write-locked by
/// another connection past the busy timeout; the PostgreSQL database refuses connections and
/// the service's sessions are terminated.
pub enum StorageFault {
    Sqlite(rusqlite::Connection),
    Postgres(String),
}

impl StorageFault {
    pub async fn begin(url: &str) -> StorageFault {
        use sqlx::Connection;
        if let Some(path) = url.strip_prefix("sqlite://") {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
            StorageFault::Sqlite(conn)
        } else {
            let name = url.rsplit('/').next().unwrap().to_string();
            let mut admin =
                sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres")
                    .await
                    .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {name} ALLOW_CONNECTIONS false"
            )))
            .execute(&mut admin)
            .await
            .unwrap();
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            )
            .bind(&name)
            .execute(&mut admin)
            .await
            .unwrap();
            StorageFault::Postgres(name)
        }
    }

    pub async fn end(self) {
        use sqlx::Connection;
        match self {
            StorageFault::Sqlite(conn) => {
                conn.execute_batch("ROLLBACK").unwrap();
            }
            StorageFault::Postgres(name) => {
                let mut admin =
                    sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres")
                        .await
                        .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
                )))
                .execute(&mut admin)
                .await
                .unwrap();
            }
        }
    }
}
