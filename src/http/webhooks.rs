//! `POST /webhooks/{source}`: one verify, one parse, and a commit shared with the requests that
//! arrive at the same time. Nothing is acknowledged before it is durable.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::http::AppState;
use crate::http::error::{ApiPath as Path, AppError};
use crate::mapping::{self};
use crate::signature::WithQuery;
use crate::store::{IngestOutcome, NewEvent, Plan, now_ms};

/// Receive a signed webhook.
///
/// The request is authenticated with the source's scheme (standard-webhooks with `v1` HMAC or
/// `v1a` Ed25519 entries, github, stripe, hmac / hmac-sha256 with a configured header or query
/// parameter, token, basic, or a preset: shopify, woocommerce, typeform, slack, hotmart). A `202` means the event is committed
/// to storage; on any error nothing is stored. The signature headers (and the timestamp) are
/// checked before the body is read, the MAC after.
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
    request_body(content = Object, content_type = "application/json", description = "The event, as the sending system posts it"),
    responses(
        (status = 202, description = "Committed to storage: `queued`, or `parked` with a reason", body = crate::http::openapi::WebhookAccepted),
        (status = 200, description = "`duplicate` (this source already has the event id) or `ignored` (type not accepted); nothing new stored", body = crate::http::openapi::WebhookNoop),
        (status = 400, description = "`invalid_json`; `invalid_event_id` (longer than 256 bytes or a control character), `invalid_event_type` (the same) or `invalid_id` (an object id, lead id or lookup key with a control character); or `bad_request` when the body could not be read. Nothing is stored", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "`missing_signature`, `invalid_signature` or `timestamp_out_of_tolerance`", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "`unknown_source`", body = crate::http::openapi::ErrorBody),
        (status = 413, description = "`payload_too_large`: more than `server.max_body_bytes`", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "`unavailable`: storage down, shutting down, or too many request bodies being received at once (`server.max_buffered_bytes`); retry", body = crate::http::openapi::ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait"))),
    ),
    security(())
)]
pub async fn webhook(
    State(state): State<Arc<AppState>>,
    Path(source): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let label = if state.sources.contains_key(&source) {
        source.as_str()
    } else {
        "_unknown"
    };
    let (outcome, response) = match accept(&state, &source, &headers, uri.query(), body).await {
        Ok((outcome, resp)) => (outcome, resp),
        Err(e) => {
            if !matches!(e, AppError::UnknownSource(_)) {
                tracing::info!(source = %source, code = e.code().as_str(), error = %e, "webhook rejected");
            }
            (e.code().as_str(), e.into_response())
        }
    };
    state.metrics.webhook(label, outcome, start.elapsed());
    response
}

async fn accept(
    state: &AppState,
    source_name: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    body: Body,
) -> Result<(&'static str, Response), AppError> {
    if state.shutdown.is_cancelled() {
        return Err(AppError::Unavailable(
            "the service is shutting down, retry shortly".into(),
        ));
    }
    let (source, verifier) = state
        .sources
        .get(source_name)
        .ok_or_else(|| AppError::UnknownSource(source_name.to_string()))?;
    // The scheme's headers, and its timestamp, are checked before any of the body is read: a
    // request that cannot be authentic holds no memory. The MAC is checked once, below. The
    // query string may carry the credential (signature_query, token_query): it is read here
    // and never logged or stored.
    let request = WithQuery::new(headers, query);
    verifier.precheck(&request, now_ms().div_euclid(1000))?;
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
    let verified = verifier.verify(&request, &raw, now.div_euclid(1000))?;
    let json: Value =
        serde_json::from_slice(&raw).map_err(|e| AppError::InvalidJson(e.to_string()))?;
    let event_type = mapping::event_type(source, &json);
    if !mapping::accepts(source, event_type.as_deref()) {
        tracing::debug!(source = %source.name, event_type = ?event_type, "event type ignored");
        return Ok((
            "ignored",
            (StatusCode::OK, axum::Json(json!({"status": "ignored"}))).into_response(),
        ));
    }
    let event_id = mapping::event_id(source, &json, &raw, verified.delivery_id.as_deref());
    mapping::check_event_id(&event_id)
        .and_then(|()| mapping::check_storable(source, &json))
        .map_err(AppError::Unstorable)?;
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
        // The body passed JSON parsing, so it is UTF-8.
        body: String::from_utf8_lossy(&raw).into_owned(),
        object_id,
        plan,
    };
    let outcome = state.ingest.submit(event).await?;
    let answer = match outcome {
        IngestOutcome::Queued => {
            state.wake.notify_one();
            tracing::debug!(event_id = %event_id, source = %source.name, "event queued");
            (
                "queued",
                StatusCode::ACCEPTED,
                json!({"event_id": event_id, "status": "queued"}),
            )
        }
        IngestOutcome::Parked => {
            let reason = parked_reason.unwrap_or_default();
            tracing::warn!(event_id = %event_id, source = %source.name, reason = %reason, "event parked");
            (
                "parked",
                StatusCode::ACCEPTED,
                json!({"event_id": event_id, "status": "parked", "reason": reason}),
            )
        }
        IngestOutcome::Duplicate => {
            tracing::debug!(event_id = %event_id, source = %source.name, "duplicate event");
            (
                "duplicate",
                StatusCode::OK,
                json!({"event_id": event_id, "status": "duplicate"}),
            )
        }
    };
    Ok((answer.0, (answer.1, axum::Json(answer.2)).into_response()))
}
