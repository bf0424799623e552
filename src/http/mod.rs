//! The HTTP layer: the router over one shared state, its layers and fallbacks, and the
//! operational routes (`/healthz`, `/readyz`, `/metrics`). Handlers live one file per resource;
//! what the admin API and the dashboard share lives outside, in `operations`.

pub mod admin;
pub mod auth;
pub mod bodies;
pub mod budget;
pub mod error;
pub mod openapi;
pub mod serve;
pub mod ui;
pub mod webhooks;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::alerts::{Alerts, Example};
use crate::batch::Batcher;
use crate::config::{AlertKind, Config};
use crate::store::{IngestOutcome, NewEvent, Store};
use crate::telemetry::Metrics;
use crate::telemetry::traces::Tracer;
use error::AppError;

/// Everything a request handler may need, shared by all of them.
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub sources: HashMap<String, webhooks::Endpoint>,
    pub ingest: Batcher<NewEvent, IngestOutcome>,
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the process starts draining.
    pub shutdown: CancellationToken,
    /// The latest storage check of `/readyz` and when it ran: probes share one write a second.
    pub readiness: tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// Failed-token throttle and dashboard sessions (per process).
    pub auth: Arc<crate::http::auth::Auth>,
    /// Where parked events and storage failures are reported (disabled unless `[[alerts]]`).
    pub alerts: Alerts,
    /// The deployment-wide pause and this replica's view of the fleet (shared with the worker).
    pub fleet: Arc<crate::delivery::fleet::Fleet>,
    /// Where webhook spans go (disabled unless `[telemetry] otlp_endpoint`).
    pub tracer: Tracer,
}

impl AppState {
    /// The state over an open store: starts the group-commit batcher and builds each source's
    /// verifier. Errors name what in the configuration cannot be used.
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<AppState, String> {
        let ingest_store = store.clone();
        let ingest = Batcher::spawn(512, move |events: Arc<[NewEvent]>| {
            let s = ingest_store.clone();
            async move { s.ingest(&events).await }
        });
        let sources = config
            .sources
            .iter()
            .map(|s| (s.name.clone(), webhooks::Endpoint::new(s)))
            .collect();
        let auth = crate::http::auth::Auth::new(&config.admin)?;
        let fleet = crate::delivery::fleet::Fleet::new(store.clone(), &config, metrics.clone());
        Ok(AppState {
            config,
            store,
            sources,
            ingest,
            wake,
            metrics,
            shutdown,
            readiness: tokio::sync::Mutex::new(None),
            auth: Arc::new(auth),
            alerts: Alerts::disabled(),
            fleet,
            tracer: Tracer::disabled(),
        })
    }

    /// The state recording webhook spans with `tracer`.
    pub fn with_tracer(mut self, tracer: Tracer) -> AppState {
        self.tracer = tracer;
        self
    }

    /// The state reporting to `alerts`.
    pub fn with_alerts(mut self, alerts: Alerts) -> AppState {
        self.alerts = alerts;
        self
    }
}

/// Builds the router over a state; exposed so tests can drive it without a socket.
pub fn build_app(state: Arc<AppState>) -> Router {
    let timeout = Duration::from_millis(state.config.server.request_timeout_ms);
    // Every route is registered with its `#[utoipa::path]` description, which makes the
    // OpenAPI document served at /openapi.json.
    let (router, api) = OpenApiRouter::with_openapi(crate::http::openapi::ApiDoc::openapi())
        .routes(routes!(crate::http::webhooks::webhook))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(crate::http::openapi::openapi_json))
        .merge(crate::http::admin::routes(state.clone()))
        .merge(crate::http::ui::routes(state.clone()))
        .split_for_parts();
    let spec = crate::http::openapi::Spec::new(&crate::http::openapi::finish(api));
    let budget = crate::http::budget::BodyBudget::new(state.config.server.max_buffered_bytes);
    router
        .layer(Extension(spec))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(timeout, request_timeout))
        .layer(middleware::from_fn_with_state(
            budget,
            crate::http::budget::limit_buffered,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// The routes `server.internal_listen` serves, and the ones that leave `listen` when it is set.
const INTERNAL_ONLY: &[&str] = &["/metrics", "/openapi.json"];
const INTERNAL: &[&str] = &["/healthz", "/readyz", "/metrics", "/openapi.json"];

/// The router restricted for one listener: with `internal`, only the operational routes;
/// without, everything but the internal-only ones (when `hide_internal`).
pub(crate) fn restricted(router: Router, internal: bool, hide_internal: bool) -> Router {
    if !internal && !hide_internal {
        return router;
    }
    router.layer(middleware::from_fn(
        move |req: Request, next: Next| async move {
            let path = req.uri().path();
            let allowed = if internal {
                INTERNAL.contains(&path)
            } else {
                !INTERNAL_ONLY.contains(&path)
            };
            if allowed {
                next.run(req).await
            } else {
                not_found().await.into_response()
            }
        },
    ))
}

/// Connections `server.internal_listen` accepts at once.
pub(crate) const INTERNAL_MAX_CONNECTIONS: usize = 64;

/// Liveness: 200 while the process runs.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process runs", body = bodies::Health))
)]
async fn healthz() -> impl IntoResponse {
    axum::Json(bodies::Health { status: "ok" })
}

/// Readiness: storage answers and the service is not draining.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: storage answers and the service is not draining", body = bodies::Readiness),
        (status = 503, description = "Not ready; the body names each check", body = bodies::Readiness),
    )
)]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let storage = storage_check(&state).await;
    let draining = state.shutdown.is_cancelled();
    let ready = storage == "ok" && !draining;
    let body = bodies::Readiness {
        status: if ready { "ready" } else { "not_ready" },
        checks: bodies::ReadinessChecks {
            storage,
            accepting: if draining { "draining" } else { "ok" },
        },
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// The readiness write is a durable write on the one SQLite writer that anyone may trigger, so
/// its result is reused for `READY_CACHE`; callers arriving meanwhile wait for the one running.
async fn storage_check(state: &AppState) -> String {
    let mut cached = state.readiness.lock().await;
    if let Some((at, result)) = cached.as_ref()
        && at.elapsed() < READY_CACHE
    {
        return result.clone();
    }
    let result = match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => match state.ingest.failing(INGEST_FAILURE_WINDOW) {
            Some(e) => format!("failing: webhooks cannot be committed: {e}"),
            None => "ok".to_string(),
        },
        Ok(Err(e)) => format!("failing: {e}"),
        Err(_) => "failing: no answer within 2 s".to_string(),
    };
    if result != "ok" {
        state.alerts.report(
            AlertKind::Storage,
            Example::default().error(format!("readiness check {result}")),
        );
    }
    *cached = Some((std::time::Instant::now(), result.clone()));
    result
}

const READY_CACHE: Duration = Duration::from_secs(1);

/// A failed group commit keeps `/readyz` at 503 for this long unless a later one succeeds; after
/// it, the readiness write alone decides (a load balancer that took the replica out of service
/// sends no webhooks to prove ingest works again). Senders retrying against a full disk fail
/// their commits again and keep it at 503.
const INGEST_FAILURE_WINDOW: Duration = Duration::from_secs(3);

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "The Prometheus text exposition format (0.0.4)", content_type = "text/plain", body = String),
    )
)]
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let read = async { tokio::join!(state.store.stats(), state.store.storage_bytes()) };
    let stats = match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok((Ok(mut s), bytes)) => {
            s.storage_bytes = bytes.ok();
            Some(s)
        }
        _ => None,
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(stats.as_ref()),
    )
        .into_response()
}

async fn not_found() -> AppError {
    AppError::NotFound("no such route".into())
}

async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// Answers 408 in the JSON error format when a request (a slow client included) takes too long.
async fn request_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => AppError::Timeout(limit.as_millis() as u64).into_response(),
    }
}

/// Accepts the caller's `x-request-id` (or makes one), puts it on the span and the answer.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", fastrand::u64(..)));
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert("x-request-id", v);
    }
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = {
        use tracing::Instrument;
        next.run(req).instrument(span).await
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
