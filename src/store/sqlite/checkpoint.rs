//! Copies committed pages from the write-ahead log into the database file, on a connection and
//! a thread of its own, so no commit waits for it (the writer never checkpoints). Under a steady
//! stream of commits such a checkpoint never quite catches up and the log would grow without
//! end; past `CHECKPOINT_FORCE_PAGES` one pass runs as a job on the writer's thread, which holds
//! every write off while it finishes (it has only the last few commits left to copy).

use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::Duration;

use rusqlite::Connection;

use super::writer::WriterHandle;
use crate::store::{Cause, Result, StoreError};

/// How often the write-ahead log is copied into the database file.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// The log length (in 4 KiB pages, 64 MiB) past which a checkpoint holds the writer for a
/// moment so that it can finish and the log starts again from its beginning.
const CHECKPOINT_FORCE_PAGES: i64 = 16_384;

/// The running checkpointer: dropping `stop` (or sending on it) ends it within one period.
pub(super) struct Checkpointer {
    stop: Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Pages in the log after a passive checkpoint.
fn passive(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?)
}

impl Checkpointer {
    pub(super) fn spawn(conn: Connection, writer: &WriterHandle) -> Result<Self> {
        let writer = writer.sender()?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                loop {
                    match stopped.recv_timeout(CHECKPOINT_EVERY) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    match passive(&conn) {
                        Ok(pages) if pages >= CHECKPOINT_FORCE_PAGES => {
                            let held =
                                WriterHandle::run_blocking(&writer, |w| passive(w).map(|_| ()));
                            if let Err(e) = held {
                                tracing::warn!(error = %e, "checkpoint with the writer held failed");
                            }
                        }
                        Ok(_) => {}
                        // Busy (another process holds the database) or a failing disk: the
                        // writer's own errors tell the operator; the next pass tries again.
                        Err(e) => tracing::debug!(error = %e, "checkpoint failed"),
                    }
                }
            })
            .map_err(|e| StoreError::Broken(Cause::new(e)))?;
        Ok(Checkpointer { stop, thread })
    }

    /// Stops the checkpointer and waits for its thread (at most one pass).
    pub(super) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}
