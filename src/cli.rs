//! The command line of SPEC section 2. `main.rs` parses; these functions do the work and return
//! an exit code (0 success, 1 failure, 2 bad usage is clap's).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::{Config, Secret, SourceConfig, config_path};
use crate::signature::Verifier;

#[derive(Debug, Parser)]
#[command(
    name = "sprintlink",
    version,
    about = "Signed webhooks in, SprintHub custom-object links out."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate configuration and secrets; one line per problem.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Self-contained end-to-end run on a temporary database and a local SprintHub stand-in.
    Demo,
    /// Print the headers (and a curl line) of a validly signed request for a source.
    Sign {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        source: String,
        /// The body to sign (default: a sample event).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Apply the schema migrations the database is missing (`serve` does this too), or with
    /// `--dry-run` only list them.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a consistent copy of the SQLite database to PATH while the service runs (never
    /// overwrites PATH). PostgreSQL: use pg_dump.
    Backup {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the copy goes; must not exist.
        #[arg(long)]
        to: PathBuf,
    },
    /// Exit 0 if BASE/readyz answers 200, else 1.
    Healthcheck {
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `println!` that does not panic when stdout is closed early (`sprintlink sign | head -3`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Loads the configuration the way every command does; errors are printed one per line.
pub fn load_config(flag: Option<PathBuf>) -> Result<Config, String> {
    let explicit = flag.is_some() || std::env::var_os("SPRINTLINK_CONFIG").is_some();
    let path = config_path(flag);
    Config::load(&path, explicit).map_err(|e| e.to_string())
}

pub async fn serve(flag: Option<PathBuf>) -> i32 {
    let config = match load_config(flag) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    for w in &config.warnings {
        tracing::warn!(warning = %w, "configuration warning");
    }
    match crate::app::run(config).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sprintlink: {e}");
            1
        }
    }
}

pub async fn migrate(flag: Option<PathBuf>, dry_run: bool) -> i32 {
    let config = match load_config(flag) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    match crate::store::migrate(config.storage.url.expose(), !dry_run).await {
        Ok(status) => {
            let verb = if dry_run { "pending" } else { "applied" };
            for (version, name) in &status.pending {
                say!("{verb}: {version:04} {name}");
            }
            let now_at = if dry_run {
                status.current
            } else {
                status.latest
            };
            say!(
                "schema version {now_at} (this sprintlink knows up to {}); {} migration(s) {verb}",
                status.latest,
                status.pending.len()
            );
            0
        }
        Err(e) => {
            eprintln!("sprintlink: {e}");
            1
        }
    }
}

pub async fn backup(flag: Option<PathBuf>, to: PathBuf) -> i32 {
    let config = match load_config(flag) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let started = std::time::Instant::now();
    match crate::store::backup(config.storage.url.expose(), &to).await {
        Ok(()) => {
            let bytes = std::fs::metadata(&to).map_or(0, |m| m.len());
            say!(
                "backup written to {} ({bytes} bytes, {} ms); start `sprintlink serve` on it to restore",
                to.display(),
                started.elapsed().as_millis()
            );
            0
        }
        Err(e) => {
            eprintln!("sprintlink: {e}");
            1
        }
    }
}

pub fn check_config(flag: Option<PathBuf>) -> i32 {
    match load_config(flag) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            say!(
                "configuration is valid: {} source(s), storage {}",
                c.sources.len(),
                crate::config::redact_url(c.storage.url.expose())
            );
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

const SAMPLE_BODY: &str =
    r#"{"id":"evt_sample_1","type":"object.created","data":{"object_id":123,"lead_id":8473}}"#;

pub fn sign(flag: Option<PathBuf>, source: &str, file: Option<PathBuf>) -> i32 {
    let config = match load_config(flag) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let Some(src) = config.source(source) else {
        let names: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
        eprintln!(
            "no source named {source:?}; configured: {}",
            names.join(", ")
        );
        return 1;
    };
    let body = match file {
        Some(p) => match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cannot read {}: {e}", p.display());
                return 1;
            }
        },
        None => SAMPLE_BODY.as_bytes().to_vec(),
    };
    let now = crate::store::now_ms() / 1000;
    let id = format!("msg_{:016x}", fastrand::u64(..));
    let headers = Verifier::from_source(src).sign(&body, now, &id);
    for (k, v) in &headers {
        say!("{k}: {v}");
    }
    let port = config.server.listen.rsplit(':').next().unwrap_or("8080");
    let mut curl = format!(
        "curl -sS -X POST http://127.0.0.1:{port}/webhooks/{source} -H 'content-type: application/json'"
    );
    for (k, v) in &headers {
        curl.push_str(&format!(" -H '{k}: {v}'"));
    }
    match std::str::from_utf8(&body) {
        Ok(text) if !text.contains('\'') => curl.push_str(&format!(" --data-binary '{text}'")),
        _ => curl.push_str(" --data-binary @BODY_FILE"),
    }
    say!("\n{curl}");
    0
}

pub async fn healthcheck(url: Option<String>, flag: Option<PathBuf>) -> i32 {
    let base = match url {
        Some(u) => u,
        None => {
            let listen = load_config(flag)
                .map(|c| c.server.listen)
                .unwrap_or_else(|_| "0.0.0.0:8080".into());
            let port = listen.rsplit(':').next().unwrap_or("8080").to_string();
            format!("http://127.0.0.1:{port}")
        }
    };
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
    {
        Ok(c) => c,
        Err(_) => return 1,
    };
    match client
        .get(format!("{}/readyz", base.trim_end_matches('/')))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => 0,
        Ok(r) => {
            eprintln!("not ready: HTTP {}", r.status().as_u16());
            1
        }
        Err(e) => {
            eprintln!("not ready: {}", e.without_url());
            1
        }
    }
}

/// Starts everything locally, posts signed samples, and prints what happened.
pub async fn demo() -> i32 {
    match run_demo().await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo failed: {e}");
            1
        }
    }
}

async fn run_demo() -> Result<(), String> {
    let hub = crate::standin::StandIn::start()
        .await
        .map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("sprintlink-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let db = dir.join("demo.db");
    let mut config = Config::for_local(&format!("sqlite://{}", db.display()), &hub.url());
    config.admin.token = Secret::new("demo-admin");
    config.delivery.initial_backoff_ms = 200;
    config.sources.push(SourceConfig::example(
        "erp",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ));
    let verifier = Verifier::from_source(&config.sources[0]);
    let running = crate::app::start(config).await.map_err(|e| e.to_string())?;
    let base = format!("http://{}", running.addr);
    say!(
        "sprintlink demo: service on {base}, SprintHub stand-in on {}, database {}\n",
        hub.url(),
        db.display()
    );
    let samples = [
        (
            "a new order linked to one lead",
            json!({"id": "evt_1", "type": "object.created", "data": {"object_id": 5001, "lead_id": 8473}}),
        ),
        (
            "an invoice linked to two leads",
            json!({"id": "evt_2", "type": "object.created", "data": {"object_id": 5002, "lead_id": [8473, "8474"]}}),
        ),
        (
            "the sender retries evt_1",
            json!({"id": "evt_1", "type": "object.created", "data": {"object_id": 5001, "lead_id": 8473}}),
        ),
        (
            "an event without a lead",
            json!({"id": "evt_3", "type": "object.created", "data": {"object_id": 5003}}),
        ),
        (
            "an update nobody asked for",
            json!({"id": "evt_4", "type": "object.updated", "data": {"object_id": 5001, "lead_id": 8473}}),
        ),
    ];
    let client = reqwest::Client::new();
    for (what, body) in &samples {
        let raw = body.to_string();
        let now = crate::store::now_ms() / 1000;
        let mut req = client
            .post(format!("{base}/webhooks/erp"))
            .header("content-type", "application/json");
        for (k, v) in verifier.sign(
            raw.as_bytes(),
            now,
            &format!("msg_{}", body["id"].as_str().unwrap_or("")),
        ) {
            req = req.header(k, v);
        }
        let resp = req
            .body(raw)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        say!("POST {what:<32} -> {status} {answer}");
    }
    // Wait for the worker to link what was queued.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let list: Value = client
            .get(format!("{base}/admin/events"))
            .bearer_auth("demo-admin")
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let events = list["events"].as_array().cloned().unwrap_or_default();
        if events.iter().all(|e| e["state"] != "queued") || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    say!("\nevents as the admin API shows them:");
    for e in events.iter().rev() {
        say!(
            "  {:<6} {:<10} object {:<5} {}",
            e["event_id"].as_str().unwrap_or(""),
            e["state"].as_str().unwrap_or(""),
            e["object_id"].as_str().unwrap_or("-"),
            e["reason"].as_str().unwrap_or("")
        );
    }
    say!("\nwhat the SprintHub stand-in received (POST /customobjects/link):");
    for r in hub.requests_to("/customobjects/link") {
        say!("  {} -> HTTP {}", r.body, r.status);
    }
    let linked = hub.linked_pairs().len();
    say!(
        "\n{linked} link(s) made; the retried evt_1 was deduplicated, evt_3 is parked for an operator, evt_4 was ignored by type."
    );
    running.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    if linked == 3 {
        Ok(())
    } else {
        Err(format!("expected 3 links, SprintHub got {linked}"))
    }
}
