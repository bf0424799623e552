//! The issue-6 benchmark: `cargo bench --bench throughput` (or `bench/run`).
//!
//! The service runs as a separate process (the real `sprintlink` binary with a generated TOML
//! config in a temp dir), so its memory and start-up are its own. The load generator and the
//! SprintHub stand-in run in this process. Every figure is printed next to a baseline measured in
//! the same run (the service's own `/healthz`, the stand-in on its own, an empty database, a bare
//! exec of the binary), so the ratios stay meaningful on whatever machine runs it.
//!
//! Knobs (environment): `BENCH_SECONDS` (10) per timed phase, `BENCH_WARMUP_SECONDS` (2),
//! `BENCH_BACKENDS` (sqlite,postgres), `BENCH_ONLY` (ingest,paced,delivery,limited,fleet,memory,search,startup,pruning,versus),
//! `BENCH_CONNECTIONS` (64), `BENCH_PACED_RATE` (2000), `BENCH_DELIVERY_EVENTS`
//! (5000 x BENCH_SECONDS), `BENCH_DELIVERY_CONCURRENCY` (64), `BENCH_RATE_LIMIT` (200),
//! `BENCH_FLEET_RATE` (20: the deployment-wide rate of the fleet phase, PostgreSQL only),
//! `BENCH_MEMORY_EVENTS` (1000000), `BENCH_PG_MEMORY_EVENTS` (same), `BENCH_MEMORY_SECONDS` (5),
//! `BENCH_SEARCH_EVENTS` (1000000: the admin search phase `search`), `BENCH_STARTUP_RUNS` (7),
//! `BENCH_PRUNE_EVENTS` (200000, the delivered events the `pruning` phase has retention
//! delete), `BENCH_CLIENT_THREADS` (2), `SPRINTLINK_TEST_PG_URL` (as the
//! tests: postgres://postgres@127.0.0.1:5432), `BENCH_DIR` (the system temp dir), `BENCH_KEEP` (1 keeps
//! the temp dir and databases), `BENCH_RUST_LOG` (the service's RUST_LOG, default info),
//! `BENCH_SERVICE_BIN` (another sprintlink binary to measure, e.g. a build of the previous commit),
//! `BENCH_BASELINE_BIN` (the `versus` phase: this binary and that one, alternating round by
//! round in one run, JSON ingest and unlimited delivery; `BENCH_VERSUS_ROUNDS` 3,
//! `BENCH_VERSUS_EVENTS` 20000 per delivery round).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use common::{Backend, ERP_SECRET, TestDb};
use sprintlink::config::Config;
use sprintlink::signature::Verifier;
use sprintlink::standin::StandIn;
use sprintlink::store::{self, NewEvent, Plan};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The service binary cargo built with this bench; `BENCH_SERVICE_BIN` measures another build
/// (e.g. the previous commit's) with the same load.
/// The integration tests' helpers (databases, the sender's secret), shared instead of copied.
#[path = "../tests/it/common/mod.rs"]
mod common;

fn bin() -> String {
    std::env::var("BENCH_SERVICE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sprintlink").into())
}
const ADMIN_TOKEN: &str = "bench-admin-token-0001";

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    seconds: f64,
    warmup: f64,
    backends: Vec<Backend>,
    only: Option<Vec<String>>,
    connections: usize,
    paced_rate: f64,
    presign_rate: f64,
    delivery_events: usize,
    delivery_concurrency: usize,
    limited_rate: f64,
    fleet_rate: f64,
    memory_events: usize,
    /// Delivered events the pruning phase prefills and retention deletes.
    prune_events: usize,
    pg_memory_events: usize,
    memory_seconds: f64,
    search_events: usize,
    startup_runs: usize,
    client_threads: usize,
    dir: PathBuf,
    keep: bool,
    rust_log: String,
    /// `BENCH_BASELINE_BIN`: the binary the `versus` phase measures beside this one.
    baseline_bin: Option<String>,
    versus_rounds: usize,
    versus_events: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("bench: cannot parse {name}={v:?}; using the default");
            default
        }),
        _ => default,
    }
}

impl Opts {
    fn from_env() -> Result<Opts> {
        let seconds: f64 = env_or("BENCH_SECONDS", 10.0);
        let backends = std::env::var("BENCH_BACKENDS")
            .unwrap_or_else(|_| "sqlite,postgres".into())
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s {
                "sqlite" => Ok(Backend::Sqlite),
                "postgres" | "pg" | "postgresql" => Ok(Backend::Postgres),
                other => Err(anyhow!("BENCH_BACKENDS: unknown backend {other:?}")),
            })
            .collect::<Result<Vec<_>>>()?;
        let only = std::env::var("BENCH_ONLY")
            .ok()
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.split(',')
                    .map(|p| p.trim().to_string())
                    .collect::<Vec<_>>()
            });
        let memory_events = env_or("BENCH_MEMORY_EVENTS", 1_000_000usize);
        let prune_events = env_or("BENCH_PRUNE_EVENTS", 200_000usize);
        let dir = std::env::var_os("BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("sprintlink-bench-{}", std::process::id()));
        Ok(Opts {
            seconds,
            warmup: env_or("BENCH_WARMUP_SECONDS", 2.0),
            backends,
            only,
            connections: env_or("BENCH_CONNECTIONS", 64),
            paced_rate: env_or("BENCH_PACED_RATE", 2000.0),
            presign_rate: env_or("BENCH_PRESIGN_RATE", 30_000.0),
            delivery_events: env_or("BENCH_DELIVERY_EVENTS", (5000.0 * seconds) as usize),
            delivery_concurrency: env_or("BENCH_DELIVERY_CONCURRENCY", 64),
            limited_rate: env_or("BENCH_RATE_LIMIT", 200.0),
            fleet_rate: env_or("BENCH_FLEET_RATE", 20.0),
            memory_events,
            prune_events,
            pg_memory_events: env_or("BENCH_PG_MEMORY_EVENTS", memory_events),
            memory_seconds: env_or("BENCH_MEMORY_SECONDS", 5.0),
            search_events: env_or("BENCH_SEARCH_EVENTS", 1_000_000usize),
            startup_runs: env_or("BENCH_STARTUP_RUNS", 7),
            client_threads: env_or("BENCH_CLIENT_THREADS", 2),
            dir,
            keep: env_or("BENCH_KEEP", 0u8) == 1,
            rust_log: std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
            baseline_bin: std::env::var("BENCH_BASELINE_BIN")
                .ok()
                .filter(|s| !s.is_empty()),
            versus_rounds: env_or("BENCH_VERSUS_ROUNDS", 3usize).max(1),
            versus_events: env_or("BENCH_VERSUS_EVENTS", 20_000usize),
        })
    }

    fn runs(&self, phase: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == phase))
    }

    fn dur(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }

    fn warm(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }
}

// ---------------------------------------------------------------------------------------------
// The table

struct Row {
    backend: String,
    measurement: String,
    result: String,
    target: String,
    ratio: String,
    pass: Option<bool>,
}

fn row(
    backend: &str,
    measurement: impl Into<String>,
    result: impl Into<String>,
    target: impl Into<String>,
    ratio: impl Into<String>,
    pass: Option<bool>,
) -> Row {
    Row {
        backend: backend.into(),
        measurement: measurement.into(),
        result: result.into(),
        target: target.into(),
        ratio: ratio.into(),
        pass,
    }
}

fn render_table(rows: &[Row]) -> String {
    let head = [
        "backend",
        "measurement",
        "result",
        "target",
        "ratio/baseline",
        "pass?",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.backend.clone(),
                r.measurement.clone(),
                r.result.clone(),
                r.target.clone(),
                r.ratio.clone(),
                match r.pass {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let mut width = head.map(|h| h.chars().count());
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            width[i] = width[i].max(v.chars().count());
        }
    }
    let line = |vals: &[String]| {
        let mut s = String::from("|");
        for (i, v) in vals.iter().enumerate() {
            let pad = width[i] - v.chars().count();
            let _ = write!(s, " {v}{} |", " ".repeat(pad));
        }
        s
    };
    let mut out = String::new();
    out.push_str(&line(&head.map(String::from)));
    out.push('\n');
    let mut sep = String::from("|");
    for w in width {
        let _ = write!(sep, "{}|", "-".repeat(w + 2));
    }
    out.push_str(&sep);
    out.push('\n');
    for c in &cells {
        out.push_str(&line(c));
        out.push('\n');
    }
    out
}

fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

fn per_s(v: f64) -> String {
    if v >= 100.0 {
        format!("{:.0}/s", v)
    } else {
        format!("{:.1}/s", v)
    }
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// A lean HTTP/1.1 keep-alive client: the request bytes are built beforehand, a round trip is one
// write and the reads of one response.

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Sends one request and reads its response; answers the status code.
    async fn roundtrip(&mut self, req: &[u8]) -> std::io::Result<u16> {
        self.stream.write_all(req).await?;
        self.buf.clear();
        loop {
            if let Some((status, total)) = parse_head(&self.buf)?
                && self.buf.len() >= total
            {
                return Ok(status);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

fn bad_response() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
}

/// The status and the full length of a response once its head is complete.
fn parse_head(buf: &[u8]) -> std::io::Result<Option<(u16, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad_response())?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad_response)?;
    let mut len = 0usize;
    for line in head.split("\r\n").skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().map_err(|_| bad_response())?;
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                // Only the timed endpoints use this client, and they all send a length.
                return Err(bad_response());
            }
        }
    }
    Ok(Some((status, end + 4 + len)))
}

fn get_request(addr: SocketAddr, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").into_bytes()
}

/// Signed `POST /webhooks/erp` requests, each a new event with a new (object, lead) pair.
struct Signer {
    verifier: Verifier,
    addr: SocketAddr,
    tag: String,
    /// Object ids start here; connection `c`'s request `i` uses `base + c * 10_000_000 + i`.
    base: u64,
    ts: i64,
    body: BodyKind,
}

/// An extra ingest leg: its name, the route it posts to (for the log), the first object id,
/// and how its signer posts.
type IngestLeg = (&'static str, &'static str, u64, fn(Signer) -> Signer);

/// How a `Signer` posts its events.
#[derive(Clone)]
enum BodyKind {
    /// JSON to `erp`, signed `v1` (HMAC-SHA256).
    Json,
    /// The same fields as `application/x-www-form-urlencoded` (bracketed keys) to `erp`.
    Form,
    /// JSON to `erp-ed`, signed `v1a` (Ed25519) with this key.
    Ed25519(Arc<ed25519_dalek::SigningKey>),
}

/// The bench's Ed25519 key: fixed, so that the `erp-ed` source's `whpk_` key is known ahead.
fn ed25519_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
}

/// `[[sources]]` `erp-ed`: `erp` with the bench key's `whpk_` public key (Standard Webhooks
/// `v1a`), for the current binary only (0.1.0 has no `v1a`).
fn ed25519_source() -> String {
    use base64::Engine as _;
    let public =
        base64::engine::general_purpose::STANDARD.encode(ed25519_key().verifying_key().to_bytes());
    format!(
        r#"
[[sources]]
name = "erp-ed"
scheme = "standard-webhooks"
secrets = ["whpk_{public}"]
event_id = "/id"
event_type = "/type"
accept_types = ["object.created"]
object_id = "/data/object_id"

[sources.lead]
id = "/data/lead_id"
"#
    )
}

impl Signer {
    fn new(verifier: &Verifier, addr: SocketAddr, tag: &str, base: u64) -> Signer {
        Signer {
            verifier: verifier.clone(),
            addr,
            tag: tag.into(),
            base,
            ts: store::now_ms() / 1000,
            body: BodyKind::Json,
        }
    }

    /// The same events as form bodies.
    fn forms(mut self) -> Signer {
        self.body = BodyKind::Form;
        self
    }

    /// The same events, signed with Ed25519 for the `erp-ed` source.
    fn ed25519(mut self) -> Signer {
        self.body = BodyKind::Ed25519(Arc::new(ed25519_key()));
        self
    }

    fn request(&self, conn: usize, seq: usize) -> Vec<u8> {
        let object = self.base + conn as u64 * 10_000_000 + seq as u64;
        let id = format!("{}-{conn}-{seq}", self.tag);
        let lead = 8000 + object % 977;
        let (source, body, content_type) = match self.body {
            BodyKind::Form => (
                "erp",
                form_body(&id, object, lead),
                "application/x-www-form-urlencoded",
            ),
            BodyKind::Json => ("erp", event_body(&id, object, lead), "application/json"),
            BodyKind::Ed25519(_) => ("erp-ed", event_body(&id, object, lead), "application/json"),
        };
        let mut req = format!(
            "POST /webhooks/{source} HTTP/1.1\r\nhost: {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
            self.addr,
            body.len()
        );
        let msg_id = format!("msg_{}_{conn}_{seq}", self.tag);
        let headers = match &self.body {
            BodyKind::Ed25519(key) => {
                use base64::Engine as _;
                use ed25519_dalek::Signer as _;
                let signed = format!("{msg_id}.{}.{body}", self.ts);
                let sig = key.sign(signed.as_bytes()).to_bytes();
                vec![
                    ("webhook-id".to_string(), msg_id),
                    ("webhook-timestamp".to_string(), self.ts.to_string()),
                    (
                        "webhook-signature".to_string(),
                        format!(
                            "v1a,{}",
                            base64::engine::general_purpose::STANDARD.encode(sig)
                        ),
                    ),
                ]
            }
            _ => self.verifier.sign(body.as_bytes(), self.ts, &msg_id),
        };
        for (k, v) in headers {
            let _ = write!(req, "{k}: {v}\r\n");
        }
        req.push_str("\r\n");
        req.push_str(&body);
        req.into_bytes()
    }
}

/// `event_body` as a PHP-style form: the same pointers read it.
fn form_body(id: &str, object: u64, lead: u64) -> String {
    format!(
        "id={id}&type=object.created&data%5Bobject_id%5D={object}&data%5Blead_id%5D={lead}&data%5Bnote%5D=benchmark+event"
    )
}

fn event_body(id: &str, object: u64, lead: u64) -> String {
    format!(
        r#"{{"id":"{id}","type":"object.created","data":{{"object_id":{object},"lead_id":{lead},"note":"benchmark event"}}}}"#
    )
}

#[derive(Clone)]
enum Work {
    /// The same request every time.
    Fixed(Arc<Vec<u8>>),
    Ingest(Arc<Signer>),
}

impl Work {
    /// Requests built before the timed window, per connection.
    fn prebuild(&self, conn: usize, count: usize) -> Vec<Vec<u8>> {
        match self {
            Work::Fixed(_) => Vec::new(),
            Work::Ingest(s) => (0..count).map(|i| s.request(conn, i)).collect(),
        }
    }
}

#[derive(Default)]
struct Load {
    ok: u64,
    other: BTreeMap<u16, u64>,
    io_errors: u64,
    built_late: u64,
    lat_us: Vec<u32>,
    window: f64,
    /// Open loop only: requests sent later than scheduled because the connection was busy.
    behind: u64,
}

impl Load {
    fn merge(&mut self, o: Load) {
        self.ok += o.ok;
        for (k, v) in o.other {
            *self.other.entry(k).or_default() += v;
        }
        self.io_errors += o.io_errors;
        self.built_late += o.built_late;
        self.lat_us.extend(o.lat_us);
        self.behind += o.behind;
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.window
    }

    fn pct(&mut self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        self.lat_us.sort_unstable();
        let n = self.lat_us.len();
        let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
        f64::from(self.lat_us[i])
    }

    fn problems(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.other {
            let _ = write!(s, " {v}x HTTP {k}");
        }
        if self.io_errors > 0 {
            let _ = write!(s, " {} connection errors", self.io_errors);
        }
        s
    }
}

/// `conns` connections, each sending its next request as soon as the previous one is answered.
/// Counts answers that arrive within the window after the warm-up.
async fn closed_loop(
    addr: SocketAddr,
    conns: usize,
    warmup: Duration,
    dur: Duration,
    work: Work,
    expect: u16,
    prebuilt_per_conn: usize,
) -> Result<Load> {
    let mut prepared = Vec::with_capacity(conns);
    for c in 0..conns {
        prepared.push(work.prebuild(c, prebuilt_per_conn));
    }
    let t0 = tokio::time::Instant::now() + Duration::from_millis(300);
    let mut tasks = tokio::task::JoinSet::new();
    for (c, reqs) in prepared.into_iter().enumerate() {
        let work = work.clone();
        tasks.spawn(async move {
            let mut load = Load::default();
            let mut conn = Conn::connect(addr).await?;
            tokio::time::sleep_until(t0).await;
            let from = t0.into_std() + warmup;
            let end = from + dur;
            let mut seq = 0usize;
            loop {
                let late;
                let req: &[u8] = match (&work, reqs.get(seq)) {
                    (Work::Fixed(r), _) => r,
                    (Work::Ingest(_), Some(r)) => r,
                    (Work::Ingest(s), None) => {
                        load.built_late += 1;
                        late = s.request(c, seq);
                        &late
                    }
                };
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result = conn.roundtrip(req).await;
                let done = Instant::now();
                let counted = done >= from && done <= end;
                match result {
                    Ok(st) if counted && st == expect => {
                        load.ok += 1;
                        load.lat_us.push((done - sent).as_micros() as u32);
                    }
                    Ok(st) if counted => *load.other.entry(st).or_default() += 1,
                    Ok(_) => {}
                    Err(_) => {
                        load.io_errors += 1;
                        conn = Conn::connect(addr).await?;
                    }
                }
                seq += 1;
            }
            anyhow::Ok(load)
        });
    }
    let mut total = Load {
        window: dur.as_secs_f64(),
        ..Default::default()
    };
    while let Some(r) = tasks.join_next().await {
        total.merge(r??);
    }
    Ok(total)
}

/// Open loop: request `i` is due at `t0 + i / rate`, whatever happened to the others. Each of
/// `conns` connections takes every `conns`-th slot; a request that must wait for its connection
/// is timed from its due time (no coordinated omission), one sent on time from its send time (so
/// the 1 ms timer granularity of the generator is not counted against the service).
async fn open_loop(
    addr: SocketAddr,
    conns: usize,
    rate: f64,
    warmup: Duration,
    dur: Duration,
    work: Work,
    expect: u16,
) -> Result<Load> {
    let total_reqs = (rate * (warmup + dur).as_secs_f64()).ceil() as usize;
    let per_conn = total_reqs.div_ceil(conns);
    let mut prepared = Vec::with_capacity(conns);
    for c in 0..conns {
        prepared.push(work.prebuild(c, per_conn));
    }
    let t0 = tokio::time::Instant::now() + Duration::from_millis(300);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = tokio::task::JoinSet::new();
    for (c, reqs) in prepared.into_iter().enumerate() {
        let work = work.clone();
        tasks.spawn(async move {
            let mut load = Load::default();
            let mut conn = Conn::connect(addr).await?;
            let from = t0 + warmup;
            let end = from + dur;
            let mut prev_done = tokio::time::Instant::now();
            for k in 0..per_conn {
                let slot = k * conns + c;
                let due = t0 + interval.mul_f64(slot as f64);
                if due >= end {
                    break;
                }
                let req: &[u8] = match (&work, reqs.get(k)) {
                    (Work::Fixed(r), _) => r,
                    (Work::Ingest(_), Some(r)) => r,
                    (Work::Ingest(_), None) => unreachable!("built per_conn requests"),
                };
                tokio::time::sleep_until(due).await;
                let sent = tokio::time::Instant::now();
                let start = if prev_done > due {
                    load.behind += u64::from(due >= from);
                    due
                } else {
                    sent
                };
                let result = conn.roundtrip(req).await;
                let done = tokio::time::Instant::now();
                prev_done = done;
                if due < from {
                    continue;
                }
                match result {
                    Ok(st) if st == expect => {
                        load.ok += 1;
                        load.lat_us.push((done - start).as_micros() as u32);
                    }
                    Ok(st) => *load.other.entry(st).or_default() += 1,
                    Err(_) => {
                        load.io_errors += 1;
                        conn = Conn::connect(addr).await?;
                    }
                }
            }
            anyhow::Ok(load)
        });
    }
    let mut total = Load {
        window: dur.as_secs_f64(),
        ..Default::default()
    };
    while let Some(r) = tasks.join_next().await {
        total.merge(r??);
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// Databases

struct PhaseDir {
    path: PathBuf,
    keep: bool,
}

impl std::ops::Deref for PhaseDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for PhaseDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

struct Env {
    opts: Opts,
    /// Unique per run, so two runs on one PostgreSQL server do not collide.
    run_id: String,
    seq: Mutex<u32>,
    notes: Mutex<Vec<String>>,
}

impl Env {
    fn note(&self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("bench: note: {s}");
        self.notes.lock().unwrap().push(s);
    }

    fn next(&self) -> u32 {
        let mut s = self.seq.lock().unwrap();
        *s += 1;
        *s
    }

    /// A new empty directory for one service process.
    /// A new empty directory for one service process, removed when dropped (unless
    /// `BENCH_KEEP=1`): removing a database drops its dirty pages instead of leaving the disk
    /// writing them back during the next phase.
    fn phase_dir(&self, tag: &str) -> Result<PhaseDir> {
        let d = self.opts.dir.join(format!("{:03}-{tag}", self.next()));
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(PhaseDir {
            path: d,
            keep: self.opts.keep,
        })
    }

    /// A fresh database for one service process (the tests' helper); dropped afterwards
    /// unless `BENCH_KEEP=1`.
    async fn fresh_db(&self, backend: Backend, dir: &Path) -> Result<TestDb> {
        Ok(TestDb::create_in(backend, dir).await)
    }

    async fn drop_db(&self, db: TestDb) {
        if self.opts.keep {
            db.keep();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The service under test, as its own process

struct ServiceCfg<'a> {
    storage: &'a str,
    hub: &'a str,
    concurrency: usize,
    rate: f64,
    /// More TOML appended to the configuration (e.g. a `[retention]` table).
    extra: &'a str,
}

fn config_toml(port: u16, c: &ServiceCfg) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[storage]
url = "{storage}"

[sprinthub]
base_url = "{hub}"
instance = "bench"
api_token = "bench-token"
concurrency = {concurrency}
rate_limit_per_second = {rate:.3}

[delivery]
initial_backoff_ms = 1000

[admin]
token = "{ADMIN_TOKEN}"

[[sources]]
name = "erp"
scheme = "standard-webhooks"
secrets = ["{ERP_SECRET}"]
event_id = "/id"
event_type = "/type"
accept_types = ["object.created"]
object_id = "/data/object_id"

[sources.lead]
id = "/data/lead_id"
{extra}
"#,
        storage = c.storage,
        hub = c.hub,
        concurrency = c.concurrency,
        rate = c.rate,
        extra = c.extra,
    )
}

fn verifier() -> Result<Verifier> {
    let text = config_toml(
        1,
        &ServiceCfg {
            storage: "sqlite://unused.db",
            hub: "http://127.0.0.1:1",
            concurrency: 1,
            rate: 0.0,
            extra: "",
        },
    );
    let cfg = Config::from_parts(&text, &[], &|_| None).map_err(|e| anyhow!("{e}"))?;
    Ok(Verifier::from_source(&cfg.sources[0]))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Service {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
    spawned: Instant,
}

impl Service {
    fn spawn(dir: &Path, cfg: &ServiceCfg, rust_log: &str) -> Result<Service> {
        Service::spawn_bin(&bin(), dir, cfg, rust_log)
    }

    fn spawn_bin(bin: &str, dir: &Path, cfg: &ServiceCfg, rust_log: &str) -> Result<Service> {
        let port = free_port()?;
        let config = dir.join("sprintlink.toml");
        std::fs::write(&config, config_toml(port, cfg))?;
        let log = dir.join("service.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SPRINTLINK_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", rust_log);
        let spawned = Instant::now();
        let child = cmd.spawn().with_context(|| format!("spawning {bin}"))?;
        Ok(Service {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            spawned,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Polls `/readyz` (blocking, every 0.5 ms) and answers the time from spawn to the first 200.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let addr = self.addr;
        let spawned = self.spawned;
        let ready = tokio::task::spawn_blocking(move || poll_ready(addr, spawned, timeout)).await?;
        match ready {
            Some(d) => Ok(d),
            None => {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                bail!(
                    "the service did not become ready within {timeout:?} (exit: {status:?}); log tail:\n{}",
                    self.log_tail()
                )
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within 15 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("bench: the service did not exit 15 s after SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn poll_ready(addr: SocketAddr, since: Instant, timeout: Duration) -> Option<Duration> {
    let req = get_request(addr, "/readyz");
    while since.elapsed() < timeout {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            if s.write_all(&req).is_ok() {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 2048];
                loop {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if let Ok(Some((status, total))) = parse_head(&buf)
                        && buf.len() >= total
                    {
                        if status == 200 {
                            return Some(since.elapsed());
                        }
                        break;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    None
}

/// (VmRSS, VmHWM) in kB.
fn rss_kb(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds (user + system) `pid` has used: what a request costs, whatever the disk and the
/// other processes on the machine make it wait.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Samples the RSS of `pid` every 50 ms until told to stop; answers the largest sample.
fn rss_sampler(
    pid: u32,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<u64>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut max = 0;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some((rss, _)) = rss_kb(pid) {
                max = max.max(rss);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        max
    });
    (stop, h)
}

// ---------------------------------------------------------------------------------------------
// Direct store prefill

/// Commits `n` events (one new pair each) straight through `Store::ingest`, `batch` per
/// transaction, `parallel` transactions at once. Answers the time taken.
async fn prefill(
    url: &str,
    n: usize,
    batch: usize,
    parallel: usize,
    tag: &str,
) -> Result<Duration> {
    prefill_from(url, n, batch, parallel, tag, 500_000_000).await
}

/// `prefill` with object ids from `first_object` on (two prefills of one database use
/// distinct pairs).
async fn prefill_from(
    url: &str,
    n: usize,
    batch: usize,
    parallel: usize,
    tag: &str,
    first_object: u64,
) -> Result<Duration> {
    let s = store::open(url).await.map_err(|e| anyhow!("{e}"))?;
    let start = Instant::now();
    let now = store::now_ms();
    let batches = n.div_ceil(batch);
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..parallel {
        let s = s.clone();
        let tag = tag.to_string();
        tasks.spawn(async move {
            for b in (k..batches).step_by(parallel) {
                let events: Vec<NewEvent> = (b * batch..((b + 1) * batch).min(n))
                    .map(|i| {
                        let object = first_object + i as u64;
                        let lead = 8000 + object % 977;
                        let id = format!("{tag}-{i}");
                        NewEvent {
                            source: "erp".into(),
                            request: sprintlink::store::StoredRequest::json(event_body(
                                &id, object, lead,
                            )),
                            event_id: id,
                            event_type: Some("object.created".into()),
                            // One millisecond apart, oldest first, so time filters can cut.
                            received_at: now - (n - i) as i64,
                            object_id: Some(object.to_string().into()),
                            plan: Plan::Links(vec![lead.to_string().into()]),
                            trace: None,
                        }
                    })
                    .collect();
                s.ingest(&events).await.map_err(|e| anyhow!("{e}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let took = start.elapsed();
    s.close().await;
    Ok(took)
}

// ---------------------------------------------------------------------------------------------
// Phases

async fn phase_ingest(
    env: &Env,
    backend: Backend,
    hub: &StandIn,
    v: &Verifier,
) -> Result<Vec<Row>> {
    let o = &env.opts;
    let b = backend.name();
    let dir = env.phase_dir(&format!("{b}-ingest"))?;
    let db = env.fresh_db(backend, &dir).await?;
    // Another binary (`BENCH_SERVICE_BIN`, e.g. 0.1.0) may know neither `v1a` nor form bodies.
    let current = std::env::var_os("BENCH_SERVICE_BIN").is_none();
    let extra = if current {
        ed25519_source()
    } else {
        String::new()
    };
    let result = async {
        let url = hub.url();
        let mut svc = Service::spawn(
            &dir,
            &ServiceCfg {
                storage: &db.url,
                hub: &url,
                concurrency: 8,
                rate: 5.0,
                extra: &extra,
            },
            &o.rust_log,
        )?;
        svc.wait_ready(Duration::from_secs(30)).await?;
        eprintln!("bench: {b}: GET /healthz, {} connections, closed loop", o.connections);
        let mut h = closed_loop(
            svc.addr,
            o.connections,
            o.warm(),
            o.dur(),
            Work::Fixed(Arc::new(get_request(svc.addr, "/healthz"))),
            200,
            0,
        )
        .await?;
        let per_conn = ((o.presign_rate * (o.seconds + o.warmup)) as usize).div_ceil(o.connections);
        eprintln!(
            "bench: {b}: POST /webhooks/erp, {} connections, closed loop ({} requests signed beforehand)",
            o.connections,
            per_conn * o.connections
        );
        let signer = Arc::new(Signer::new(v, svc.addr, &format!("{}i{}", env.run_id, env.next()), 1_000_000_000));
        let mut i = closed_loop(
            svc.addr,
            o.connections,
            o.warm(),
            o.dur(),
            Work::Ingest(signer),
            202,
            per_conn,
        )
        .await?;
        // The same events as form bodies, then signed v1a (Ed25519) for `erp-ed`.
        let mut legs: Vec<(&str, Load)> = Vec::new();
        if current {
            let kinds: [IngestLeg; 2] = [
                ("form-body", "/webhooks/erp as forms", 3_000_000_000, Signer::forms),
                ("Ed25519 (v1a)", "/webhooks/erp-ed signed v1a (Ed25519)", 5_000_000_000, Signer::ed25519),
            ];
            for (what, route, base, kind) in kinds {
                eprintln!("bench: {b}: POST {route}, {} connections, closed loop", o.connections);
                let tag = format!("{}{}{}", env.run_id, &what[..1], env.next());
                let signer = Arc::new(kind(Signer::new(v, svc.addr, &tag, base)));
                let load = closed_loop(svc.addr, o.connections, o.warm(), o.dur(), Work::Ingest(signer), 202, per_conn)
                    .await?;
                legs.push((what, load));
            }
        }
        let rss = rss_kb(svc.pid()).map(|r| r.1).unwrap_or(0);
        svc.stop();
        if i.built_late > 0 {
            env.note(format!(
                "{b}: ingest ran past the {} pre-signed requests; {} were signed during the run",
                per_conn * o.connections,
                i.built_late
            ));
        }
        let (hp50, hp99) = (h.pct(0.50), h.pct(0.99));
        let (ip50, ip99) = (i.pct(0.50), i.pct(0.99));
        let rows = vec![
            row(
                b,
                format!("GET /healthz @{} conns (ceiling)", o.connections),
                format!("{} (p50 {}, p99 {}){}", per_s(h.rate()), ms(hp50), ms(hp99), h.problems()),
                "-",
                "baseline",
                None,
            ),
            row(
                b,
                format!("ingest 202/s @{} conns", o.connections),
                format!("{}{}", per_s(i.rate()), i.problems()),
                ">= 15000/s",
                format!("{:.2} x healthz", i.rate() / h.rate()),
                Some(i.rate() >= 15_000.0 && i.other.is_empty() && i.io_errors == 0),
            ),
            row(
                b,
                format!("ingest latency @{} conns", o.connections),
                format!("p50 {}, p99 {}", ms(ip50), ms(ip99)),
                "p99 < 20 ms",
                format!("p99 {:.1} x healthz p99", ip99 / hp99),
                Some(ip99 < 20_000.0),
            ),
        ];
        let mut rows = rows;
        for (what, mut l) in legs {
            rows.push(row(
                b,
                format!("{what} ingest 202/s @{} conns", o.connections),
                format!("{} (p50 {}, p99 {}){}", per_s(l.rate()), ms(l.pct(0.50)), ms(l.pct(0.99)), l.problems()),
                "-",
                format!("{:.2} x JSON ingest", l.rate() / i.rate()),
                Some(l.other.is_empty() && l.io_errors == 0),
            ));
        }
        env.note(format!(
            "{b}: service peak RSS after the closed-loop ingest run: {}",
            mb(rss)
        ));
        anyhow::Ok(rows)
    }
    .await;
    env.drop_db(db).await;
    result
}

async fn phase_paced(env: &Env, backend: Backend, hub: &StandIn, v: &Verifier) -> Result<Vec<Row>> {
    let o = &env.opts;
    let b = backend.name();
    let dir = env.phase_dir(&format!("{b}-paced"))?;
    let db = env.fresh_db(backend, &dir).await?;
    let result = async {
        let url = hub.url();
        let mut svc = Service::spawn(
            &dir,
            &ServiceCfg {
                storage: &db.url,
                hub: &url,
                concurrency: 8,
                rate: 5.0,
                extra: "",
            },
            &o.rust_log,
        )?;
        svc.wait_ready(Duration::from_secs(30)).await?;
        let rate = o.paced_rate;
        eprintln!("bench: {b}: GET /healthz paced at {rate}/s");
        let mut h = open_loop(
            svc.addr,
            o.connections,
            rate,
            o.warm(),
            o.dur(),
            Work::Fixed(Arc::new(get_request(svc.addr, "/healthz"))),
            200,
        )
        .await?;
        eprintln!("bench: {b}: POST /webhooks/erp paced at {rate}/s");
        let signer = Arc::new(Signer::new(v, svc.addr, &format!("{}p{}", env.run_id, env.next()), 2_000_000_000));
        let mut i = open_loop(
            svc.addr,
            o.connections,
            rate,
            o.warm(),
            o.dur(),
            Work::Ingest(signer),
            202,
        )
        .await?;
        svc.stop();
        let (hp50, hp99) = (h.pct(0.50), h.pct(0.99));
        let (ip50, ip99, ip999) = (i.pct(0.50), i.pct(0.99), i.pct(0.999));
        if i.behind > 0 {
            env.note(format!(
                "{b}: paced ingest: {} requests found their connection still busy and were timed from their due time",
                i.behind
            ));
        }
        anyhow::Ok(vec![
            row(
                b,
                format!("GET /healthz paced {rate:.0}/s"),
                format!("p50 {}, p99 {}{}", ms(hp50), ms(hp99), h.problems()),
                "-",
                "baseline",
                None,
            ),
            row(
                b,
                format!("ingest paced {rate:.0}/s"),
                format!(
                    "p50 {}, p99 {} (p99.9 {}, {}){}",
                    ms(ip50),
                    ms(ip99),
                    ms(ip999),
                    per_s(i.rate()),
                    i.problems()
                ),
                "p99 < 5 ms",
                format!("p99 {:.1} x healthz p99", ip99 / hp99),
                Some(ip99 < 5_000.0 && i.other.is_empty() && i.io_errors == 0),
            ),
        ])
    }
    .await;
    env.drop_db(db).await;
    result
}

/// The stand-in on its own: how many link calls per second it answers to this client.
async fn phase_standin_ceiling(env: &Env) -> Result<Row> {
    let o = &env.opts;
    let hub = StandIn::start().await?;
    let addr = hub.addr;
    let body = r#"{"objectId":123,"linkType":"lead","targetId":8473,"amount":1}"#;
    let req = format!(
        "POST /customobjects/link?apitoken=bench-token&i=bench HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    eprintln!(
        "bench: SprintHub stand-in alone, {} connections, closed loop",
        o.delivery_concurrency
    );
    let mut l = closed_loop(
        addr,
        o.delivery_concurrency,
        o.warm(),
        o.dur(),
        Work::Fixed(Arc::new(req.into_bytes())),
        200,
        0,
    )
    .await?;
    let p99 = l.pct(0.99);
    Ok(row(
        "-",
        format!(
            "stand-in SprintHub alone @{} conns (ceiling)",
            o.delivery_concurrency
        ),
        format!("{} (p99 {}){}", per_s(l.rate()), ms(p99), l.problems()),
        "-",
        "baseline",
        None,
    ))
}

struct Drain {
    /// Link calls answered 2xx, in the order they were received.
    at: Vec<Instant>,
    unique_pairs: usize,
}

/// Waits until the stand-in has answered `n` link calls 2xx (or `timeout` passes).
async fn wait_links(hub: &StandIn, n: usize, timeout: Duration) -> Drain {
    let deadline = Instant::now() + timeout;
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let got = hub
            .requests_to("/customobjects/link")
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect::<Vec<_>>();
        if got.len() >= n || Instant::now() >= deadline {
            let mut at: Vec<Instant> = got.iter().map(|r| r.at).collect();
            at.sort();
            let unique_pairs = got
                .iter()
                .map(|r| {
                    (
                        r.body["objectId"].to_string(),
                        r.body["targetId"].to_string(),
                    )
                })
                .collect::<std::collections::HashSet<_>>()
                .len();
            return Drain { at, unique_pairs };
        }
    }
}

/// The rate between the 5th and the 95th percentile of calls (the warm-up and the tail cut).
fn steady_rate(at: &[Instant]) -> f64 {
    if at.len() < 20 {
        return f64::NAN;
    }
    let a = at.len() / 20;
    let z = at.len() - 1 - at.len() / 20;
    (z - a) as f64 / (at[z] - at[a]).as_secs_f64()
}

async fn phase_delivery(env: &Env, backend: Backend, ceiling: Option<f64>) -> Result<Vec<Row>> {
    let o = &env.opts;
    let b = backend.name();
    let mut rows = Vec::new();
    // Unlimited
    {
        let dir = env.phase_dir(&format!("{b}-delivery"))?;
        let db = env.fresh_db(backend, &dir).await?;
        let r = async {
            let n = o.delivery_events;
            eprintln!("bench: {b}: prefilling {n} events for delivery");
            let took = prefill(&db.url, n, 1000, prefill_parallel(backend), &format!("{}d", env.run_id)).await?;
            env.note(format!(
                "{b}: delivery backlog of {n} events prefilled through Store::ingest in {:.1} s ({})",
                took.as_secs_f64(),
                per_s(n as f64 / took.as_secs_f64())
            ));
            let hub = StandIn::start().await?;
            let url = hub.url();
            let mut svc = Service::spawn(
                &dir,
                &ServiceCfg {
                    storage: &db.url,
                    hub: &url,
                    concurrency: o.delivery_concurrency,
                    rate: 0.0,
                    extra: "",
                },
                &o.rust_log,
            )?;
            svc.wait_ready(Duration::from_secs(60)).await?;
            eprintln!(
                "bench: {b}: delivering {n} links, concurrency {}, no rate limit",
                o.delivery_concurrency
            );
            let d = wait_links(&hub, n, Duration::from_secs_f64(o.seconds * 30.0 + 60.0)).await;
            svc.stop();
            let rate = steady_rate(&d.at);
            let all = if d.at.len() > 1 {
                (d.at.len() - 1) as f64 / (d.at[d.at.len() - 1] - d.at[0]).as_secs_f64()
            } else {
                f64::NAN
            };
            let complete = d.at.len() >= n;
            if d.unique_pairs != d.at.len() {
                env.note(format!(
                    "{b}: delivery: {} successful link calls for {} distinct pairs",
                    d.at.len(),
                    d.unique_pairs
                ));
            }
            anyhow::Ok(row(
                b,
                format!("delivery links/s, concurrency {}, no limit", o.delivery_concurrency),
                format!(
                    "{} (whole drain {}; {} of {n} linked)",
                    per_s(rate),
                    per_s(all),
                    d.at.len()
                ),
                ">= 3000/s",
                ceiling.map_or("-".into(), |c| format!("{:.2} x stand-in", rate / c)),
                Some(rate >= 3000.0 && complete),
            ))
        }
        .await;
        env.drop_db(db).await;
        rows.push(r?);
    }
    Ok(rows)
}

async fn phase_limited(env: &Env, backend: Backend) -> Result<Vec<Row>> {
    let o = &env.opts;
    let b = backend.name();
    let dir = env.phase_dir(&format!("{b}-limited"))?;
    let db = env.fresh_db(backend, &dir).await?;
    let r = async {
        let limit = o.limited_rate;
        let n = (limit * o.seconds).ceil() as usize + 1;
        prefill(
            &db.url,
            n,
            1000,
            prefill_parallel(backend),
            &format!("{}l", env.run_id),
        )
        .await?;
        let hub = StandIn::start().await?;
        let url = hub.url();
        let mut svc = Service::spawn(
            &dir,
            &ServiceCfg {
                storage: &db.url,
                hub: &url,
                concurrency: o.delivery_concurrency,
                rate: limit,
                extra: "",
            },
            &o.rust_log,
        )?;
        svc.wait_ready(Duration::from_secs(60)).await?;
        eprintln!("bench: {b}: delivering {n} links at rate_limit_per_second = {limit}");
        let d = wait_links(
            &hub,
            n,
            Duration::from_secs_f64(n as f64 / limit * 3.0 + 30.0),
        )
        .await;
        svc.stop();
        let achieved = if d.at.len() > 1 {
            (d.at.len() - 1) as f64 / (d.at[d.at.len() - 1] - d.at[0]).as_secs_f64()
        } else {
            f64::NAN
        };
        let dev = (achieved - limit) / limit;
        anyhow::Ok(row(
            b,
            format!("delivery with rate_limit_per_second = {limit:.0}"),
            format!(
                "{} ({:+.2} %, {} links)",
                per_s(achieved),
                dev * 100.0,
                d.at.len()
            ),
            "within 5 %",
            format!("{:.3} x configured", achieved / limit),
            Some(dev.abs() <= 0.05 && d.at.len() >= n),
        ))
    }
    .await;
    env.drop_db(db).await;
    Ok(vec![r?])
}

/// Three replicas on one PostgreSQL database with a deployment-wide rate drain a backlog
/// (built while delivery is paused, so all three start together): the achieved rate against
/// the configured one, the worst 10 s window against SPEC section 8's bound (10 x rate plus 2 s
/// worth), then the time from a 202 to its link call with webhooks posted one at a time.
async fn phase_fleet(env: &Env, v: &Verifier) -> Result<Vec<Row>> {
    let o = &env.opts;
    let dir = env.phase_dir("postgres-fleet")?;
    let db = env.fresh_db(Backend::Postgres, &dir).await?;
    let r = async {
        let rate = o.fleet_rate;
        let hub = StandIn::start().await?;
        let url = hub.url();
        let mut replicas = Vec::new();
        for i in 0..3 {
            let d = dir.join(format!("replica-{i}"));
            std::fs::create_dir_all(&d)?;
            let mut svc = Service::spawn(
                &d,
                &ServiceCfg {
                    storage: &db.url,
                    hub: &url,
                    concurrency: 8,
                    rate,
                    extra: "",
                },
                &o.rust_log,
            )?;
            svc.wait_ready(Duration::from_secs(60)).await?;
            replicas.push(svc);
        }
        let client = reqwest::Client::new();
        let admin = async |svc: &Service, what: &str| -> Result<()> {
            let r = client
                .post(format!("{}/admin/delivery/{what}", svc.base()))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("POST /admin/delivery/{what}: {}", r.status());
            }
            Ok(())
        };
        admin(&replicas[0], "pause").await?;
        let n = (rate * (2.0 * o.seconds).max(20.0)).ceil() as usize;
        prefill(&db.url, n, 1000, 4, &format!("{}f", env.run_id)).await?;
        // The replicas settle their shares (a new one waits 2.5 s) while paused.
        tokio::time::sleep(Duration::from_secs(3)).await;
        eprintln!("bench: postgres: 3 replicas delivering {n} links at a deployment-wide {rate}/s");
        admin(&replicas[1], "resume").await?;
        let d = wait_links(
            &hub,
            n,
            Duration::from_secs_f64(n as f64 / rate * 3.0 + 30.0),
        )
        .await;
        let achieved = if d.at.len() > 1 {
            (d.at.len() - 1) as f64 / (d.at[d.at.len() - 1] - d.at[0]).as_secs_f64()
        } else {
            f64::NAN
        };
        let mut worst = 0;
        let mut j = 0;
        for i in 0..d.at.len() {
            while j < d.at.len() && d.at[j] < d.at[i] + Duration::from_secs(10) {
                j += 1;
            }
            worst = worst.max(j - i);
        }
        let bound = (12.0 * rate).floor() as usize;
        // Latency: one webhook at a time, round-robin over the replicas, each 202 timed.
        let before = hub.requests_to("/customobjects/link").len();
        let mut acked = Vec::new();
        for i in 0..200u64 {
            let object = 900_000_000 + i;
            let id = format!("{}-fleet-lat-{i}", env.run_id);
            let body = event_body(&id, object, 8000);
            let mut req = client
                .post(format!("{}/webhooks/erp", replicas[i as usize % 3].base()))
                .header("content-type", "application/json");
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs() as i64;
            for (k, val) in v.sign(body.as_bytes(), ts, &id) {
                req = req.header(k, val);
            }
            let r = req.body(body).send().await?;
            if r.status() != 202 {
                bail!("webhook answered {}", r.status());
            }
            acked.push((object, Instant::now()));
            tokio::time::sleep(Duration::from_millis((2000.0 / rate).max(20.0) as u64)).await;
        }
        wait_links(&hub, before + acked.len(), Duration::from_secs(60)).await;
        let calls = hub.requests_to("/customobjects/link");
        let mut lat: Vec<f64> = acked
            .iter()
            .filter_map(|(object, at)| {
                calls
                    .iter()
                    .find(|c| c.body["objectId"].as_u64() == Some(*object))
                    .map(|c| c.at.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        for r in &mut replicas {
            r.stop();
        }
        let p = |q: f64| {
            lat.get(((lat.len().max(1) - 1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        anyhow::Ok(vec![
            row(
                "postgres",
                format!("fleet: 3 replicas draining {n} links at a deployment-wide {rate:.0}/s"),
                format!("{} ({} links)", per_s(achieved), d.at.len()),
                ">= 95 % of the rate",
                format!("{:.3} x configured", achieved / rate),
                Some(achieved / rate >= 0.95 && d.at.len() >= n),
            ),
            row(
                "postgres",
                "fleet: worst 10 s window",
                format!("{worst} calls"),
                format!("<= {bound} (10 x rate + 2 s worth)"),
                format!("{:.3} x bound", worst as f64 / bound as f64),
                Some(worst <= bound),
            ),
            row(
                "postgres",
                "fleet: 202 to link call, 3 replicas (LISTEN/NOTIFY)",
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms ({} events)",
                    p(0.5),
                    p(0.99),
                    lat.len()
                ),
                "-",
                "-",
                None,
            ),
        ])
    }
    .await;
    env.drop_db(db).await;
    r
}

fn prefill_parallel(backend: Backend) -> usize {
    match backend {
        Backend::Sqlite => 1,
        Backend::Postgres => 4,
    }
}

struct MemRun {
    max_sampled: u64,
    hwm: u64,
    metrics_ms: f64,
    events_ms: f64,
}

/// Starts a service on `db`, asks for /metrics and /admin/events once, samples RSS for a while.
async fn memory_run(env: &Env, dir: &Path, db: &TestDb, hub: &StandIn) -> Result<MemRun> {
    let o = &env.opts;
    let url = hub.url();
    let mut svc = Service::spawn(
        dir,
        &ServiceCfg {
            storage: &db.url,
            hub: &url,
            concurrency: 8,
            rate: 1.0,
            extra: "",
        },
        &o.rust_log,
    )?;
    let (stop, sampler) = rss_sampler(svc.pid());
    let r = async {
        svc.wait_ready(Duration::from_secs(120)).await?;
        let client = reqwest::Client::new();
        let t = Instant::now();
        let m = client.get(format!("{}/metrics", svc.base())).send().await?;
        let ok_m = m.status().is_success();
        let _ = m.text().await?;
        let metrics_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        let e = client
            .get(format!("{}/admin/events", svc.base()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        let ok_e = e.status().is_success();
        let _ = e.text().await?;
        let events_ms = t.elapsed().as_secs_f64() * 1000.0;
        if !ok_m || !ok_e {
            bail!("/metrics or /admin/events failed");
        }
        tokio::time::sleep(Duration::from_secs_f64(o.memory_seconds)).await;
        anyhow::Ok((metrics_ms, events_ms))
    }
    .await;
    let hwm = rss_kb(svc.pid()).map_or(0, |r| r.1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_sampled = sampler.join().unwrap_or(0);
    svc.stop();
    let (metrics_ms, events_ms) = r?;
    Ok(MemRun {
        max_sampled,
        hwm,
        metrics_ms,
        events_ms,
    })
}

async fn phase_memory(env: &Env, backend: Backend, hub: &StandIn) -> Result<Vec<Row>> {
    let o = &env.opts;
    let b = backend.name();
    let n = match backend {
        Backend::Sqlite => o.memory_events,
        Backend::Postgres => o.pg_memory_events,
    };
    // Baseline: the same service on an empty database.
    let dir = env.phase_dir(&format!("{b}-memory-empty"))?;
    let db = env.fresh_db(backend, &dir).await?;
    eprintln!("bench: {b}: memory with an empty database");
    let empty = memory_run(env, &dir, &db, hub).await;
    env.drop_db(db).await;
    let empty = empty?;
    let dir = env.phase_dir(&format!("{b}-memory-full"))?;
    let db = env.fresh_db(backend, &dir).await?;
    let r = async {
        eprintln!("bench: {b}: prefilling {n} events for the memory run");
        let took = prefill(&db.url, n, 5000, prefill_parallel(backend), &format!("{}m", env.run_id)).await?;
        let direct = n as f64 / took.as_secs_f64();
        eprintln!("bench: {b}: prefilled in {:.1} s; memory with {n} events queued", took.as_secs_f64());
        let full = memory_run(env, &dir, &db, hub).await?;
        let peak = full.max_sampled.max(full.hwm);
        let base = empty.max_sampled.max(empty.hwm);
        env.note(format!(
            "{b}: with {n} queued: GET /metrics took {:.0} ms, GET /admin/events {:.0} ms; sampled max {} / VmHWM {}",
            full.metrics_ms,
            full.events_ms,
            mb(full.max_sampled),
            mb(full.hwm)
        ));
        let label = if n == 1_000_000 {
            "1M".to_string()
        } else {
            format!("{n}")
        };
        anyhow::Ok(vec![
            row(
                b,
                "service RSS, empty database",
                mb(base),
                "-",
                "baseline",
                None,
            ),
            row(
                b,
                format!("service RSS, {label} events queued"),
                mb(peak),
                "< 100 MB",
                format!("{:.2} x empty", peak as f64 / base as f64),
                Some(peak < 100 * 1024),
            ),
            row(
                b,
                "Store::ingest direct, 5000/tx (prefill)",
                per_s(direct),
                "-",
                "diagnostic",
                None,
            ),
        ])
    }
    .await;
    env.drop_db(db).await;
    r
}

/// The admin search (issue 17): each filter of `GET /admin/events` as one `Store::list_events`
/// page of 50, the median of 5 runs, on `BENCH_SEARCH_EVENTS` queued events (one pair each,
/// 977 leads, received 1 ms apart); beside the unfiltered page as the baseline.
async fn phase_search(env: &Env, backend: Backend) -> Result<Vec<Row>> {
    let o = &env.opts;
    let b = backend.name();
    let n = o.search_events.max(1000);
    let dir = env.phase_dir(&format!("{b}-search"))?;
    let db = env.fresh_db(backend, &dir).await?;
    let r = async {
        let tag = format!("{}s", env.run_id);
        eprintln!("bench: {b}: prefilling {n} events for the search phase");
        // The prefill's times: event i is received at `now - (n - i)` ms, `now` taken when it
        // starts (a few ms after this); so the oldest is about `first`, the newest `first + n`.
        let first = store::now_ms() - n as i64;
        let newest = first + n as i64;
        let took = prefill(&db.url, n, 5000, prefill_parallel(backend), &tag).await?;
        eprintln!("bench: {b}: prefilled in {:.1} s", took.as_secs_f64());
        if backend == Backend::Postgres {
            // What autovacuum does after a bulk load; without statistics the planner guesses.
            let pool = sqlx::PgPool::connect(&db.url).await?;
            sqlx::query("ANALYZE").execute(&pool).await?;
            pool.close().await;
        }
        let s = store::open(&db.url).await.map_err(|e| anyhow!("{e}"))?;
        let mid = n / 2;
        let lead = 8000 + (500_000_000 + mid as u64) % 977;
        s.mapping_put("erp", "buyer@example.com", &[lead.to_string()])
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let mut rows = Vec::new();
        if let Some(path) = db.url.strip_prefix("sqlite://") {
            // SQLite indexes lead and object ids behind the ingest path (schema version 9): the
            // prefill wrote faster than that, so first a lead search with all of it unindexed,
            // then the time the indexer takes to catch up; the cases below are steady state.
            let t = Instant::now();
            let found = s
                .list_events(&store::EventFilter {
                    lead_id: Some(lead.to_string()),
                    limit: 50,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("lead search before indexing: {e}"))?
                .len();
            rows.push(row(
                b,
                "search right after the bulk load: lead_id, nothing indexed yet",
                format!(
                    "{:.1} ms ({found} rows)",
                    t.elapsed().as_secs_f64() * 1000.0
                ),
                "-",
                "diagnostic",
                None,
            ));
            let c = rusqlite::Connection::open_with_flags(
                path.split('?').next().unwrap_or(path),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?;
            let t = Instant::now();
            loop {
                let behind: i64 = c.query_row(
                    "SELECT (SELECT COALESCE(MAX(id), 0) FROM events)
                          - (SELECT upto FROM index_marks WHERE name = 'event_objects')
                          + (SELECT COALESCE(MAX(id), 0) FROM links)
                          - (SELECT upto FROM index_marks WHERE name = 'lead_links')",
                    [],
                    |r| r.get(0),
                )?;
                if behind <= 0 {
                    break;
                }
                if t.elapsed() > Duration::from_secs(600) {
                    bail!("the search indexes are still {behind} rows behind after 600 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            rows.push(row(
                b,
                format!("search indexes caught up with {n} events and pairs"),
                format!("{:.1} s", t.elapsed().as_secs_f64()),
                "-",
                "diagnostic",
                None,
            ));
        }
        let f = |f: store::EventFilter| store::EventFilter { limit: 50, ..f };
        let cases: Vec<(String, store::EventFilter)> = vec![
            ("no filter (baseline)".into(), f(Default::default())),
            (
                "state=queued".into(),
                f(store::EventFilter {
                    state: Some(store::EventState::Queued),
                    ..Default::default()
                }),
            ),
            (
                "state=dead (none)".into(),
                f(store::EventFilter {
                    state: Some(store::EventState::Dead),
                    ..Default::default()
                }),
            ),
            (
                "object_id".into(),
                f(store::EventFilter {
                    object_id: Some((500_000_000 + mid as u64).to_string()),
                    ..Default::default()
                }),
            ),
            (
                "object_id + source + state".into(),
                f(store::EventFilter {
                    object_id: Some((500_000_000 + mid as u64).to_string()),
                    source: Some("erp".into()),
                    state: Some(store::EventState::Queued),
                    ..Default::default()
                }),
            ),
            (
                format!("lead_id (~{} events)", n / 977),
                f(store::EventFilter {
                    lead_id: Some(lead.to_string()),
                    ..Default::default()
                }),
            ),
            (
                "lead_id + state=dead (none)".into(),
                f(store::EventFilter {
                    lead_id: Some(lead.to_string()),
                    state: Some(store::EventState::Dead),
                    ..Default::default()
                }),
            ),
            (
                "since (newest 1000 ms)".into(),
                f(store::EventFilter {
                    since: Some(newest - 1000),
                    ..Default::default()
                }),
            ),
            (
                "until (oldest 1000 ms)".into(),
                f(store::EventFilter {
                    until: Some(first + 1000),
                    ..Default::default()
                }),
            ),
            (
                "since + until (1 s in the middle)".into(),
                f(store::EventFilter {
                    since: Some(first + mid as i64),
                    until: Some(first + mid as i64 + 1000),
                    ..Default::default()
                }),
            ),
            (
                "q = event id prefix".into(),
                f(store::EventFilter {
                    q: Some(format!("{tag}-{}", mid / 10)),
                    ..Default::default()
                }),
            ),
            (
                "q = lead key (mapping)".into(),
                f(store::EventFilter {
                    q: Some("buyer@example.com".into()),
                    ..Default::default()
                }),
            ),
            (
                "q matching nothing".into(),
                f(store::EventFilter {
                    q: Some("nothing-like-it".into()),
                    ..Default::default()
                }),
            ),
        ];
        let mut baseline = None;
        let label = if n == 1_000_000 {
            "1M".to_string()
        } else {
            format!("{n}")
        };
        for (name, filter) in cases {
            let mut times = Vec::new();
            let mut found = 0;
            for _ in 0..5 {
                let t = Instant::now();
                found = s
                    .list_events(&filter)
                    .await
                    .map_err(|e| anyhow!("{name}: {e}"))?
                    .len();
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let ms = median(times);
            let base = *baseline.get_or_insert(ms);
            rows.push(row(
                b,
                format!("search {label}: {name}"),
                format!("{ms:.2} ms ({found} rows)"),
                "< 100 ms",
                format!("{:.1} x no filter", ms / base.max(0.001)),
                Some(ms < 100.0),
            ));
        }
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let st = s.stats().await.map_err(|e| anyhow!("stats: {e}"))?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            if st.oldest_pending_at.is_none() {
                bail!("stats: no oldest pending job with {n} queued");
            }
        }
        rows.push(row(
            b,
            format!("stats {label} (with oldest pending)"),
            format!("{:.1} ms", median(times)),
            "-",
            "diagnostic",
            None,
        ));
        s.close().await;
        anyhow::Ok(rows)
    }
    .await;
    env.drop_db(db).await;
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Exec of the binary printing its version: the floor of any start-up.
fn exec_baseline(runs: usize) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let st = Command::new(bin())
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if !st.success() {
            bail!("{} --version failed", bin());
        }
    }
    Ok(median(times))
}

async fn phase_startup(
    env: &Env,
    backend: Backend,
    hub: &StandIn,
    exec_ms: Option<f64>,
) -> Result<Vec<Row>> {
    let b = backend.name();
    let mut rows = vec![startup_row(env, backend, hub, exec_ms, "", "").await?];
    if backend == Backend::Postgres {
        // The default `sslmode=prefer` negotiates TLS with a server that offers it; this row
        // shows what the TLS set-up of the first connections costs.
        rows.push(
            startup_row(
                env,
                backend,
                hub,
                exec_ms,
                "?sslmode=disable",
                ", ?sslmode=disable",
            )
            .await?,
        );
    }
    eprintln!("bench: {b}: start-up done");
    Ok(rows)
}

async fn startup_row(
    env: &Env,
    backend: Backend,
    hub: &StandIn,
    exec_ms: Option<f64>,
    url_suffix: &str,
    label: &str,
) -> Result<Row> {
    let o = &env.opts;
    let b = backend.name();
    let mut times = Vec::new();
    eprintln!(
        "bench: {b}: start-up to ready{label}, {} runs",
        o.startup_runs
    );
    for _ in 0..o.startup_runs {
        let dir = env.phase_dir(&format!("{b}-startup"))?;
        let db = env.fresh_db(backend, &dir).await?;
        let url = hub.url();
        let storage = format!("{}{url_suffix}", db.url);
        let r = async {
            let mut svc = Service::spawn(
                &dir,
                &ServiceCfg {
                    storage: &storage,
                    hub: &url,
                    concurrency: 8,
                    rate: 5.0,
                    extra: "",
                },
                &o.rust_log,
            )?;
            let d = svc.wait_ready(Duration::from_secs(30)).await?;
            svc.stop();
            anyhow::Ok(d.as_secs_f64() * 1000.0)
        }
        .await;
        env.drop_db(db).await;
        times.push(r?);
    }
    let med = median(times.clone());
    let max = times.iter().cloned().fold(f64::NAN, f64::max);
    let min = times.iter().cloned().fold(f64::NAN, f64::min);
    Ok(row(
        b,
        format!("start-up to first /readyz 200, empty db{label}"),
        format!(
            "{med:.1} ms median (min {min:.1}, max {max:.1}, n={})",
            times.len()
        ),
        "< 200 ms",
        exec_ms.map_or("-".into(), |e| format!("{:.1} x bare exec", med / e)),
        Some(med < 200.0),
    ))
}

// ---------------------------------------------------------------------------------------------

/// The 1-minute load average, as text.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| {
            format!("{:.1} GB", kb as f64 / 1024.0 / 1024.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    format!("{cpus} CPUs ({model}), {mem} RAM, Linux {kernel}")
}

// ---------------------------------------------------------------------------------------------
// Pruning (issue 16)

/// Marks every event of the database delivered long ago (their pairs linked), as if they had
/// been delivered a day before `retention.delivered` would let them go.
async fn age_as_delivered(url: &str) -> Result<()> {
    let sql = "UPDATE links SET state = 'linked', due_at = NULL;
               UPDATE events SET state = 'delivered';
               UPDATE events SET delivered_at = 1000;";
    if let Some(path) = url.strip_prefix("sqlite://") {
        let c = rusqlite::Connection::open(path)?;
        c.execute_batch(sql)?;
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    } else {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(url).await?;
        sqlx::raw_sql(sql).execute(&mut c).await?;
        sqlx::raw_sql("VACUUM ANALYZE").execute(&mut c).await?;
    }
    Ok(())
}

/// Bytes of the database: the SQLite file and its log, or `pg_database_size`.
async fn db_bytes(url: &str) -> Result<u64> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let len = |p: String| std::fs::metadata(p).map_or(0, |m| m.len());
        Ok(len(path.to_string()) + len(format!("{path}-wal")))
    } else {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(url).await?;
        let n: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&mut c)
            .await?;
        Ok(n as u64)
    }
}

async fn scrape(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

struct PruneRun {
    ingest_p99_us: f64,
    ingest_rate: f64,
    delivery_rate: f64,
    size_before: u64,
    size_after: u64,
    pruned: f64,
    prune_secs: f64,
    /// From the last deletion until the file stopped shrinking (incremental vacuum).
    vacuum_secs: f64,
    /// The 1-minute load average at the end of the timed window.
    load: String,
}

/// One run: `n` delivered events aged past retention, a backlog of links to deliver, then paced
/// ingest while the backlog drains, with or without `retention.delivered` set.
async fn prune_run(env: &Env, backend: Backend, v: &Verifier, prune: bool) -> Result<PruneRun> {
    let o = &env.opts;
    let b = backend.name();
    let n = o.prune_events;
    let backlog = (2000.0 * o.seconds) as usize;
    let tag = if prune { "with" } else { "without" };
    let dir = env.phase_dir(&format!("{b}-pruning-{tag}"))?;
    let db = env.fresh_db(backend, &dir).await?;
    let r = async {
        eprintln!("bench: {b}: pruning ({tag}): prefilling {n} delivered events");
        prefill_from(
            &db.url,
            n,
            5000,
            prefill_parallel(backend),
            &format!("{}o{tag}", env.run_id),
            700_000_000,
        )
        .await?;
        age_as_delivered(&db.url).await?;
        prefill_from(
            &db.url,
            backlog,
            1000,
            prefill_parallel(backend),
            &format!("{}q{tag}", env.run_id),
            800_000_000,
        )
        .await?;
        let size_before = db_bytes(&db.url).await?;
        let hub = StandIn::start().await?;
        let url = hub.url();
        let extra = if prune {
            "[retention]\ndelivered = \"1h\"\ninterval = \"1h\"\n"
        } else {
            ""
        };
        let mut svc = Service::spawn(
            &dir,
            &ServiceCfg {
                storage: &db.url,
                hub: &url,
                concurrency: o.delivery_concurrency,
                rate: 0.0,
                extra,
            },
            &o.rust_log,
        )?;
        svc.wait_ready(Duration::from_secs(120)).await?;
        let started = Instant::now();
        let signer = Arc::new(Signer::new(
            v,
            svc.addr,
            &format!("{}pr{tag}", env.run_id),
            3_000_000_000,
        ));
        let rate = o.paced_rate / 4.0;
        let (ingest, drain) = tokio::join!(
            open_loop(
                svc.addr,
                o.connections.min(16),
                rate,
                Duration::ZERO,
                o.dur(),
                Work::Ingest(signer),
                202
            ),
            wait_links(
                &hub,
                backlog,
                Duration::from_secs_f64(o.seconds * 3.0 + 30.0)
            ),
        );
        let mut ingest = ingest?;
        let load = load_average();
        let mut pruned = 0.0;
        if prune {
            let deadline = Instant::now() + Duration::from_secs(600);
            while Instant::now() < deadline {
                pruned = scrape(
                    svc.addr,
                    "sprintlink_pruned_events_total{rule=\"delivered\"}",
                )
                .await
                .unwrap_or(0.0);
                if pruned >= n as f64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let prune_secs = started.elapsed().as_secs_f64();
        // The incremental vacuum runs after the last batch, in short steps: wait until the
        // database has stopped shrinking for 3 s (at most 10 min), then stop the service.
        let vacuum_started = Instant::now();
        let mut last = db_bytes(&db.url).await?;
        let mut still = 0;
        while prune && still < 3 && vacuum_started.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = db_bytes(&db.url).await?;
            still = if now < last { 0 } else { still + 1 };
            last = now.min(last);
        }
        let vacuum_secs = vacuum_started.elapsed().as_secs_f64();
        svc.stop();
        let size_after = db_bytes(&db.url).await?;
        anyhow::Ok(PruneRun {
            ingest_p99_us: ingest.pct(0.99),
            ingest_rate: ingest.rate(),
            delivery_rate: steady_rate(&drain.at),
            size_before,
            size_after,
            pruned,
            prune_secs,
            vacuum_secs,
            load,
        })
    }
    .await;
    env.drop_db(db).await;
    r
}

/// Ingest p99 and delivery throughput with and without retention deleting `BENCH_PRUNE_EVENTS`
/// delivered events at the same time, and the database size before and after.
async fn phase_pruning(env: &Env, backend: Backend, v: &Verifier) -> Result<Vec<Row>> {
    let b = backend.name();
    let n = env.opts.prune_events;
    let without = prune_run(env, backend, v, false).await?;
    let with = prune_run(env, backend, v, true).await?;
    let p99_ratio = with.ingest_p99_us / without.ingest_p99_us;
    let delivery_ratio = with.delivery_rate / without.delivery_rate;
    let per_event = without.size_before as f64 / n as f64;
    Ok(vec![
        row(
            b,
            format!("ingest p99 while {n} delivered events are pruned"),
            format!(
                "p99 {} with, {} without ({} / {} ingested; load {} / {})",
                ms(with.ingest_p99_us),
                ms(without.ingest_p99_us),
                per_s(with.ingest_rate),
                per_s(without.ingest_rate),
                with.load,
                without.load
            ),
            "within 20 %",
            format!("{p99_ratio:.2} x without"),
            Some(p99_ratio <= 1.2),
        ),
        row(
            b,
            format!("delivery links/s while {n} delivered events are pruned"),
            format!(
                "{} with, {} without",
                per_s(with.delivery_rate),
                per_s(without.delivery_rate)
            ),
            "within 20 %",
            format!("{delivery_ratio:.2} x without"),
            Some(delivery_ratio >= 0.8),
        ),
        row(
            b,
            format!("pruning {n} delivered events"),
            format!(
                "{:.0} deleted in {:.1} s, space back {:.0} s later; database {} before, {} after ({} without pruning)",
                with.pruned,
                with.prune_secs,
                with.vacuum_secs,
                mb(with.size_before / 1024),
                mb(with.size_after / 1024),
                mb(without.size_after / 1024)
            ),
            "space given back",
            format!("{per_event:.0} bytes per delivered event"),
            Some(
                with.pruned >= n as f64
                    && (backend == Backend::Postgres || with.size_after < with.size_before),
            ),
        ),
    ])
}

// ---------------------------------------------------------------------------------------------
// This binary against another (`BENCH_BASELINE_BIN`), in one run

/// Sends `n` signed events over `conns` connections, each answered 202; answers how many were
/// not.
async fn post_all(addr: SocketAddr, signer: Arc<Signer>, n: usize, conns: usize) -> Result<usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let signer = signer.clone();
        let count = n / conns + usize::from(c < n % conns);
        tasks.spawn(async move {
            let mut conn = Conn::connect(addr).await?;
            let mut bad = 0;
            for seq in 0..count {
                if conn.roundtrip(&signer.request(c, seq)).await? != 202 {
                    bad += 1;
                }
            }
            anyhow::Ok(bad)
        });
    }
    let mut bad = 0;
    while let Some(r) = tasks.join_next().await {
        bad += r??;
    }
    Ok(bad)
}

/// One ingest round: a fresh database, the binary, JSON webhooks closed loop. Answers (202/s,
/// p99 µs, the service's CPU µs per answered webhook).
async fn versus_ingest(
    env: &Env,
    backend: Backend,
    v: &Verifier,
    bin: &str,
    hub: &StandIn,
) -> Result<(f64, f64, f64)> {
    let o = &env.opts;
    let dir = env.phase_dir(&format!("{}-versus-ingest", backend.name()))?;
    let db = env.fresh_db(backend, &dir).await?;
    let r = async {
        let url = hub.url();
        let cfg = ServiceCfg {
            storage: &db.url,
            hub: &url,
            concurrency: 8,
            rate: 5.0,
            extra: "",
        };
        let mut svc = Service::spawn_bin(bin, &dir, &cfg, &o.rust_log)?;
        svc.wait_ready(Duration::from_secs(60)).await?;
        let per_conn = ((o.presign_rate * (o.seconds + o.warmup)) as usize).div_ceil(o.connections);
        let signer = Arc::new(Signer::new(
            v,
            svc.addr,
            &format!("{}v{}", env.run_id, env.next()),
            7_000_000_000,
        ));
        let cpu_before = cpu_seconds(svc.pid()).unwrap_or(f64::NAN);
        let mut l = closed_loop(
            svc.addr,
            o.connections,
            o.warm(),
            o.dur(),
            Work::Ingest(signer),
            202,
            per_conn,
        )
        .await?;
        // Every answered request, warm-up included, against the CPU the whole run took.
        let answered = l.ok as f64 * (o.seconds + o.warmup) / o.seconds;
        let cpu_us = (cpu_seconds(svc.pid()).unwrap_or(f64::NAN) - cpu_before) * 1e6 / answered;
        svc.stop();
        if !l.other.is_empty() || l.io_errors > 0 {
            bail!("{bin}: ingest had errors:{}", l.problems());
        }
        anyhow::Ok((l.rate(), l.pct(0.99), cpu_us))
    }
    .await;
    env.drop_db(db).await;
    r
}

/// One delivery round: the binary takes `versus_events` webhooks while the stand-in holds every
/// call, then the stand-in lets go and the backlog drains with no rate limit. Answers links/s.
async fn versus_delivery(env: &Env, backend: Backend, v: &Verifier, bin: &str) -> Result<f64> {
    let o = &env.opts;
    let n = o.versus_events;
    let dir = env.phase_dir(&format!("{}-versus-delivery", backend.name()))?;
    let db = env.fresh_db(backend, &dir).await?;
    let r = async {
        let hub = StandIn::start().await?;
        hub.set_held(true);
        let url = hub.url();
        let cfg = ServiceCfg {
            storage: &db.url,
            hub: &url,
            concurrency: o.delivery_concurrency,
            rate: 0.0,
            extra: "",
        };
        let mut svc = Service::spawn_bin(bin, &dir, &cfg, &o.rust_log)?;
        svc.wait_ready(Duration::from_secs(60)).await?;
        let signer = Arc::new(Signer::new(
            v,
            svc.addr,
            &format!("{}w{}", env.run_id, env.next()),
            8_000_000_000,
        ));
        let bad = post_all(svc.addr, signer, n, 16).await?;
        if bad > 0 {
            bail!("{bin}: {bad} of {n} webhooks were not accepted");
        }
        hub.set_held(false);
        let d = wait_links(&hub, n, Duration::from_secs_f64(n as f64 / 500.0 + 60.0)).await;
        svc.stop();
        if d.at.len() < n {
            bail!("{bin}: {} of {n} linked before the timeout", d.at.len());
        }
        anyhow::Ok(steady_rate(&d.at))
    }
    .await;
    env.drop_db(db).await;
    r
}

/// JSON ingest and unlimited delivery of this binary against `BENCH_BASELINE_BIN`, round by
/// round alternating which goes first, so drift of a shared machine falls on both. The ratio is
/// of the medians.
async fn phase_versus(
    env: &Env,
    backend: Backend,
    v: &Verifier,
    hub: &StandIn,
) -> Result<Vec<Row>> {
    let o = &env.opts;
    let b = backend.name();
    let Some(base) = o.baseline_bin.clone() else {
        bail!(
            "BENCH_BASELINE_BIN is not set (the binary to compare with, e.g. a release build of 0.1.0)"
        );
    };
    let this: String = env!("CARGO_BIN_EXE_sprintlink").into();
    let order = |round: usize| {
        if round.is_multiple_of(2) {
            [(0, &base), (1, &this)]
        } else {
            [(1, &this), (0, &base)]
        }
    };
    let mut ingest: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    let mut delivery: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..o.versus_rounds {
        for (k, bin) in order(round) {
            eprintln!("bench: {b}: versus round {}: ingest, {bin}", round + 1);
            ingest[k].push(versus_ingest(env, backend, v, bin, hub).await?);
        }
    }
    for round in 0..o.versus_rounds {
        for (k, bin) in order(round) {
            eprintln!(
                "bench: {b}: versus round {}: delivery of {}, {bin}",
                round + 1,
                o.versus_events
            );
            delivery[k].push(versus_delivery(env, backend, v, bin).await?);
        }
    }
    let list = |xs: &[f64], f: &dyn Fn(f64) -> String| {
        xs.iter().map(|x| f(*x)).collect::<Vec<_>>().join(", ")
    };
    let rates = |k: usize| ingest[k].iter().map(|r| r.0).collect::<Vec<_>>();
    let p99s = |k: usize| ingest[k].iter().map(|r| r.1).collect::<Vec<_>>();
    let (ib, it) = (median(rates(0)), median(rates(1)));
    let (pb, pt) = (median(p99s(0)), median(p99s(1)));
    let cpus = |k: usize| ingest[k].iter().map(|r| r.2).collect::<Vec<_>>();
    let (cb, ct) = (median(cpus(0)), median(cpus(1)));
    let (db_, dt) = (median(delivery[0].clone()), median(delivery[1].clone()));
    let name = Path::new(&base).display().to_string();
    env.note(format!("{b}: versus: baseline binary {name}"));
    Ok(vec![
        row(
            b,
            format!(
                "JSON ingest 202/s @{} conns, this vs baseline",
                o.connections
            ),
            format!(
                "{} vs {} (medians of {}; this: {}; baseline: {})",
                per_s(it),
                per_s(ib),
                o.versus_rounds,
                list(&rates(1), &|x| per_s(x)),
                list(&rates(0), &|x| per_s(x))
            ),
            ">= 0.95 x baseline",
            format!("{:.3} x baseline", it / ib),
            Some(it / ib >= 0.95),
        ),
        row(
            b,
            "JSON ingest p99, this vs baseline".to_string(),
            format!("{} vs {} (medians)", ms(pt), ms(pb)),
            "-",
            format!("{:.2} x baseline", pt / pb),
            None,
        ),
        row(
            b,
            "JSON ingest CPU per webhook (service, user+system), this vs baseline".to_string(),
            format!(
                "{ct:.0} µs vs {cb:.0} µs (medians; this: {}; baseline: {})",
                list(&cpus(1), &|x| format!("{x:.0}")),
                list(&cpus(0), &|x| format!("{x:.0}"))
            ),
            "<= 1.05 x baseline",
            format!("{:.3} x baseline", ct / cb),
            Some(ct / cb <= 1.05),
        ),
        row(
            b,
            format!(
                "delivery links/s, concurrency {}, no limit, this vs baseline",
                o.delivery_concurrency
            ),
            format!(
                "{} vs {} (medians of {}; this: {}; baseline: {})",
                per_s(dt),
                per_s(db_),
                o.versus_rounds,
                list(&delivery[1], &|x| per_s(x)),
                list(&delivery[0], &|x| per_s(x))
            ),
            ">= 0.95 x baseline",
            format!("{:.3} x baseline", dt / db_),
            Some(dt / db_ >= 0.95),
        ),
    ])
}

async fn run(env: Arc<Env>) -> Vec<Row> {
    let o = env.opts.clone();
    let mut rows = Vec::new();
    let push = |rows: &mut Vec<Row>, what: &str, r: Result<Vec<Row>>| match r {
        Ok(mut v) => rows.append(&mut v),
        Err(e) => {
            eprintln!("bench: {what} failed: {e:#}");
            rows.push(row(
                "-",
                what,
                format!("FAILED: {e:#}").replace('\n', " "),
                "-",
                "-",
                Some(false),
            ));
        }
    };
    let v = match verifier() {
        Ok(v) => v,
        Err(e) => {
            push(&mut rows, "configuration", Err(e));
            return rows;
        }
    };
    let hub = match StandIn::start().await {
        Ok(h) => h,
        Err(e) => {
            push(&mut rows, "stand-in", Err(e.into()));
            return rows;
        }
    };
    let ceiling = if o.runs("delivery") {
        match phase_standin_ceiling(&env).await {
            Ok(r) => {
                let c = r
                    .result
                    .split('/')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok());
                rows.push(r);
                c
            }
            Err(e) => {
                push(&mut rows, "stand-in ceiling", Err(e));
                None
            }
        }
    } else {
        None
    };
    let exec_ms = if o.runs("startup") {
        match exec_baseline(o.startup_runs) {
            Ok(ms) => {
                rows.push(row(
                    "-",
                    "bare exec of the binary (--version)",
                    format!("{ms:.1} ms median"),
                    "-",
                    "baseline",
                    None,
                ));
                Some(ms)
            }
            Err(e) => {
                push(&mut rows, "exec baseline", Err(e));
                None
            }
        }
    } else {
        None
    };
    // The memory phases come last: their million-event prefills leave the disk and PostgreSQL
    // busy (write-back, checkpoints) in a way that would disturb the latency of later phases.
    let mut groups: Vec<(Backend, Vec<Row>)> = Vec::new();
    for &backend in &o.backends {
        let b = backend.name();
        let mut g = Vec::new();
        if backend == Backend::Postgres
            && let Err(e) = common::pg_reachable().await
        {
            push(&mut g, &format!("{b}: connect"), Err(anyhow!(e)));
            rows.append(&mut g);
            continue;
        }
        if o.only
            .as_ref()
            .is_some_and(|p| p.iter().any(|p| p == "versus"))
            || (o.only.is_none() && o.baseline_bin.is_some())
        {
            let r = phase_versus(&env, backend, &v, &hub).await;
            push(&mut g, &format!("{b}: versus baseline"), r);
        }
        if o.runs("ingest") {
            let r = phase_ingest(&env, backend, &hub, &v).await;
            push(&mut g, &format!("{b}: ingest"), r);
        }
        if o.runs("paced") {
            let r = phase_paced(&env, backend, &hub, &v).await;
            push(&mut g, &format!("{b}: paced ingest"), r);
        }
        if o.runs("delivery") {
            let r = phase_delivery(&env, backend, ceiling).await;
            push(&mut g, &format!("{b}: delivery"), r);
        }
        if o.runs("limited") {
            let r = phase_limited(&env, backend).await;
            push(&mut g, &format!("{b}: rate-limited delivery"), r);
        }
        if o.runs("fleet") && backend == Backend::Postgres {
            let r = phase_fleet(&env, &v).await;
            push(&mut g, &format!("{b}: fleet"), r);
        }
        if o.runs("startup") {
            let r = phase_startup(&env, backend, &hub, exec_ms).await;
            push(&mut g, &format!("{b}: start-up"), r);
        }
        if o.runs("pruning") {
            let r = phase_pruning(&env, backend, &v).await;
            push(&mut g, &format!("{b}: pruning"), r);
        }
        groups.push((backend, g));
    }
    for (backend, g) in &mut groups {
        if o.runs("search") {
            let r = phase_search(&env, *backend).await;
            push(g, &format!("{}: search", backend.name()), r);
        }
        if o.runs("memory") {
            let r = phase_memory(&env, *backend, &hub).await;
            push(g, &format!("{}: memory", backend.name()), r);
        }
    }
    for (_, mut g) in groups {
        rows.append(&mut g);
    }
    rows
}

fn main() {
    let opts = match Opts::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&opts.dir) {
        eprintln!("bench: cannot create {}: {e}", opts.dir.display());
        std::process::exit(1);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.client_threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let env = Arc::new(Env {
        run_id: format!("{}_{}", std::process::id(), store::now_ms() % 1_000_000),
        opts: opts.clone(),
        seq: Mutex::new(0),
        notes: Mutex::new(Vec::new()),
    });
    let started = Instant::now();
    let load_before = load_average();
    let when = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M:%S UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    eprintln!("bench: temp dir {}", opts.dir.display());
    let rows = runtime.block_on(run(env.clone()));
    let mut out = String::new();
    let _ = writeln!(out, "sprintlink throughput benchmark, {when}");
    let _ = writeln!(out, "machine: {}", machine());
    let _ = writeln!(
        out,
        "settings: {} s per phase after {} s warm-up, {} connections, client threads {}, backends {}",
        opts.seconds,
        opts.warmup,
        opts.connections,
        opts.client_threads,
        opts.backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(",")
    );
    let _ = writeln!(
        out,
        "service: {} (separate process, RUST_LOG={}, log to a file)\n",
        bin(),
        opts.rust_log
    );
    out.push_str(&render_table(&rows));
    let notes = env.notes.lock().unwrap().clone();
    if !notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    let _ = writeln!(
        out,
        "\ntotal bench time {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        out,
        "1-minute load average: {load_before} before, {} after (other work on the machine skews every figure)",
        load_average()
    );
    print!("{out}");
    let _ = std::io::stdout().flush();
    drop(runtime);
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&opts.dir);
    }
}
