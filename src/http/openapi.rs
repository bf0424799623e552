//! `GET /openapi.json`: the OpenAPI 3.1 description of every route, generated from the code.
//!
//! Each handler carries a `#[utoipa::path]` annotation and is registered through
//! `utoipa_axum::routes!`, so a route cannot be served without being described (see
//! `http::build_app`). Bodies are the types of `http::bodies` and `http::error`, serialised by the
//! handlers and described by the same types; below are the shared error answers and the
//! dashboard's forms. `.ci/api-fuzz`
//! (schemathesis) checks every answer against the document.

use axum::Extension;
use axum::body::Bytes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as OpenApiDoc, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

pub use crate::http::error::{ErrorBody, ErrorCode};

/// The name of the admin bearer security scheme in the document.
pub const ADMIN_BEARER: &str = "admin_token";
/// The name of the dashboard's session cookie scheme in the document.
pub const UI_SESSION: &str = "ui_session";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sprintlink",
        description = "Signed webhooks in, SprintHub custom-object links out, durably. \
            Every error answer is `{\"error\": {\"code\": \"...\", \"message\": \"...\"}}`.",
    ),
    components(schemas(ErrorBody)),
    modifiers(&Security),
    tags(
        (name = "webhooks", description = "Signed webhooks from the sending systems"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
        (name = "admin", description = "The operator's API (bearer admin token; 404 when admin.token is not set)"),
        (name = "dashboard", description = "The server-rendered dashboard at /ui (same token; 404 when admin.token is not set)"),
    )
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The configured `admin.token`."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            UI_SESSION,
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::http::ui::SESSION_COOKIE,
                "The dashboard session set by `POST /ui/login`.",
            ))),
        );
    }
}

/// Completes the collected document with what applies to every route: the request timeout
/// middleware can answer 408 anywhere.
pub fn finish(mut doc: OpenApiDoc) -> OpenApiDoc {
    let timeout = ResponseBuilder::new()
        .description(
            "The request took longer than `server.request_timeout_ms` (`request_timeout`).",
        )
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            op.responses
                .responses
                .entry("408".to_string())
                .or_insert_with(|| timeout.clone().into());
        }
    }
    doc
}

/// The serialised document, computed once when the router is built.
#[derive(Clone)]
pub struct Spec(pub Bytes);

impl Spec {
    pub fn new(doc: &OpenApiDoc) -> Spec {
        // Serialising a document of plain strings and maps cannot fail; if it ever did, the
        // answer still says so in JSON.
        let text = doc.to_pretty_json().unwrap_or_else(|e| {
            json!({"error": {"code": "openapi", "message": e.to_string()}}).to_string()
        });
        Spec(Bytes::from(text))
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document describing every route", content_type = "application/json", body = Object),
    )
)]
pub async fn openapi_json(Extension(spec): Extension<Spec>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], spec.0).into_response()
}

// ------------------------------------------------------------------ shared answers

/// The 401 of every route behind the admin token (`AppError::Unauthorized` sends the challenge).
#[derive(utoipa::IntoResponses)]
#[response(
    status = 401,
    description = "`unauthorized`: a missing or wrong admin token (the dashboard sends a missing one to its login page instead)",
    headers(("WWW-Authenticate" = String))
)]
pub struct Unauthorized(pub ErrorBody);

/// The 503 of every admin and dashboard route that reads or writes storage (every 503 carries
/// `Retry-After`).
#[derive(utoipa::IntoResponses)]
#[response(
    status = 503,
    description = "`unavailable`: storage is down, or (for a request with a body) too many request bodies are being received at once (`server.max_buffered_bytes`); retry",
    headers(("Retry-After" = String))
)]
pub struct StorageUnavailable(pub ErrorBody);

/// The 429 of every check of the admin token (bearer or login form) from an address with too
/// many recent failures.
#[derive(utoipa::IntoResponses)]
#[response(
    status = 429,
    description = "`too_many_requests`: too many failed admin token checks from this address (`admin.failed_auth_limit` per `admin.failed_auth_window_seconds`); every check from it is refused until `Retry-After` seconds have passed",
    headers(("Retry-After" = String))
)]
pub struct TooManyRequests(pub ErrorBody);

/// The 413 of a route's body over its limit.
#[derive(utoipa::IntoResponses)]
#[response(
    status = 413,
    description = "`payload_too_large`: the body is over the limit (`server.max_body_bytes` for the admin API, 8 KiB for the dashboard's forms)"
)]
pub struct PayloadTooLarge(pub ErrorBody);

/// The 415 of a JSON route sent something else.
#[derive(utoipa::IntoResponses)]
#[response(
    status = 415,
    description = "`unsupported_media_type`: the body is not sent as `Content-Type: application/json`"
)]
pub struct UnsupportedMediaType(pub ErrorBody);

// ------------------------------------------------------------------ documented bodies

/// The dashboard's login form.
#[derive(ToSchema)]
pub struct LoginForm {
    /// The admin token.
    pub token: String,
    /// Where to go after logging in (a `/ui` path).
    pub next: Option<String>,
}

/// The dashboard's bulk action on the selected events.
#[derive(ToSchema)]
pub struct BulkForm {
    /// The token from the page's hidden field.
    pub csrf: Option<String>,
    /// `replay` or `discard`.
    pub action: String,
    /// The selected events (repeated), as the page's checkboxes name them.
    pub pk: Vec<String>,
    /// Why (discard); a default is written when empty.
    pub reason: Option<String>,
    /// The dashboard page to go back to.
    pub back: Option<String>,
}

/// The dashboard's mapping form: set (`lead_ids` given) or delete a key.
#[derive(ToSchema)]
pub struct MappingForm {
    /// The token from the page's hidden field.
    pub csrf: Option<String>,
    pub source: String,
    pub key: String,
    /// Lead ids separated by commas or spaces (set only).
    pub lead_ids: Option<String>,
}

/// The dashboard's CSV upload: a `csrf` part and a `csv` file part of `key,lead_id` lines.
#[derive(ToSchema)]
pub struct CsvUpload {
    pub csrf: Option<String>,
    #[schema(format = Binary, value_type = String)]
    pub csv: Vec<u8>,
}

/// A dashboard form that changes something; `csrf` is required with a session cookie.
#[derive(ToSchema)]
pub struct CsrfForm {
    /// The token from the page's hidden field.
    pub csrf: Option<String>,
}

/// The dashboard's pause form.
#[derive(ToSchema)]
pub struct PauseForm {
    /// The token from the page's hidden field.
    pub csrf: Option<String>,
    /// Resume by itself after this many minutes; empty: until resumed.
    pub minutes: Option<String>,
}
