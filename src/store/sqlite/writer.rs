//! SQLite's one write connection, owned by a dedicated OS thread. Every write is a job sent to
//! that thread through a bounded channel and answered through a oneshot, so no async thread ever
//! blocks on SQLite (its busy waits, its fsyncs) and no two writes ever overlap.
//!
//! After a failed job the connection is brought back to a usable state before the next job
//! runs: an open transaction is rolled back, and a connection that cannot roll back, or that
//! reports a broken database (I/O error, corruption), is replaced by a fresh one. So a COMMIT
//! refused for a full disk never leaves the writer stuck inside a transaction.
//!
//! Background work (retention) goes through a second lane, `run_background`: such a job runs
//! only when no other job is queued (or once it has waited `BACKGROUND_MAX_WAIT`, so it is never
//! starved for good), so a group commit never queues behind a prune step; and it commits
//! without an fsync of its own (see `run_background`).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{mpsc, oneshot};

use super::Target;
use crate::store::{Cause, Result, StoreError};

/// How long a caller waits for the writer (a place in its queue, then the start of its job)
/// before answering "storage unavailable".
pub(super) const WRITER_WAIT: Duration = Duration::from_secs(5);

/// Jobs waiting for the writer; a caller finding it full waits (within `WRITER_WAIT`).
const QUEUE: usize = 1024;

/// Background jobs waiting for an idle writer: only retention submits them, one at a time per
/// pruner, so a handful is plenty; a caller finding it full is told `Timeout`.
const BACKGROUND_QUEUE: usize = 8;

/// The longest a background job waits for an idle writer before it runs between two other
/// jobs anyway: under a load that never lets the queue empty, retention still moves.
pub(super) const BACKGROUND_MAX_WAIT: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce(&mut Writer) + Send>;

/// The background lane: jobs with the time they were queued.
type Background = Arc<Mutex<VecDeque<(Instant, Job)>>>;

/// What the writer thread owns: its connection (none after a reopen failed; the next job tries
/// again) and how to open another.
pub(super) struct Writer {
    conn: Option<Connection>,
    target: Target,
}

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const ABANDONED: u8 = 2;

impl Writer {
    fn conn(&mut self) -> Result<&mut Connection> {
        if self.conn.is_none() {
            self.conn = Some(super::open_writer(&self.target)?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::broken("no database writer"))
    }

    /// Makes the connection fit for the next job after `failure`.
    fn recover(&mut self, failure: Option<&StoreError>) {
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let mut reopen = failure.is_some_and(reports_broken_database);
        if !conn.is_autocommit() {
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "rolling back a failed write failed");
                reopen = true;
            }
            reopen |= !conn.is_autocommit();
        }
        if reopen {
            tracing::warn!("the database writer was left unusable by a failed write; reopening it");
            if let Some(old) = self.conn.take()
                && let Err((_, e)) = old.close()
            {
                tracing::warn!(error = %e, "closing the broken database writer failed");
            }
            match super::open_writer(&self.target) {
                Ok(c) => self.conn = Some(c),
                Err(e) => tracing::warn!(error = %e, "reopening the database writer failed"),
            }
        }
    }

    /// Folds the write-ahead log back into the database file, then closes the connection.
    fn close(mut self) -> Result<()> {
        let Some(conn) = self.conn.take() else {
            return Ok(());
        };
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "the final checkpoint failed");
        }
        conn.close().map_err(|(_, e)| e.into())
    }
}

/// Whether an error says the database or its file is in trouble, not just this statement.
fn reports_broken_database(e: &StoreError) -> bool {
    let cause = match e {
        StoreError::Broken(c) | StoreError::Timeout(c) => c,
        _ => return false,
    };
    let source: &(dyn std::error::Error + 'static) = cause.inner();
    source
        .downcast_ref::<rusqlite::Error>()
        .and_then(rusqlite::Error::sqlite_error_code)
        .is_some_and(|code| {
            matches!(
                code,
                ErrorCode::SystemIoFailure
                    | ErrorCode::DatabaseCorrupt
                    | ErrorCode::NotADatabase
                    | ErrorCode::CannotOpen
            )
        })
}

/// The async side of the writer: sends jobs and awaits their answers.
pub(super) struct WriterHandle {
    tx: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<Result<()>>>>,
    background: Background,
}

/// The oldest background job, if there is one and (given `waited`) it has waited that long.
fn next_background(lane: &Background, waited: Option<Duration>) -> Option<Job> {
    let mut lane = lane.lock().ok()?;
    let (queued, _) = lane.front()?;
    if waited.is_some_and(|w| queued.elapsed() < w) {
        return None;
    }
    lane.pop_front().map(|(_, job)| job)
}

impl WriterHandle {
    /// Starts the writer thread on `conn`.
    pub(super) fn spawn(conn: Connection, target: Target) -> Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let mut writer = Writer {
            conn: Some(conn),
            target,
        };
        let background: Background = Arc::default();
        let lane = background.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let run = |writer: &mut Writer, job: Job| {
                    if std::panic::catch_unwind(AssertUnwindSafe(|| job(writer))).is_err() {
                        tracing::error!("a database write panicked");
                        writer.recover(None);
                    }
                };
                // Ends once every sender is gone, after the jobs already queued (background
                // jobs still waiting are dropped: their callers hear `Closed`).
                loop {
                    let job = match rx.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Disconnected) => break,
                        Err(TryRecvError::Empty) => match next_background(&lane, None) {
                            Some(job) => job,
                            None => match rx.blocking_recv() {
                                Some(job) => job,
                                None => break,
                            },
                        },
                    };
                    run(&mut writer, job);
                    if let Some(starved) = next_background(&lane, Some(BACKGROUND_MAX_WAIT)) {
                        run(&mut writer, starved);
                    }
                }
                // The receiver goes first: a job put in the lane after this finds the channel
                // closed and takes it out again itself (`run_background`).
                drop(rx);
                if let Ok(mut lane) = lane.lock() {
                    lane.clear();
                }
                writer.close()
            })
            .map_err(|e| StoreError::Broken(Cause::new(e)))?;
        Ok(WriterHandle {
            tx: std::sync::Mutex::new(Some(tx)),
            thread: std::sync::Mutex::new(Some(thread)),
            background,
        })
    }

    /// Runs `f` like `run`, but only when no other job is queued (or once it has waited
    /// `BACKGROUND_MAX_WAIT`), inside `BEGIN IMMEDIATE` ... `COMMIT` with `synchronous = NORMAL`:
    /// its commit is not fsync'd by itself, the next ordinary commit's fsync of the log covers
    /// it. So it must only be work whose loss in a power cut is harmless because it is done
    /// again (retention: the rows come back and the next pass deletes them); the log stays
    /// consistent either way (a torn tail is discarded at recovery). `synchronous = FULL` is
    /// back before any other job runs, or the connection is replaced.
    pub(super) async fn run_background<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (job, _state, answer) = job(move |conn: &mut Connection| {
            conn.execute_batch("PRAGMA synchronous = NORMAL")?;
            let out = (|| {
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let out = f(&tx)?;
                tx.commit()?;
                Ok(out)
            })();
            if !conn.is_autocommit() {
                // Rolled back here, not in `recover`, so that FULL is restored after it.
                let _ = conn.execute_batch("ROLLBACK");
            }
            conn.execute_batch("PRAGMA synchronous = FULL")?;
            out
        });
        // Restoring FULL is checked: a connection left in NORMAL would acknowledge events
        // without an fsync, so one that refuses is dropped (the next job opens a fresh one).
        let job: Job = Box::new(move |w: &mut Writer| {
            job(w);
            let full = w.conn.as_ref().and_then(|c| {
                c.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))
                    .ok()
            });
            if w.conn.is_some() && full != Some(2) {
                tracing::warn!(
                    "the database writer did not return to synchronous = FULL; reopening it"
                );
                w.conn = None;
            }
        });
        let sender = self.sender()?;
        {
            let mut lane = self.background.lock().map_err(|_| StoreError::Closed)?;
            if lane.len() >= BACKGROUND_QUEUE {
                return Err(StoreError::Timeout(Cause::msg(
                    "the database writer's background lane is full",
                )));
            }
            lane.push_back((Instant::now(), job));
        }
        // Wakes a writer blocked waiting for jobs; when the queue is full the writer is busy and
        // looks at the background lane as soon as it has drained it.
        if let Err(TrySendError::Closed(_)) = sender.try_send(Box::new(|_: &mut Writer| {})) {
            if let Ok(mut lane) = self.background.lock() {
                lane.clear();
            }
            return Err(StoreError::Closed);
        }
        drop(sender);
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// A sender for jobs, unless the writer is closed.
    pub(super) fn sender(&self) -> Result<mpsc::Sender<Job>> {
        self.tx
            .lock()
            .ok()
            .and_then(|t| t.clone())
            .ok_or(StoreError::Closed)
    }

    /// Runs `f` on the writer's connection and answers its result. Waiting more than
    /// `WRITER_WAIT` for the job to start answers `Timeout`, and the job is then skipped; a job
    /// that has started always runs to its end.
    pub(super) async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let deadline = tokio::time::Instant::now() + WRITER_WAIT;
        let (job, state, mut answer) = job(f);
        let sender = self.sender()?;
        match tokio::time::timeout_at(deadline, sender.send(job)).await {
            Err(_) => return Err(timeout()),
            Ok(Err(_)) => return Err(StoreError::Closed),
            Ok(Ok(())) => {}
        }
        drop(sender);
        match tokio::time::timeout_at(deadline, &mut answer).await {
            Ok(r) => r.map_err(|_| StoreError::Closed)?,
            Err(_) => {
                if state
                    .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Err(timeout());
                }
                answer.await.map_err(|_| StoreError::Closed)?
            }
        }
    }

    /// `run` inside `BEGIN IMMEDIATE` ... `COMMIT`; rolled back if `f` fails.
    pub(super) async fn run_tx<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.run(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// `run` for a caller outside the async runtime (the checkpointer's thread), without the
    /// wait limit.
    pub(super) fn run_blocking<T, F>(sender: &mpsc::Sender<Job>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let (job, _state, answer) = job(f);
        sender.blocking_send(job).map_err(|_| StoreError::Closed)?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Lets the queued jobs finish, then closes the connection (after a final checkpoint).
    pub(super) async fn close(&self) -> Result<()> {
        let tx = self.tx.lock().ok().and_then(|mut t| t.take());
        drop(tx);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        let Some(thread) = thread else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| StoreError::Broken(Cause::new(e)))?
            .map_err(|_| StoreError::broken("the database writer thread panicked"))?
    }
}

fn timeout() -> StoreError {
    StoreError::Timeout(Cause::msg("no database writer within 5 s"))
}

type Answer<T> = oneshot::Receiver<Result<T>>;

/// `f` as a job for the writer thread, with its state (queued, running, abandoned) and where its
/// answer arrives.
fn job<T, F>(f: F) -> (Job, Arc<AtomicU8>, Answer<T>)
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
{
    let state = Arc::new(AtomicU8::new(QUEUED));
    let (reply, answer) = oneshot::channel();
    let job_state = state.clone();
    let job: Job = Box::new(move |w: &mut Writer| {
        if job_state
            .compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let r = w.conn().and_then(f);
        if let Err(e) = &r {
            w.recover(Some(e));
        }
        let _ = reply.send(r);
    });
    (job, state, answer)
}
