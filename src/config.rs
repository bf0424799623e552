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
    "telemetry",
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
    /// `[telemetry]`: where traces are exported (nothing is, by default).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `[retention]`: read apart from the rest (`RetentionConfig::from_table`) so that each
    /// unreadable duration is its own line.
    #[serde(skip)]
    pub retention: RetentionConfig,
    /// `[[alerts]]` as written; parsed into `alerts` at load (each problem its own line).
    #[serde(default, rename = "alerts")]
    raw_alerts: Vec<RawAlert>,
    /// Where notifications go (SPEC 10), parsed and validated.
    #[serde(skip)]
    pub alerts: Vec<AlertTarget>,
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
    /// Reverse proxies whose `X-Forwarded-For` is believed (SPEC 6.3); empty: it is ignored.
    pub trusted_proxies: Vec<Cidr>,
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
            trusted_proxies: Vec::new(),
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

/// `[telemetry]` (SPEC 10, tracing): OpenTelemetry traces over OTLP/HTTP with the JSON
/// encoding. Without `otlp_endpoint` nothing is recorded and no exporter runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's base URL, e.g. `http://collector:4318`; spans go to `{it}/v1/traces`.
    /// http(s) with a host, without credentials, query or fragment (checked at start-up).
    pub otlp_endpoint: Option<String>,
    /// The resource attribute `service.name`.
    pub service_name: String,
    /// Finished spans waiting for the exporter; beyond it spans are dropped (and counted).
    pub queue_size: usize,
    /// How long one export request may take before its batch is dropped.
    pub export_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "sprintlink".into(),
            queue_size: 2048,
            export_timeout_ms: 5_000,
        }
    }
}

/// What is wrong with an OTLP endpoint, if anything. The value itself is never quoted (it might
/// hold a credential); `url_origin` shows the part that may be printed.
impl Config {
    /// `[telemetry]`'s endpoint and service name (its numbers are checked with the others).
    fn validate_telemetry(&self, errors: &mut Vec<String>) {
        let t = &self.telemetry;
        if let Some(url) = &t.otlp_endpoint
            && let Some(problem) = otlp_endpoint_problem(url)
        {
            errors.push(format!(
                "telemetry.otlp_endpoint: {problem} (given: {})",
                url_origin(url)
            ));
        }
        if t.service_name.trim().is_empty()
            || t.service_name.len() > 255
            || t.service_name.contains(char::is_control)
        {
            errors.push(
                "telemetry.service_name: must be 1 to 255 characters without control characters"
                    .into(),
            );
        }
    }
}

fn otlp_endpoint_problem(url: &str) -> Option<&'static str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some("not a URL; write it like http://collector:4318");
    };
    if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
        return Some("only http and https are supported (OTLP/HTTP)");
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Some(
            "holds credentials (user:password@); the collector must be reachable without them",
        );
    }
    if rest.contains(['?', '#']) {
        return Some("must not have a query or fragment; /v1/traces is appended to it");
    }
    if authority.is_empty() || url.contains(char::is_whitespace) {
        return Some("has no host, or holds whitespace");
    }
    None
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

/// A duration of the configuration (retention, alerts): a whole number of days, hours,
/// minutes or seconds (`"30d"`, `"12h"`, `"15m"`, `"90s"`), more than zero and at most 100 years.
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

/// The `scheme` of a source: a scheme, or a preset that fills in a scheme's keys (SPEC 6.2).
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
    #[serde(rename = "hmac")]
    Hmac,
    #[serde(rename = "token")]
    Token,
    #[serde(rename = "basic")]
    Basic,
    #[serde(rename = "shopify")]
    Shopify,
    #[serde(rename = "woocommerce")]
    Woocommerce,
    #[serde(rename = "typeform")]
    Typeform,
    #[serde(rename = "slack")]
    Slack,
    #[serde(rename = "hotmart")]
    Hotmart,
    /// Any other name: loading reports it (with the name) and such a source verifies nothing.
    #[serde(other)]
    Unknown,
}

impl Scheme {
    /// Every accepted name, in the order the README lists them.
    pub const NAMES: &[&str] = &[
        "standard-webhooks",
        "github",
        "stripe",
        "hmac-sha256",
        "hmac",
        "token",
        "basic",
        "shopify",
        "woocommerce",
        "typeform",
        "slack",
        "hotmart",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::StandardWebhooks => "standard-webhooks",
            Scheme::Github => "github",
            Scheme::Stripe => "stripe",
            Scheme::HmacSha256 => "hmac-sha256",
            Scheme::Hmac => "hmac",
            Scheme::Token => "token",
            Scheme::Basic => "basic",
            Scheme::Shopify => "shopify",
            Scheme::Woocommerce => "woocommerce",
            Scheme::Typeform => "typeform",
            Scheme::Slack => "slack",
            Scheme::Hotmart => "hotmart",
            Scheme::Unknown => "unknown",
        }
    }

    /// The generic HMAC schemes and the presets built on them.
    pub fn is_hmac(self) -> bool {
        matches!(
            self,
            Scheme::Hmac
                | Scheme::HmacSha256
                | Scheme::Shopify
                | Scheme::Woocommerce
                | Scheme::Typeform
                | Scheme::Slack
        )
    }

    pub fn is_token(self) -> bool {
        matches!(self, Scheme::Token | Scheme::Hotmart)
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
    /// hmac schemes: where the signature is (exactly one of the two).
    pub signature_header: Option<String>,
    pub signature_query: Option<String>,
    pub encoding: Option<Encoding>,
    /// hmac: before the encoded signature; token: before the token in `token_header`.
    pub prefix: Option<String>,
    pub algorithm: Option<Algorithm>,
    /// hmac: the template of what is signed (default `{body}`).
    pub signed_content: Option<String>,
    pub timestamp_header: Option<String>,
    pub timestamp_unit: Option<TimestampUnit>,
    /// token: where the token is (exactly one of the two).
    pub token_header: Option<String>,
    pub token_query: Option<String>,
    pub event_id: Option<ValueRef>,
    pub event_type: Option<ValueRef>,
    #[serde(default)]
    pub accept_types: Vec<String>,
    /// Where the sender put the id of the object it created. Exclusive with `object`.
    #[serde(default)]
    pub object_id: Option<ValueRef>,
    /// `[sources.object]`: sprintlink creates the object from the event. Exclusive with
    /// `object_id`.
    #[serde(default)]
    pub object: Option<ObjectSpec>,
    pub lead: LeadConfig,
    /// Only these addresses may post (SPEC 6.3); empty: any address.
    #[serde(default)]
    pub allow_ips: Vec<Cidr>,
}

/// How a source's events name their custom object, one of the two (check-config refuses
/// both and neither).
/// What a source without either key (refused by check-config) reads: nothing.
static NO_OBJECT_ID: ValueRef = ValueRef::Pointer(String::new());

#[derive(Debug, Clone, Copy)]
pub enum ObjectRule<'a> {
    /// The sender created it; the reference says where its id is.
    FromBody(&'a ValueRef),
    /// sprintlink creates it.
    Create(&'a ObjectSpec),
}

/// `[sources.object]`: the custom object sprintlink creates for each event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectSpec {
    pub definition_id: DefinitionId,
    /// Field alias -> where its value comes from.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldValue>,
}

/// A custom object definition's id, written as a number (`42`) or a string; kept as text and
/// used in a URL path, so only `[A-Za-z0-9_-]{1,64}` is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DefinitionId(String);

impl DefinitionId {
    pub fn parse(text: &str) -> Result<DefinitionId, String> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(DefinitionId(text.to_string()))
        } else {
            Err(format!(
                "{text:?} is not a definition id (a number, or 1 to 64 of A-Z a-z 0-9 _ -)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DefinitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DefinitionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) if n > 0 => n.to_string(),
            Raw::Number(n) => {
                return Err(serde::de::Error::custom(format!(
                    "definition_id {n} is not a definition id (a positive number or a string)"
                )));
            }
            Raw::Text(t) => t,
        };
        DefinitionId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The value of one field of a created object.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// A value reference into the request (a JSON pointer, `header:` or `query:`); one that
    /// finds nothing leaves the field out.
    Reference(ValueRef),
    /// `{ value = ... }`: this value, for every event.
    Literal(serde_json::Value),
}

impl<'de> Deserialize<'de> for FieldValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Literal {
            value: serde_json::Value,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Reference(String),
            Literal(Literal),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Reference(r)) => Ok(FieldValue::Reference(ValueRef::parse(&r))),
            Ok(Raw::Literal(l)) => Ok(FieldValue::Literal(l.value)),
            Err(_) => Err(serde::de::Error::custom(
                "a field is a value reference (\"/pointer\") or a literal ({ value = ... })",
            )),
        }
    }
}

fn default_tolerance() -> u64 {
    300
}

impl SourceConfig {
    /// Which of `object_id` and `[sources.object]` this source uses. A validated configuration
    /// has exactly one; `object` wins should both be set.
    pub fn object_rule(&self) -> ObjectRule<'_> {
        match (&self.object, &self.object_id) {
            (Some(spec), _) => ObjectRule::Create(spec),
            (None, Some(p)) => ObjectRule::FromBody(p),
            (None, None) => ObjectRule::FromBody(&NO_OBJECT_ID),
        }
    }

    /// The layout of SPEC section 3's example: Standard Webhooks, `{"id", "type": "object.created",
    /// "data": {"object_id", "lead_id"}}`. The demo and the tests start from it.
    pub fn example(name: &str, secret: &str) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            scheme: Scheme::StandardWebhooks,
            secrets: vec![Secret::new(secret)],
            tolerance_seconds: default_tolerance(),
            signature_header: None,
            signature_query: None,
            encoding: None,
            prefix: None,
            algorithm: None,
            signed_content: None,
            timestamp_header: None,
            timestamp_unit: None,
            token_header: None,
            token_query: None,
            event_id: Some("/id".into()),
            event_type: Some("/type".into()),
            accept_types: vec!["object.created".into()],
            object_id: Some("/data/object_id".into()),
            object: None,
            lead: LeadConfig {
                id: Some("/data/lead_id".into()),
                ..Default::default()
            },
            allow_ips: Vec::new(),
        }
    }

    /// Every value reference of the source, with the key that holds it (for messages).
    pub fn references(&self) -> Vec<(String, &ValueRef)> {
        let mut out: Vec<(String, &ValueRef)> = Vec::new();
        out.extend(self.object_id.iter().map(|r| ("object_id".into(), r)));
        if let Some(spec) = &self.object {
            out.extend(spec.fields.iter().filter_map(|(alias, v)| match v {
                FieldValue::Reference(r) => Some((format!("object.fields.{alias}"), r)),
                FieldValue::Literal(_) => None,
            }));
        }
        out.extend(self.event_id.iter().map(|r| ("event_id".into(), r)));
        out.extend(self.event_type.iter().map(|r| ("event_type".into(), r)));
        out.extend(self.lead.id.iter().map(|r| ("lead.id".into(), r)));
        out.extend(self.lead.key.iter().map(|r| ("lead.key".into(), r)));
        out.extend(
            self.lead
                .create_fields
                .iter()
                .map(|(f, r)| (format!("lead.create_fields.{f}"), r)),
        );
        out
    }

    /// The (lower-case) header names some `header:` reference of the source names: the
    /// headers stored with an event, so the worker and a replay see what the request carried.
    pub fn referenced_headers(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .references()
            .into_iter()
            .filter_map(|(_, r)| match r {
                ValueRef::Header(n) => Some(n.as_str()),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The query parameter names some `query:` reference of the source names.
    pub fn referenced_query(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .references()
            .into_iter()
            .filter_map(|(_, r)| match r {
                ValueRef::Query(n) => Some(n.as_str()),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Headers that carry a credential for this source: a reference may not name them, so
    /// they are never stored or shown.
    pub fn credential_headers(&self) -> Vec<String> {
        let mut names: Vec<String> = ["authorization", "proxy-authorization", "cookie"]
            .into_iter()
            .map(String::from)
            .collect();
        // A preset's keys count as if written out.
        let mut s = self.clone();
        s.apply_preset();
        let scheme: &[&str] = match s.scheme {
            Scheme::StandardWebhooks => &["webhook-signature", "svix-signature"],
            Scheme::Github => &["x-hub-signature-256", "x-hub-signature"],
            Scheme::Stripe => &["stripe-signature"],
            _ => &[],
        };
        names.extend(scheme.iter().map(|n| n.to_string()));
        names.extend(s.signature_header.iter().map(|h| h.to_ascii_lowercase()));
        names.extend(s.token_header.iter().map(|h| h.to_ascii_lowercase()));
        names
    }

    /// Whether `ip` may post to this source.
    pub fn allows(&self, ip: Option<std::net::IpAddr>) -> bool {
        self.allow_ips.is_empty()
            || ip.is_some_and(|ip| self.allow_ips.iter().any(|c| c.contains(ip)))
    }
}

/// Where a value of the request is read (SPEC 6.1): a JSON pointer into the parsed body
/// (`/data/object_id`), a request header (`header:NAME`, compared case-insensitively) or a
/// parameter of the webhook URL's query string (`query:NAME`). Parsed once, at load; a pointer
/// that does not start with `/` is reported by the validation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ValueRef {
    Pointer(String),
    /// The header name in lower case.
    Header(String),
    Query(String),
}

impl ValueRef {
    pub fn parse(text: &str) -> ValueRef {
        if let Some(name) = strip_prefix_ignore_case(text, "header:") {
            ValueRef::Header(name.trim().to_ascii_lowercase())
        } else if let Some(name) = strip_prefix_ignore_case(text, "query:") {
            ValueRef::Query(name.to_string())
        } else {
            ValueRef::Pointer(text.to_string())
        }
    }

    /// What is wrong with the reference, if anything.
    fn problem(&self) -> Option<String> {
        match self {
            ValueRef::Pointer(p) if !(p.is_empty() || p.starts_with('/')) => Some(format!(
                "{p:?} is not a JSON pointer (it must start with /), header:NAME or query:NAME"
            )),
            ValueRef::Header(n) if n.is_empty() || http_token(n).is_none() => {
                Some(format!("{self} does not name a valid header"))
            }
            ValueRef::Query(n) if n.is_empty() => Some("query: needs a parameter name".into()),
            _ => None,
        }
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// The name when it is an HTTP token (RFC 9110 `tchar`s).
fn http_token(name: &str) -> Option<&str> {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        .then_some(name)
}

impl From<&str> for ValueRef {
    fn from(text: &str) -> ValueRef {
        ValueRef::parse(text)
    }
}

impl fmt::Display for ValueRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueRef::Pointer(p) => f.write_str(p),
            ValueRef::Header(n) => write!(f, "header:{n}"),
            ValueRef::Query(n) => write!(f, "query:{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for ValueRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| ValueRef::parse(&s))
    }
}

/// An address block, `203.0.113.0/24` or `2001:db8::/32` (a bare address is one host). Parsed
/// at load; bits past the prefix are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the block. An IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Cidr, String> {
        let bad =
            || format!("{text:?} is not an address block like 203.0.113.0/24 or 2001:db8::/32");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|n| *n <= max).ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Every address block written in the file that does not parse, one line each naming where it
/// is, so check-config reports them all (a failed deserialization would name only the first,
/// and not its source).
fn check_cidrs(root: &toml::Table, errors: &mut Vec<String>) {
    let mut check = |at: &str, v: Option<&toml::Value>| {
        let Some(toml::Value::Array(items)) = v else {
            return;
        };
        for item in items {
            match item {
                toml::Value::String(s) => {
                    if let Err(e) = s.parse::<Cidr>() {
                        errors.push(format!("{at}: {e}"));
                    }
                }
                other => errors.push(format!("{at}: {other} is not a string")),
            }
        }
    };
    if let Some(toml::Value::Table(server)) = root.get("server") {
        check("server.trusted_proxies", server.get("trusted_proxies"));
    }
    if let Some(toml::Value::Array(sources)) = root.get("sources") {
        for (i, src) in sources.iter().enumerate() {
            let toml::Value::Table(t) = src else { continue };
            let name = t
                .get("name")
                .and_then(|n| n.as_str())
                .map_or_else(|| i.to_string(), str::to_string);
            check(&format!("sources.{name}.allow_ips"), t.get("allow_ips"));
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
    pub id: Option<ValueRef>,
    pub key: Option<ValueRef>,
    pub lookup: Option<LookupKind>,
    pub field: Option<LeadField>,
    #[serde(default)]
    pub create_missing: bool,
    #[serde(default)]
    pub create_fields: BTreeMap<String, ValueRef>,
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
        check_cidrs(&root, &mut errors);
        let retention = RetentionConfig::from_table(root.remove("retention"), &mut errors);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        // The names as written, for the line that reports an unknown scheme.
        let scheme_names: Vec<String> = root
            .get("sources")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|t| {
                        t.get("scheme")
                            .and_then(|s| s.as_str())
                            .unwrap_or_default()
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut cfg: Config = toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigErrors(vec![format!("config: {}", e.message())]))?;
        for (i, source) in cfg.sources.iter_mut().enumerate() {
            if source.scheme == Scheme::Unknown {
                errors.push(format!(
                    "sources.{}.scheme: unknown scheme or preset {:?}; use one of {}",
                    source.name,
                    scheme_names.get(i).map(String::as_str).unwrap_or_default(),
                    Scheme::NAMES.join(", ")
                ));
            }
            source.apply_preset();
        }
        cfg.retention = retention;
        // An empty endpoint (an override that turns tracing off) is no endpoint.
        if cfg
            .telemetry
            .otlp_endpoint
            .as_deref()
            .is_some_and(|u| u.trim().is_empty())
        {
            cfg.telemetry.otlp_endpoint = None;
        }
        let mut warnings = warnings;
        cfg.resolve_secrets(env, &mut errors);
        cfg.parse_alerts(&mut errors);
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
        for (i, alert) in self.raw_alerts.iter_mut().enumerate() {
            if let Err(e) = alert.url.resolve(env) {
                errors.push(format!("alerts[{i}].url: {e}"));
            }
            if let Some(secret) = &mut alert.secret
                && let Err(e) = secret.resolve(env)
            {
                errors.push(format!("alerts[{i}].secret: {e}"));
            }
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
        self.validate_telemetry(errors);
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
        let t = &self.telemetry;
        bounded(
            "telemetry.queue_size",
            t.queue_size as u64,
            1,
            1_000_000,
            " spans",
        );
        bounded(
            "telemetry.export_timeout_ms",
            t.export_timeout_ms,
            1,
            60_000,
            " ms (1 min)",
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
                let ed25519 = s.scheme == Scheme::StandardWebhooks && value.starts_with("whpk_");
                let key_len = if ed25519 {
                    Some(32)
                } else if s.scheme == Scheme::StandardWebhooks {
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
                } else if ed25519 {
                    let valid = whpk_key(value)
                        .is_some_and(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).is_ok());
                    if !valid {
                        errors.push(format!(
                            "{at}.secrets[{i}]: a whpk_ key must be whpk_ followed by the base64 of a 32-byte Ed25519 public key"
                        ));
                    }
                } else if key_len.is_none() {
                    errors.push(format!(
                        "{at}.secrets[{i}]: a standard-webhooks secret must be whsec_ followed by base64 (or whpk_ for an Ed25519 public key)"
                    ));
                } else if s.scheme == Scheme::Basic && !value.contains(':') {
                    errors.push(format!(
                        "{at}.secrets[{i}]: a basic secret is written user:password (the value is not shown)"
                    ));
                } else if s.scheme == Scheme::Basic
                    && value.split_once(':').is_some_and(|(_, p)| p.is_empty())
                {
                    errors.push(format!(
                        "{at}.secrets[{i}]: the password after user: is empty"
                    ));
                } else if key_len.is_some_and(|n| n < MIN_WEBHOOK_KEY_BYTES) {
                    warnings.push(format!(
                        "{at}.secrets[{i}]: the key is {} bytes; {MIN_WEBHOOK_KEY_BYTES} or more random bytes are recommended",
                        key_len.unwrap_or(0)
                    ));
                }
            }
            if s.scheme != Scheme::Unknown
                && let Err(lines) = s.scheme_spec()
            {
                errors.extend(lines);
            }
            let credentials = s.credential_headers();
            let credential_query = s.credential_query();
            for (field, r) in s.references() {
                if let Some(problem) = r.problem() {
                    errors.push(format!("{at}.{field}: {problem}"));
                }
                if let ValueRef::Query(q) = r
                    && Some(q.as_str()) == credential_query
                {
                    errors.push(format!(
                        "{at}.{field}: query:{q} names the parameter that carries the credential, which is never stored or shown"
                    ));
                }
                if let ValueRef::Header(n) = r
                    && credentials.contains(n)
                {
                    errors.push(format!(
                        "{at}.{field}: {r} names a credential header; it is never stored, so it cannot be a value"
                    ));
                }
            }
            match (&s.object_id, &s.object) {
                (Some(_), Some(_)) => errors.push(format!(
                    "{at}: set either object_id (the sender created the object) or [sources.object] (sprintlink creates it), not both"
                )),
                (None, None) => errors.push(format!(
                    "{at}: set object_id (where the sender put the object's id) or [sources.object] (sprintlink creates the object)"
                )),
                (Some(_), None) => {}
                (None, Some(spec)) => {
                    if spec.fields.is_empty() {
                        errors.push(format!(
                            "{at}.object.fields: empty; map the object's field aliases to values"
                        ));
                    }
                    for alias in spec.fields.keys() {
                        if alias.trim().is_empty() {
                            errors.push(format!("{at}.object.fields: an alias is empty"));
                        }
                    }
                }
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
                (Some(_), None) => {
                    if lead.lookup.is_some() || lead.create_missing {
                        errors.push(format!(
                            "{at}.lead: lookup and create_missing need key, not id"
                        ));
                    }
                }
                (None, Some(_)) => {
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
            telemetry: TelemetryConfig::default(),
            retention: RetentionConfig::default(),
            raw_alerts: Vec::new(),
            alerts: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Alerts (SPEC 10): where a person is told that something needs them.

/// What an alert is about. The names are the `on` values and the `kind` of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertKind {
    /// A link, an object creation or a lead resolution gave up.
    Dead,
    /// An event was parked, at ingest or at lead resolution.
    Parked,
    /// SprintHub refused the API token or instance.
    Credentials,
    /// SprintHub said too many requests.
    Throttled,
    /// The oldest pending link or resolution is older than `backlog_age`.
    Backlog,
    /// A group commit failed, or storage did not answer a check.
    Storage,
}

impl AlertKind {
    pub const ALL: [AlertKind; 6] = [
        AlertKind::Dead,
        AlertKind::Parked,
        AlertKind::Credentials,
        AlertKind::Throttled,
        AlertKind::Backlog,
        AlertKind::Storage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Dead => "dead",
            AlertKind::Parked => "parked",
            AlertKind::Credentials => "credentials",
            AlertKind::Throttled => "throttled",
            AlertKind::Backlog => "backlog",
            AlertKind::Storage => "storage",
        }
    }

    pub fn parse(text: &str) -> Option<AlertKind> {
        AlertKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// A bit of its own, for sets of kinds that are read on the request path.
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a notification is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertFormat {
    /// `{"text": "..."}`, what a Slack incoming webhook takes.
    Slack,
    /// `{"type": "sprintlink.alert", ...}`, signed with Standard Webhooks headers.
    Json,
}

/// One `[[alerts]]` entry, parsed.
#[derive(Debug, Clone)]
pub struct AlertTarget {
    /// A credential (a Slack webhook URL is one): never logged; `origin()` is what may be shown.
    pub url: Secret,
    pub format: AlertFormat,
    /// `whsec_...`, for `json` only.
    pub secret: Option<Secret>,
    pub on: Vec<AlertKind>,
    pub backlog_age: std::time::Duration,
    pub min_interval: std::time::Duration,
}

const DEFAULT_BACKLOG_AGE: std::time::Duration = std::time::Duration::from_secs(15 * 60);
const DEFAULT_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5 * 60);

impl AlertTarget {
    /// A target with the defaults: every kind, `backlog_age = "15m"`, `min_interval = "5m"`.
    pub fn new(url: &str, format: AlertFormat, secret: Option<&str>) -> AlertTarget {
        AlertTarget {
            url: Secret::new(url),
            format,
            secret: secret.map(Secret::new),
            on: AlertKind::ALL.to_vec(),
            backlog_age: DEFAULT_BACKLOG_AGE,
            min_interval: DEFAULT_MIN_INTERVAL,
        }
    }

    pub fn wants(&self, kind: AlertKind) -> bool {
        self.on.contains(&kind)
    }

    /// `scheme://host[:port]`: the part of the URL that may be printed (the path of a Slack
    /// webhook URL is its secret).
    pub fn origin(&self) -> String {
        url_origin(self.url.expose())
    }
}

/// `scheme://host[:port]` of a URL, without user info, path or query.
pub fn url_origin(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}")
        }
        None => "(not a URL)".to_string(),
    }
}

/// `[[alerts]]` as written: strings, so that every problem of an entry gets its own line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlert {
    url: Secret,
    format: Option<String>,
    secret: Option<Secret>,
    on: Option<Vec<String>>,
    backlog_age: Option<String>,
    min_interval: Option<String>,
}

/// A URL a notification can be posted to: http or https with a host.
fn is_http_url(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https")
        && !host.is_empty()
        && !host.contains(char::is_whitespace)
}

impl Config {
    /// `[[alerts]]` into `alerts`; the URL and the secret are never part of a message.
    fn parse_alerts(&mut self, errors: &mut Vec<String>) {
        let raw = std::mem::take(&mut self.raw_alerts);
        for (i, a) in raw.into_iter().enumerate() {
            let at = format!("alerts[{i}]");
            let mut ok = true;
            let mut fail = |line: String| {
                errors.push(line);
                ok = false;
            };
            if !a.url.is_empty()
                && !a.url.expose().starts_with("env:")
                && !is_http_url(a.url.expose())
            {
                fail(format!(
                    "{at}.url: not an http(s) URL with a host (the value is not shown)"
                ));
            }
            if a.url.is_empty() {
                fail(format!("{at}.url: required"));
            }
            let format = match a.format.as_deref() {
                Some("slack") => Some(AlertFormat::Slack),
                Some("json") => Some(AlertFormat::Json),
                Some(other) => {
                    fail(format!(
                        "{at}.format: unknown format {other:?}; use slack or json"
                    ));
                    None
                }
                None => {
                    fail(format!("{at}.format: required: slack or json"));
                    None
                }
            };
            match (format, &a.secret) {
                (Some(AlertFormat::Json), None) => fail(format!(
                    "{at}.secret: required with format = \"json\" (whsec_ followed by base64)"
                )),
                (Some(AlertFormat::Json), Some(s)) if whsec_key(s.expose()).is_none() => {
                    fail(format!(
                        "{at}.secret: not a whsec_ secret (whsec_ followed by base64; the value is not shown)"
                    ))
                }
                (Some(AlertFormat::Json), Some(s)) if is_placeholder(s.expose()) => fail(format!(
                    "{at}.secret: a placeholder value; generate a real secret"
                )),
                (Some(AlertFormat::Slack), Some(_)) => fail(format!(
                    "{at}.secret: used only with format = \"json\"; a slack URL carries its own secret"
                )),
                _ => {}
            }
            let mut on = Vec::new();
            match &a.on {
                None => on = AlertKind::ALL.to_vec(),
                Some(names) if names.is_empty() => fail(format!(
                    "{at}.on: empty; name at least one of {}",
                    kind_names()
                )),
                Some(names) => {
                    for name in names {
                        match AlertKind::parse(name) {
                            Some(k) if !on.contains(&k) => on.push(k),
                            Some(_) => {}
                            None => fail(format!(
                                "{at}.on: unknown kind {name:?}; use {}",
                                kind_names()
                            )),
                        }
                    }
                }
            }
            let mut duration = |key: &str,
                                text: &Option<String>,
                                default: std::time::Duration,
                                max_days: u64|
             -> std::time::Duration {
                let Some(text) = text else {
                    return default;
                };
                match parse_duration(text) {
                    Ok(d) if d.as_secs() >= 1 && d.as_secs() <= max_days * DAY_SECONDS => d,
                    Ok(_) => {
                        fail(format!(
                            "{at}.{key}: {text:?} is out of range; allowed 1s to {max_days}d"
                        ));
                        default
                    }
                    Err(e) => {
                        fail(format!(
                            "{at}.{key}: {text:?} {e}; write a whole number and a unit, e.g. 90s, 15m, 12h or 30d"
                        ));
                        default
                    }
                }
            };
            let backlog_age = duration("backlog_age", &a.backlog_age, DEFAULT_BACKLOG_AGE, 30);
            let min_interval = duration("min_interval", &a.min_interval, DEFAULT_MIN_INTERVAL, 1);
            if let (true, Some(format)) = (ok, format) {
                self.alerts.push(AlertTarget {
                    url: a.url,
                    format,
                    secret: a.secret,
                    on,
                    backlog_age,
                    min_interval,
                });
            }
        }
    }
}

fn kind_names() -> String {
    AlertKind::ALL.map(AlertKind::as_str).join(", ")
}

// ---------------------------------------------------------------------------------------------
// Schemes and presets (SPEC 6.2): the raw keys of a source parsed once into what verification
// needs, so the request path never looks at a string key or a template again.

/// hmac `algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Sha1,
    #[default]
    Sha256,
    Sha512,
}

/// hmac `timestamp_unit`: what the `timestamp_header` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum TimestampUnit {
    #[default]
    #[serde(rename = "s")]
    Seconds,
    #[serde(rename = "ms")]
    Milliseconds,
}

/// Where a credential travels: a request header or a parameter of the webhook URL's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialAt {
    Header(String),
    Query(String),
}

/// One piece of an hmac `signed_content` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentPart {
    Text(String),
    Body,
    /// The `timestamp_header` value exactly as sent.
    Timestamp,
    /// A request header's value (name compared case-insensitively).
    Header(String),
}

/// A parsed `signed_content` template: `{body}`, `{timestamp}`, `{header:NAME}` and text
/// (`{{` and `}}` are literal braces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedContent(Vec<ContentPart>);

impl SignedContent {
    pub fn parse(template: &str) -> Result<SignedContent, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(c) = rest.chars().next() {
            if let Some(r) = rest.strip_prefix("{{") {
                text.push('{');
                rest = r;
            } else if let Some(r) = rest.strip_prefix("}}") {
                text.push('}');
                rest = r;
            } else if c == '}' {
                return Err("a lone } (write }} for a literal brace)".into());
            } else if c == '{' {
                let end = rest
                    .find('}')
                    .ok_or("a { without its } (write {{ for a literal brace)")?;
                let name = &rest[1..end];
                let part = match name {
                    "body" => ContentPart::Body,
                    "timestamp" => ContentPart::Timestamp,
                    _ => match name.strip_prefix("header:") {
                        Some(h) if is_header_name(h) => ContentPart::Header(h.to_string()),
                        Some(h) => return Err(format!("{{header:{h}}} does not name a header")),
                        None => {
                            return Err(format!(
                                "unknown placeholder {{{name}}}; use {{body}}, {{timestamp}} or {{header:NAME}}"
                            ));
                        }
                    },
                };
                if !text.is_empty() {
                    parts.push(ContentPart::Text(std::mem::take(&mut text)));
                }
                parts.push(part);
                rest = &rest[end + 1..];
            } else {
                text.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        if !text.is_empty() {
            parts.push(ContentPart::Text(text));
        }
        Ok(SignedContent(parts))
    }

    pub fn parts(&self) -> &[ContentPart] {
        &self.0
    }

    pub fn uses(&self, part: &ContentPart) -> bool {
        self.0.contains(part)
    }
}

impl Default for SignedContent {
    fn default() -> Self {
        SignedContent(vec![ContentPart::Body])
    }
}

/// An HTTP header name: one or more token characters (RFC 9110).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A generic HMAC, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HmacSpec {
    pub algorithm: Algorithm,
    pub signature: CredentialAt,
    pub encoding: Encoding,
    pub prefix: String,
    pub content: SignedContent,
    /// The timestamp header and its unit; `tolerance_seconds` applies.
    pub timestamp: Option<(String, TimestampUnit)>,
}

/// A static token, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub at: CredentialAt,
    /// Before the token in the header, e.g. `Bearer `; empty for a query parameter.
    pub prefix: String,
}

/// How a source's requests are authenticated, parsed once from its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemeSpec {
    StandardWebhooks,
    Github,
    Stripe,
    Hmac(HmacSpec),
    Token(TokenSpec),
    Basic,
}

/// What a preset fills in (SPEC 6.2's table). Explicit keys win.
struct Preset {
    signature_header: Option<&'static str>,
    encoding: Option<Encoding>,
    prefix: Option<&'static str>,
    signed_content: Option<&'static str>,
    timestamp_header: Option<&'static str>,
    token_header: Option<&'static str>,
    event_id: Option<&'static str>,
    event_type: Option<&'static str>,
}

const NO_PRESET: Preset = Preset {
    signature_header: None,
    encoding: None,
    prefix: None,
    signed_content: None,
    timestamp_header: None,
    token_header: None,
    event_id: None,
    event_type: None,
};

fn preset(scheme: Scheme) -> Option<Preset> {
    Some(match scheme {
        Scheme::Shopify => Preset {
            signature_header: Some("X-Shopify-Hmac-Sha256"),
            encoding: Some(Encoding::Base64),
            event_id: Some("header:X-Shopify-Webhook-Id"),
            event_type: Some("header:X-Shopify-Topic"),
            ..NO_PRESET
        },
        Scheme::Woocommerce => Preset {
            signature_header: Some("X-WC-Webhook-Signature"),
            encoding: Some(Encoding::Base64),
            event_id: Some("header:X-WC-Webhook-Delivery-ID"),
            event_type: Some("header:X-WC-Webhook-Topic"),
            ..NO_PRESET
        },
        Scheme::Typeform => Preset {
            signature_header: Some("Typeform-Signature"),
            encoding: Some(Encoding::Base64),
            prefix: Some("sha256="),
            event_id: Some("/event_id"),
            event_type: Some("/event_type"),
            ..NO_PRESET
        },
        // No event id reference: the id is the SHA-256 of the body (a Slack retry repeats it).
        Scheme::Slack => Preset {
            signature_header: Some("X-Slack-Signature"),
            encoding: Some(Encoding::Hex),
            prefix: Some("v0="),
            signed_content: Some("v0:{timestamp}:{body}"),
            timestamp_header: Some("X-Slack-Request-Timestamp"),
            event_type: Some("/type"),
            ..NO_PRESET
        },
        Scheme::Hotmart => Preset {
            token_header: Some("X-HOTMART-HOTTOK"),
            event_id: Some("/id"),
            event_type: Some("/event"),
            ..NO_PRESET
        },
        _ => return None,
    })
}

fn fill(slot: &mut Option<String>, value: Option<&str>) {
    if slot.is_none() {
        *slot = value.map(str::to_string);
    }
}

/// A key that is set and not empty.
fn set(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

impl SourceConfig {
    /// Fills in the keys the source's preset implies, where they are not set explicitly:
    /// the scheme's keys and the `event_id` / `event_type` references. Loading does this once;
    /// a configuration built in code may call it too (it changes nothing the second time).
    pub fn apply_preset(&mut self) {
        let Some(p) = preset(self.scheme) else {
            return;
        };
        fill(&mut self.signature_header, p.signature_header);
        fill(&mut self.prefix, p.prefix);
        fill(&mut self.signed_content, p.signed_content);
        fill(&mut self.timestamp_header, p.timestamp_header);
        fill(&mut self.token_header, p.token_header);
        if self.event_id.is_none() {
            self.event_id = p.event_id.map(ValueRef::parse);
        }
        if self.event_type.is_none() {
            self.event_type = p.event_type.map(ValueRef::parse);
        }
        if self.encoding.is_none() {
            self.encoding = p.encoding;
        }
    }

    /// The query parameter that carries this source's credential, if any: never stored, so no
    /// `query:` reference may name it.
    pub fn credential_query(&self) -> Option<&str> {
        if self.scheme.is_hmac() {
            set(&self.signature_query)
        } else if self.scheme.is_token() {
            set(&self.token_query)
        } else {
            None
        }
    }

    /// Parses the scheme keys (after the preset) into what verification needs, or every
    /// problem, one line each.
    pub fn scheme_spec(&self) -> Result<SchemeSpec, Vec<String>> {
        let mut s = self.clone();
        s.apply_preset();
        let at = format!("sources.{}", s.name);
        let mut errors = Vec::new();
        let hmac_keys = [
            ("signature_header", s.signature_header.is_some()),
            ("signature_query", s.signature_query.is_some()),
            ("encoding", s.encoding.is_some()),
            ("algorithm", s.algorithm.is_some()),
            ("signed_content", s.signed_content.is_some()),
            ("timestamp_header", s.timestamp_header.is_some()),
            ("timestamp_unit", s.timestamp_unit.is_some()),
        ];
        let token_keys = [
            ("token_header", s.token_header.is_some()),
            ("token_query", s.token_query.is_some()),
        ];
        let misplaced = |errors: &mut Vec<String>, keys: &[(&str, bool)], family: &str| {
            for (key, present) in keys {
                if *present {
                    errors.push(format!(
                        "{at}.{key}: applies to {family} only, not to scheme {}",
                        s.scheme.as_str()
                    ));
                }
            }
        };
        let spec = match s.scheme {
            Scheme::StandardWebhooks | Scheme::Github | Scheme::Stripe | Scheme::Basic => {
                misplaced(&mut errors, &hmac_keys, "the hmac schemes");
                misplaced(&mut errors, &token_keys, "scheme token");
                misplaced(
                    &mut errors,
                    &[("prefix", s.prefix.is_some())],
                    "the hmac and token schemes",
                );
                match s.scheme {
                    Scheme::StandardWebhooks => SchemeSpec::StandardWebhooks,
                    Scheme::Github => SchemeSpec::Github,
                    Scheme::Stripe => SchemeSpec::Stripe,
                    _ => SchemeSpec::Basic,
                }
            }
            scheme if scheme.is_hmac() => {
                misplaced(&mut errors, &token_keys, "scheme token");
                if scheme == Scheme::HmacSha256
                    && s.algorithm.is_some_and(|a| a != Algorithm::Sha256)
                {
                    errors.push(format!(
                        "{at}.algorithm: scheme hmac-sha256 is sha256; use scheme = \"hmac\" for another algorithm"
                    ));
                }
                let signature = match (set(&s.signature_header), set(&s.signature_query)) {
                    (Some(_), Some(_)) => {
                        errors.push(format!(
                            "{at}: signature_header and signature_query are both set; the signature is sent in one of them"
                        ));
                        None
                    }
                    (None, None) => {
                        errors.push(format!(
                            "{at}.signature_header: required for scheme {} (or signature_query, for a signature in the URL)",
                            scheme.as_str()
                        ));
                        None
                    }
                    (Some(h), None) => Some(CredentialAt::Header(h.to_string())),
                    (None, Some(q)) => Some(CredentialAt::Query(q.to_string())),
                };
                let content = match s.signed_content.as_deref() {
                    None => Some(SignedContent::default()),
                    Some(t) => match SignedContent::parse(t) {
                        Ok(c) if !c.uses(&ContentPart::Body) => {
                            errors.push(format!(
                                "{at}.signed_content: must include {{body}}, or the signature would not cover the body"
                            ));
                            None
                        }
                        Ok(c) => Some(c),
                        Err(e) => {
                            errors.push(format!("{at}.signed_content: {e}"));
                            None
                        }
                    },
                };
                let timestamp = match set(&s.timestamp_header) {
                    Some(h) if is_header_name(h) => {
                        Some((h.to_string(), s.timestamp_unit.unwrap_or_default()))
                    }
                    Some(_) => {
                        errors.push(format!("{at}.timestamp_header: is not a header name"));
                        None
                    }
                    None => {
                        if content
                            .as_ref()
                            .is_some_and(|c| c.uses(&ContentPart::Timestamp))
                        {
                            errors.push(format!(
                                "{at}.timestamp_header: required because signed_content uses {{timestamp}}"
                            ));
                        }
                        if s.timestamp_unit.is_some() {
                            errors.push(format!("{at}.timestamp_unit: needs timestamp_header"));
                        }
                        None
                    }
                };
                match (signature, content) {
                    (Some(signature), Some(content)) => SchemeSpec::Hmac(HmacSpec {
                        algorithm: s.algorithm.unwrap_or_default(),
                        signature,
                        encoding: s.encoding.unwrap_or_default(),
                        prefix: s.prefix.clone().unwrap_or_default(),
                        content,
                        timestamp,
                    }),
                    _ => SchemeSpec::Basic,
                }
            }
            scheme if scheme.is_token() => {
                misplaced(&mut errors, &hmac_keys, "the hmac schemes");
                let at_where = match (set(&s.token_header), set(&s.token_query)) {
                    (Some(_), Some(_)) => {
                        errors.push(format!(
                            "{at}: token_header and token_query are both set; the token is sent in one of them"
                        ));
                        None
                    }
                    (None, None) => {
                        errors.push(format!(
                            "{at}.token_header: required for scheme {} (or token_query, for a token in the URL)",
                            scheme.as_str()
                        ));
                        None
                    }
                    (Some(h), None) => Some(CredentialAt::Header(h.to_string())),
                    (None, Some(q)) => {
                        if s.prefix.is_some() {
                            errors.push(format!(
                                "{at}.prefix: applies to token_header only, not to token_query"
                            ));
                        }
                        Some(CredentialAt::Query(q.to_string()))
                    }
                };
                match at_where {
                    Some(at) => SchemeSpec::Token(TokenSpec {
                        at,
                        prefix: s.prefix.clone().unwrap_or_default(),
                    }),
                    None => SchemeSpec::Basic,
                }
            }
            _ => {
                errors.push(format!(
                    "{at}.scheme: unknown scheme or preset; use one of {}",
                    Scheme::NAMES.join(", ")
                ));
                SchemeSpec::Basic
            }
        };
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(errors)
        }
    }
}

/// The Ed25519 public key of a `whpk_<base64>` secret: `None` unless it is 32 bytes of base64
/// (whether the bytes are a valid point is the verifier's to say).
pub fn whpk_key(secret: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let b64 = secret.strip_prefix("whpk_")?;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()?
        .try_into()
        .ok()
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
    fn object_fields_parse_into_references_and_literals() {
        let text = BASE.replace(
            "object_id = \"/data/object_id\"\n",
            "[sources.object]\ndefinition_id = 42\nfields = { pedido = \"/id\", canal = { value = \"loja\" }, qtd = { value = 2 } }\n",
        );
        let cfg = Config::from_parts(&text, &[], &env).unwrap();
        let ObjectRule::Create(spec) = cfg.sources[0].object_rule() else {
            panic!("a source with [sources.object] creates its object");
        };
        assert_eq!(spec.definition_id.as_str(), "42");
        assert_eq!(spec.fields["pedido"], FieldValue::Reference("/id".into()));
        assert_eq!(
            spec.fields["canal"],
            FieldValue::Literal(serde_json::json!("loja"))
        );
        assert_eq!(
            spec.fields["qtd"],
            FieldValue::Literal(serde_json::json!(2))
        );
        // A string id works too; one that cannot go in a URL path does not.
        let named = text.replace("definition_id = 42", "definition_id = \"pedido_v2\"");
        assert!(Config::from_parts(&named, &[], &env).is_ok());
        for bad in [
            "definition_id = \"a/b\"",
            "definition_id = 0",
            "definition_id = \"\"",
        ] {
            let t = text.replace("definition_id = 42", bad);
            assert!(Config::from_parts(&t, &[], &env).is_err(), "{bad}");
        }
        let t = text.replace("{ value = 2 }", "{ val = 2 }");
        let e = Config::from_parts(&t, &[], &env).unwrap_err().to_string();
        assert!(e.contains("a literal ({ value = ... })"), "{e}");
        let t = text.replace("pedido = \"/id\"", "pedido = \"id\"");
        let e = Config::from_parts(&t, &[], &env).unwrap_err().to_string();
        assert!(e.contains("sources.erp.object.fields.pedido"), "{e}");
        let t = text.replace(
            "fields = { pedido = \"/id\", canal = { value = \"loja\" }, qtd = { value = 2 } }",
            "fields = {}",
        );
        let e = Config::from_parts(&t, &[], &env).unwrap_err().to_string();
        assert!(e.contains("sources.erp.object.fields: empty"), "{e}");
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
    fn references_are_parsed_once_and_checked() {
        // BASE ends in [sources.lead].
        let text = format!("{BASE}create_fields = {{ email = \"query:mail\" }}\n");
        let text = text.replace(
            "object_id = \"/data/object_id\"",
            "object_id = \"Header:X-Object-Id\"\nevent_id = \"query:id\"\nevent_type = \"header:X-Topic\"",
        );
        let text = text.replace(
            "id = \"/data/lead_id\"",
            "key = \"/c/email\"\nlookup = \"table\"",
        );
        let cfg = Config::from_parts(&text, &[], &env).unwrap();
        let s = &cfg.sources[0];
        assert_eq!(s.object_id, Some(ValueRef::Header("x-object-id".into())));
        assert_eq!(s.event_id, Some(ValueRef::Query("id".into())));
        assert_eq!(s.lead.key, Some(ValueRef::Pointer("/c/email".into())));
        assert_eq!(s.referenced_headers(), vec!["x-object-id", "x-topic"]);
        assert_eq!(s.referenced_query(), vec!["id", "mail"]);
        assert_eq!(
            s.object_id.as_ref().map(ValueRef::to_string).as_deref(),
            Some("header:x-object-id")
        );

        let bad = BASE
            .replace(
                "object_id = \"/data/object_id\"",
                "object_id = \"header:Authorization\"\nevent_id = \"header:webhook-signature\"\nevent_type = \"header:\"",
            )
            .replace("id = \"/data/lead_id\"", "id = \"query:\"");
        let errs = Config::from_parts(&bad, &[], &env).unwrap_err().0;
        let all = errs.join("\n");
        for needle in [
            "sources.erp.object_id: header:authorization names a credential header",
            "sources.erp.event_id: header:webhook-signature names a credential header",
            "sources.erp.event_type: header: does not name a valid header",
            "sources.erp.lead.id: query: needs a parameter name",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
    }

    #[test]
    fn address_blocks_parse_and_each_bad_one_is_a_line() {
        let c: Cidr = "203.0.113.0/24".parse().unwrap();
        assert!(c.contains("203.0.113.77".parse().unwrap()));
        assert!(!c.contains("203.0.114.1".parse().unwrap()));
        assert!(
            c.contains("::ffff:203.0.113.1".parse().unwrap()),
            "mapped IPv4"
        );
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(!v6.contains("203.0.113.1".parse().unwrap()));
        let host: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(host.to_string(), "127.0.0.1/32");
        assert!(host.contains("127.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "::/129",
            "x",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let text = BASE.replace(
            "object_id = \"/data/object_id\"",
            "object_id = \"/data/object_id\"\nallow_ips = [\"10.0.0.0/8\", \"10.0.0.0/99\", \"nope\"]",
        );
        let text = format!("[server]\ntrusted_proxies = [\"fe80::/200\"]\n{text}");
        let errs = Config::from_parts(&text, &[], &env).unwrap_err().0;
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].starts_with("server.trusted_proxies: \"fe80::/200\""),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("sources.erp.allow_ips: \"10.0.0.0/99\""),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("sources.erp.allow_ips: \"nope\""),
            "{errs:?}"
        );
        let good = BASE.replace(
            "object_id = \"/data/object_id\"",
            "object_id = \"/data/object_id\"\nallow_ips = [\"10.0.0.0/8\", \"2001:db8::/32\"]",
        );
        let cfg = Config::from_parts(&good, &[], &env).unwrap();
        assert_eq!(cfg.sources[0].allow_ips.len(), 2);
        assert!(cfg.sources[0].allows(Some("10.9.9.9".parse().unwrap())));
        assert!(!cfg.sources[0].allows(Some("127.0.0.1".parse().unwrap())));
        assert!(!cfg.sources[0].allows(None));
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

    #[test]
    fn durations_are_a_number_and_a_unit() {
        use std::time::Duration;
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        for bad in [
            "",
            "m",
            "15",
            "1.5h",
            "-1m",
            "15 minutes",
            "10w",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn alerts_parse_with_defaults_and_secrets_from_the_environment() {
        let text = format!(
            "{BASE}\n[[alerts]]\nurl = \"env:HOOK\"\nformat = \"slack\"\n\n[[alerts]]\nurl = \"https://ops.example/in\"\nformat = \"json\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\non = [\"dead\", \"backlog\"]\nbacklog_age = \"2h\"\nmin_interval = \"90s\"\n"
        );
        let env = |n: &str| match n {
            "HOOK" => Some("https://hooks.slack.example/services/T0/B0/XYZsecret".to_string()),
            other => env(other),
        };
        let cfg = Config::from_parts(&text, &[], &env).unwrap();
        assert_eq!(cfg.alerts.len(), 2);
        let slack = &cfg.alerts[0];
        assert_eq!(slack.format, AlertFormat::Slack);
        assert_eq!(slack.on, AlertKind::ALL.to_vec());
        assert_eq!(slack.min_interval.as_secs(), 300);
        assert_eq!(slack.backlog_age.as_secs(), 900);
        assert_eq!(slack.origin(), "https://hooks.slack.example");
        assert!(
            !format!("{cfg:?}").contains("XYZsecret"),
            "the URL is a secret"
        );
        let json = &cfg.alerts[1];
        assert_eq!(json.on, vec![AlertKind::Dead, AlertKind::Backlog]);
        assert_eq!(json.backlog_age.as_secs(), 7200);
        assert_eq!(json.min_interval.as_secs(), 90);
    }

    #[test]
    fn every_alert_problem_is_its_own_line_and_no_url_is_shown() {
        let text = format!(
            "{BASE}\n[[alerts]]\nurl = \"ftp://hooks.example/s3cr3tpath\"\nformat = \"json\"\non = [\"dead\", \"fire\"]\nbacklog_age = \"soon\"\nmin_interval = \"2d\"\n\n[[alerts]]\nurl = \"https://hooks.example/x\"\nformat = \"slack\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n\n[[alerts]]\nurl = \"https://hooks.example/y\"\nformat = \"teams\"\non = []\n"
        );
        let err = Config::from_parts(&text, &[], &env).unwrap_err();
        let lines = err.0.join("\n");
        for expected in [
            "alerts[0].url: not an http(s) URL",
            "alerts[0].secret: required with format = \"json\"",
            "alerts[0].on: unknown kind \"fire\"",
            "alerts[0].backlog_age: \"soon\" does not start with a number",
            "alerts[0].min_interval: \"2d\" is out of range",
            "alerts[1].secret: used only with format = \"json\"",
            "alerts[2].format: unknown format \"teams\"",
            "alerts[2].on: empty",
        ] {
            assert!(
                lines.contains(expected),
                "missing {expected:?} in:\n{lines}"
            );
        }
        assert_eq!(err.0.len(), 8, "{lines}");
        assert!(!lines.contains("s3cr3tpath"), "{lines}");
    }

    #[test]
    fn an_origin_hides_path_query_and_user_info() {
        assert_eq!(
            url_origin("https://u:p@hooks.example:8443/a/b?c=d"),
            "https://hooks.example:8443"
        );
        assert_eq!(url_origin("http://127.0.0.1:9/x"), "http://127.0.0.1:9");
        assert_eq!(url_origin("nonsense"), "(not a URL)");
    }
}
