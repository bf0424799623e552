//! Typed configuration: built-in defaults, then the TOML file, then `SPRINTLINK_*` environment
//! overrides, then secret references resolved, then validated once at start-up.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment variables that start with `SPRINTLINK_` but are not configuration paths.
const NON_CONFIG_ENV: &[&str] = &["SPRINTLINK_CONFIG", "SPRINTLINK_LOG_FORMAT"];

/// The top-level sections, the only places `SPRINTLINK_*` overrides may write to.
const SECTIONS: &[&str] = &[
    "server",
    "storage",
    "sprinthub",
    "delivery",
    "admin",
    "lookup",
    "retention",
    "sources",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub sprinthub: SprintHubConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub lookup: LookupConfig,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// `[retention]`: read apart from the rest (`RetentionConfig::from_table`) so that each
    /// unreadable duration is its own line.
    #[serde(skip)]
    pub retention: RetentionConfig,
    /// Problems that do not stop the service (look-alike variables, short webhook keys): one
    /// line each, printed by `check-config` and logged at start-up.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    pub shutdown_timeout_ms: u64,
    /// A second address serving only `/healthz`, `/readyz`, `/metrics` and `/openapi.json`
    /// (for probes and scrapers); when set, `/metrics` and `/openapi.json` leave `listen`.
    pub internal_listen: Option<String>,
    /// Request body bytes held in memory across all requests at once; beyond it, 503.
    pub max_buffered_bytes: usize,
    /// Open connections on `listen`; beyond it, new connections wait in the kernel backlog.
    pub max_connections: usize,
    /// HTTP/1: time a client has to send a complete request head.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed (HTTP/1 and HTTP/2).
    pub idle_timeout_ms: u64,
    /// HTTP/2: concurrent streams per connection.
    pub http2_max_concurrent_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            max_body_bytes: 1_048_576,
            request_timeout_ms: 10_000,
            shutdown_timeout_ms: 25_000,
            internal_listen: None,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_connections: 1024,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            http2_max_concurrent_streams: 32,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// May hold a password, so it is a secret reference like the tokens.
    pub url: Secret,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("sqlite://sprintlink.db"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SprintHubConfig {
    pub base_url: String,
    pub instance: String,
    pub api_token: Secret,
    pub timeout_ms: u64,
    pub concurrency: usize,
    pub rate_limit_per_second: f64,
}

impl Default for SprintHubConfig {
    fn default() -> Self {
        Self {
            base_url: "https://sprinthub-api-master.sprinthub.app".into(),
            instance: String::new(),
            api_token: Secret::default(),
            timeout_ms: 15_000,
            concurrency: 8,
            rate_limit_per_second: 5.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub max_age_hours: f64,
    pub lease_seconds: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 12,
            initial_backoff_ms: 5_000,
            max_backoff_ms: 3_600_000,
            max_age_hours: 72.0,
            lease_seconds: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub token: Secret,
    /// The dashboard's session cookie carries `Secure` (sent over https only). Turn it off only
    /// for a plain-HTTP development setup; behind an https proxy (`X-Forwarded-Proto: https`) the
    /// cookie is `Secure` either way.
    pub secure_cookies: bool,
    /// Failed admin token checks (admin API bearer, dashboard bearer or login form) one client
    /// address may make within `failed_auth_window_seconds` before it is answered 429.
    pub failed_auth_limit: u32,
    pub failed_auth_window_seconds: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token: Secret::default(),
            secure_cookies: true,
            failed_auth_limit: 10,
            failed_auth_window_seconds: 300,
        }
    }
}

/// Caching of `lookup = "sprinthub"` results, so a burst of events for one customer costs one
/// search.
/// How long data is kept (SPEC section 9). `None` keeps forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Delete delivered events, with their attempts, this long after they were delivered.
    pub delivered: Option<Duration>,
    /// Delete dead and parked events this long after they were received.
    pub failed: Option<Duration>,
    /// Blank the bodies and response excerpts of delivered events this long after delivery.
    pub bodies: Option<Duration>,
    /// How often pruning runs.
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            delivered: None,
            failed: None,
            bodies: None,
            interval: Duration::from_secs(3600),
        }
    }
}

/// The longest retention accepted: 100 years (a longer one is a typo, and overflows nothing).
const MAX_RETENTION: Duration = Duration::from_secs(36_500 * 86_400);

impl RetentionConfig {
    /// Whether any rule removes anything.
    pub fn prunes(&self) -> bool {
        self.delivered.is_some() || self.failed.is_some() || self.bodies.is_some()
    }

    /// Reads the `[retention]` table, one error line per key that cannot be used.
    fn from_table(table: Option<toml::Value>, errors: &mut Vec<String>) -> RetentionConfig {
        let mut out = RetentionConfig::default();
        let Some(value) = table else {
            return out;
        };
        let Some(table) = value.as_table() else {
            errors.push("retention: must be a table ([retention])".into());
            return out;
        };
        for (key, value) in table {
            let slot = match key.as_str() {
                "delivered" => &mut out.delivered,
                "failed" => &mut out.failed,
                "bodies" => &mut out.bodies,
                "interval" => {
                    let mut interval = None;
                    read_duration(key, value, &mut interval, errors);
                    if let Some(d) = interval {
                        out.interval = d;
                    }
                    continue;
                }
                other => {
                    errors.push(format!(
                        "retention.{other}: unknown key; known: delivered, failed, bodies, interval"
                    ));
                    continue;
                }
            };
            read_duration(key, value, slot, errors);
        }
        out
    }
}

fn read_duration(
    key: &str,
    value: &toml::Value,
    slot: &mut Option<Duration>,
    errors: &mut Vec<String>,
) {
    let parsed = match value.as_str() {
        Some(text) => parse_duration(text).map_err(|e| format!("{text:?} {e}")),
        None => Err(format!("{value} is not a string")),
    };
    match parsed {
        Ok(d) => *slot = Some(d),
        Err(e) => errors.push(format!(
            "retention.{key}: {e}; write a whole number and one unit, like \"30d\", \"12h\", \"15m\" or \"90s\""
        )),
    }
}

/// A retention duration: a whole number of days, hours, minutes or seconds (`"30d"`, `"12h"`,
/// `"15m"`, `"90s"`), more than zero and at most 100 years.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("has no unit")?;
    let (digits, unit) = text.split_at(unit_at);
    if digits.is_empty() {
        return Err("does not start with a number".into());
    }
    let seconds_per: u64 = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err("is not a number followed by d, h, m or s".into()),
    };
    let n: u64 = digits.parse().map_err(|_| "is too long".to_string())?;
    let d = n
        .checked_mul(seconds_per)
        .map(Duration::from_secs)
        .filter(|d| *d <= MAX_RETENTION)
        .ok_or("is longer than 100 years")?;
    if d.is_zero() {
        return Err("is zero".into());
    }
    Ok(d)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupConfig {
    pub cache_ttl_seconds: u64,
    pub negative_cache_ttl_seconds: u64,
    pub cache_capacity: usize,
}

impl Default for LookupConfig {
    fn default() -> Self {
        Self {
            cache_ttl_seconds: 600,
            negative_cache_ttl_seconds: 60,
            cache_capacity: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Scheme {
    #[serde(rename = "standard-webhooks")]
    StandardWebhooks,
    #[serde(rename = "github")]
    Github,
    #[serde(rename = "stripe")]
    Stripe,
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::StandardWebhooks => "standard-webhooks",
            Scheme::Github => "github",
            Scheme::Stripe => "stripe",
            Scheme::HmacSha256 => "hmac-sha256",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Hex,
    Base64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    pub scheme: Scheme,
    #[serde(default)]
    pub secrets: Vec<Secret>,
    #[serde(default = "default_tolerance")]
    pub tolerance_seconds: u64,
    pub signature_header: Option<String>,
    pub encoding: Option<Encoding>,
    pub prefix: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    #[serde(default)]
    pub accept_types: Vec<String>,
    pub object_id: String,
    pub lead: LeadConfig,
}

fn default_tolerance() -> u64 {
    300
}

impl SourceConfig {
    /// The layout of SPEC section 3's example: Standard Webhooks, `{"id", "type": "object.created",
    /// "data": {"object_id", "lead_id"}}`. The demo and the tests start from it.
    pub fn example(name: &str, secret: &str) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            scheme: Scheme::StandardWebhooks,
            secrets: vec![Secret::new(secret)],
            tolerance_seconds: default_tolerance(),
            signature_header: None,
            encoding: None,
            prefix: None,
            event_id: Some("/id".into()),
            event_type: Some("/type".into()),
            accept_types: vec!["object.created".into()],
            object_id: "/data/object_id".into(),
            lead: LeadConfig {
                id: Some("/data/lead_id".into()),
                ..Default::default()
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LookupKind {
    Table,
    Sprinthub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeadField {
    Email,
    Whatsapp,
    Mobile,
}

impl LeadField {
    pub fn as_str(self) -> &'static str {
        match self {
            LeadField::Email => "email",
            LeadField::Whatsapp => "whatsapp",
            LeadField::Mobile => "mobile",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeadConfig {
    pub id: Option<String>,
    pub key: Option<String>,
    pub lookup: Option<LookupKind>,
    pub field: Option<LeadField>,
    #[serde(default)]
    pub create_missing: bool,
    #[serde(default)]
    pub create_fields: BTreeMap<String, String>,
}

/// The key bytes of a `whsec_<base64>` secret (the prefix is optional, as in the reference
/// libraries); `None` when it is not base64 or decodes to nothing.
pub fn whsec_key(secret: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|k| !k.is_empty())
}

/// A secret value. Written in the file literally, as `env:VAR` or as `file:/path`; resolved once
/// at load. Its `Debug` and `Display` never show the value, and neither does a type error: a
/// secret written as a number or a list is refused without echoing it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const NOT_A_STRING: &str = "a secret must be a string (the value, env:VAR or file:/path); the value given is not shown";
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(E::custom(NOT_A_STRING))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(E::custom(NOT_A_STRING))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(E::custom(NOT_A_STRING))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom(NOT_A_STRING))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(serde::de::Error::custom(NOT_A_STRING))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
                Err(serde::de::Error::custom(NOT_A_STRING))
            }
        }
        d.deserialize_any(V)
    }
}

/// A `file:` secret larger than this is refused (a secret is a line, not a file system dump).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Values that ship in examples and templates; as a secret they protect nothing. Compared
/// case-insensitively, after a `whsec_` prefix is taken off.
const PLACEHOLDERS: &[&str] = &[
    "replace_me",
    "replace-me",
    "replaceme",
    "changeme",
    "change_me",
    "change-me",
    "changeit",
    "secret",
    "password",
    "passw0rd",
    "token",
    "admin",
    "test",
    "example",
    "placeholder",
    "todo",
    "fixme",
    "xxx",
    "none",
    "null",
    "default",
];

/// Whether a secret value is one of the well-known placeholders (or carries one, such as
/// `postgres://u:REPLACE_ME@h/db` or `whsec_REPLACE_ME`).
pub fn is_placeholder(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    let bare = v.strip_prefix("whsec_").unwrap_or(&v);
    PLACEHOLDERS.contains(&bare)
        || [
            "replace_me",
            "replaceme",
            "replace-me",
            "changeme",
            "change_me",
        ]
        .iter()
        .any(|p| v.contains(p))
}

/// Upper bounds of the numeric settings (README, "Limits of the settings").
const HOUR_MS: u64 = 3_600_000;
const DAY_SECONDS: u64 = 86_400;
const WEEK_SECONDS: u64 = 7 * DAY_SECONDS;
const WEEK_MS: u64 = WEEK_SECONDS * 1000;
const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;
const MAX_CONCURRENCY: u64 = 1024;
const MAX_ATTEMPTS: u64 = 1000;
const MAX_CACHE_CAPACITY: u64 = 1_000_000;
const MAX_AGE_HOURS: f64 = 8760.0;
const MIN_RATE: f64 = 0.01;
const MAX_RATE: f64 = 10_000.0;

/// The shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;
/// Webhook keys shorter than this are accepted with a warning.
pub const MIN_WEBHOOK_KEY_BYTES: usize = 16;

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret's value, for the few places that must use it (signing, the outbound query).
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Replaces an `env:`/`file:` reference by the value it points to.
    fn resolve(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
        if let Some(var) = self.0.strip_prefix("env:") {
            let var = var.to_string();
            match env(&var) {
                Some(v) if !v.is_empty() => self.0 = v,
                _ => return Err(format!("environment variable {var} is not set or empty")),
            }
        } else if let Some(path) = self.0.strip_prefix("file:") {
            let path = path.to_string();
            match read_secret_file(&path) {
                Ok(v) => {
                    let v = v.strip_suffix('\n').unwrap_or(&v);
                    let v = v.strip_suffix('\r').unwrap_or(v);
                    if v.is_empty() {
                        return Err(format!("secret file {path} is empty"));
                    }
                    self.0 = v.to_string();
                }
                Err(e) => return Err(format!("cannot read secret file {path}: {e}")),
            }
        }
        Ok(())
    }
}

/// Reads at most `MAX_SECRET_FILE_BYTES` of a secret file; its contents never reach an error.
fn read_secret_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "larger than {} KiB, not a secret",
            MAX_SECRET_FILE_BYTES / 1024
        ));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<unset>"
        } else {
            "<redacted>"
        })
    }
}

/// Every problem found while loading, one readable line each.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// Where the configuration file is: the flag, then `$SPRINTLINK_CONFIG`, then `./sprintlink.toml`.
pub fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("SPRINTLINK_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("sprintlink.toml"))
}

impl Config {
    /// Loads the file (which may be absent only when it is the implicit default) and the process
    /// environment.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigErrors> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(e) => {
                return Err(ConfigErrors(vec![format!(
                    "cannot read config file {}: {e}",
                    path.display()
                )]));
            }
        };
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::from_parts(&text, &vars, &|name| std::env::var(name).ok())
    }

    /// Builds a configuration from TOML text, `SPRINTLINK_*` overrides and an environment for
    /// `env:` references. Tests use this directly.
    pub fn from_parts(
        toml_text: &str,
        overrides: &[(String, String)],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut root: toml::Table = toml_text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![format!("config file: {}", e.message())])
        })?;
        let mut errors = Vec::new();
        let mut look_alikes = Vec::new();
        for (name, value) in overrides {
            let Some(path) = name.strip_prefix("SPRINTLINK_") else {
                continue;
            };
            if NON_CONFIG_ENV.contains(&name.as_str()) || path.is_empty() {
                continue;
            }
            let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
            // Only paths into a known section are configuration; other SPRINTLINK_* variables
            // belong to tools around the service. A single `_` after a section may be a typo:
            // decided below, once the `env:` references are known.
            if !SECTIONS.contains(&segments[0].as_str()) {
                if let Some(section) = SECTIONS
                    .iter()
                    .find(|s| segments[0].starts_with(&format!("{s}_")))
                {
                    look_alikes.push((name.clone(), format!(
                        "{name}: not used as configuration; if it was meant as an override, levels are separated by two underscores, e.g. SPRINTLINK_{}__{}",
                        section.to_ascii_uppercase(),
                        segments[0][section.len() + 1..].to_ascii_uppercase()
                    )));
                }
                continue;
            }
            if let Err(e) = apply_override(&mut root, &segments, value) {
                errors.push(format!("{name}: {e}"));
            }
        }
        // A variable the configuration names through `env:` is an input, not a typo.
        let mut referenced = std::collections::HashSet::new();
        collect_env_refs(&toml::Value::Table(root.clone()), &mut referenced);
        let warnings: Vec<String> = look_alikes
            .into_iter()
            .filter(|(name, _)| !referenced.contains(name))
            .map(|(_, warning)| warning)
            .collect();
        let retention = RetentionConfig::from_table(root.remove("retention"), &mut errors);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let mut cfg: Config = toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigErrors(vec![format!("config: {}", e.message())]))?;
        cfg.retention = retention;
        let mut warnings = warnings;
        cfg.resolve_secrets(env, &mut errors);
        cfg.validate(&mut errors, &mut warnings);
        cfg.warnings = warnings;
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn resolve_secrets(&mut self, env: &dyn Fn(&str) -> Option<String>, errors: &mut Vec<String>) {
        if let Err(e) = self.sprinthub.api_token.resolve(env) {
            errors.push(format!("sprinthub.api_token: {e}"));
        }
        if let Err(e) = self.storage.url.resolve(env) {
            errors.push(format!("storage.url: {e}"));
        }
        if let Err(e) = self.admin.token.resolve(env) {
            errors.push(format!("admin.token: {e}"));
        }
        for source in &mut self.sources {
            for (i, secret) in source.secrets.iter_mut().enumerate() {
                if let Err(e) = secret.resolve(env) {
                    errors.push(format!("sources.{}.secrets[{i}]: {e}", source.name));
                }
            }
        }
    }

    fn validate(&self, errors: &mut Vec<String>, warnings: &mut Vec<String>) {
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            errors.push(format!(
                "server.listen: {:?} is not an address like 0.0.0.0:8080",
                self.server.listen
            ));
        }
        let mut bounded = |name: &str, value: u64, min: u64, max: u64, unit: &str| {
            if !(min..=max).contains(&value) {
                errors.push(format!(
                    "{name}: {value} is out of range; allowed {min} to {max}{unit}"
                ));
            }
        };
        let s = &self.server;
        bounded(
            "server.max_body_bytes",
            s.max_body_bytes as u64,
            1,
            MAX_BODY_BYTES,
            " bytes (16 MiB)",
        );
        bounded(
            "server.request_timeout_ms",
            s.request_timeout_ms,
            1,
            HOUR_MS,
            " ms (1 h)",
        );
        bounded(
            "server.shutdown_timeout_ms",
            s.shutdown_timeout_ms,
            0,
            HOUR_MS,
            " ms (1 h)",
        );
        let hub = &self.sprinthub;
        bounded(
            "sprinthub.timeout_ms",
            hub.timeout_ms,
            1,
            HOUR_MS,
            " ms (1 h)",
        );
        bounded(
            "sprinthub.concurrency",
            hub.concurrency as u64,
            1,
            MAX_CONCURRENCY,
            "",
        );
        let d = &self.delivery;
        bounded(
            "delivery.max_attempts",
            u64::from(d.max_attempts),
            1,
            MAX_ATTEMPTS,
            "",
        );
        bounded(
            "delivery.initial_backoff_ms",
            d.initial_backoff_ms,
            1,
            WEEK_MS,
            " ms (7 days)",
        );
        bounded(
            "delivery.max_backoff_ms",
            d.max_backoff_ms,
            1,
            WEEK_MS,
            " ms (7 days)",
        );
        bounded(
            "delivery.lease_seconds",
            d.lease_seconds,
            1,
            DAY_SECONDS,
            " s (1 day)",
        );
        let l = &self.lookup;
        bounded(
            "lookup.cache_ttl_seconds",
            l.cache_ttl_seconds,
            0,
            WEEK_SECONDS,
            " s (7 days)",
        );
        bounded(
            "lookup.negative_cache_ttl_seconds",
            l.negative_cache_ttl_seconds,
            0,
            DAY_SECONDS,
            " s (1 day)",
        );
        bounded(
            "lookup.cache_capacity",
            l.cache_capacity as u64,
            1,
            MAX_CACHE_CAPACITY,
            " entries",
        );
        for src in &self.sources {
            bounded(
                &format!("sources.{}.tolerance_seconds", src.name),
                src.tolerance_seconds,
                1,
                DAY_SECONDS,
                " s (1 day)",
            );
        }
        if let Some(internal) = &self.server.internal_listen {
            match internal.parse::<std::net::SocketAddr>() {
                Err(_) => errors.push(format!(
                    "server.internal_listen: {internal:?} is not an address like 127.0.0.1:9090"
                )),
                Ok(a) if a.port() != 0 && *internal == self.server.listen => {
                    errors.push("server.internal_listen: must differ from server.listen".into())
                }
                Ok(_) => {}
            }
        }
        if self.server.max_buffered_bytes / 2 < self.server.max_body_bytes {
            errors.push(format!(
                "server.max_buffered_bytes: {} must be at least twice server.max_body_bytes ({}), or bodies of the largest allowed size would not fit",
                self.server.max_buffered_bytes, self.server.max_body_bytes
            ));
        }
        for (name, value) in [
            ("max_connections", self.server.max_connections as u64),
            ("header_read_timeout_ms", self.server.header_read_timeout_ms),
            ("idle_timeout_ms", self.server.idle_timeout_ms),
            (
                "http2_max_concurrent_streams",
                u64::from(self.server.http2_max_concurrent_streams),
            ),
        ] {
            if value == 0 {
                errors.push(format!("server.{name}: must be greater than 0"));
            }
        }
        let url = self.storage.url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            // The value is not shown: it may be a password, or a file read by mistake.
            errors.push(
                "storage.url: must start with sqlite:, postgres:// or postgresql:// (the value is not shown)"
                    .into(),
            );
        }
        if is_placeholder(url) {
            errors.push(
                "storage.url: holds a placeholder from an example; set the real password".into(),
            );
        }
        if !(hub.base_url.starts_with("http://") || hub.base_url.starts_with("https://")) {
            errors.push(format!(
                "sprinthub.base_url: {:?} is not an http(s) URL",
                hub.base_url
            ));
        }
        if hub.instance.is_empty() {
            errors.push(
                "sprinthub.instance: not set (the `i` parameter, your SprintHub subdomain)".into(),
            );
        }
        if hub.api_token.is_empty() {
            errors.push("sprinthub.api_token: not set (use env:VAR or file:/path)".into());
        } else if is_placeholder(hub.api_token.expose()) {
            errors.push(
                "sprinthub.api_token: is a placeholder from an example; set the real token".into(),
            );
        }
        let rate = hub.rate_limit_per_second;
        if !(rate == 0.0 || (MIN_RATE..=MAX_RATE).contains(&rate)) {
            errors.push(format!(
                "sprinthub.rate_limit_per_second: must be 0 (unlimited) or between {MIN_RATE} and {MAX_RATE}"
            ));
        }
        if self.admin.failed_auth_limit == 0 {
            errors.push("admin.failed_auth_limit: must be at least 1".into());
        }
        if self.admin.failed_auth_window_seconds == 0 {
            errors.push("admin.failed_auth_window_seconds: must be greater than 0".into());
        }
        if d.max_backoff_ms < d.initial_backoff_ms {
            errors.push("delivery: need 0 < initial_backoff_ms <= max_backoff_ms".into());
        }
        if !(d.max_age_hours > 0.0 && d.max_age_hours <= MAX_AGE_HOURS) {
            errors.push(format!(
                "delivery.max_age_hours: must be a positive number of at most {MAX_AGE_HOURS} (1 year)"
            ));
        }
        if d.lease_seconds.saturating_mul(1000) < hub.timeout_ms.saturating_add(5_000) {
            errors.push(format!(
                "delivery.lease_seconds: {} s is too short for sprinthub.timeout_ms = {} ms; keep it at least 5 s longer than the timeout, or a slow attempt is sent twice",
                d.lease_seconds, hub.timeout_ms
            ));
        }
        let admin = self.admin.token.expose();
        if !admin.is_empty() {
            if is_placeholder(admin) {
                errors.push(
                    "admin.token: is a placeholder from an example; use a long random value (openssl rand -hex 32)"
                        .into(),
                );
            } else if admin.chars().count() < MIN_ADMIN_TOKEN_CHARS {
                errors.push(format!(
                    "admin.token: shorter than {MIN_ADMIN_TOKEN_CHARS} characters; use a long random value (openssl rand -hex 32)"
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.sources {
            let at = format!("sources.{}", s.name);
            if !valid_source_name(&s.name) {
                errors.push(format!(
                    "sources: name {:?} must match [a-z0-9_-]{{1,64}}",
                    s.name
                ));
            }
            if !seen.insert(s.name.clone()) {
                errors.push(format!("{at}: the name is used twice"));
            }
            if s.secrets.is_empty() {
                errors.push(format!("{at}.secrets: at least one secret is needed"));
            }
            for (i, secret) in s.secrets.iter().enumerate() {
                let value = secret.expose();
                let key_len = if s.scheme == Scheme::StandardWebhooks {
                    whsec_key(value).map(|k| k.len())
                } else {
                    Some(value.len())
                };
                if value.is_empty() {
                    errors.push(format!(
                        "{at}.secrets[{i}]: is empty; anyone could sign with an empty key"
                    ));
                } else if is_placeholder(value) {
                    errors.push(format!(
                        "{at}.secrets[{i}]: is a placeholder from an example; use a long random value"
                    ));
                } else if key_len.is_none() {
                    errors.push(format!(
                        "{at}.secrets[{i}]: a standard-webhooks secret must be whsec_ followed by base64"
                    ));
                } else if key_len.is_some_and(|n| n < MIN_WEBHOOK_KEY_BYTES) {
                    warnings.push(format!(
                        "{at}.secrets[{i}]: the key is {} bytes; {MIN_WEBHOOK_KEY_BYTES} or more random bytes are recommended",
                        key_len.unwrap_or(0)
                    ));
                }
            }
            if s.scheme == Scheme::HmacSha256 {
                if s.signature_header.as_deref().unwrap_or("").is_empty() {
                    errors.push(format!(
                        "{at}.signature_header: required for scheme hmac-sha256"
                    ));
                }
            } else if s.signature_header.is_some() || s.encoding.is_some() || s.prefix.is_some() {
                errors.push(format!(
                    "{at}: signature_header, encoding and prefix apply to scheme hmac-sha256 only"
                ));
            }
            let check_pointer = |errors: &mut Vec<String>, field: &str, p: &str| {
                if !(p.is_empty() || p.starts_with('/')) {
                    errors.push(format!(
                        "{at}.{field}: {p:?} is not a JSON pointer (it must start with /)"
                    ));
                }
            };
            check_pointer(errors, "object_id", &s.object_id);
            if let Some(p) = &s.event_id {
                check_pointer(errors, "event_id", p);
            }
            if let Some(p) = &s.event_type {
                check_pointer(errors, "event_type", p);
            }
            if !s.accept_types.is_empty() && s.event_type.is_none() {
                errors.push(format!(
                    "{at}.accept_types: needs event_type, the pointer to the type"
                ));
            }
            let lead = &s.lead;
            match (&lead.id, &lead.key) {
                (Some(_), Some(_)) => {
                    errors.push(format!("{at}.lead: set either id or key, not both"))
                }
                (None, None) => errors.push(format!(
                    "{at}.lead: set id (a pointer to lead ids) or key (with lookup)"
                )),
                (Some(p), None) => {
                    check_pointer(errors, "lead.id", p);
                    if lead.lookup.is_some() || lead.create_missing {
                        errors.push(format!(
                            "{at}.lead: lookup and create_missing need key, not id"
                        ));
                    }
                }
                (None, Some(p)) => {
                    check_pointer(errors, "lead.key", p);
                    match lead.lookup {
                        None => errors.push(format!("{at}.lead.lookup: required with key (table or sprinthub)")),
                        Some(LookupKind::Sprinthub) if lead.field.is_none() => errors.push(format!(
                            "{at}.lead.field: required for lookup = \"sprinthub\" (email, whatsapp or mobile)"
                        )),
                        Some(LookupKind::Table) if lead.create_missing => errors.push(format!(
                            "{at}.lead.create_missing: only works with lookup = \"sprinthub\""
                        )),
                        _ => {}
                    }
                    for (field, p) in &lead.create_fields {
                        check_pointer(errors, &format!("lead.create_fields.{field}"), p);
                    }
                }
            }
        }
    }

    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// A configuration that needs no file: used by `demo` and tests as a starting point.
    pub fn for_local(storage_url: &str, sprinthub_url: &str) -> Config {
        Config {
            server: ServerConfig {
                listen: "127.0.0.1:0".into(),
                ..Default::default()
            },
            storage: StorageConfig {
                url: Secret::new(storage_url),
            },
            sprinthub: SprintHubConfig {
                base_url: sprinthub_url.into(),
                instance: "demo".into(),
                api_token: Secret::new("local-token"),
                ..Default::default()
            },
            delivery: DeliveryConfig::default(),
            admin: AdminConfig::default(),
            lookup: LookupConfig::default(),
            sources: Vec::new(),
            retention: RetentionConfig::default(),
            warnings: Vec::new(),
        }
    }
}

fn valid_source_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Hides the password of a database URL so it can be shown in errors and logs: the one in the
/// user info (`user:***@host`) and query parameters such as `password=` and `sslpassword=`.
pub fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => head.to_string(),
        },
        None => head.to_string(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|kv| {
                let key = kv.split_once('=').map_or(kv, |(k, _)| k);
                let k = key.to_ascii_lowercase();
                if ["password", "secret", "token"]
                    .iter()
                    .any(|s| k.contains(s))
                {
                    format!("{key}=***")
                } else {
                    kv.to_string()
                }
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Whether an override path names a secret: `storage.url`, `sprinthub.api_token`,
/// `admin.token` or `sources.N.secrets`.
fn is_secret_path(path: &[String]) -> bool {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    matches!(
        p.as_slice(),
        ["storage", "url"] | ["sprinthub", "api_token"] | ["admin", "token"]
    ) || matches!(p.as_slice(), ["sources", i, "secrets"] if i.parse::<usize>().is_ok())
}

/// Every `VAR` of an `env:VAR` string anywhere in the tree.
fn collect_env_refs(v: &toml::Value, out: &mut std::collections::HashSet<String>) {
    match v {
        toml::Value::String(s) => {
            if let Some(var) = s.strip_prefix("env:") {
                out.insert(var.to_string());
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|i| collect_env_refs(i, out)),
        toml::Value::Table(t) => t.values().for_each(|i| collect_env_refs(i, out)),
        _ => {}
    }
}

/// Sets `value` at `path` in the TOML tree. A value that parses as TOML (number, bool, array)
/// is taken as such unless the file already holds a string there.
fn apply_override(root: &mut toml::Table, path: &[String], value: &str) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty path")?;
    let mut table = root;
    let mut i = 0;
    while i < parents.len() {
        let seg = &parents[i];
        let entry = table
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => table = t,
            toml::Value::Array(items) => {
                let idx: usize = parents
                    .get(i + 1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("{seg} is a list: give an index, e.g. {seg}__0__..."))?;
                let item = items
                    .get_mut(idx)
                    .ok_or_else(|| format!("{seg} has no entry {idx}"))?;
                i += 1;
                match item {
                    toml::Value::Table(t) => table = t,
                    _ => return Err(format!("{seg}[{idx}] is not a table")),
                }
            }
            _ => return Err(format!("{seg} is not a table")),
        }
        i += 1;
    }
    let existing_is_string = matches!(table.get(last), Some(toml::Value::String(_)));
    if is_secret_path(path) {
        // A secret is text whatever it looks like: a numeric token stays a string, and a value
        // is never parsed as TOML (whose errors would quote it). `secrets` takes one secret.
        let v = toml::Value::String(value.to_string());
        let v = if last == "secrets" {
            toml::Value::Array(vec![v])
        } else {
            v
        };
        table.insert(last.clone(), v);
        return Ok(());
    }
    let parsed = if existing_is_string {
        toml::Value::String(value.to_string())
    } else {
        format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()))
    };
    table.insert(last.clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[sprinthub]
instance = "acme"
api_token = "env:TOKEN"
[[sources]]
name = "erp"
scheme = "standard-webhooks"
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
object_id = "/data/object_id"
[sources.lead]
id = "/data/lead_id"
"#;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "t0ken".to_string())
    }

    #[test]
    fn loads_defaults_and_resolves_env_secret() {
        let cfg = Config::from_parts(BASE, &[], &env).unwrap();
        assert_eq!(cfg.server.listen, "0.0.0.0:8080");
        assert_eq!(cfg.sprinthub.api_token.expose(), "t0ken");
        assert_eq!(cfg.delivery.max_attempts, 12);
        assert_eq!(format!("{:?}", cfg.sprinthub.api_token), "<redacted>");
    }

    #[test]
    fn env_overrides_nested_values_and_lists() {
        let o = vec![
            (
                "SPRINTLINK_SERVER__LISTEN".to_string(),
                "127.0.0.1:9000".to_string(),
            ),
            (
                "SPRINTLINK_SPRINTHUB__CONCURRENCY".to_string(),
                "3".to_string(),
            ),
            (
                "SPRINTLINK_SPRINTHUB__INSTANCE".to_string(),
                "123".to_string(),
            ),
            (
                "SPRINTLINK_SOURCES__0__TOLERANCE_SECONDS".to_string(),
                "60".to_string(),
            ),
            ("SPRINTLINK_CONFIG".to_string(), "x.toml".to_string()),
            ("SPRINTLINK_SKIP_PG".to_string(), "1".to_string()),
        ];
        let cfg = Config::from_parts(BASE, &o, &env).unwrap();
        assert_eq!(cfg.server.listen, "127.0.0.1:9000");
        assert_eq!(cfg.sprinthub.concurrency, 3);
        assert_eq!(cfg.sprinthub.instance, "123");
        assert_eq!(cfg.sources[0].tolerance_seconds, 60);
    }

    #[test]
    fn edge_limits_have_defaults_and_are_validated() {
        let cfg = Config::from_parts(BASE, &[], &env).unwrap();
        assert_eq!(cfg.server.internal_listen, None);
        assert_eq!(cfg.server.max_buffered_bytes, 64 * 1024 * 1024);
        assert_eq!(cfg.server.max_connections, 1024);
        assert_eq!(cfg.server.http2_max_concurrent_streams, 32);
        let o = vec![(
            "SPRINTLINK_SERVER__INTERNAL_LISTEN".to_string(),
            "127.0.0.1:9090".to_string(),
        )];
        let cfg = Config::from_parts(BASE, &o, &env).unwrap();
        assert_eq!(
            cfg.server.internal_listen.as_deref(),
            Some("127.0.0.1:9090")
        );
        let text = format!(
            "[server]\nlisten = \"0.0.0.0:8080\"\ninternal_listen = \"0.0.0.0:8080\"\nmax_connections = 0\nheader_read_timeout_ms = 0\nidle_timeout_ms = 0\nhttp2_max_concurrent_streams = 0\nmax_buffered_bytes = 1000000\n{BASE}"
        );
        let e = Config::from_parts(&text, &[], &env)
            .unwrap_err()
            .to_string();
        for key in [
            "server.internal_listen: must differ",
            "server.max_connections",
            "server.header_read_timeout_ms",
            "server.idle_timeout_ms",
            "server.http2_max_concurrent_streams",
            "server.max_buffered_bytes",
        ] {
            assert!(e.contains(key), "{key} not reported in: {e}");
        }
        let text = format!("[server]\ninternal_listen = \"metrics\"\n{BASE}");
        let e = Config::from_parts(&text, &[], &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.internal_listen"), "{e}");
    }

    #[test]
    fn a_single_underscore_after_a_section_is_a_warning() {
        let o = vec![("SPRINTLINK_SERVER_LISTEN".to_string(), "x".to_string())];
        let cfg = Config::from_parts(BASE, &o, &env).unwrap();
        assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
        assert!(
            cfg.warnings[0].contains("SPRINTLINK_SERVER__LISTEN"),
            "{:?}",
            cfg.warnings
        );
        assert_eq!(cfg.server.listen, "0.0.0.0:8080");
    }

    #[test]
    fn file_secret_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, "from-file\n").unwrap();
        let text = BASE.replace("env:TOKEN", &format!("file:{}", p.display()));
        let cfg = Config::from_parts(&text, &[], &env).unwrap();
        assert_eq!(cfg.sprinthub.api_token.expose(), "from-file");
    }

    #[test]
    fn reports_every_problem_one_line_each() {
        let text = r#"
[server]
listen = "nowhere"
[sprinthub]
api_token = "env:MISSING"
[[sources]]
name = "Bad Name"
scheme = "hmac-sha256"
secrets = []
object_id = "data/object_id"
[sources.lead]
key = "/email"
"#;
        let errs = Config::from_parts(text, &[], &env).unwrap_err().0;
        let all = errs.join("\n");
        for needle in [
            "server.listen",
            "sprinthub.instance",
            "MISSING",
            "must match",
            "secrets: at least one",
            "signature_header",
            "not a JSON pointer",
            "lead.lookup",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        assert!(errs.iter().all(|l| !l.contains('\n')));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = format!("{BASE}\n[delivery]\nmax_attempt = 3\n");
        let e = Config::from_parts(&text, &[], &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_attempt"), "{e}");
    }

    #[test]
    fn redacts_database_password() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    fn with_source_secret(secret: &str, scheme: &str) -> String {
        BASE.replace(
            r#"scheme = "standard-webhooks"
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]"#,
            &format!("scheme = \"{scheme}\"\nsecrets = [\"{secret}\"]"),
        )
    }

    #[test]
    fn empty_and_placeholder_webhook_secrets_are_rejected() {
        for (secret, scheme) in [
            ("", "github"),
            ("", "stripe"),
            ("REPLACE_ME", "github"),
            ("changeme", "stripe"),
            ("Secret", "github"),
            ("whsec_REPLACE_ME", "standard-webhooks"),
        ] {
            let text = with_source_secret(secret, scheme);
            let e = Config::from_parts(&text, &[], &env)
                .unwrap_err()
                .to_string();
            assert!(e.contains("sources.erp.secrets[0]"), "{secret:?}: {e}");
        }
        // A webhook secret from an env: reference that resolves to a placeholder is caught too.
        let text = with_source_secret("env:HOOK", "github");
        let placeholder = |n: &str| match n {
            "TOKEN" => Some("t0ken".to_string()),
            "HOOK" => Some("password".to_string()),
            _ => None,
        };
        let e = Config::from_parts(&text, &[], &placeholder)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sources.erp.secrets[0]"), "{e}");
        assert!(!e.contains("password\""), "{e}");
        // A real one passes.
        let text = with_source_secret("a-long-random-github-secret-1234", "github");
        Config::from_parts(&text, &[], &env).unwrap();
    }

    #[test]
    fn short_or_placeholder_admin_tokens_are_rejected() {
        for token in ["x", "short-token-15c", "REPLACE_ME", "ChangeMe", "password"] {
            let text = format!("{BASE}\n[admin]\ntoken = \"{token}\"\n");
            let e = Config::from_parts(&text, &[], &env)
                .unwrap_err()
                .to_string();
            assert!(e.contains("admin.token"), "{token:?}: {e}");
            if token.len() > 1 {
                assert!(!e.contains(token), "the token is not echoed: {e}");
            }
        }
        let text = format!("{BASE}\n[admin]\ntoken = \"sixteen-chars-ok\"\n");
        Config::from_parts(&text, &[], &env).unwrap();
        // No admin token at all keeps the admin API off, as before.
        Config::from_parts(BASE, &[], &env).unwrap();
    }

    #[test]
    fn a_numeric_secret_override_is_taken_as_a_string() {
        // BASE without an api_token line: the override is the only place it is set.
        let text = BASE.replace("api_token = \"env:TOKEN\"\n", "");
        for (name, value) in [
            ("SPRINTLINK_SPRINTHUB__API_TOKEN", "73198642501937"),
            ("SPRINTLINK_ADMIN__TOKEN", "1234567890123456789"),
        ] {
            let o = vec![(name.to_string(), value.to_string())];
            let text = if name.contains("ADMIN") { BASE } else { &text };
            let cfg = Config::from_parts(text, &o, &env).unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = if name.contains("ADMIN") {
                cfg.admin.token.expose().to_string()
            } else {
                cfg.sprinthub.api_token.expose().to_string()
            };
            assert_eq!(got, value);
        }
        // A literal non-string secret in the file is refused without showing it.
        let text = BASE.replace("api_token = \"env:TOKEN\"", "api_token = 73198642501937");
        let e = Config::from_parts(&text, &[], &env)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("73198642501937"), "{e}");
        assert!(e.contains("string"), "{e}");
    }

    #[test]
    fn a_placeholder_database_password_is_rejected() {
        let text = format!(
            "{BASE}\n[storage]\nurl = \"postgres://sprintlink:REPLACE_ME@db/sprintlink\"\n"
        );
        let e = Config::from_parts(&text, &[], &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage.url"), "{e}");
        assert!(!e.contains("REPLACE_ME"), "{e}");
    }

    #[test]
    fn a_wrong_file_target_is_not_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("not-a-url");
        std::fs::write(&p, "root:Zq-DISTINCT-file-c0ntent:0:0\n").unwrap();
        let text = format!("{BASE}\n[storage]\nurl = \"file:{}\"\n", p.display());
        let e = Config::from_parts(&text, &[], &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("storage.url"), "{e}");
        assert!(!e.contains("DISTINCT"), "{e}");
    }

    #[test]
    fn redacts_query_passwords() {
        let r = redact_url("postgres://u@h/db?sslmode=verify-full&password=Pw-SECRET-1&x=1");
        assert!(!r.contains("Pw-SECRET-1"), "{r}");
        assert!(r.contains("sslmode=verify-full"), "{r}");
        let r = redact_url("postgresql://h/db?PASSWORD=abc&sslpassword=def");
        assert!(!r.contains("abc") && !r.contains("def"), "{r}");
        let r = redact_url("postgres://u:p%40ss@h/db?password=q");
        assert!(!r.contains("p%40ss") && !r.contains("=q"), "{r}");
    }

    #[test]
    fn retention_durations_parse_into_durations() {
        for (text, secs) in [
            ("30d", 30 * 86_400),
            ("12h", 12 * 3_600),
            ("15m", 900),
            ("90s", 90),
            ("1s", 1),
            ("36500d", 36_500 * 86_400),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for text in [
            "",
            "3 days",
            "3",
            "d",
            "30D",
            "1.5h",
            "-1d",
            "0s",
            "1d12h",
            " 1d",
            "1d ",
            "36501d",
            "99999999999999999999d",
            "1w",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn retention_absent_keeps_forever_and_each_bad_key_is_one_line() {
        let c = Config::from_parts(BASE, &[], &env).unwrap();
        assert_eq!(c.retention, RetentionConfig::default());
        assert!(!c.retention.prunes());
        assert_eq!(c.retention.interval, Duration::from_secs(3600));
        let text = format!(
            "{BASE}\n[retention]\ndelivered = \"30d\"\nbodies = \"7d\"\ninterval = \"15m\"\n"
        );
        let c = Config::from_parts(&text, &[], &env).unwrap();
        assert_eq!(
            c.retention.delivered,
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(c.retention.bodies, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(c.retention.failed, None);
        assert_eq!(c.retention.interval, Duration::from_secs(900));
        let o = vec![(
            "SPRINTLINK_RETENTION__FAILED".to_string(),
            "180d".to_string(),
        )];
        let c = Config::from_parts(&text, &o, &env).unwrap();
        assert_eq!(c.retention.failed, Some(Duration::from_secs(180 * 86_400)));
        let bad = format!(
            "{BASE}\n[retention]\ndelivered = \"3 days\"\nfailed = 30\nbodies = \"7d\"\nkeep = \"1d\"\n"
        );
        let e = Config::from_parts(&bad, &[], &env).unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
        assert!(
            e.0.iter()
                .any(|l| l.starts_with("retention.delivered: \"3 days\"")),
            "{e}"
        );
        assert!(
            e.0.iter().any(|l| l.starts_with("retention.failed:")),
            "{e}"
        );
        assert!(e.0.iter().any(|l| l.starts_with("retention.keep:")), "{e}");
    }

    #[test]
    fn huge_durations_are_rejected_not_overflowed() {
        for (section, key, value) in [
            ("delivery", "lease_seconds", "9223372036854776"),
            ("delivery", "lease_seconds", "86401"),
            ("delivery", "max_backoff_ms", "604800001"),
            ("delivery", "max_age_hours", "8761"),
            ("delivery", "max_attempts", "100001"),
            ("server", "request_timeout_ms", "3600001"),
            ("server", "shutdown_timeout_ms", "3600001"),
            ("server", "max_body_bytes", "17179869184"),
            ("sprinthub", "timeout_ms", "9223372036854775807"),
            ("sprinthub", "concurrency", "100000"),
            ("sprinthub", "rate_limit_per_second", "1e-300"),
            ("lookup", "cache_ttl_seconds", "9223372036854775807"),
            (
                "lookup",
                "negative_cache_ttl_seconds",
                "9223372036854775807",
            ),
            ("lookup", "cache_capacity", "1000000000000"),
        ] {
            let o = vec![(
                format!(
                    "SPRINTLINK_{}__{}",
                    section.to_uppercase(),
                    key.to_uppercase()
                ),
                value.to_string(),
            )];
            let e = Config::from_parts(BASE, &o, &env)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("{section}.{key}")),
                "{key}={value}: {e}"
            );
        }
        let text = BASE.replace(
            "object_id = \"/data/object_id\"",
            "object_id = \"/data/object_id\"\ntolerance_seconds = 9223372036854775807",
        );
        let e = Config::from_parts(&text, &[], &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tolerance_seconds"), "{e}");
        // The largest allowed values load.
        let o: Vec<(String, String)> = [
            ("SPRINTLINK_DELIVERY__LEASE_SECONDS", "86400"),
            ("SPRINTLINK_DELIVERY__MAX_BACKOFF_MS", "604800000"),
            ("SPRINTLINK_DELIVERY__MAX_AGE_HOURS", "8760"),
            ("SPRINTLINK_SPRINTHUB__TIMEOUT_MS", "3600000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Config::from_parts(BASE, &o, &env).unwrap();
    }

    #[test]
    fn a_variable_named_by_an_env_reference_is_not_a_typo() {
        let text = format!("{BASE}\n[admin]\ntoken = \"env:SPRINTLINK_ADMIN_TOKEN\"\n");
        let token = "a-long-admin-token-0123456789";
        let o = vec![("SPRINTLINK_ADMIN_TOKEN".to_string(), token.to_string())];
        let vars = |n: &str| match n {
            "TOKEN" => Some("t0ken".to_string()),
            "SPRINTLINK_ADMIN_TOKEN" => Some(token.to_string()),
            _ => None,
        };
        let cfg = Config::from_parts(&text, &o, &vars).unwrap();
        assert_eq!(cfg.admin.token.expose(), token);
    }
}
