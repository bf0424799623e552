//! The NOTIFY that wakes the other replicas' workers when an ingest queued work, sent after the
//! commit on a connection of its own instead of inside the ingest transaction: there it cost
//! every group one more round trip and NOTIFY's work at commit. Calls coalesce: at most one
//! NOTIFY is in flight, and one is always sent after the last commit that asked for it, so no
//! wake-up is lost (a worker woken claims what is committed by then).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use crate::store::WORK_CHANNEL;

pub(super) struct Waker {
    wanted: AtomicBool,
    poke: Notify,
}

impl Waker {
    /// Starts the sending task on `pool`; it ends when the pool is closed.
    pub(super) fn spawn(pool: sqlx::PgPool) -> Arc<Waker> {
        let waker = Arc::new(Waker {
            wanted: AtomicBool::new(false),
            poke: Notify::new(),
        });
        let w = waker.clone();
        tokio::spawn(async move {
            loop {
                w.poke.notified().await;
                if pool.is_closed() {
                    return;
                }
                while w.wanted.swap(false, Ordering::AcqRel) {
                    if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
                        .bind(WORK_CHANNEL)
                        .execute(&pool)
                        .await
                    {
                        // The other replicas' polls cover a lost wake-up.
                        tracing::debug!(error = %e, "waking the other replicas failed");
                    }
                }
            }
        });
        waker
    }

    /// Asks for a NOTIFY after work was committed.
    pub(super) fn wake(&self) {
        self.wanted.store(true, Ordering::Release);
        self.poke.notify_one();
    }

    /// Lets the task see a closed pool and end.
    pub(super) fn stop(&self) {
        self.poke.notify_one();
    }
}
