//! Wiring: builds the router and the worker from a `Config`, serves until shutdown, drains.
//! `start` is what tests use; `run` adds the signal handling of the real process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::Worker;
use crate::http::{AppState, INTERNAL_MAX_CONNECTIONS, build_app, restricted};
use crate::sprinthub::SprintHubClient;
use crate::store;
use crate::telemetry::Metrics;
use crate::telemetry::traces::Tracer;

/// How long stopping waits for the queued trace spans to be exported.
const TRACE_FLUSH: Duration = Duration::from_secs(5);

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

/// Opens storage, binds the listener, and spawns the server and the worker.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let store = store::open(config.storage.url.expose())
        .await
        .map_err(|e| StartError::Storage(e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    let tracer = Tracer::start(&config.telemetry, metrics.clone()).map_err(StartError::Client)?;
    let hub = SprintHubClient::new(&config.sprinthub)
        .map_err(StartError::Client)?
        .with_tracer(tracer.clone());
    let wake = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let alerts = crate::alerts::start(&config, store.clone(), metrics.clone(), shutdown.clone());
    let state = Arc::new(
        AppState::new(
            config.clone(),
            store.clone(),
            metrics.clone(),
            wake.clone(),
            shutdown.clone(),
        )
        .map_err(StartError::Client)?
        .with_alerts(alerts.clone())
        .with_tracer(tracer.clone()),
    );
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
    let mut limits = crate::http::serve::Limits::from_config(&config.server);
    let others = if internal_listener.is_some() {
        INTERNAL_MAX_CONNECTIONS
    } else {
        0
    };
    let fds = crate::http::serve::open_files_limit();
    let cap = crate::http::serve::clamp_connections(limits.max_connections, others, fds);
    if cap < limits.max_connections {
        tracing::warn!(
            configured = limits.max_connections,
            effective = cap,
            open_files_limit = fds,
            "server.max_connections lowered to fit the open-files limit (raise `ulimit -n` for more)"
        );
        limits.max_connections = cap;
    }
    let pruner =
        crate::retention::Pruner::new(store.clone(), config.retention.clone(), metrics.clone());
    let pruner_task = tokio::spawn(pruner.run(shutdown.clone()));
    let worker = Worker::new(
        store.clone(),
        hub,
        config.clone(),
        metrics,
        wake,
        alerts,
        state.fleet.clone(),
    );
    let drain = Duration::from_millis(config.server.shutdown_timeout_ms);
    let worker_task = tokio::spawn(worker.run(shutdown.clone(), drain.mul_f64(0.8)));
    let stop = shutdown.clone();
    let handle = tokio::spawn(async move {
        let internal_task = internal_listener.map(|l| {
            // Probes and scrapers: few connections, the same timeouts.
            let internal_limits = crate::http::serve::Limits {
                max_connections: INTERNAL_MAX_CONNECTIONS,
                ..limits.clone()
            };
            tokio::spawn(crate::http::serve::serve(
                l,
                restricted(router.clone(), true, false),
                internal_limits,
                stop.clone(),
            ))
        });
        let public = restricted(router, false, internal_task.is_some());
        let server_task = tokio::spawn(crate::http::serve::serve(
            listener,
            public,
            limits,
            stop.clone(),
        ));
        stop.cancelled().await;
        tracing::info!("draining");
        let both = async {
            let _ = server_task.await;
            if let Some(t) = internal_task {
                let _ = t.await;
            }
            let _ = worker_task.await;
            let _ = pruner_task.await;
        };
        if tokio::time::timeout(drain, both).await.is_err() {
            tracing::warn!("drain took longer than server.shutdown_timeout_ms; stopping anyway");
        }
        // The spans of the drained requests and calls go out, within a deadline of their own.
        tracer.shutdown(TRACE_FLUSH).await;
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
