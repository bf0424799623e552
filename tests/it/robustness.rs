//! Robustness: a SprintHub outage, storage faults, and hostile input over HTTP. Nothing may
//! panic, hang or answer 5xx (but the storage-fault 503), and nothing acknowledged may be lost.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{Value, json};

/// SprintHub is down for a while, then back: every link is delivered, the outbound rate limit
/// holds during the outage and the catch-up, and retries back off instead of storming.
async fn outage_then_recovery(backend: Backend) {
    let app = TestApp::builder(backend)
        .config(|c| {
            c.sprinthub.rate_limit_per_second = 20.0;
            c.delivery.initial_backoff_ms = 200;
            c.delivery.max_backoff_ms = 1_000;
            c.delivery.max_attempts = 100;
        })
        .spawn()
        .await;
    app.hub.set_down(true);
    let outage_started = Instant::now();
    for i in 0..30 {
        app.post_webhook("erp", &erp_event(&format!("out-{i}"), 7000 + i, 1))
            .await
            .expect(202);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = app.link_calls().len();
    // 20/s is the ceiling whatever the number of failing links; the window includes the time
    // the 30 posts took (slow on a loaded machine), plus the bucket's one and one for jitter.
    let ceiling = (20.0 * outage_started.elapsed().as_secs_f64()).ceil() as usize + 2;
    assert!(
        during <= ceiling,
        "{during} calls in a 2 s outage: the rate limit did not hold"
    );
    assert!(during >= 10, "only {during} calls: retries stalled");
    app.hub.set_down(false);
    wait_until(
        "all 30 links are delivered",
        Duration::from_secs(20),
        async || app.events(Some("delivered")).await.len() == 30,
    )
    .await;
    let calls = app.link_calls();
    let ok: Vec<_> = calls.iter().filter(|c| c.status == 200).collect();
    assert_eq!(ok.len(), 30, "each pair linked once");
    // No two-second window of the whole run holds more than the limit allows (plus the
    // bucket's one, and three for arrival jitter: on a loaded two-core machine, calls sent
    // 50 ms apart can reach the stand-in bunched; 43 was seen with 4 builds running).
    for (i, first) in calls.iter().enumerate() {
        let in_window = calls[i..]
            .iter()
            .take_while(|c| c.at.duration_since(first.at) < Duration::from_secs(2))
            .count();
        assert!(
            in_window <= 44,
            "{in_window} calls within two seconds at 20/s"
        );
    }
}

/// A database that cannot commit: ingest answers 503 with Retry-After (nothing acknowledged
/// that is not stored), readiness is 503, and both recover by themselves.
async fn storage_fault_then_recovery(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.post_webhook("erp", &erp_event("before", 1, 2))
        .await
        .expect(202);
    let fault = StorageFault::begin(&app.db.url).await;
    let r = app.post_webhook("erp", &erp_event("during", 3, 4)).await;
    r.expect_error(503, "unavailable");
    assert!(
        r.headers.get("retry-after").is_some(),
        "503 without Retry-After"
    );
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_ne!(body["checks"]["storage"], "ok", "{body}");
    fault.end().await;
    wait_until("readiness recovers", TIMEOUT, async || app.is_ready().await).await;
    app.post_webhook("erp", &erp_event("after", 5, 6))
        .await
        .expect(202);
    app.wait_for_state("after", "delivered").await;
    app.wait_for_state("before", "delivered").await;
    assert_eq!(
        app.event_state("during").await,
        None,
        "a 503'd event must not be stored"
    );
}

both_backends!(outage_then_recovery, storage_fault_then_recovery);

/// A full disk under SQLite: once the file system has no room, webhooks get 503 and readiness
/// turns 503; once room is back, readiness turns 200 by itself (no webhook needed) and ingest
/// works again without a restart. Needs root for the tmpfs mount (CI runs as root); reported as
/// ignored when built by another user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(sl_not_root, ignore = "needs root to mount a tmpfs")]
async fn sqlite_ingest_recovers_after_the_disk_was_full() {
    let disk = SmallDisk::mount();
    let url = format!("sqlite://{}/full.db", disk.dir.path().display());
    let app = TestApp::builder(Backend::Sqlite)
        .config(move |c| {
            c.storage.url = sprintlink::config::Secret::new(url);
            c.server.max_body_bytes = 1 << 20;
        })
        .spawn()
        .await;
    // Parked events (no lead) so nothing is delivered and every byte stays on disk.
    let padding = "x".repeat(200_000);
    let post = async |id: String| {
        let body =
            json!({"id": id, "type": "object.created", "data": {"object_id": 1, "pad": padding}});
        app.post_webhook("erp", &body).await
    };
    assert_eq!(post("first".into()).await.status.as_u16(), 202);
    // Leave little room, then fill the rest with events until the disk refuses.
    let filler = disk.dir.path().join("filler");
    disk.fill_leaving(&filler, 600_000);
    let mut refused = 0;
    let mut accepted = Vec::new();
    for i in 0..200 {
        let r = post(format!("fill-{i}")).await;
        match r.status.as_u16() {
            202 => accepted.push(format!("fill-{i}")),
            503 => {
                refused += 1;
                if refused >= 3 {
                    break;
                }
            }
            other => panic!("unexpected {other} while the disk fills: {:?}", r.body),
        }
    }
    assert!(refused >= 3, "the disk never filled up");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        503,
        "readiness says ready while ingest fails"
    );
    // Room again: readiness recovers by itself, and ingest works without a restart.
    std::fs::remove_file(&filler).unwrap();
    let recovered = poll(Duration::from_secs(30), async || app.is_ready().await).await;
    if !recovered {
        let r = app.client.get(app.url("/readyz")).send().await.unwrap();
        panic!(
            "readiness did not recover by itself: {}",
            r.text().await.unwrap()
        );
    }
    for i in 0..5 {
        let r = post(format!("after-{i}")).await;
        assert_eq!(
            r.status.as_u16(),
            202,
            "ingest after the disk has room: {:?}",
            r.body
        );
    }
    // Everything acknowledged is there.
    for id in accepted.iter().chain(["first".to_string()].iter()) {
        assert_eq!(app.event_state(id).await.as_deref(), Some("parked"), "{id}");
    }
}

/// PostgreSQL text cannot hold NUL. Events with NUL in their id, posted among 200 ordinary
/// ones that share their group commits, are refused alone; the ordinary ones are all
/// acknowledged and delivered; a NUL in a descriptive field (the type) is stored replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(sl_skip_pg, ignore = "SPRINTLINK_SKIP_PG=1: no PostgreSQL")]
async fn postgres_nul_in_one_event_never_fails_another() {
    let app = TestApp::builder(Backend::Postgres)
        .config(|c| c.sprinthub.rate_limit_per_second = 0.0)
        .spawn()
        .await;
    // Signed up front, posted all at once so that they share group commits.
    let mut tasks = Vec::new();
    for i in 0..210 {
        let id = match i % 21 {
            0 => format!("nul\u{0}-{i}"),
            1 => format!("typed-{i}"),
            _ => format!("plain-{i}"),
        };
        let mut body = erp_event(&id, 9000 + i, 1);
        if i % 21 == 1 {
            body["type"] = json!("object.created");
            body["data"]["note"] = json!("a \u{0} inside");
        }
        let raw = body.to_string();
        // A header cannot carry NUL: the delivery id differs, the event id is the body's.
        let headers = app.sign("erp", raw.as_bytes(), unix_ms() / 1000, &format!("msg-{i}"));
        let client = app.client.clone();
        let url = app.url("/webhooks/erp");
        tasks.push(tokio::spawn(async move {
            let mut req = client
                .post(url)
                .header("content-type", "application/json")
                .body(raw);
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            (
                id,
                Resp::from(req.send().await.expect("webhook request")).await,
            )
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let (refused, ordinary): (Vec<_>, Vec<_>) =
        answers.iter().partition(|(id, _)| id.starts_with("nul"));
    for (id, r) in &ordinary {
        assert_eq!(
            r.status.as_u16(),
            202,
            "{id} failed because of another event: {:?}",
            r.body
        );
    }
    assert_eq!(refused.len(), 10);
    for (id, r) in &refused {
        r.expect_error(400, "invalid_event_id");
        assert!(!id.is_empty());
    }
    wait_until(
        "every ordinary event is delivered",
        Duration::from_secs(30),
        async || app.events(Some("delivered")).await.len() == 200,
    )
    .await;
    let typed = app.event("typed-1").await;
    assert!(
        typed["body_json"]["data"]["note"]
            .as_str()
            .is_some_and(|b| b.contains("inside")),
        "{typed}"
    );
}

/// A tmpfs of a few MiB mounted on a temporary directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot mount a tmpfs on {}", dir.path().display());
        SmallDisk { dir }
    }

    /// Writes `path` until the file system has about `leave` bytes free.
    fn fill_leaving(&self, path: &std::path::Path, leave: u64) {
        use std::io::Write;
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.dir.path())
            .output()
            .unwrap();
        let avail: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap();
        let mut f = std::fs::File::create(path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut left = avail.saturating_sub(leave);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if f.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = f.sync_all();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile input (SQLite is enough: the request path is the same code for both backends)

fn now_secs() -> i64 {
    unix_ms() / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_clear_4xx_never_5xx() {
    let app = TestApp::builder(Backend::Sqlite)
        .config(|c| c.server.max_body_bytes = 64 * 1024)
        .spawn()
        .await;
    let signed = |body: &[u8]| {
        app.sign(
            "erp",
            body,
            now_secs(),
            &format!("h-{:x}", fastrand::u64(..)),
        )
    };

    // Not UTF-8, correctly signed.
    let body = vec![0xff, 0xfe, b'{', 0x80, b'}'];
    app.post_raw("erp", body.clone(), &signed(&body))
        .await
        .expect_error(400, "invalid_json");
    // Truncated JSON.
    let body = br#"{"id":"t","data":{"object_id":1,"lead_id""#.to_vec();
    app.post_raw("erp", body.clone(), &signed(&body))
        .await
        .expect_error(400, "invalid_json");
    // Deeply nested.
    let body = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000)).into_bytes();
    app.post_raw("erp", body.clone(), &signed(&body))
        .await
        .expect_error(400, "invalid_json");
    let body = format!(
        "{{\"id\":\"deep\",\"data\":{}1{}}}",
        "{\"a\":".repeat(100),
        "}".repeat(100)
    )
    .into_bytes();
    let r = app.post_raw("erp", body.clone(), &signed(&body)).await;
    assert!(r.status.as_u16() < 500, "{}", r.text);
    // Oversized: declared, and streamed without a length.
    let body = vec![b' '; 64 * 1024 + 1];
    app.post_raw("erp", body.clone(), &signed(&body))
        .await
        .expect_error(413, "payload_too_large");
    let addr = app.addr;
    // Well-formed signature headers, so the body is read (and found too long) rather than the
    // request being refused before its body.
    let forged = forged_headers();
    let chunked = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "POST /webhooks/erp HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n{}\r\n",
            forged
        )
        .unwrap();
        for _ in 0..20 {
            let chunk = vec![b' '; 8 * 1024];
            if write!(s, "{:x}\r\n", chunk.len()).is_err()
                || s.write_all(&chunk).is_err()
                || s.write_all(b"\r\n").is_err()
            {
                break;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
        let mut answer = vec![0u8; 512];
        let n = s.read(&mut answer).unwrap_or(0);
        String::from_utf8_lossy(&answer[..n]).into_owned()
    });
    let answer = chunked.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "streamed oversized body got: {answer:?}"
    );
    // Random bytes and random JSON, signed or not: a 4xx or an acceptance, never 5xx.
    for i in 0..300 {
        let body: Vec<u8> = match i % 3 {
            0 => (0..fastrand::usize(0..300))
                .map(|_| fastrand::u8(..))
                .collect(),
            1 => random_json(4).to_string().into_bytes(),
            _ => erp_event(&format!("r{i}"), random_json(1), random_json(1))
                .to_string()
                .into_bytes(),
        };
        let headers = if i % 5 == 0 { vec![] } else { signed(&body) };
        let r = app.post_raw("erp", body, &headers).await;
        assert!(r.status.as_u16() < 500, "5xx for input {i}: {}", r.text);
        if !r.status.is_success() {
            assert!(
                r.body["error"]["code"].is_string(),
                "error without a code: {}",
                r.text
            );
        }
    }
    // A method a route does not take is a JSON error too.
    let r = app
        .client
        .delete(app.url("/webhooks/erp"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

fn random_json(depth: u32) -> Value {
    match fastrand::u8(0..if depth == 0 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => json!(fastrand::i64(..)),
        2 => json!(fastrand::bool()),
        3 => Value::String(
            (0..fastrand::usize(0..12))
                .map(|_| fastrand::char(..))
                .collect(),
        ),
        4 => Value::Array(
            (0..fastrand::usize(0..4))
                .map(|_| random_json(depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..fastrand::usize(0..4))
                .map(|i| (format!("k{i}"), random_json(depth - 1)))
                .collect(),
        ),
    }
}

/// A client that sends its body one byte at a time, slowly, is cut off at the request timeout
/// with a JSON 408, and the service keeps serving others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_is_timed_out_and_others_are_served() {
    let app = TestApp::builder(Backend::Sqlite)
        .config(|c| c.server.request_timeout_ms = 700)
        .spawn()
        .await;
    let addr = app.addr;
    // Well-formed signature headers: the pre-check passes and the body is waited for.
    let forged = forged_headers();
    let loris = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "POST /webhooks/erp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n{forged}\r\n").unwrap();
        let start = Instant::now();
        for _ in 0..30 {
            if s.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        (answer, start.elapsed())
    });
    // Meanwhile, a normal sender is served at once.
    let t = Instant::now();
    app.post_webhook("erp", &erp_event("while-slow", 1, 1))
        .await
        .expect(202);
    assert!(t.elapsed() < Duration::from_millis(600));
    let (answer, took) = loris.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "slow client got: {answer:?}"
    );
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(took < Duration::from_secs(3), "cut off only after {took:?}");
}

// ---------------------------------------------------------------------------------------------
// The HTTP edge: what an unauthenticated client can hold (memory, connections, time)

/// Standard Webhooks headers that pass the pre-check (present, well formed, timestamp now) but
/// whose MAC is wrong: what an outsider who knows the scheme can send.
fn forged_headers() -> String {
    format!(
        "webhook-id: forged\r\nwebhook-timestamp: {}\r\nwebhook-signature: {}\r\n",
        now_secs(),
        zero_signature()
    )
}

/// A well-formed Standard Webhooks signature entry that matches nothing (32 zero bytes).
fn zero_signature() -> String {
    format!("v1,{}=", "A".repeat(43))
}

/// Reads until the server closes the connection; `Some(bytes read)` when it did so within
/// `limit`, `None` when the connection was still open.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A webhook without the scheme's headers, or with a stale timestamp, is answered 401 at once:
/// its body is never waited for (the client declares 1 MiB and sends nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_prechecked_before_the_body_is_read() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::builder(Backend::Sqlite)
        .config(|c| c.server.request_timeout_ms = 5_000)
        .spawn()
        .await;
    let stale = format!(
        "webhook-id: old\r\nwebhook-timestamp: {}\r\nwebhook-signature: {}\r\n",
        now_secs() - 3600,
        zero_signature()
    );
    for (extra, code) in [
        (String::new(), "missing_signature"),
        (stale, "timestamp_out_of_tolerance"),
    ] {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        s.write_all(
            format!(
                "POST /webhooks/erp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1048576\r\n{extra}\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let t = Instant::now();
        let answer = closed_within(&mut s, Duration::from_secs(3)).await;
        let answer = String::from_utf8_lossy(answer.as_deref().unwrap_or_default()).into_owned();
        assert!(
            answer.starts_with("HTTP/1.1 401") && answer.contains(code),
            "expected a 401 {code} before the body, got {answer:?} after {:?}",
            t.elapsed()
        );
    }
}

/// Request bodies share one byte budget: while stalled large uploads hold most of it, another
/// large upload is answered 503 `unavailable` with Retry-After, and a small signed webhook is
/// still accepted (a quarter of the budget is kept for bodies of 64 KiB or less).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bodies_are_bounded_by_a_shared_budget() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::builder(Backend::Sqlite)
        .config(|c| {
            c.server.max_body_bytes = 1024 * 1024;
            c.server.max_buffered_bytes = 2 * 1024 * 1024;
            c.server.request_timeout_ms = 8_000;
        })
        .spawn()
        .await;
    // Each declares 1 MiB and sends all but one byte: 1.5 MiB (three quarters of the budget)
    // is the most large bodies may hold, so the second of them does not fit.
    let mut stalled = Vec::new();
    let mut answers = Vec::new();
    for i in 0..3 {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let head = format!(
            "POST /webhooks/erp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1048576\r\n{}\r\n",
            forged_headers()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        if i == 0 {
            // The first sends all but one byte and stalls; the others wait for an answer
            // before sending their bodies (a busy server answers from the declared length).
            let body = vec![b' '; 1024 * 1024 - 1];
            tokio::time::timeout(Duration::from_secs(3), s.write_all(&body))
                .await
                .expect("the first upload is read")
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stalled.push(s);
    }
    for s in stalled.iter_mut().skip(1) {
        let answer = closed_within(s, Duration::from_secs(3)).await;
        answers.push(String::from_utf8_lossy(answer.as_deref().unwrap_or_default()).into_owned());
    }
    for a in &answers {
        assert!(
            a.starts_with("HTTP/1.1 503") && a.contains("\"unavailable\""),
            "an upload beyond the budget got: {a:?}"
        );
        assert!(a.to_ascii_lowercase().contains("retry-after:"), "{a}");
    }
    // The first upload still holds its megabyte; a small webhook fits beside it.
    app.post_webhook("erp", &erp_event("beside-the-stalled", 1, 1))
        .await
        .expect(202);
    drop(stalled);
    // Once the stalled bodies are gone, the budget is whole again.
    wait_until("the budget is released", TIMEOUT, async || {
        let mut body = erp_event("big-after", 2, 2).to_string();
        body.push_str(&" ".repeat(1_000_000 - body.len()));
        let headers = app.sign("erp", body.as_bytes(), now_secs(), "big-after");
        app.post_raw("erp", body.into_bytes(), &headers)
            .await
            .status
            == 202
    })
    .await;
}

/// Slow-header and idle keep-alive connections are closed by the header-read and idle
/// timeouts, and `/healthz` on `server.internal_listen` answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_and_idle_connections_are_closed_and_healthz_answers() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::builder(Backend::Sqlite)
        .config(|c| {
            c.server.header_read_timeout_ms = 1_000;
            c.server.idle_timeout_ms = 1_000;
            c.server.internal_listen = Some("127.0.0.1:0".into());
        })
        .spawn()
        .await;
    let internal = app
        .running
        .as_ref()
        .unwrap()
        .internal_addr
        .expect("internal_listen is bound");
    let started = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..400 {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        s.write_all(b"POST /webhooks/erp HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        conns.push(s);
    }
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        conns.push(s);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    for _ in 0..5 {
        let r = client
            .get(format!("http://{internal}/healthz"))
            .send()
            .await
            .expect("/healthz on the internal address answers during the flood");
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move { closed_within(&mut s, Duration::from_secs(8)).await })
        })
        .collect();
    let mut open = 0;
    for t in tasks {
        if t.await.unwrap().is_none() {
            open += 1;
        }
    }
    assert_eq!(
        open,
        0,
        "{open} of 500 connections still open after {:?}",
        started.elapsed()
    );
    // The internal address serves the operational routes only.
    let r = client
        .get(format!("http://{internal}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("http://{internal}/webhooks/erp"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // And the public address no longer serves /metrics.
    let r = client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

// --- the real binary under a flood, its memory measured

const FLOOD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The resident set of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The soft limit on open files of this process.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// An HTTP/2 frame: 24-bit length, type, flags, stream id.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK: every header as a literal without indexing, names and values not Huffman-coded.
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    fn int(out: &mut Vec<u8>, mut n: usize) {
        if n < 127 {
            out.push(n as u8);
            return;
        }
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128 + 128) as u8);
            n /= 128;
        }
        out.push(n as u8);
    }
    let mut out = Vec::new();
    for (k, v) in headers {
        out.push(0);
        int(&mut out, k.len());
        out.extend_from_slice(k.as_bytes());
        int(&mut out, v.len());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// Reads frames until the server's SETTINGS frame; its MAX_CONCURRENT_STREAMS (None when
/// the server sets no limit).
async fn server_max_streams(s: &mut tokio::net::TcpStream) -> Option<u32> {
    use tokio::io::AsyncReadExt;
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head)
            .await
            .expect("a frame from the server");
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)
            .await
            .expect("the frame's payload");
        if head[3] == 0x4 && head[4] & 0x1 == 0 {
            return payload
                .chunks_exact(6)
                .find(|p| u16::from_be_bytes([p[0], p[1]]) == 0x3)
                .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
        }
    }
}

/// The real binary on a free port, with an open-files limit of its own (`ulimit -n`) and extra
/// `[server]` lines; killed when dropped.
struct Binary {
    child: std::process::Child,
    pid: u32,
    port: u16,
    base: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
    _hub: sprintlink::standin::StandIn,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    async fn spawn(server_extra: &str, open_files: u32) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let hub = sprintlink::standin::StandIn::start().await.unwrap();
        let port = free_port();
        let config = dir.path().join("sprintlink.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_timeout_ms = 2000
{server_extra}
[storage]
url = "sqlite://{}/flood.db"
[sprinthub]
base_url = "{}"
instance = "flood"
api_token = "tok-flood-test"
rate_limit_per_second = 0
[[sources]]
name = "erp"
scheme = "standard-webhooks"
secrets = ["{FLOOD_SECRET}"]
event_id = "/id"
object_id = "/data/object_id"
[sources.lead]
id = "/data/lead_id"
"#,
                dir.path().display(),
                hub.url()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                r#"ulimit -n {open_files} 2>/dev/null; exec "$0" serve --config "$1""#
            ))
            .arg(env!("CARGO_BIN_EXE_sprintlink"))
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(std::fs::File::create(dir.path().join("service.log")).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start sprintlink");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let server = Binary {
            pid: child.id(),
            child,
            port,
            base,
            client,
            _dir: dir,
            _hub: hub,
        };
        let ready = poll(Duration::from_secs(10), async || {
            server
                .client
                .get(format!("{}/readyz", server.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(ready, "the service did not become ready");
        server
    }

    /// What the service has logged (warnings and errors) so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("service.log")).unwrap_or_default()
    }
}

/// Under a 256-descriptor limit, 400 slow-header and 100 idle keep-alive connections meet the
/// connection cap (lowered to fit the limit) instead of the descriptor limit: no accept fails
/// for want of descriptors, and `/healthz` on `server.internal_listen` keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_under_a_connection_flood_at_256_descriptors() {
    use tokio::io::AsyncWriteExt;
    let internal = free_port();
    let server = Binary::spawn(
        &format!(
            "internal_listen = \"127.0.0.1:{internal}\"\nheader_read_timeout_ms = 30000\nidle_timeout_ms = 30000"
        ),
        256,
    )
    .await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    // All at once; those beyond the cap and the backlog may not connect at all.
    let connects: Vec<_> = (0..500)
        .map(|i| {
            tokio::spawn(async move {
                let connect = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(addr),
                );
                let Ok(Ok(mut s)) = connect.await else {
                    return None;
                };
                let head: &[u8] = if i < 400 {
                    b"POST /webhooks/erp HTTP/1.1\r\nhost: x\r\n"
                } else {
                    b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
                };
                let _ = s.write_all(head).await;
                Some(s)
            })
        })
        .collect();
    let mut flood = Vec::new();
    for c in connects {
        flood.extend(c.await.unwrap());
    }
    assert!(
        flood.len() > 128,
        "only {} connections were made",
        flood.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    for i in 0..5 {
        let r = client
            .get(format!("http://127.0.0.1:{internal}/healthz"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("/healthz {i} during the flood: {e}"));
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = server.log();
    assert!(
        !log.contains("Too many open files"),
        "the flood reached the descriptor limit instead of the connection cap:\n{}",
        log.lines().take(5).collect::<Vec<_>>().join("\n")
    );
    drop(flood);
    drop(server);
}

/// One thousand slow uploads (1 MiB declared, all but a byte sent, then silence) and HTTP/2
/// connections opening many streams each: the real process stays under 128 MB resident, and a
/// well-behaved sender's signed webhooks are accepted throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_slow_uploads_and_h2_streams_stays_under_128_mb() {
    use tokio::io::AsyncWriteExt;
    assert!(
        open_files_limit() >= 2_500,
        "this test opens about 1,100 sockets: raise `ulimit -n` (now {})",
        open_files_limit()
    );
    let server = Binary::spawn("", 4096).await;
    let (pid, port, base, client) = (
        server.pid,
        server.port,
        server.base.clone(),
        server.client.clone(),
    );
    let before = rss_bytes(pid);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // HTTP/1.1: 1,000 uploads that stall one byte short of their declared length.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut flood = Vec::new();
    for _ in 0..1_000 {
        let stop = stop.clone();
        flood.push(tokio::spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                return;
            };
            let head = format!(
                "POST /webhooks/erp HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1048576\r\n{}\r\n",
                forged_headers()
            );
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b' '; 64 * 1024];
            let mut left = 1024 * 1024 - 1;
            while left > 0 {
                let n = left.min(chunk.len());
                match tokio::time::timeout(Duration::from_secs(5), s.write_all(&chunk[..n])).await {
                    Ok(Ok(())) => left -= n,
                    _ => break,
                }
            }
            stop.cancelled().await;
            drop(s);
        }));
    }
    // HTTP/2 (prior knowledge): 8 connections, each opening 100 streams with a little data.
    let mut advertised = Vec::new();
    for c in 0..8 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(0x4, 0, 0, &[]));
        s.write_all(&out).await.unwrap();
        advertised.push(server_max_streams(&mut s).await);
        let mut out = h2_frame(0x4, 0x1, 0, &[]);
        let ts = now_secs().to_string();
        let sig = zero_signature();
        for i in 0..100u32 {
            let stream = 2 * i + 1;
            let block = hpack(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/webhooks/erp"),
                (":authority", "x"),
                ("content-type", "application/json"),
                ("content-length", "1048576"),
                ("webhook-id", &format!("h2-{c}-{i}")),
                ("webhook-timestamp", &ts),
                ("webhook-signature", &sig),
            ]);
            out.extend(h2_frame(0x1, 0x4, stream, &block));
            // 100 x 600 bytes stays inside the default 65,535-byte connection window.
            out.extend(h2_frame(0x0, 0, stream, &[b' '; 600]));
        }
        let _ = s.write_all(&out).await;
        let stop = stop.clone();
        flood.push(tokio::spawn(async move {
            stop.cancelled().await;
            drop(s);
        }));
    }

    // A well-behaved sender, during the flood, and the resident set sampled throughout.
    let verifier = sprintlink::signature::Verifier::from_source(
        &sprintlink::config::SourceConfig::example("erp", FLOOD_SECRET),
    );
    let mut peak = before;
    let mut answers = Vec::new();
    let flood_started = Instant::now();
    let mut i = 0;
    while flood_started.elapsed() < Duration::from_secs(8) {
        peak = peak.max(rss_bytes(pid));
        if i < 8 && flood_started.elapsed() >= Duration::from_millis(500 + 800 * i) {
            let id = format!("good-{i}");
            let body = json!({"id": id, "type": "object.created", "data": {"object_id": 100 + i, "lead_id": 7}})
                .to_string();
            let mut req = client
                .post(format!("{base}/webhooks/erp"))
                .header("content-type", "application/json")
                .body(body.clone());
            for (k, v) in verifier.sign(body.as_bytes(), now_secs(), &id) {
                req = req.header(k, v);
            }
            let status = match req.send().await {
                Ok(r) => r.status().as_u16(),
                Err(e) => {
                    eprintln!("good-{i}: {e}");
                    0
                }
            };
            answers.push(status);
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak = peak.max(rss_bytes(pid));
    stop.cancel();
    for t in flood {
        let _ = t.await;
    }
    let mb = |b: u64| b as f64 / 1_048_576.0;
    eprintln!(
        "RSS before {:.1} MiB, peak {:.1} MiB; good answers {answers:?}; h2 advertised {advertised:?}",
        mb(before),
        mb(peak)
    );
    assert!(
        peak < 128 * 1024 * 1024,
        "resident set reached {:.1} MiB (from {:.1} MiB)",
        mb(peak),
        mb(before)
    );
    assert!(
        advertised.iter().all(|m| m.is_some_and(|m| m <= 32)),
        "HTTP/2 streams per connection are not capped at 32: {advertised:?}"
    );
    assert_eq!(
        answers,
        vec![202; 8],
        "the signed webhooks during the flood"
    );
    drop(server);
}

/// `/readyz` is an unauthenticated durable write: within a second its storage check runs once
/// and the other probes share the answer, so a probe flood cannot queue writes on SQLite's
/// single writer. Seen through the heartbeat row the check writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_writes_at_most_once_a_second() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let first = unix_ms();
    for _ in 0..10 {
        let r = app.client.get(app.url("/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let last = unix_ms();
    assert!(last - first < 1000, "the probes took longer than the cache");
    let path = app.db.url.trim_start_matches("sqlite://").to_string();
    let at: i64 = rusqlite::Connection::open(path)
        .unwrap()
        .query_row("SELECT at FROM heartbeat WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert!(
        at - first < 150,
        "the heartbeat was written {} ms after the first probe, by a later one",
        at - first
    );
    // After the cache, a probe writes again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = unix_ms();
    app.client.get(app.url("/readyz")).send().await.unwrap();
    let path = app.db.url.trim_start_matches("sqlite://").to_string();
    let again: i64 = rusqlite::Connection::open(path)
        .unwrap()
        .query_row("SELECT at FROM heartbeat WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert!(
        again >= before,
        "no new readiness write after the cache expired"
    );
}
