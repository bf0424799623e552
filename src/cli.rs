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
        /// Also ask SprintHub: token and instance accepted, each `definition_id` exists, each
        /// alias in `fields` is one of its fields, each required field is mapped.
        #[arg(long)]
        online: bool,
    },
    /// Commands that ask SprintHub, for integrators.
    Sprinthub {
        #[command(subcommand)]
        command: SprinthubCommand,
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
        /// The body's media type, e.g. application/x-www-form-urlencoded for a form post
        /// (default: application/json).
        #[arg(long, default_value = "application/json")]
        content_type: String,
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
    /// Send one test notification to every `[[alerts]]` target and print what each answered
    /// (exit 1 if any did not answer 2xx).
    AlertTest {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Exit 0 if BASE/readyz answers 200, else 1.
    Healthcheck {
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SprinthubCommand {
    /// List the instance's custom object definitions: id, name, and each field's alias, type
    /// and whether it is required (what `[sources.object]` needs).
    Definitions {
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

pub fn check_config(flag: Option<PathBuf>, online: bool) -> i32 {
    match load_config(flag) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            if online {
                let problems = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(online_problems(&c)),
                    Err(e) => vec![format!("cannot start the runtime: {e}")],
                };
                if !problems.is_empty() {
                    for p in &problems {
                        eprintln!("{p}");
                    }
                    return 1;
                }
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

/// What SprintHub says about the configuration: one line per problem.
async fn online_problems(c: &Config) -> Vec<String> {
    let hub = match crate::sprinthub::SprintHubClient::new(&c.sprinthub) {
        Ok(h) => h,
        Err(e) => return vec![format!("sprinthub: {e}")],
    };
    match hub.definitions().await {
        Ok(defs) => crate::sprinthub::check_definitions(c, &defs),
        Err(f) => vec![crate::sprinthub::definitions_failure(c, &f)],
    }
}

/// `sprintlink sprinthub definitions`.
pub async fn sprinthub_definitions(flag: Option<PathBuf>) -> i32 {
    let config = match load_config(flag) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let hub = match crate::sprinthub::SprintHubClient::new(&config.sprinthub) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("sprinthub: {e}");
            return 1;
        }
    };
    let defs = match hub.definitions().await {
        Ok(d) => d,
        Err(f) => {
            eprintln!("{}", crate::sprinthub::definitions_failure(&config, &f));
            return 1;
        }
    };
    if defs.is_empty() {
        say!(
            "instance {:?} has no custom object definitions",
            config.sprinthub.instance
        );
    }
    for d in &defs {
        say!("definition_id = {}  name = {:?}", d.id, d.name);
        for f in &d.fields {
            say!(
                "    {:<24} {:<12} {:<9} {}",
                f.alias,
                f.kind,
                if f.required { "required" } else { "optional" },
                f.label
            );
        }
    }
    0
}

const SAMPLE_BODY: &str =
    r#"{"id":"evt_sample_1","type":"object.created","data":{"object_id":123,"lead_id":8473}}"#;

pub fn sign(flag: Option<PathBuf>, source: &str, file: Option<PathBuf>, content_type: &str) -> i32 {
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
    let body = match &file {
        Some(p) => match std::fs::read(p) {
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
    let signed = match Verifier::from_source(src).sign_request(&body, now, &id) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot sign for source {source:?}: {e}");
            return 1;
        }
    };
    for (k, v) in &signed.headers {
        say!("{k}: {v}");
    }
    let query = (!signed.query.is_empty()).then(|| {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&signed.query)
            .finish()
    });
    if let Some(q) = &query {
        say!("query: ?{q}");
    }
    let port = config.server.listen.rsplit(':').next().unwrap_or("8080");
    let url = match &query {
        Some(q) => format!("http://127.0.0.1:{port}/webhooks/{source}?{q}"),
        None => format!("http://127.0.0.1:{port}/webhooks/{source}"),
    };
    let mut curl = format!(
        "curl -sS -X POST '{url}' -H {}",
        shell_quote(&format!("content-type: {content_type}"))
    );
    for (k, v) in &signed.headers {
        curl.push_str(&format!(" -H {}", shell_quote(&format!("{k}: {v}"))));
    }
    match (&file, std::str::from_utf8(&body)) {
        (Some(p), _) => curl.push_str(&format!(
            " --data-binary {}",
            shell_quote(&format!("@{}", p.display()))
        )),
        (None, Ok(text)) => curl.push_str(&format!(" --data-binary {}", shell_quote(text))),
        (None, Err(_)) => curl.push_str(" --data-binary @BODY_FILE"),
    }
    say!("\n{curl}");
    0
}

/// A value in single quotes for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// One test notification per target, one try each: the status or the error, and only the
/// target's `scheme://host` (the rest of a webhook URL is its secret).
pub async fn alert_test(flag: Option<PathBuf>) -> i32 {
    let config = match load_config(flag) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if config.alerts.is_empty() {
        eprintln!("no [[alerts]] target is configured");
        return 1;
    }
    let client = crate::alerts::notify::client();
    let mut failed = 0;
    for (i, target) in config.alerts.iter().enumerate() {
        let n = crate::alerts::notify::Notification {
            kind: target
                .on
                .first()
                .copied()
                .unwrap_or(crate::config::AlertKind::Dead),
            count: 0,
            examples: Vec::new(),
            at: crate::store::now_ms(),
            instance: config.sprinthub.instance.clone(),
            test: true,
        };
        let (body, headers) = n.request(target);
        let format = match target.format {
            crate::config::AlertFormat::Slack => "slack",
            crate::config::AlertFormat::Json => "json",
        };
        let at = format!("alerts[{i}] ({format}, {})", target.origin());
        match crate::alerts::notify::post_once(&client, target, &body, &headers).await {
            Ok(status) if (200..300).contains(&status) => say!("{at}: HTTP {status}"),
            Ok(status) => {
                failed += 1;
                say!("{at}: HTTP {status} (not accepted)");
            }
            Err(e) => {
                failed += 1;
                say!("{at}: {e}");
            }
        }
    }
    i32::from(failed > 0)
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
    // A shop that cannot create objects itself: sprintlink creates a "Pedido" for each order.
    hub.add_definition(json!({"id": 42, "name": "Pedido", "fields": [
        {"label": "Pedido", "alias": "pedido", "type": "text", "required": true},
        {"label": "Valor", "alias": "valor", "type": "number", "required": false},
        {"label": "Canal", "alias": "canal", "type": "text", "required": false},
    ]}));
    let mut loja = SourceConfig::example("loja", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    loja.accept_types = Vec::new();
    loja.object_id = None;
    loja.object = Some(crate::config::ObjectSpec {
        definition_id: crate::config::DefinitionId::parse("42").map_err(|e| e.to_string())?,
        fields: [
            ("pedido", crate::config::FieldValue::Reference("/id".into())),
            (
                "valor",
                crate::config::FieldValue::Reference("/total_price".into()),
            ),
            ("canal", crate::config::FieldValue::Literal(json!("loja"))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    });
    loja.lead.id = Some("/customer/lead_id".into());
    config.sources.push(loja);
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
    let order = json!({"id": "ord_1001", "type": "orders/create", "total_price": "149.90", "customer": {"lead_id": 8475}});
    let samples = samples.iter().map(|(w, b)| (*w, "erp", b.clone())).chain([(
        "a shop order (object created)",
        "loja",
        order,
    )]);
    let client = reqwest::Client::new();
    for (what, source, body) in samples {
        let raw = body.to_string();
        let now = crate::store::now_ms() / 1000;
        let mut req = client
            .post(format!("{base}/webhooks/{source}"))
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
            "  {:<8} {:<10} object {:<5} {}",
            e["event_id"].as_str().unwrap_or(""),
            e["state"].as_str().unwrap_or(""),
            e["object_id"].as_str().unwrap_or("-"),
            e["reason"].as_str().unwrap_or("")
        );
    }
    say!("\nwhat the SprintHub stand-in received (POST /customobjects/objects/42):");
    for r in hub.creations() {
        say!("  {} -> HTTP {}", r.body, r.status);
    }
    say!("\nwhat the SprintHub stand-in received (POST /customobjects/link):");
    for r in hub.requests_to("/customobjects/link") {
        say!("  {} -> HTTP {}", r.body, r.status);
    }
    let linked = hub.linked_pairs().len();
    let created = hub.creations().len();
    say!(
        "\n{linked} link(s) made; {created} object created for ord_1001 and linked to its lead; the retried evt_1 was deduplicated, evt_3 is parked for an operator, evt_4 was ignored by type."
    );
    running.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    if linked == 4 && created == 1 {
        Ok(())
    } else {
        Err(format!(
            "expected 4 links and 1 created object, SprintHub got {linked} and {created}"
        ))
    }
}
