//! The dashboard in a real headless Chromium.
//!
//! Debian's `chromium` and `chromium-driver` (install them with `bash .ci/install-browser`) are
//! driven over the W3C WebDriver protocol: chromedriver runs on a free loopback port and this file
//! speaks its JSON with `reqwest`, so no WebDriver crate is needed.
//!
//! Scenario: the service runs against the SprintHub stand-in, which answers the first link call
//! 503 and the second 400, so the event goes dead. An operator logs in through the form, opens the
//! dead event, sees both attempts, clicks Replay, and the link is made: the stand-in records a 2xx
//! link, and both the page and the admin API show the event delivered.
//!
//! Without chromedriver the test fails with a message saying how to install it, unless
//! `SPRINTLINK_SKIP_BROWSER=1` is set when building it: then it is reported as ignored. With `SPRINTLINK_SCREENSHOTS=1` it writes the overview and the
//! event page to `docs/dashboard.png` and `docs/event.png`. `CHROMEDRIVER` and `CHROME` override
//! the binaries' paths.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use sprintlink::config::{Config, Secret, SourceConfig};
use sprintlink::signature::Verifier;
use sprintlink::standin::{Canned, StandIn};

use crate::common::free_port;

const TOKEN: &str = "browser-test-admin-token";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

// ------------------------------------------------------------------ a minimal WebDriver client

fn find_binary(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    for c in candidates {
        let p = Path::new(c);
        if p.is_absolute() {
            if p.exists() {
                return Some(p.to_path_buf());
            }
        } else if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let full = dir.join(c);
                if full.exists() {
                    return Some(full);
                }
            }
        }
    }
    None
}

/// A chromedriver process with one browser session; both end when this is dropped, even when
/// the test panics.
struct Browser {
    http: reqwest::Client,
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(chromedriver: &Path, chrome: &Path) -> Browser {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            http,
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = browser
                .http
                .get(format!("http://{addr}/status"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            if let Some(r) = ready {
                let status: Value = r.json().await.unwrap_or(Value::Null);
                if status["value"]["ready"] == true {
                    break;
                }
            }
            if let Ok(Some(code)) = browser.driver.try_wait() {
                panic!("chromedriver exited with {code} before it was ready");
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on {addr} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chrome.to_string_lossy(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--force-device-scale-factor=1",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", browser._profile.path().display()),
                ],
            },
        }}});
        let answer = browser.raw("POST", "/session", Some(caps)).await;
        browser.session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {answer}"))
            .to_string();
        browser
            .cmd(
                "POST",
                "/timeouts",
                Some(json!({"implicit": 5000, "pageLoad": 30000})),
            )
            .await;
        browser
    }

    /// A WebDriver command on the driver; returns `value`, panics with the driver's error.
    async fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("http://{}{path}", self.addr);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self
                .http
                .post(&url)
                .json(&body.unwrap_or_else(|| json!({}))),
        };
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = resp.status();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "WebDriver {method} {path} failed with {status}: {} {}",
            answer["value"]["error"],
            answer["value"]["message"]
        );
        answer["value"].clone()
    }

    /// A command of this session.
    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.raw(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url}))).await;
    }

    async fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the current URL satisfies `want` (a click that submits a form or follows a
    /// link returns before the new page is there), and returns it.
    async fn wait_url(&self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let url = self.url().await;
            if want(&url) {
                return url;
            }
            assert!(
                Instant::now() < deadline,
                "expected {what}, the browser is at {url}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn refresh(&self) {
        self.cmd("POST", "/refresh", None).await;
    }

    /// The first element matching a CSS selector (waits up to the implicit timeout).
    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    /// How many elements match, without waiting.
    async fn count(&self, css: &str) -> usize {
        self.cmd("POST", "/timeouts", Some(json!({"implicit": 0})))
            .await;
        let v = self
            .cmd(
                "POST",
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        self.cmd("POST", "/timeouts", Some(json!({"implicit": 5000})))
            .await;
        v.as_array().map_or(0, Vec::len)
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.cmd("POST", &format!("/element/{el}/click"), None)
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        let el = self.find(css).await;
        self.cmd("GET", &format!("/element/{el}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Chooses a state in the events page's filter.
    async fn select_state(&self, state: &str) {
        self.click(&format!("#state option[value='{state}']")).await;
    }

    async fn cookie(&self, name: &str) -> Value {
        self.cmd("GET", &format!("/cookie/{name}"), None).await
    }

    /// A PNG of the whole page: the window is first made as tall as the document.
    async fn screenshot(&self, width: u64) -> Vec<u8> {
        let measure = json!({"script": "return [document.documentElement.scrollHeight, \
            window.outerHeight - window.innerHeight]", "args": []});
        let m = self.cmd("POST", "/execute/sync", Some(measure)).await;
        let (page, chrome) = (m[0].as_u64().unwrap_or(900), m[1].as_u64().unwrap_or(0));
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": page.clamp(400, 4000) + chrome})),
        )
        .await;
        let b64 = self.cmd("GET", "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("a base64 screenshot")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Blocking and dependency-free, so it also runs while a panic unwinds: end the session
        // (chromedriver closes Chromium), then stop chromedriver.
        if !self.session.is_empty()
            && let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
        {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                s,
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session, self.addr
            );
            let _ = s.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

// ------------------------------------------------------------------ the service

struct Service {
    base: String,
    hub: StandIn,
    verifier: Verifier,
    http: reqwest::Client,
    running: Option<sprintlink::Running>,
    _dir: tempfile::TempDir,
}

impl Service {
    async fn start() -> Service {
        let hub = StandIn::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("dashboard.db");
        let mut config = Config::for_local(&format!("sqlite://{}", db.display()), &hub.url());
        config.admin.token = Secret::new(TOKEN);
        config.delivery.initial_backoff_ms = 200;
        config.sources.push(SourceConfig::example("erp", SECRET));
        let verifier = Verifier::from_source(&config.sources[0]);
        let running = sprintlink::start(config).await.unwrap();
        Service {
            base: format!("http://{}", running.addr),
            hub,
            verifier,
            http: reqwest::Client::new(),
            running: Some(running),
            _dir: dir,
        }
    }

    async fn post_event(&self, body: Value) {
        let raw = body.to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let id = format!("msg_{}", body["id"].as_str().unwrap());
        let mut req = self
            .http
            .post(format!("{}/webhooks/erp", self.base))
            .header("content-type", "application/json");
        for (k, v) in self.verifier.sign(raw.as_bytes(), now, &id) {
            req = req.header(k, v);
        }
        let resp = req.body(raw).send().await.unwrap();
        assert!(resp.status().is_success(), "webhook: {}", resp.status());
    }

    async fn admin(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    async fn wait_state(&self, event_id: &str, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let e = self.admin(&format!("/admin/events/{event_id}")).await;
            if e["state"] == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{event_id} did not become {state}: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn save(name: &str, png: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, png).unwrap();
    eprintln!("wrote {}", path.display());
}

// ------------------------------------------------------------------ the scenario

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    sl_skip_browser,
    ignore = "SPRINTLINK_SKIP_BROWSER=1: no headless Chromium"
)]
async fn dashboard_login_then_replay_a_dead_event_in_chromium() {
    let missing = "headless Chromium is needed for the dashboard test: run `bash .ci/install-browser` \
                   (Debian's chromium and chromium-driver), or set SPRINTLINK_SKIP_BROWSER=1 to skip it";
    let chromedriver = find_binary("CHROMEDRIVER", &["/usr/bin/chromedriver", "chromedriver"])
        .unwrap_or_else(|| panic!("chromedriver not found: {missing}"));
    let chrome = find_binary(
        "CHROME",
        &["/usr/bin/chromium", "chromium", "chromium-browser"],
    )
    .unwrap_or_else(|| panic!("chromium not found: {missing}"));
    let screenshots = std::env::var("SPRINTLINK_SCREENSHOTS").is_ok_and(|v| v == "1");

    let svc = Service::start().await;
    let base = svc.base.clone();

    // The event that goes dead: a transient 503, then a permanent 400.
    svc.hub.script([
        Canned::new(503, r#"{"msg":"maintenance, try again"}"#),
        Canned::new(400, r#"{"msg":"customobject 5001 is not linkable yet"}"#),
    ]);
    svc.post_event(json!({"id": "evt_1001", "type": "object.created",
        "data": {"object_id": 5001, "lead_id": 8473}}))
        .await;
    svc.wait_state("evt_1001", "dead").await;
    // Company for the overview: delivered, parked and still queued events.
    svc.post_event(json!({"id": "evt_1002", "type": "object.created",
        "data": {"object_id": 5002, "lead_id": [8473, "8474"]}}))
        .await;
    svc.wait_state("evt_1002", "delivered").await;
    svc.post_event(json!({"id": "evt_1003", "type": "object.created",
        "data": {"object_id": 5003}}))
        .await;
    svc.hub
        .script([Canned::new(503, r#"{"msg":"maintenance"}"#).header("Retry-After", "3600")]);
    svc.post_event(json!({"id": "evt_1004", "type": "object.created",
        "data": {"object_id": 5004, "lead_id": 9120}}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while svc.hub.requests_to("/customobjects/link").len() < 5 {
        assert!(
            Instant::now() < deadline,
            "the 503 for evt_1004 was not used"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    svc.post_event(json!({"id": "evt_1005", "type": "object.created",
        "data": {"object_id": 5005, "lead_id": 8475}}))
        .await;
    svc.wait_state("evt_1005", "delivered").await;
    let linked_before = svc.hub.linked_pairs().len();

    let browser = Browser::start(&chromedriver, &chrome).await;

    // Not signed in: every page sends the browser to the login form.
    browser.goto(&format!("{base}/ui/events?state=dead")).await;
    browser
        .wait_url("the login page", |u| u.contains("/ui/login?next="))
        .await;
    // A wrong token: the form again, with an error.
    browser.type_into("#token", "not-the-token").await;
    browser.click("#login").await;
    assert!(
        browser
            .text("#login-error")
            .await
            .contains("not the admin token")
    );
    // The right one: back to the page that was asked for.
    browser.type_into("#token", TOKEN).await;
    browser.click("#login").await;
    let back = format!("{base}/ui/events?state=dead");
    browser.wait_url(&back, |u| u == back).await;
    let cookie = browser.cookie("sprintlink_ui").await;
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert_eq!(cookie["path"], "/ui", "{cookie}");
    // `Secure` by default; Chromium keeps it over plain HTTP on 127.0.0.1 (a secure context).
    assert_eq!(cookie["secure"], true, "{cookie}");
    let session = cookie["value"].as_str().unwrap().to_string();
    assert!(
        !session.contains(TOKEN),
        "the cookie must not hold the token"
    );

    // The overview counts events by state.
    browser.click("a.brand").await;
    let overview = format!("{base}/ui");
    browser.wait_url(&overview, |u| u == overview).await;
    assert_eq!(browser.text("#count-dead .n").await, "1");
    assert_eq!(browser.text("#count-delivered .n").await, "2");
    assert_eq!(browser.text("#count-parked .n").await, "1");
    assert_eq!(browser.text("#count-queued .n").await, "1");
    if screenshots {
        save("dashboard.png", &browser.screenshot(1280).await);
    }

    // The dead list, then the dead event with both attempts.
    browser.click("#count-dead").await;
    browser
        .wait_url("the dead list", |u| u.ends_with("/ui/events?state=dead"))
        .await;
    assert_eq!(browser.count("#events tbody tr").await, 1);
    browser
        .click("#events a[href^='/ui/events/evt_1001']")
        .await;
    browser
        .wait_url("the event page", |u| {
            u.contains("/ui/events/evt_1001?source=erp")
        })
        .await;
    assert_eq!(browser.text("#event-state").await, "dead");
    assert_eq!(browser.count(".timeline li").await, 2);
    let timeline = browser.text(".timeline").await;
    assert!(timeline.contains("HTTP 503"), "{timeline}");
    assert!(timeline.contains("HTTP 400"), "{timeline}");
    assert!(timeline.contains("not linkable yet"), "{timeline}");

    // The replay form is protected: the session cookie without the form's CSRF token is refused.
    let forged = svc
        .http
        .post(format!("{base}/ui/events/evt_1001/replay?source=erp"))
        .header("cookie", format!("sprintlink_ui={session}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=0000")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 403);
    let body: Value = forged.json().await.unwrap();
    assert_eq!(body["error"]["code"], "csrf");
    assert_eq!(svc.admin("/admin/events/evt_1001").await["state"], "dead");

    // Replay from the page.
    browser.click("#replay").await;
    browser
        .wait_url("the event page after the replay", |u| {
            u.ends_with("replayed=true")
        })
        .await;
    assert!(browser.text("#notice").await.starts_with("Replayed"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while browser.text("#event-state").await != "delivered" {
        assert!(
            Instant::now() < deadline,
            "the page never showed the event delivered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        browser.refresh().await;
    }
    assert_eq!(browser.count(".timeline li").await, 3);
    assert!(browser.text(".timeline li.ok").await.contains("HTTP 200"));

    // SprintHub got the link, and the admin API agrees.
    let linked = svc.hub.linked_pairs();
    assert_eq!(linked.len(), linked_before + 1, "{linked:?}");
    assert!(linked.contains(&(json!(5001), json!(8473))), "{linked:?}");
    let event = svc.admin("/admin/events/evt_1001").await;
    assert_eq!(event["state"], "delivered", "{event}");
    assert_eq!(event["links"][0]["state"], "linked", "{event}");
    if screenshots {
        save("event.png", &browser.screenshot(1280).await);
    }

    // Search, select two events, discard them: the list shows them discarded.
    browser.goto(&format!("{base}/ui/events")).await;
    browser.type_into("#q", "evt_100").await;
    browser.click("#filter").await;
    browser
        .wait_url("the filtered list", |u| u.contains("q=evt_100"))
        .await;
    assert_eq!(browser.count("#events tbody tr").await, 5);
    browser
        .click("#events input[aria-label='select evt_1003']")
        .await;
    browser
        .click("#events input[aria-label='select evt_1004']")
        .await;
    browser.type_into("#reason", "test traffic").await;
    browser.click("#bulk-discard").await;
    browser
        .wait_url("the list after the discard", |u| {
            u.contains("done=discarded")
        })
        .await;
    assert_eq!(browser.text("#bulk-notice").await, "Discarded 2 events.");
    assert!(
        browser.url().await.contains("q=evt_100"),
        "the filter is kept"
    );
    for id in ["evt_1003", "evt_1004"] {
        let e = svc.admin(&format!("/admin/events/{id}")).await;
        assert_eq!(e["state"], "discarded", "{e}");
        assert_eq!(e["reason"], "test traffic", "{e}");
    }
    browser.select_state("discarded").await;
    browser.click("#filter").await;
    browser
        .wait_url("the discarded list", |u| u.contains("state=discarded"))
        .await;
    assert_eq!(browser.count("#events tbody tr").await, 2);
    let table = browser.text("#events").await;
    assert!(
        table.contains("evt_1003") && table.contains("evt_1004"),
        "{table}"
    );
    assert_eq!(browser.count("#events .badge.b-grey").await, 2);

    // The mapping table: add a key, a CSV with a bad line is refused with its line number
    // (nothing imported), then delete the key.
    browser.click("nav a[href='/ui/mappings']").await;
    browser
        .wait_url("the mappings page", |u| u.ends_with("/ui/mappings"))
        .await;
    browser.type_into("#mkey", "ann@example.com").await;
    browser.type_into("#mleads", "17, 18").await;
    browser.click("#mapping-add").await;
    browser
        .wait_url("the table after the add", |u| u.contains("done=set"))
        .await;
    assert_eq!(browser.count("#mappings tbody tr").await, 2);
    let csv_dir = tempfile::tempdir().unwrap();
    let csv = csv_dir.path().join("leads.csv");
    std::fs::write(&csv, "key,lead_id\nbob@example.com,19\nthis line is bad\n").unwrap();
    browser.type_into("#csv", &csv.display().to_string()).await;
    browser.click("#mapping-upload").await;
    let error = browser.text("#mapping-error").await;
    assert!(error.contains("line 3"), "{error}");
    assert_eq!(
        browser.count("#mappings tbody tr").await,
        2,
        "nothing imported"
    );
    browser.click("#mappings button.danger").await;
    browser
        .wait_url("the table after the delete", |u| u.contains("done=deleted"))
        .await;
    assert_eq!(browser.count("#mappings tbody tr").await, 0);

    // Log out: the cookie goes, and the dashboard asks for the token again.
    browser.click("#logout").await;
    let login = format!("{base}/ui/login");
    browser.wait_url(&login, |u| u == login).await;
    assert_eq!(browser.count("#logout").await, 0);
    browser.goto(&format!("{base}/ui")).await;
    browser
        .wait_url("the login page", |u| u.contains("/ui/login?next="))
        .await;
    // The logout ended the session on the server: the old cookie value signs nobody in.
    let stale = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{base}/ui"))
        .header("cookie", format!("sprintlink_ui={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status().as_u16(), 303, "a revoked session");

    drop(browser);
    if let Some(r) = svc.running {
        r.stop().await;
    }
}
