//! Crash safety and scale-out with the real binary: `kill -9` in the middle of posting and
//! delivering, restarts, several replicas on one PostgreSQL database. Every event that got a
//! 202 must end linked; duplicates sends (at least once) are counted and bounded.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sprintlink::config::SourceConfig;
use sprintlink::signature::Verifier;
use sprintlink::standin::StandIn;

use crate::common::{Process, free_port};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn verifier() -> Verifier {
    Verifier::from_source(&SourceConfig::example("erp", SECRET))
}

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
api_token = "tok-crash-test"
timeout_ms = 1000
concurrency = {concurrency}
rate_limit_per_second = 0
[delivery]
initial_backoff_ms = 50
max_backoff_ms = 500
lease_seconds = 6
[[sources]]
name = "erp"
scheme = "standard-webhooks"
secrets = ["{SECRET}"]
event_id = "/id"
object_id = "/data/object_id"
[sources.lead]
id = "/data/lead_id"
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

type Acked = Arc<Mutex<HashSet<(u64, u64)>>>;

/// Posts events `from..` to `bases` round-robin from `workers` tasks until `stop` or an error;
/// records the pairs of every event that got a 202.
async fn post_until_error(bases: Vec<String>, from: u64, count: u64, workers: u64, acked: Acked) {
    let v = verifier();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let bases = bases.clone();
        let v = v.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = from + w;
            while n < from + count {
                let (obj, lead) = (n, n % 7 + 1);
                let body =
                    json!({"id": format!("evt-{n}"), "type": "object.created", "data": {"object_id": obj, "lead_id": lead}})
                        .to_string();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64;
                let base = &bases[(n as usize) % bases.len()];
                let mut req = client
                    .post(format!("{base}/webhooks/erp"))
                    .header("content-type", "application/json");
                for (k, val) in v.sign(body.as_bytes(), now, &format!("m{n}")) {
                    req = req.header(k, val);
                }
                match req.body(body).send().await {
                    Ok(r) if r.status() == 202 => {
                        acked.lock().unwrap().insert((obj, lead));
                    }
                    Ok(r) if r.status() == 503 => {}
                    Ok(r) => panic!("unexpected answer {}", r.status()),
                    Err(_) => return,
                }
                n += workers;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn link_counts(hub: &StandIn) -> HashMap<(u64, u64), usize> {
    let mut counts = HashMap::new();
    for (o, l) in hub.linked_pairs() {
        *counts
            .entry((o.as_u64().unwrap(), l.as_u64().unwrap()))
            .or_insert(0) += 1;
    }
    counts
}

async fn wait_all_linked(
    hub: &StandIn,
    acked: &Acked,
    within: Duration,
) -> HashMap<(u64, u64), usize> {
    let deadline = Instant::now() + within;
    loop {
        let counts = link_counts(hub);
        let missing: Vec<_> = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|p| !counts.contains_key(p))
            .copied()
            .collect();
        if missing.is_empty() {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged events never linked, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_twenty_times_loses_nothing_acknowledged() {
    let rounds: u64 = std::env::var("SPRINTLINK_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let hub = StandIn::start().await.unwrap();
    hub.set_delay(Duration::from_millis(5));
    let port = free_port();
    let storage = format!("sqlite://{}", dir.path().join("crash.db").display());
    let config = write_config(dir.path(), port, &storage, &hub.url(), 8);
    let acked: Acked = Arc::default();
    for round in 0..rounds {
        let mut svc = Process::serve(&config, port).await;
        let poster = tokio::spawn(post_until_error(
            vec![svc.base.clone()],
            round * 100_000,
            100_000,
            8,
            acked.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..400))).await;
        svc.kill9();
        poster.await.unwrap();
    }
    let _svc = Process::serve(&config, port).await;
    let counts = wait_all_linked(&hub, &acked, Duration::from_secs(60)).await;
    let acked_n = acked.lock().unwrap().len();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    println!(
        "crash safety: {rounds} kill -9 rounds, {acked_n} events acknowledged, all linked, {duplicates} duplicate sends"
    );
    assert!(
        acked_n > rounds as usize,
        "too few events were acknowledged to mean anything"
    );
    // Only calls in flight at a kill can be repeated: at most `concurrency` per round.
    assert!(duplicates <= rounds as usize * 8, "{duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(sl_skip_pg, ignore = "SPRINTLINK_SKIP_PG=1: no PostgreSQL")]
async fn three_replicas_on_postgres_share_work_and_survive_a_kill() {
    let db = crate::common::TestDb::create(crate::common::Backend::Postgres).await;
    let url = db.url.clone();
    let dir = tempfile::tempdir().unwrap();
    let hub = StandIn::start().await.unwrap();
    hub.set_delay(Duration::from_millis(5));
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let config = write_config(dir.path(), port, &url, &hub.url(), 4);
        replicas.push(Process::serve(&config, port).await);
    }
    let bases: Vec<String> = replicas.iter().map(|r| r.base.clone()).collect();

    // Phase 1: no failures. Every pair is linked exactly once, whichever replica took it.
    let acked: Acked = Arc::default();
    post_until_error(bases.clone(), 0, 300, 6, acked.clone()).await;
    assert_eq!(acked.lock().unwrap().len(), 300);
    let counts = wait_all_linked(&hub, &acked, Duration::from_secs(60)).await;
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "pairs sent twice by replicas sharing one database: {twice:?}"
    );

    // Phase 2: replica 0 is killed mid-run; its leased jobs are taken over after the lease.
    let acked2: Acked = Arc::default();
    let poster = tokio::spawn(post_until_error(
        bases[1..].to_vec(),
        1_000,
        300,
        6,
        acked2.clone(),
    ));
    let slow = tokio::spawn(post_until_error(
        vec![bases[0].clone()],
        5_000,
        100_000,
        4,
        acked2.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    replicas[0].kill9();
    poster.await.unwrap();
    slow.await.unwrap();
    let counts = wait_all_linked(&hub, &acked2, Duration::from_secs(60)).await;
    let duplicates: usize = acked2.lock().unwrap().iter().map(|p| counts[p] - 1).sum();
    println!(
        "replicas: {} events after the kill all linked, {duplicates} duplicate sends",
        acked2.lock().unwrap().len()
    );
    assert!(
        duplicates <= 4,
        "only the killed replica's in-flight calls may repeat: {duplicates}"
    );
    drop(replicas);
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_delivery_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let hub = StandIn::start().await.unwrap();
    // Shorter than sprinthub.timeout_ms (1 s), longer than it takes to send the signal.
    hub.set_delay(Duration::from_millis(700));
    let port = free_port();
    let storage = format!("sqlite://{}", dir.path().join("term.db").display());
    let config = write_config(dir.path(), port, &storage, &hub.url(), 4);
    let mut svc = Process::serve(&config, port).await;
    let acked: Acked = Arc::default();
    post_until_error(vec![svc.base.clone()], 0, 1, 1, acked.clone()).await;
    assert_eq!(acked.lock().unwrap().len(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while hub.max_concurrency() == 0 {
        assert!(Instant::now() < deadline, "the delivery never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &svc.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = loop {
        if let Some(s) = svc.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM (drain is 2 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
    // The call in flight was allowed to finish and was recorded: a restart does not send it again.
    assert_eq!(hub.linked_pairs().len(), 1);
    let _svc = Process::serve(&config, port).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hub.requests_to("/customobjects/link").len(),
        1,
        "the finished delivery was sent again"
    );
}
