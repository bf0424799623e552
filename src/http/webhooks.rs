//! `POST /webhooks/{source}`: one verify, one parse, and a commit shared with the requests that
//! arrive at the same time. Nothing is acknowledged before it is durable.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::alerts::Example;
use crate::config::{AlertKind, Cidr, SourceConfig};
use crate::http::AppState;
use crate::http::bodies::{WebhookAccepted, WebhookNoop};
use crate::http::error::{ApiPath as Path, AppError};
use crate::mapping::{self, Input, body::Kind};
use crate::signature::{Verifier, WithQuery};
use crate::store::{IngestOutcome, NewEvent, Plan, StoredRequest, now_ms};
use crate::telemetry::traces::{SpanKind, TraceContext};

/// Receive a signed webhook.
///
/// The request is authenticated with the source's scheme (standard-webhooks with `v1` HMAC or
/// `v1a` Ed25519 entries, github, stripe, hmac / hmac-sha256 with a configured header or query
/// parameter, token, basic, or a preset: shopify, woocommerce, typeform, slack, hotmart). A
/// `202` means the event is committed to storage; on any error nothing is stored. The sender's
/// address (`allow_ips`), the signature headers (and the timestamp) and the content type are
/// checked before the body is read, the MAC after. The body may be JSON (`application/json`,
/// `+json`, or no `Content-Type`), `application/x-www-form-urlencoded` or
/// `multipart/form-data`; it is stored byte for byte.
#[utoipa::path(
    post,
    path = "/webhooks/{source}",
    tag = "webhooks",
    params(
        ("source" = String, Path, description = "A configured source name"),
        ("webhook-id" = Option<String>, Header, description = "standard-webhooks: the message id (also `svix-id`)"),
        ("webhook-timestamp" = Option<String>, Header, description = "standard-webhooks: Unix seconds (also `svix-timestamp`)"),
        ("webhook-signature" = Option<String>, Header, description = "standard-webhooks: `v1,<base64>` entries (also `svix-signature`)"),
        ("X-Hub-Signature-256" = Option<String>, Header, description = "github: `sha256=<hex>`"),
        ("X-GitHub-Delivery" = Option<String>, Header, description = "github: the delivery id; unsigned, so not the event id (the body's SHA-256 is, without an `event_id` pointer)"),
        ("Stripe-Signature" = Option<String>, Header, description = "stripe: `t=<unix>,v1=<hex>`"),
        ("Authorization" = Option<String>, Header, description = "basic: `Basic <base64 of user:password>`"),
    ),
    request_body(description = "The event, as the sending system posts it", content(
        (Object = "application/json"),
        (Object = "application/x-www-form-urlencoded"),
        (Object = "multipart/form-data"),
    )),
    responses(
        (status = 202, description = "Committed to storage: `queued`, or `parked` with a reason", body = WebhookAccepted),
        (status = 200, description = "`duplicate` (this source already has the event id) or `ignored` (type not accepted); nothing new stored", body = WebhookNoop),
        (status = 400, description = "`invalid_json`; `invalid_body` (a form or multipart body that cannot be read: a key both a value and a group, more than 1000 fields, nesting deeper than 16, a broken multipart body); `invalid_event_id` (longer than 256 bytes or a control character), `invalid_event_type` (the same) or `invalid_id` (an object id, lead id or lookup key with a control character); or `bad_request` when the body could not be read. Nothing is stored", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "`missing_signature`, `invalid_signature` or `timestamp_out_of_tolerance`", body = crate::http::openapi::ErrorBody),
        (status = 403, description = "`forbidden_address`: the sender's address is not in the source's `allow_ips`", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "`unknown_source`", body = crate::http::openapi::ErrorBody),
        (status = 413, description = "`payload_too_large`: more than `server.max_body_bytes`", body = crate::http::openapi::ErrorBody),
        (status = 415, description = "`unsupported_media_type`: a `Content-Type` other than JSON, a form or multipart/form-data", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "`unavailable`: storage down, shutting down, or too many request bodies being received at once (`server.max_buffered_bytes`); retry", body = crate::http::openapi::ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait"))),
    ),
    security(())
)]
pub async fn webhook(
    State(state): State<Arc<AppState>>,
    Path(source): Path<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let label = if state.sources.contains_key(&source) {
        source.as_str()
    } else {
        "_unknown"
    };
    let from = Sender {
        peer: peer.map(|Extension(ConnectInfo(a))| a.ip()),
        query: query.as_deref(),
    };
    // The request's span: a child of the sender's when it sent one valid `traceparent`.
    // With tracing off, the `traceparent` header is not even read.
    let mut span = state
        .tracer
        .enabled()
        .then(|| {
            state.tracer.child_span(
                "POST /webhooks/{source}",
                SpanKind::Server,
                incoming_trace(&headers),
            )
        })
        .flatten();
    let mut event_id = None;
    let trace = span.as_ref().map(|s| s.context());
    let (outcome, response, code) = match accept(
        &state,
        &source,
        &headers,
        from,
        body,
        trace,
        &mut event_id,
    )
    .await
    {
        Ok((outcome, resp)) => (outcome, resp, None),
        Err(e) => {
            if !matches!(e, AppError::UnknownSource(_)) {
                tracing::info!(source = %source, code = e.code().as_str(), error = %e, "webhook rejected");
            }
            let code = e.code().as_str();
            (code, e.into_response(), Some(code))
        }
    };
    state.metrics.webhook(label, outcome, start.elapsed());
    if let Some(span) = &mut span {
        // Names, ids and codes only: never a header, the query or the body.
        span.set("http.request.method", "POST");
        span.set("http.route", "/webhooks/{source}");
        span.set("sprintlink.source", label);
        if let Some(id) = event_id {
            span.set("sprintlink.event_id", id);
        }
        span.set(
            "sprintlink.outcome",
            if code.is_some() { "rejected" } else { outcome },
        );
        if let Some(code) = code {
            span.set("sprintlink.error_code", code);
            span.set("error.type", code);
        }
        span.set("http.response.status_code", response.status().as_u16());
        if response.status().is_server_error() {
            span.set_error();
        }
    }
    if let Some(span) = span {
        span.end();
    }
    response
}

/// The sender's trace context: one `traceparent` header that parses; anything else (none,
/// several, malformed) starts a new trace and is never a rejection.
fn incoming_trace(headers: &HeaderMap) -> Option<TraceContext> {
    let mut values = headers.get_all("traceparent").iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    match TraceContext::parse(value.to_str().ok()?) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::debug!(error = %e, "traceparent ignored");
            None
        }
    }
}

/// Where a request came from: the TCP peer and the URL's query string.
#[derive(Clone, Copy)]
struct Sender<'a> {
    peer: Option<IpAddr>,
    query: Option<&'a str>,
}

async fn accept(
    state: &AppState,
    source_name: &str,
    headers: &HeaderMap,
    from: Sender<'_>,
    body: Body,
    trace: Option<TraceContext>,
    seen_event_id: &mut Option<String>,
) -> Result<(&'static str, Response), AppError> {
    if state.shutdown.is_cancelled() {
        return Err(AppError::Unavailable(
            "the service is shutting down, retry shortly".into(),
        ));
    }
    let endpoint = state
        .sources
        .get(source_name)
        .ok_or_else(|| AppError::UnknownSource(source_name.to_string()))?;
    let (source, verifier) = (&endpoint.source, &endpoint.verifier);
    if !source.allow_ips.is_empty() {
        let client = client_address(from.peer, headers, &state.config.server.trusted_proxies);
        if !source.allows(client) {
            return Err(AppError::ForbiddenAddress(match client {
                Some(ip) => format!("{ip} may not post to this source"),
                None => "the sender's address is unknown, and this source has allow_ips".into(),
            }));
        }
    }
    // The scheme's headers, and its timestamp, are checked before any of the body is read: a
    // request that cannot be authentic holds no memory. The MAC is checked once, below. The
    // query string may carry the credential (signature_query, token_query): it is read here
    // and never logged or stored.
    let signed = WithQuery::new(headers, from.query);
    verifier.precheck(&signed, now_ms().div_euclid(1000))?;
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            AppError::UnsupportedMediaType("the Content-Type is not readable text".into())
        })?),
    };
    Kind::of(content_type)?;
    let max = state.config.server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(AppError::PayloadTooLarge(max));
    }
    let raw = axum::body::to_bytes(body, max).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            AppError::PayloadTooLarge(max)
        } else if crate::http::budget::is_budget_full(&e) {
            AppError::Unavailable(crate::http::budget::BudgetFull.to_string())
        } else {
            AppError::BadRequest(format!("could not read the body: {e}"))
        }
    })?;
    let now = now_ms();
    let verified = verifier.verify(&signed, &raw, now.div_euclid(1000))?;
    let request = StoredRequest {
        content_type: content_type.map(str::to_string),
        headers: endpoint.kept_headers(headers),
        query: endpoint.kept_query(from.query),
        body: raw,
    };
    let json = Input::read(&request)?;
    let event_type = mapping::event_type(source, &json);
    if !mapping::accepts(source, event_type.as_deref()) {
        tracing::debug!(source = %source.name, event_type = ?event_type, "event type ignored");
        return Ok((
            "ignored",
            (
                StatusCode::OK,
                axum::Json(WebhookNoop {
                    event_id: None,
                    status: "ignored",
                }),
            )
                .into_response(),
        ));
    }
    let event_id = mapping::event_id(
        source,
        &json,
        &request.body,
        verified.delivery_id.as_deref(),
    );
    // Only an id that may be stored is named in the span (not one too long or with controls).
    mapping::check_event_id(&event_id).map_err(AppError::Unstorable)?;
    *seen_event_id = Some(event_id.clone());
    mapping::check_storable(source, &json).map_err(AppError::Unstorable)?;
    let (object_id, plan) = mapping::plan(source, &json);
    let parked_reason = match &plan {
        Plan::Parked(r) => Some(r.clone()),
        _ => None,
    };
    let event = NewEvent {
        source: source.name.clone(),
        event_id: event_id.clone(),
        event_type,
        received_at: now,
        request,
        object_id,
        plan,
        trace: trace.map(|t| t.traceparent()),
    };
    let outcome = match state.ingest.submit(event).await {
        Ok(o) => o,
        Err(e) => {
            state.alerts.report(
                AlertKind::Storage,
                Example::event(&source.name, &event_id)
                    .error(format!("the webhook could not be committed: {e}")),
            );
            return Err(e.into());
        }
    };
    let answer = match outcome {
        IngestOutcome::Queued => {
            state.wake.notify_one();
            tracing::debug!(event_id = %event_id, source = %source.name, "event queued");
            (
                "queued",
                StatusCode::ACCEPTED,
                axum::Json(WebhookAccepted {
                    event_id,
                    status: "queued",
                    reason: None,
                })
                .into_response(),
            )
        }
        IngestOutcome::Parked => {
            let reason = parked_reason.unwrap_or_default();
            tracing::warn!(event_id = %event_id, source = %source.name, reason = %reason, "event parked");
            state.alerts.report(
                AlertKind::Parked,
                Example::event(&source.name, &event_id).error(reason.clone()),
            );
            (
                "parked",
                StatusCode::ACCEPTED,
                axum::Json(WebhookAccepted {
                    event_id,
                    status: "parked",
                    reason: Some(reason),
                })
                .into_response(),
            )
        }
        IngestOutcome::Duplicate => {
            tracing::debug!(event_id = %event_id, source = %source.name, "duplicate event");
            (
                "duplicate",
                StatusCode::OK,
                axum::Json(WebhookNoop {
                    event_id: Some(event_id),
                    status: "duplicate",
                })
                .into_response(),
            )
        }
    };
    Ok((answer.0, (answer.1, answer.2).into_response()))
}

/// A configured source as the webhook route uses it: its verifier, and the header and query
/// names its references read, worked out once at start-up rather than per request.
pub struct Endpoint {
    pub source: SourceConfig,
    pub verifier: Verifier,
    headers: Vec<String>,
    query: Vec<String>,
}

impl Endpoint {
    pub fn new(source: &SourceConfig) -> Endpoint {
        Endpoint {
            verifier: Verifier::from_source(source),
            headers: source
                .referenced_headers()
                .into_iter()
                .map(str::to_string)
                .collect(),
            query: source
                .referenced_query()
                .into_iter()
                .map(str::to_string)
                .collect(),
            source: source.clone(),
        }
    }

    /// The headers some `header:` reference of the source names, as the request carried them
    /// (the first value of each; one that is not text is left out, as if missing).
    fn kept_headers(&self, headers: &HeaderMap) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter_map(|name| {
                let value = headers.get(name.as_str())?.to_str().ok()?;
                Some((name.clone(), value.to_string()))
            })
            .collect()
    }

    /// The query parameters some `query:` reference of the source names (the first value of
    /// each). No other parameter is kept: a credential in the URL is never stored.
    fn kept_query(&self, query: Option<&str>) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(query) = query.filter(|_| !self.query.is_empty()) else {
            return out;
        };
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if let Some(name) = self.query.iter().find(|n| **n == k) {
                out.entry(name.clone()).or_insert_with(|| v.into_owned());
            }
        }
        out
    }
}

/// The sender's address (SPEC 6.3): the TCP peer, unless the peer is a trusted proxy; then
/// the right-most `X-Forwarded-For` address that is not itself a trusted proxy (all of them
/// trusted: the left-most). `None` when it cannot be known: no peer, or an entry that is not
/// an address where the walk needs it.
pub fn client_address(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trusted: &[Cidr],
) -> Option<IpAddr> {
    let peer = peer?.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let mut hops: Vec<&str> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        hops.extend(
            v.to_str()
                .ok()?
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty()),
        );
    }
    let mut last = peer;
    for hop in hops.iter().rev() {
        let ip = forwarded_ip(hop)?;
        if !is_trusted(ip) {
            return Some(ip);
        }
        last = ip;
    }
    Some(last)
}

/// One `X-Forwarded-For` entry: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1` or
/// `[2001:db8::1]:4711`.
fn forwarded_ip(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })
        .map(|ip: IpAddr| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_peer_counts_unless_it_is_a_trusted_proxy() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()];
        let h = xff(&["198.51.100.1, 203.0.113.9"]);
        // Not trusted, or nothing trusted: the header is ignored.
        assert_eq!(
            client_address(Some(ip("192.0.2.1")), &h, &trusted),
            Some(ip("192.0.2.1"))
        );
        assert_eq!(
            client_address(Some(ip("10.1.1.1")), &h, &[]),
            Some(ip("10.1.1.1"))
        );
        // Trusted: the right-most entry that is not a proxy.
        assert_eq!(
            client_address(Some(ip("10.1.1.1")), &h, &trusted),
            Some(ip("203.0.113.9"))
        );
        let chain = xff(&["198.51.100.1", "203.0.113.9, 10.2.2.2", "::1"]);
        assert_eq!(
            client_address(Some(ip("10.1.1.1")), &chain, &trusted),
            Some(ip("203.0.113.9"))
        );
        // Every entry a proxy: the left-most. No header: the peer.
        let proxies = xff(&["10.3.3.3, 10.2.2.2"]);
        assert_eq!(
            client_address(Some(ip("10.1.1.1")), &proxies, &trusted),
            Some(ip("10.3.3.3"))
        );
        assert_eq!(
            client_address(Some(ip("10.1.1.1")), &HeaderMap::new(), &trusted),
            Some(ip("10.1.1.1"))
        );
        // Ports, brackets and mapped addresses.
        let ported = xff(&["[2001:db8::7]:443, 203.0.113.9:8080"]);
        assert_eq!(
            client_address(Some(ip("::ffff:10.0.0.1")), &ported, &trusted),
            Some(ip("203.0.113.9"))
        );
        let v6 = xff(&["[2001:db8::7]:443"]);
        assert_eq!(
            client_address(Some(ip("10.0.0.1")), &v6, &trusted),
            Some(ip("2001:db8::7"))
        );
        // Garbage where the walk needs an address: unknown.
        let junk = xff(&["203.0.113.9, unknown"]);
        assert_eq!(client_address(Some(ip("10.0.0.1")), &junk, &trusted), None);
        assert_eq!(client_address(None, &h, &trusted), None);
    }
}
