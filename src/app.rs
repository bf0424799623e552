//! Wiring: builds the router and the worker from a `Config`, serves until shutdown, drains.
//! `start` is what tests use; `run` adds the signal handling of the real process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::batch::Batcher;
use crate::config::{Config, SourceConfig};
use crate::delivery::Worker;
use crate::error::AppError;
use crate::signature::Verifier;
use crate::sprinthub::SprintHubClient;
use crate::store::{self, IngestOutcome, NewEvent, Store};
use crate::telemetry::Metrics;

/// Everything a request handler may need, shared by all of them.
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub sources: HashMap<String, (SourceConfig, Verifier)>,
    pub ingest: Batcher<NewEvent, IngestOutcome>,
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the process starts draining.
    pub shutdown: CancellationToken,
    /// The latest storage check of `/readyz` and when it ran: probes share one write a second.
    pub readiness: tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// Failed-token throttle and dashboard sessions (per process).
    pub auth: Arc<crate::auth::Auth>,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("{0}")]
    Client(String),
}

/// A started service: where it listens and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `server.internal_listen` is bound, when it is set.
    pub internal_addr: Option<SocketAddr>,
    pub shutdown: CancellationToken,
    pub state: Arc<AppState>,
    handle: JoinHandle<()>,
}

impl Running {
    /// Starts draining and waits until the server and the worker have stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }

    /// Waits until the service has stopped (after `shutdown` was cancelled).
    pub async fn wait(self) {
        let _ = self.handle.await;
    }
}

/// Builds the router over a state; exposed so tests can drive it without a socket.
pub fn build_app(state: Arc<AppState>) -> Router {
    let timeout = Duration::from_millis(state.config.server.request_timeout_ms);
    // Every route is registered with its `#[utoipa::path]` description, which makes the
    // OpenAPI document served at /openapi.json.
    let (router, api) = OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(routes!(crate::ingest::webhook))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(crate::openapi::openapi_json))
        .merge(crate::admin::routes(state.clone()))
        .merge(crate::ui::routes(state.clone()))
        .split_for_parts();
    let spec = crate::openapi::Spec::new(&crate::openapi::finish(api));
    let budget = crate::budget::BodyBudget::new(state.config.server.max_buffered_bytes);
    router
        .layer(Extension(spec))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(timeout, request_timeout))
        .layer(middleware::from_fn_with_state(
            budget,
            crate::budget::limit_buffered,
        ))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// The routes `server.internal_listen` serves, and the ones that leave `listen` when it is set.
const INTERNAL_ONLY: &[&str] = &["/metrics", "/openapi.json"];
const INTERNAL: &[&str] = &["/healthz", "/readyz", "/metrics", "/openapi.json"];

/// The router restricted for one listener: with `internal`, only the operational routes;
/// without, everything but the internal-only ones (when `hide_internal`).
fn restricted(router: Router, internal: bool, hide_internal: bool) -> Router {
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
const INTERNAL_MAX_CONNECTIONS: usize = 64;

/// Opens storage, binds the listener, and spawns the server and the worker.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let store = store::open(config.storage.url.expose())
        .await
        .map_err(|e| StartError::Storage(e.to_string()))?;
    let hub = SprintHubClient::new(&config.sprinthub).map_err(StartError::Client)?;
    let metrics = Arc::new(Metrics::new());
    let wake = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let ingest_store = store.clone();
    let ingest = Batcher::spawn(512, move |events: Arc<[NewEvent]>| {
        let s = ingest_store.clone();
        async move { s.ingest(&events).await }
    });
    let sources = config
        .sources
        .iter()
        .map(|s| (s.name.clone(), (s.clone(), Verifier::from_source(s))))
        .collect();
    let auth = crate::auth::Auth::new(&config.admin).map_err(StartError::Client)?;
    let state = Arc::new(AppState {
        config: config.clone(),
        store: store.clone(),
        sources,
        ingest,
        wake: wake.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        readiness: tokio::sync::Mutex::new(None),
        auth: Arc::new(auth),
    });
    let listener = tokio::net::TcpListener::bind(&config.server.listen)
        .await
        .map_err(|e| StartError::Listen(config.server.listen.clone(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Listen(config.server.listen.clone(), e))?;
    let internal_listener = match &config.server.internal_listen {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| StartError::Listen(at.clone(), e))?,
        ),
        None => None,
    };
    let internal_addr = match &internal_listener {
        Some(l) => Some(l.local_addr().map_err(|e| {
            StartError::Listen(config.server.internal_listen.clone().unwrap_or_default(), e)
        })?),
        None => None,
    };
    let router = build_app(state.clone());
    let mut limits = crate::serve::Limits::from_config(&config.server);
    let others = if internal_listener.is_some() {
        INTERNAL_MAX_CONNECTIONS
    } else {
        0
    };
    let fds = crate::serve::open_files_limit();
    let cap = crate::serve::clamp_connections(limits.max_connections, others, fds);
    if cap < limits.max_connections {
        tracing::warn!(
            configured = limits.max_connections,
            effective = cap,
            open_files_limit = fds,
            "server.max_connections lowered to fit the open-files limit (raise `ulimit -n` for more)"
        );
        limits.max_connections = cap;
    }
    let worker = Worker::new(store.clone(), hub, config.clone(), metrics, wake);
    let drain = Duration::from_millis(config.server.shutdown_timeout_ms);
    let worker_task = tokio::spawn(worker.run(shutdown.clone(), drain.mul_f64(0.8)));
    let stop = shutdown.clone();
    let handle = tokio::spawn(async move {
        let internal_task = internal_listener.map(|l| {
            // Probes and scrapers: few connections, the same timeouts.
            let internal_limits = crate::serve::Limits {
                max_connections: INTERNAL_MAX_CONNECTIONS,
                ..limits.clone()
            };
            tokio::spawn(crate::serve::serve(
                l,
                restricted(router.clone(), true, false),
                internal_limits,
                stop.clone(),
            ))
        });
        let public = restricted(router, false, internal_task.is_some());
        let server_task = tokio::spawn(crate::serve::serve(listener, public, limits, stop.clone()));
        stop.cancelled().await;
        tracing::info!("draining");
        let both = async {
            let _ = server_task.await;
            if let Some(t) = internal_task {
                let _ = t.await;
            }
            let _ = worker_task.await;
        };
        if tokio::time::timeout(drain, both).await.is_err() {
            tracing::warn!("drain took longer than server.shutdown_timeout_ms; stopping anyway");
        }
        store.close().await;
        tracing::info!("stopped");
    });
    tracing::info!(%addr, internal = ?internal_addr, storage = %crate::config::redact_url(config.storage.url.expose()), sources = config.sources.len(), "sprintlink is serving");
    Ok(Running {
        addr,
        internal_addr,
        shutdown,
        state,
        handle,
    })
}

/// Runs the service until SIGTERM or SIGINT, then drains within `shutdown_timeout_ms`.
pub async fn run(config: Config) -> Result<(), StartError> {
    let running = start(config).await?;
    let token = running.shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown signal received");
        token.cancel();
    });
    running.wait().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Liveness: 200 while the process runs.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process runs", body = crate::openapi::Health))
)]
async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// Readiness: storage answers and the service is not draining.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: storage answers and the service is not draining", body = crate::openapi::Readiness),
        (status = 503, description = "Not ready; the body names each check", body = crate::openapi::Readiness),
    )
)]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let storage = storage_check(&state).await;
    let draining = state.shutdown.is_cancelled();
    let ready = storage == "ok" && !draining;
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "storage": storage,
            "accepting": if draining { "draining" } else { "ok" },
        }
    });
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
    let stats = match tokio::time::timeout(Duration::from_secs(5), state.store.stats()).await {
        Ok(Ok(s)) => Some(s),
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
