//! The outbound SprintHub client and the failure classes of SPEC section 1. It never lets the
//! API token out: URLs are stripped from errors and the token is scrubbed from any text it
//! returns.

use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use reqwest_retry::policies::ExponentialBackoff;
use reqwest_retry::{RetryTransientMiddleware, Retryable, RetryableStrategy};
use serde_json::{Value, json};

use crate::config::{LeadField, Secret, SprintHubConfig};
use crate::domain::{LeadId, ObjectId};
use crate::mapping::{digits, id_json};
use crate::store::EXCERPT_BYTES;
use crate::telemetry::traces::{SpanKind, TraceContext, Tracer};

/// The most of a link answer that is read: the status decides a link, the body is only kept as
/// an excerpt, so the rest of a larger answer is left unread (the connection is closed).
pub const LINK_ANSWER_LIMIT: usize = 64 * 1024;
/// The most of a lead search or lead creation answer that is read: these are parsed. A larger
/// search answer is a transient failure (it cannot be parsed); a larger creation answer has no
/// readable id.
pub const LOOKUP_ANSWER_LIMIT: usize = 1024 * 1024;
/// The most of a redirect's `Location` that is quoted in an error.
const LOCATION_CHARS: usize = 256;

/// How one call ended, classified the way delivery decides what to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Connection error, timeout, 408, 425, 429, 5xx: try again, after `retry_after` if given.
    Transient {
        status: Option<u16>,
        retry_after: Option<Duration>,
        error: String,
        excerpt: Option<String>,
    },
    /// SprintHub's rate limiting (a 401 saying "too many requests"): wait at least 60 s.
    Throttled {
        retry_after: Option<Duration>,
        excerpt: Option<String>,
    },
    /// Any other 401 or 403: the token or instance is wrong; retried, as an operator may fix it.
    Auth {
        status: u16,
        excerpt: Option<String>,
    },
    /// A 3xx: `base_url` points somewhere that redirects (http instead of https, an old host).
    /// Never followed; retried slowly, as an operator must fix the configuration.
    Misdirected {
        status: u16,
        location: Option<String>,
        excerpt: Option<String>,
    },
    /// Any other 4xx: this request will never succeed.
    Permanent {
        status: u16,
        excerpt: Option<String>,
    },
}

impl Failure {
    pub fn status(&self) -> Option<u16> {
        match self {
            Failure::Transient { status, .. } => *status,
            Failure::Throttled { .. } => Some(401),
            Failure::Auth { status, .. }
            | Failure::Misdirected { status, .. }
            | Failure::Permanent { status, .. } => Some(*status),
        }
    }
    pub fn excerpt(&self) -> Option<&str> {
        match self {
            Failure::Transient { excerpt, .. }
            | Failure::Throttled { excerpt, .. }
            | Failure::Auth { excerpt, .. }
            | Failure::Misdirected { excerpt, .. }
            | Failure::Permanent { excerpt, .. } => excerpt.as_deref(),
        }
    }
    /// A one-line description for the attempt record and logs.
    pub fn describe(&self) -> String {
        match self {
            Failure::Transient {
                status: Some(s),
                error,
                ..
            } if (200..300).contains(s) => format!("transient: HTTP {s}, {error}"),
            Failure::Transient {
                status: Some(s), ..
            } => format!("transient: HTTP {s}"),
            Failure::Transient { error, .. } => format!("transient: {error}"),
            Failure::Throttled { .. } => "throttled: SprintHub said too many requests".into(),
            Failure::Auth { status, .. } => {
                format!("auth: HTTP {status}, check sprinthub.api_token and sprinthub.instance")
            }
            Failure::Misdirected {
                status, location, ..
            } => match location {
                Some(to) => format!(
                    "redirect: HTTP {status} to {to}, not followed; check sprinthub.base_url"
                ),
                None => format!("redirect: HTTP {status}, not followed; check sprinthub.base_url"),
            },
            Failure::Permanent { status, .. } => format!("rejected: HTTP {status}"),
        }
    }
    /// The metric label for this class.
    pub fn class(&self) -> &'static str {
        match self {
            Failure::Transient { .. } => "transient",
            Failure::Throttled { .. } => "throttled",
            Failure::Auth { .. } => "auth_error",
            Failure::Misdirected { .. } => "redirect",
            Failure::Permanent { .. } => "rejected",
        }
    }
}

/// A successful call: the status and the start of the answer, kept with the attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Success {
    pub status: u16,
    pub excerpt: Option<String>,
    /// The parsed answer; `None` when it is not JSON or was larger than the call's bound.
    pub body: Option<Value>,
    /// Whether the whole answer was read (not cut by the bound or a dropped connection).
    pub complete: bool,
}

/// Why an object creation did not give an id, split by what SprintHub may now hold.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateFailure {
    /// SprintHub answered, and the answer says nothing was created (or, for a 2xx without an
    /// id, that it cannot be linked): classified like any call.
    Answered(Failure),
    /// The request may have reached SprintHub but no answer (or only part of one) came back:
    /// a timeout, a connection dropped after sending. An object may exist that nobody links.
    Lost(Failure),
}

impl CreateFailure {
    pub fn failure(&self) -> &Failure {
        match self {
            CreateFailure::Answered(f) | CreateFailure::Lost(f) => f,
        }
    }
}

/// A custom object definition as `GET /customobjects/def` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub id: String,
    pub name: String,
    pub fields: Vec<DefinitionField>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionField {
    pub label: String,
    pub alias: String,
    pub kind: String,
    pub required: bool,
}

/// The definitions in a `/customobjects/def` answer (`data.definitions` or `definitions`);
/// `None` when the answer has no such list.
pub fn parse_definitions(answer: &Value) -> Option<Vec<Definition>> {
    let list = answer
        .pointer("/data/definitions")
        .or_else(|| answer.get("definitions"))?
        .as_array()?;
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    Some(
        list.iter()
            .map(|d| Definition {
                id: text(d.get("id")),
                name: text(d.get("name")),
                fields: d
                    .get("fields")
                    .and_then(Value::as_array)
                    .map(|fs| {
                        fs.iter()
                            .map(|f| DefinitionField {
                                label: text(f.get("label")),
                                alias: text(f.get("alias")),
                                kind: text(f.get("type")),
                                required: match f.get("required") {
                                    Some(Value::Bool(b)) => *b,
                                    Some(Value::String(s)) => s == "true",
                                    Some(Value::Number(n)) => n.as_i64() == Some(1),
                                    _ => false,
                                },
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect(),
    )
}

/// A lead found by search.
#[derive(Debug, Clone, PartialEq)]
pub struct Lead {
    pub id: String,
    pub value: Option<String>,
}

/// Request spans without the URL and with errors stripped of it: the query carries the API
/// token, and the default backend records `error.message` from an error that prints the URL.
struct TokenSafeSpans;

impl reqwest_tracing::ReqwestOtelSpanBackend for TokenSafeSpans {
    fn on_request_start(req: &reqwest::Request, _ext: &mut http::Extensions) -> tracing::Span {
        use reqwest_tracing::reqwest_otel_span;
        let path = req.url().path().to_string();
        reqwest_otel_span!(name = "sprinthub", req, sprinthub.path = %path)
    }

    fn on_request_end(
        span: &tracing::Span,
        outcome: &reqwest_middleware::Result<reqwest::Response>,
        _ext: &mut http::Extensions,
    ) {
        match outcome {
            Ok(resp) => reqwest_tracing::default_on_request_success(span, resp),
            Err(reqwest_middleware::Error::Reqwest(e)) => {
                span.record(reqwest_tracing::OTEL_STATUS_CODE, "ERROR");
                let text = e.to_string();
                let safe = match e.url() {
                    Some(url) => text.replace(url.as_str(), "<url>"),
                    None => text,
                };
                span.record(reqwest_tracing::ERROR_MESSAGE, safe.as_str());
            }
            Err(_) => {
                span.record(reqwest_tracing::OTEL_STATUS_CODE, "ERROR");
            }
        }
    }
}

/// Retries only connection failures in memory (the request never reached SprintHub); every
/// answer goes back to the classifier so Retry-After and the durable schedule apply.
struct ConnectErrorsOnly;

impl RetryableStrategy for ConnectErrorsOnly {
    fn handle(
        &self,
        res: &Result<reqwest::Response, reqwest_middleware::Error>,
    ) -> Option<Retryable> {
        match res {
            Err(reqwest_middleware::Error::Reqwest(e)) if e.is_connect() => {
                Some(Retryable::Transient)
            }
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct SprintHubClient {
    http: ClientWithMiddleware,
    base_url: String,
    instance: String,
    token: Secret,
    /// Where each call's span goes (disabled unless `[telemetry]`).
    tracer: Tracer,
}

/// What a call is, for its span: the operation, the method and the path template (never the
/// URL, whose query holds the token), the parent span, and ids worth searching by.
struct Op<'a> {
    operation: &'static str,
    method: &'static str,
    route: &'static str,
    parent: Option<TraceContext>,
    ids: &'a [(&'static str, &'a str)],
}

impl SprintHubClient {
    pub fn new(cfg: &SprintHubConfig) -> Result<Self, String> {
        let inner = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(5_000)))
            .pool_max_idle_per_host(cfg.concurrency.max(1) * 2)
            .user_agent(concat!("sprintlink/", env!("CARGO_PKG_VERSION")))
            // A redirect means base_url is wrong; following it could take a page that answers
            // 200 for a link that was never made. 3xx is classified instead (Misdirected).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", e.without_url()))?;
        let policy = ExponentialBackoff::builder()
            .retry_bounds(Duration::from_millis(50), Duration::from_millis(500))
            .build_with_max_retries(2);
        let http = ClientBuilder::new(inner)
            .with(reqwest_tracing::TracingMiddleware::<TokenSafeSpans>::new())
            .with(RetryTransientMiddleware::new_with_policy_and_strategy(
                policy,
                ConnectErrorsOnly,
            ))
            .build();
        Ok(SprintHubClient {
            http,
            base_url: cfg.base_url.trim_end_matches('/').to_string(),
            instance: cfg.instance.clone(),
            token: cfg.api_token.clone(),
            tracer: Tracer::disabled(),
        })
    }

    /// The client recording a span per call with `tracer`.
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// `POST /customobjects/link`, the core call; its span is a child of `trace`.
    pub async fn link(
        &self,
        object_id: &ObjectId,
        lead_id: &LeadId,
        trace: Option<TraceContext>,
    ) -> Result<Success, Failure> {
        let body = json!({"objectId": id_json(object_id.as_str()), "linkType": "lead", "targetId": id_json(lead_id.as_str()), "amount": 1});
        let op = Op {
            operation: "link",
            method: "POST",
            route: "/customobjects/link",
            parent: trace,
            ids: &[
                ("sprintlink.object_id", object_id.as_str()),
                ("sprintlink.lead_id", lead_id.as_str()),
            ],
        };
        self.post(op, &body, LINK_ANSWER_LIMIT).await
    }

    /// `POST /leadsadvanced`, keeping only leads whose `field` equals `value` exactly. The
    /// value (an email, a phone number) is not put in the span.
    pub async fn search_leads(
        &self,
        field: LeadField,
        value: &str,
        trace: Option<TraceContext>,
    ) -> Result<Vec<Lead>, Failure> {
        let body = json!({"query": "{leads{id,email,whatsapp,mobile}}", "search": value, "page": 0, "limit": 15});
        let op = Op {
            operation: "lead_search",
            method: "POST",
            route: "/leadsadvanced",
            parent: trace,
            ids: &[],
        };
        let ok = self.post(op, &body, LOOKUP_ANSWER_LIMIT).await?;
        // An answer that cannot be read is not "no lead": that could park the event or create a
        // duplicate lead. It is retried like an outage.
        let Some(answer) = ok.body else {
            return Err(Failure::Transient {
                status: Some(ok.status),
                retry_after: None,
                error: format!(
                    "the lead search answer is not JSON or is larger than {} KiB",
                    LOOKUP_ANSWER_LIMIT / 1024
                ),
                excerpt: ok.excerpt,
            });
        };
        Ok(exact_matches(&answer, field, value))
    }

    /// `POST /leads`; the new lead's id is read from `id` or `data.id`.
    pub async fn create_lead(
        &self,
        fields: &Value,
        trace: Option<TraceContext>,
    ) -> Result<String, Failure> {
        let op = Op {
            operation: "lead_creation",
            method: "POST",
            route: "/leads",
            parent: trace,
            ids: &[],
        };
        let ok = self.post(op, fields, LOOKUP_ANSWER_LIMIT).await?;
        let body = ok.body.unwrap_or(Value::Null);
        body.get("id")
            .or_else(|| body.pointer("/data/id"))
            .and_then(crate::mapping::id_text)
            .ok_or_else(|| Failure::Permanent {
                status: ok.status,
                excerpt: Some(store_safe(
                    &format!(
                        "lead created but no id in the answer: {}",
                        ok.excerpt.unwrap_or_default()
                    ),
                    EXCERPT_BYTES,
                )),
            })
    }

    /// `POST /customobjects/objects/{definition_id}` with the object's fields; the new
    /// object's id is read from `id` or `data.id`.
    pub async fn create_object(
        &self,
        definition_id: &str,
        fields: &Value,
        trace: Option<TraceContext>,
    ) -> Result<(ObjectId, Success), CreateFailure> {
        let path = format!("/customobjects/objects/{definition_id}");
        let op = Op {
            operation: "object_creation",
            method: "POST",
            route: "/customobjects/objects/{definitionId}",
            parent: trace,
            ids: &[("sprintlink.definition_id", definition_id)],
        };
        let ok = match self
            .call(
                self.http.post(self.url(&path)).json(fields),
                LOOKUP_ANSWER_LIMIT,
                op,
            )
            .await
        {
            Ok(ok) => ok,
            Err((failure, true)) => return Err(CreateFailure::Lost(failure)),
            Err((failure, false)) => return Err(CreateFailure::Answered(failure)),
        };
        let id = ok.body.as_ref().and_then(|b| {
            b.get("id")
                .or_else(|| b.pointer("/data/id"))
                .and_then(crate::mapping::id_text)
        });
        match id {
            Some(id) => Ok((ObjectId::new(id), ok)),
            // A 2xx cut short: the id may have been in the part that was lost.
            None if !ok.complete => Err(CreateFailure::Lost(Failure::Transient {
                status: Some(ok.status),
                retry_after: None,
                error: "the answer was cut off before its id".into(),
                excerpt: ok.excerpt,
            })),
            // Created, perhaps, but without an id nothing can be linked; trying again could
            // create a second one.
            None => Err(CreateFailure::Answered(Failure::Permanent {
                status: ok.status,
                excerpt: Some(store_safe(
                    &format!(
                        "object created but no id in the answer: {}",
                        ok.excerpt.unwrap_or_default()
                    ),
                    EXCERPT_BYTES,
                )),
            })),
        }
    }

    /// `GET /customobjects/def`: the instance's custom object definitions.
    pub async fn definitions(&self) -> Result<Vec<Definition>, Failure> {
        let req = self.http.get(self.url("/customobjects/def")).query(&[(
            "query",
            "{definitions{id,name,fields{label,alias,type,required}}}",
        )]);
        let op = Op {
            operation: "definitions",
            method: "GET",
            route: "/customobjects/def",
            parent: None,
            ids: &[],
        };
        let ok = self
            .call(req, LOOKUP_ANSWER_LIMIT, op)
            .await
            .map_err(|(f, _)| f)?;
        ok.body
            .as_ref()
            .and_then(parse_definitions)
            .ok_or_else(|| Failure::Transient {
                status: Some(ok.status),
                retry_after: None,
                error: "the definitions answer has no definitions list".into(),
                excerpt: ok.excerpt,
            })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// One call. At most `limit` bytes of the answer are read; the rest is left unread.
    async fn post(&self, op: Op<'_>, body: &Value, limit: usize) -> Result<Success, Failure> {
        self.call(self.http.post(self.url(op.route)).json(body), limit, op)
            .await
            .map_err(|(f, _)| f)
    }

    /// `send`, in a client span (when tracing is on) that records the operation, the status
    /// and the duration: never the URL, the body or the answer.
    async fn call(
        &self,
        req: reqwest_middleware::RequestBuilder,
        limit: usize,
        op: Op<'_>,
    ) -> Result<Success, (Failure, bool)> {
        let Some(mut span) = self.tracer.child_span(
            format!("{} {}", op.method, op.route),
            SpanKind::Client,
            op.parent,
        ) else {
            return self.send(req, limit).await;
        };
        let started = Instant::now();
        let result = self.send(req, limit).await;
        span.set("sprintlink.operation", op.operation);
        span.set("http.request.method", op.method);
        span.set("url.template", op.route);
        if let Some(host) = self.base_url.split("://").nth(1) {
            let host = host.split(['/', '?', '#']).next().unwrap_or_default();
            span.set(
                "server.address",
                host.rsplit('@').next().unwrap_or_default(),
            );
        }
        for (key, value) in op.ids {
            span.set(key, *value);
        }
        let status = match &result {
            Ok(ok) => Some(ok.status),
            Err((failure, _)) => {
                span.set("error.type", failure.class());
                span.set_error();
                failure.status()
            }
        };
        if let Some(status) = status {
            span.set("http.response.status_code", status);
        }
        span.set(
            "sprintlink.duration_ms",
            i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
        );
        span.end();
        result
    }

    /// Sends the request with the credentials and reads at most `limit` bytes of the answer.
    /// A failure says whether the request may have reached SprintHub without its answer
    /// coming back (anything but a refused connection, before a status line arrived).
    async fn send(
        &self,
        req: reqwest_middleware::RequestBuilder,
        limit: usize,
    ) -> Result<Success, (Failure, bool)> {
        let sent = req
            .query(&[
                ("apitoken", self.token.expose()),
                ("i", self.instance.as_str()),
            ])
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let maybe_sent =
                    !matches!(&e, reqwest_middleware::Error::Reqwest(r) if r.is_connect());
                return Err((
                    Failure::Transient {
                        status: None,
                        retry_after: None,
                        error: self.scrub(&describe_error(e)),
                        excerpt: None,
                    },
                    maybe_sent,
                ));
            }
        };
        let mut resp = resp;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let shown: String = self.scrub(v).chars().take(LOCATION_CHARS).collect();
                store_safe(&shown, LOCATION_CHARS * 4)
            });
        let (bytes, complete) = match read_bounded(&mut resp, limit).await {
            Ok(read) => read,
            // The status line came: it decides. What was read is kept; the rest is lost.
            Err((partial, e)) => {
                let error = self.scrub(&describe_error(reqwest_middleware::Error::Reqwest(e)));
                tracing::debug!(status = status.as_u16(), error = %error, "reading a SprintHub answer failed");
                (partial, false)
            }
        };
        drop(resp);
        let excerpt =
            (!bytes.is_empty()).then(|| store_safe(&self.scrub(&excerpt(&bytes)), EXCERPT_BYTES));
        if status.is_success() {
            let body = if complete {
                serde_json::from_slice(&bytes).ok()
            } else {
                None
            };
            return Ok(Success {
                status: status.as_u16(),
                excerpt,
                body,
                complete,
            });
        }
        if status.is_redirection() {
            return Err((
                Failure::Misdirected {
                    status: status.as_u16(),
                    location,
                    excerpt,
                },
                false,
            ));
        }
        Err((classify(status, retry_after, &bytes, excerpt), false))
    }

    /// Removes the token from text that might quote a URL or an echo of the request. A quoted
    /// URL carries the token percent-encoded, so `apitoken=` values are masked whatever their form.
    fn scrub(&self, text: &str) -> String {
        let t = self.token.expose();
        let text = if t.len() >= 4 {
            text.replace(t, "***")
        } else {
            text.to_string()
        };
        mask_query_token(&text)
    }
}

/// Replaces the value of every `apitoken=` query parameter quoted in `text` by `***`.
fn mask_query_token(text: &str) -> String {
    const KEY: &str = "apitoken=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(KEY) {
        let (head, tail) = rest.split_at(i + KEY.len());
        out.push_str(head);
        let end = tail
            .find(|c: char| {
                matches!(c, '&' | '#' | ')' | '"' | '\'' | '<' | '>') || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        if end > 0 {
            out.push_str("***");
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Reads at most `limit` bytes of the answer; says whether that was the whole answer. On a read
/// error, what was read so far comes back with the error.
async fn read_bounded(
    resp: &mut reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), (Vec<u8>, reqwest::Error)> {
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - buf.len();
                if chunk.len() > room {
                    buf.extend_from_slice(&chunk[..room]);
                    return Ok((buf, false));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok((buf, true)),
            Err(e) => return Err((buf, e)),
        }
    }
}

/// Text that PostgreSQL's `text` can hold and that fits `max` bytes: U+0000 becomes U+FFFD
/// (invalid UTF-8 cannot occur in a `&str`; `excerpt` has already replaced it), cut at a
/// character boundary.
pub fn store_safe(text: &str, max: usize) -> String {
    let mut out = text.replace('\0', "\u{FFFD}");
    if out.len() > max {
        let mut end = max;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// Sorts an unsuccessful answer into its failure class.
pub fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    excerpt: Option<String>,
) -> Failure {
    let code = status.as_u16();
    match code {
        401 if says_too_many_requests(body) => Failure::Throttled {
            retry_after,
            excerpt,
        },
        401 | 403 => Failure::Auth {
            status: code,
            excerpt,
        },
        300..=399 => Failure::Misdirected {
            status: code,
            location: None,
            excerpt,
        },
        408 | 425 | 429 | 500..=599 => Failure::Transient {
            status: Some(code),
            retry_after,
            error: format!("HTTP {code}"),
            excerpt,
        },
        _ => Failure::Permanent {
            status: code,
            excerpt,
        },
    }
}

fn says_too_many_requests(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("msg").and_then(Value::as_str).map(str::to_lowercase))
        .is_some_and(|m| m.contains("too many requests"))
}

/// The first 2 KiB of an answer as text safe for storage: invalid UTF-8 and U+0000 replaced by
/// U+FFFD (PostgreSQL's `text` rejects both), at most `EXCERPT_BYTES`, cut at a character
/// boundary.
pub fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(EXCERPT_BYTES)];
    let text = String::from_utf8_lossy(cut);
    // A character split by the cut decodes as U+FFFD at the end: drop it.
    let text = if cut.len() < bytes.len() {
        text.trim_end_matches('\u{FFFD}')
    } else {
        &text
    };
    store_safe(text, EXCERPT_BYTES)
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An error's text without the URL (which carries the token in its query).
fn describe_error(e: reqwest_middleware::Error) -> String {
    let text = match e {
        reqwest_middleware::Error::Reqwest(e) => {
            let e = e.without_url();
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
        reqwest_middleware::Error::Middleware(e) => format!("{e:#}"),
    };
    // Errors nested in the chain still print their URL, query (token) included.
    let text = strip_urls(&text);
    let kind = if text.contains("timed out") {
        "timeout"
    } else if text.contains("connect") {
        "connection failed"
    } else {
        "request failed"
    };
    format!("{kind}: {text}")
}

/// Removes every ` for url (...)` that reqwest writes into error messages.
fn strip_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(" for url (") {
        out.push_str(&rest[..i]);
        rest = &rest[i + " for url (".len()..];
        match rest.find(')') {
            Some(j) => rest = &rest[j + 1..],
            None => rest = "",
        }
    }
    out.push_str(rest);
    out
}

/// Leads from a `/leadsadvanced` answer whose `field` equals `value`: email ignoring case,
/// phone numbers by their digits.
pub fn exact_matches(answer: &Value, field: LeadField, value: &str) -> Vec<Lead> {
    let wanted = normalize(field, value);
    let Some(leads) = answer.pointer("/data/leads").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut out: Vec<Lead> = leads
        .iter()
        .filter_map(|l| {
            let v = l.get(field.as_str()).and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })?;
            let id = l.get("id").and_then(crate::mapping::id_text)?;
            (!wanted.is_empty() && normalize(field, &v) == wanted)
                .then_some(Lead { id, value: Some(v) })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|a, b| a.id == b.id);
    out
}

fn normalize(field: LeadField, v: &str) -> String {
    match field {
        LeadField::Email => v.trim().to_lowercase(),
        LeadField::Whatsapp | LeadField::Mobile => digits(v),
    }
}

/// The line `check-config --online` and `sprinthub definitions` print when the definitions
/// could not be listed. Never holds the token.
pub fn definitions_failure(cfg: &crate::config::Config, f: &Failure) -> String {
    match f {
        Failure::Auth { status, .. } => format!(
            "sprinthub: SprintHub refused the token or the instance {:?} (HTTP {status}); check sprinthub.api_token and sprinthub.instance",
            cfg.sprinthub.instance
        ),
        other => format!(
            "sprinthub: cannot list the custom object definitions at {}: {}",
            cfg.sprinthub.base_url,
            other.describe()
        ),
    }
}

/// Every `[sources.object]` against the instance's definitions: the definition exists, each
/// alias is one of its fields, each required field is mapped. One line per problem.
pub fn check_definitions(cfg: &crate::config::Config, defs: &[Definition]) -> Vec<String> {
    use crate::config::ObjectRule;
    let mut problems = Vec::new();
    for s in &cfg.sources {
        let ObjectRule::Create(spec) = s.object_rule() else {
            continue;
        };
        let at = format!("sources.{}.object", s.name);
        let Some(def) = defs.iter().find(|d| d.id == spec.definition_id.as_str()) else {
            let known: Vec<String> = defs
                .iter()
                .map(|d| format!("{} ({})", d.id, d.name))
                .collect();
            problems.push(format!(
                "{at}.definition_id: instance {:?} has no custom object definition {}; it has: {}",
                cfg.sprinthub.instance,
                spec.definition_id,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
            continue;
        };
        for alias in spec.fields.keys() {
            if !def.fields.iter().any(|f| &f.alias == alias) {
                let aliases: Vec<&str> = def.fields.iter().map(|f| f.alias.as_str()).collect();
                problems.push(format!(
                    "{at}.fields.{alias}: definition {} ({}) has no field with this alias; its aliases: {}",
                    def.id,
                    def.name,
                    aliases.join(", ")
                ));
            }
        }
        for f in def.fields.iter().filter(|f| f.required) {
            if !spec.fields.contains_key(&f.alias) {
                problems.push(format!(
                    "{at}.fields: definition {} ({}) requires field {} ({}), which is not mapped",
                    def.id, def.name, f.alias, f.label
                ));
            }
        }
    }
    problems
}

/// How long one call took, for the attempt record.
pub fn elapsed_ms(start: Instant) -> i64 {
    start.elapsed().as_millis() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_classes_follow_the_spec() {
        let c = |code: u16, body: &str| {
            classify(
                StatusCode::from_u16(code).unwrap(),
                None,
                body.as_bytes(),
                None,
            )
        };
        for code in [408, 425, 429, 500, 502, 503, 599] {
            assert!(matches!(c(code, ""), Failure::Transient { .. }), "{code}");
        }
        assert!(matches!(
            c(401, r#"{"msg":"Too Many Requests, slow down"}"#),
            Failure::Throttled { .. }
        ));
        assert!(matches!(
            c(401, r#"{"msg":"invalid token"}"#),
            Failure::Auth { status: 401, .. }
        ));
        assert!(matches!(c(401, "too many requests"), Failure::Auth { .. }));
        assert!(matches!(c(403, ""), Failure::Auth { status: 403, .. }));
        for code in [400, 404, 409, 422] {
            assert!(matches!(c(code, ""), Failure::Permanent { .. }), "{code}");
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn exact_match_filtering() {
        let answer = json!({"data": {"leads": [
            {"id": 1, "email": "Ann@Example.com", "whatsapp": "+55 11 99999-0000"},
            {"id": 2, "email": "ann@example.com.br", "whatsapp": "5511999990001"},
            {"id": 3, "email": null, "whatsapp": "55 (11) 99999 0000"},
        ]}});
        let ids = |f, v| {
            exact_matches(&answer, f, v)
                .into_iter()
                .map(|l| l.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(LeadField::Email, "ann@example.com"), vec!["1"]);
        assert_eq!(ids(LeadField::Whatsapp, "5511999990000"), vec!["1", "3"]);
        assert!(ids(LeadField::Mobile, "5511999990000").is_empty());
        assert!(exact_matches(&json!({"oops": 1}), LeadField::Email, "x").is_empty());
    }

    #[test]
    fn quoted_urls_lose_their_token_in_any_encoding() {
        let text = "error sending request for url (http://h/customobjects/link?apitoken=tok%2B%2F%3D&i=acme): refused";
        assert_eq!(
            mask_query_token(text),
            "error sending request for url (http://h/customobjects/link?apitoken=***&i=acme): refused"
        );
        assert_eq!(mask_query_token("a apitoken=x"), "a apitoken=***");
        assert_eq!(mask_query_token("apitoken=&i=1"), "apitoken=&i=1");
        assert_eq!(mask_query_token("no token here"), "no token here");
    }

    #[test]
    fn urls_are_stripped_from_error_text() {
        let t = "error sending request for url (http://h/customobjects/link?apitoken=SECRET&i=x): client error (Connect): refused";
        assert_eq!(
            strip_urls(t),
            "error sending request: client error (Connect): refused"
        );
        assert_eq!(strip_urls("a for url (b"), "a");
    }

    #[tokio::test]
    async fn connection_errors_never_carry_the_token() {
        let cfg = SprintHubConfig {
            base_url: "http://127.0.0.1:9".into(),
            instance: "acme".into(),
            api_token: Secret::new("tok-NEVER-SHOWN-55"),
            timeout_ms: 500,
            ..Default::default()
        };
        let client = SprintHubClient::new(&cfg).unwrap();
        let err = client
            .link(&"1".into(), &"2".into(), None)
            .await
            .unwrap_err();
        let shown = format!("{err:?} {}", err.describe());
        assert!(matches!(err, Failure::Transient { status: None, .. }));
        assert!(!shown.contains("NEVER-SHOWN"), "{shown}");
        assert!(!shown.contains("apitoken"), "{shown}");
    }

    #[test]
    fn definitions_are_read_from_data_or_top_level() {
        let def = json!({"id": 42, "name": "Pedido", "fields": [
            {"label": "Pedido", "alias": "pedido", "type": "text", "required": true},
            {"label": "Valor", "alias": "valor", "type": "number", "required": false},
        ]});
        for answer in [
            json!({"data": {"definitions": [def.clone()]}}),
            json!({"definitions": [def.clone()]}),
        ] {
            let defs = parse_definitions(&answer).unwrap();
            assert_eq!(defs[0].id, "42");
            assert_eq!(defs[0].fields[0].alias, "pedido");
            assert!(defs[0].fields[0].required);
            assert!(!defs[0].fields[1].required);
            assert_eq!(defs[0].fields[1].kind, "number");
        }
        assert!(parse_definitions(&json!({"msg": "no"})).is_none());
    }

    #[test]
    fn redirects_are_their_own_class() {
        for code in [301, 302, 303, 307, 308] {
            let f = classify(StatusCode::from_u16(code).unwrap(), None, b"", None);
            assert!(matches!(f, Failure::Misdirected { .. }), "{code}");
            assert_eq!(f.class(), "redirect");
            assert!(f.describe().contains("sprinthub.base_url"));
        }
    }

    #[test]
    fn excerpts_are_safe_for_postgresql_text() {
        let e = excerpt(b"{\"a\":\"x\x00y\"}\xff\xfe tail");
        assert!(!e.contains('\0'), "{e:?}");
        assert_eq!(e, "{\"a\":\"x\u{FFFD}y\"}\u{FFFD}\u{FFFD} tail");
        // NUL becomes a 3-byte character: the excerpt still fits and ends on a char boundary.
        let nuls = vec![0u8; 5000];
        let e = excerpt(&nuls);
        assert!(e.len() <= EXCERPT_BYTES && !e.contains('\0'));
        assert!(e.chars().all(|c| c == '\u{FFFD}'));
        assert_eq!(store_safe("abc\0", 4), "abc");
        assert_eq!(store_safe("é", 1), "");
    }

    #[test]
    fn excerpt_is_capped_at_two_kib() {
        let long = "é".repeat(3000);
        let e = excerpt(long.as_bytes());
        assert!(e.len() <= 2048);
        assert!(e.chars().all(|c| c == 'é'));
    }
}
