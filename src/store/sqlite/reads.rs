//! A small pool of read-only SQLite connections. Each read runs on a blocking thread
//! (`spawn_blocking`) with a connection taken from the pool and given back afterwards; in WAL
//! mode they read beside the writer without waiting for it.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::Semaphore;

use super::Target;
use crate::store::{Cause, Result, StoreError};

/// Connections in the pool: reads of the admin API, the dashboard and the worker's lookups.
const READERS: usize = 4;
/// How long a read waits for a free connection.
const READ_WAIT: Duration = Duration::from_secs(5);

pub(super) struct Reads {
    idle: std::sync::Mutex<Vec<Connection>>,
    permits: Semaphore,
    target: Target,
}

impl Reads {
    /// Opens one connection now (so a database that cannot be read fails at start-up); the
    /// others are opened when first needed.
    pub(super) fn open(target: Target) -> Result<Arc<Self>> {
        let first = super::open_reader(&target)?;
        Ok(Arc::new(Reads {
            idle: std::sync::Mutex::new(vec![first]),
            permits: Semaphore::new(READERS),
            target,
        }))
    }

    /// Runs `f` on a read connection.
    pub(super) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let permit = match tokio::time::timeout(READ_WAIT, self.permits.acquire()).await {
            Err(_) => {
                return Err(StoreError::Timeout(Cause::msg(
                    "no database read connection within 5 s",
                )));
            }
            Ok(Err(_)) => return Err(StoreError::Closed),
            Ok(Ok(p)) => p,
        };
        let pool = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            let idle = pool.idle.lock().ok().and_then(|mut v| v.pop());
            let mut conn = match idle {
                Some(c) => c,
                None => super::open_reader(&pool.target)?,
            };
            let r = f(&mut conn);
            // A connection left inside a transaction (a read that failed half-way) is dropped.
            if conn.is_autocommit()
                && !pool.permits.is_closed()
                && let Ok(mut idle) = pool.idle.lock()
            {
                idle.push(conn);
            }
            r
        })
        .await
        .map_err(|e| StoreError::Broken(Cause::new(e)))?;
        drop(permit);
        r
    }

    /// Refuses new reads and closes the idle connections; one in use closes when its read ends.
    pub(super) fn close(&self) {
        self.permits.close();
        let idle = self
            .idle
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        for conn in idle {
            if let Err((_, e)) = conn.close() {
                tracing::warn!(error = %e, "closing a database read connection failed");
            }
        }
    }
}
