//! The accept loop: hyper-util's HTTP/1 + HTTP/2 server with the limits `axum::serve` lacks.
//!
//! - at most `max_connections` connections at once; when they are all taken the loop stops
//!   accepting until one closes (new clients wait in the kernel's backlog);
//! - HTTP/1: the request head must arrive within `header_read_timeout` (which also closes a
//!   keep-alive connection that sends nothing) and may be at most [`MAX_HEAD_BYTES`];
//! - HTTP/2: `http2_max_concurrent_streams` streams per connection, small flow-control windows,
//!   a 16 KiB header list, keep-alive pings;
//! - a connection with no request in flight for `idle_timeout` is shut down gracefully (both
//!   protocols; an HTTP/2 client gets a GOAWAY);
//! - on `stop`, accepting ends and every connection is shut down gracefully: requests in flight
//!   finish, then the connections close. `serve` returns when the last one has closed.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// HTTP/1 read buffer, and so the largest request head accepted (larger: 431).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// HTTP/2 header list limit.
const MAX_H2_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 flow-control windows: what a client may send before the server has read it.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 256 * 1024;
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// Descriptors kept for everything but client connections: the database pool, outbound
/// HTTP, the listeners, logs.
pub const RESERVED_DESCRIPTORS: u64 = 64;
/// The fewest client connections the descriptor clamp leaves.
const MIN_CONNECTIONS: u64 = 16;

/// The soft limit on open files, from `/proc/self/limits` (`None` where there is no procfs or
/// no limit).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `wanted` connections, lowered so that `others` more connections (another listener) and the
/// reserved descriptors fit under `limit`: a flood then meets the cap, not the descriptor limit,
/// and the process can still open its database connections and the other listener's.
pub fn clamp_connections(wanted: usize, others: usize, limit: Option<u64>) -> usize {
    let Some(limit) = limit else {
        return wanted;
    };
    let room = limit
        .saturating_sub(RESERVED_DESCRIPTORS + others as u64)
        .max(MIN_CONNECTIONS);
    wanted.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// The limits of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
}

impl Limits {
    pub fn from_config(c: &crate::config::ServerConfig) -> Limits {
        Limits {
            max_connections: c.max_connections,
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            http2_max_concurrent_streams: c.http2_max_concurrent_streams,
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.http2_max_concurrent_streams)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_header_list_size(MAX_H2_HEADER_LIST)
            .max_send_buf_size(64 * 1024)
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_timeout(H2_KEEPALIVE);
        b
    }
}

/// Serves `router` on `listener` until `stop`, then drains the connections.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, stop: CancellationToken) {
    let builder = Arc::new(limits.builder());
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let epoch = Instant::now();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => (stream, peer),
                Err(e) => {
                    // Per-connection errors (reset before accept) are routine; others (out of
                    // descriptors) get a pause so the loop does not spin.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                    ) {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = stream.0.set_nodelay(true);
        let builder = builder.clone();
        let router = router.clone();
        let stop = stop.clone();
        let idle = limits.idle_timeout;
        tokio::spawn(async move {
            connection(stream, router, &builder, idle, stop, epoch).await;
            drop(permit);
        });
    }
    drop(listener);
    // Every connection holds a slot: all slots free means all connections have closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// What a connection is doing: requests in flight and when the count last changed.
struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// `None` when the connection has been idle for `idle`; otherwise how long to wait before
    /// asking again.
    fn idle_left(&self, idle: Duration) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Some(idle);
        }
        let since = Duration::from_millis(
            (self.epoch.elapsed().as_millis() as u64)
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        );
        idle.checked_sub(since).filter(|d| !d.is_zero())
    }

    async fn idle_for(&self, idle: Duration) {
        while let Some(wait) = self.idle_left(idle) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Marks a request in flight until its response body has been sent (or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(a: &Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        a.touch();
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    (stream, peer): (tokio::net::TcpStream, std::net::SocketAddr),
    router: Router,
    builder: &auto::Builder<TokioExecutor>,
    idle: Duration,
    stop: CancellationToken,
    epoch: Instant,
) {
    let activity = Arc::new(Activity {
        epoch,
        in_flight: AtomicUsize::new(0),
        last_ms: AtomicU64::new(epoch.elapsed().as_millis() as u64),
    });
    let watched = activity.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let guard = InFlight::begin(&watched);
        let router = router.clone();
        async move {
            use tower::ServiceExt;
            // The peer address, as `axum::serve` would give it: the admin token's failure
            // throttle counts by it.
            let mut req = req.map(Body::new);
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            // The guard lives in the response body, so a slow download is not "idle".
            Ok::<_, Infallible>(resp.map(|b| {
                Body::new(b.map_frame(move |f| {
                    let _ = &guard;
                    f
                }))
            }))
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = stop.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.idle_for(idle), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_fits_under_the_descriptor_limit() {
        assert_eq!(clamp_connections(1024, 64, Some(20_000)), 1024);
        assert_eq!(clamp_connections(1024, 64, Some(256)), 128);
        assert_eq!(clamp_connections(1024, 0, Some(100)), 36);
        assert_eq!(clamp_connections(1024, 64, Some(50)), 16);
        assert_eq!(clamp_connections(1024, 64, None), 1024);
    }
}
