//! The embedded default: one SQLite file through rusqlite, WAL, `synchronous=FULL` so an
//! acknowledged event survives a power cut. Every write runs on one dedicated thread that owns
//! the one write connection (`writer`); reads run on a small pool of read-only connections
//! (`reads`); the write-ahead log is copied back beside them (`checkpoint`). Plain SQL in
//! SQLite's dialect, with `?n` parameters.

mod checkpoint;
mod group;
mod objects;
mod reads;
mod retention;
mod search_index;
mod writer;

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};

use super::shared::{
    EVENT_STATE, HELD_BY_OPERATOR, PAIR_WANTED, SUMMARY_COLUMNS, lease_token, prefix_end,
};
use super::*;
use checkpoint::Checkpointer;
use reads::Reads;
use writer::WriterHandle;

const SET_PAUSE: &str = "INSERT INTO delivery_control (id, reason, paused_until, changed_at)
     VALUES (1, ?1, ?2, ?3)
     ON CONFLICT (id) DO UPDATE SET reason = excluded.reason,
       paused_until = excluded.paused_until, changed_at = excluded.changed_at";

const THROTTLE_PAUSE: &str = "INSERT INTO delivery_control (id, reason, paused_until, changed_at)
     VALUES (1, 'throttled', ?1, ?2)
     ON CONFLICT (id) DO UPDATE SET reason = 'throttled',
       paused_until = excluded.paused_until, changed_at = excluded.changed_at
     WHERE delivery_control.reason IS NULL
        OR (delivery_control.paused_until IS NOT NULL AND delivery_control.paused_until < excluded.paused_until)";

/// A time range of at most this many events is read through `events_received` (see
/// `list_events`).
const SMALL_TIME_RANGE: i64 = 10_000;

/// The events of a time range, counted up to `?3`: an index range, a few ms at most.
const COUNT_TIME_RANGE: &str =
    "SELECT COUNT(*) FROM (SELECT 1 FROM events INDEXED BY events_received
    WHERE received_at >= ?1 AND received_at < ?2 LIMIT ?3)";

/// States read from and bound as their text column, so a row struct holds the enum.
macro_rules! state_column {
    ($ty:ty) => {
        impl rusqlite::types::ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }
        impl rusqlite::types::FromSql for $ty {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                v.as_str()?
                    .parse()
                    .map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
            }
        }
    };
}
state_column!(EventState);
state_column!(LinkState);
state_column!(ObjectState);
state_column!(CreationOutcome);

/// Ids read from and bound as their integer or text column.
macro_rules! id_column {
    ($ty:ty, int) => {
        impl rusqlite::types::ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.0.into())
            }
        }
        impl rusqlite::types::FromSql for $ty {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                v.as_i64().map(Self)
            }
        }
    };
    ($ty:ty, text) => {
        impl rusqlite::types::ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }
        impl rusqlite::types::FromSql for $ty {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                v.as_str().map(<$ty>::from)
            }
        }
    };
}
id_column!(EventPk, int);
id_column!(LinkId, int);
id_column!(ObjectId, text);
id_column!(LeadId, text);

/// The columns of a `StoredRequest`, in the order `request_at` reads them.
const REQUEST_COLUMNS: &str = "raw_body, body, content_type, request_headers, request_query";

/// The stored request in the five columns from `at` on (`REQUEST_COLUMNS`).
fn request_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<StoredRequest> {
    Ok(StoredRequest::from_columns(
        r.get(at)?,
        r.get(at + 1)?,
        r.get(at + 2)?,
        r.get(at + 3)?,
        r.get(at + 4)?,
    ))
}

const CLAIM_LINKS: &str = "UPDATE links SET locked_until = ?1, lease = ?2
    WHERE id IN (SELECT id FROM links WHERE due_at IS NOT NULL AND due_at <= ?3 AND locked_until <= ?3
                 ORDER BY due_at LIMIT ?4)
    RETURNING id, object_id, lead_id, attempts, first_queued_at";

const CLAIM_RESOLVES: &str = "UPDATE events SET resolve_locked_until = ?1, resolve_lease = ?2
    WHERE id IN (SELECT id FROM events WHERE resolve_due IS NOT NULL AND resolve_due <= ?3
                 AND resolve_locked_until <= ?3 ORDER BY resolve_due LIMIT ?4)
    RETURNING id, source, event_id, raw_body, body, content_type, request_headers, request_query,
              resolve_attempts, resolve_first, trace_context";

/// `(source, event_id, trace_context)` of the events a link serves, oldest first. Each event is
/// looked up by primary key.
const EVENT_KEYS_OF_LINK: &str = "SELECT
       (SELECT e.source FROM events e WHERE e.id = el.event_pk),
       (SELECT e.event_id FROM events e WHERE e.id = el.event_pk),
       (SELECT e.trace_context FROM events e WHERE e.id = el.event_pk)
     FROM event_links el WHERE el.link_id = ?1 ORDER BY el.event_pk";

/// Creates the pair, or finds it, and says in which state it is.
const UPSERT_LINK: &str =
    "INSERT INTO links (object_id, lead_id, state, attempts, due_at, first_queued_at, updated_at)
    VALUES (?1, ?2, 'pending', 0, ?3, ?3, ?3)
    ON CONFLICT (object_id, lead_id) DO UPDATE SET updated_at = links.updated_at
    RETURNING id, state";

/// Makes a pair that is not linked due now with a fresh attempt budget: a dead pair named by a
/// new event, or any unlinked pair of a replayed event. A linked pair is never touched.
const REVIVE_LINK: &str =
    "UPDATE links SET state = 'pending', attempts = 0, due_at = ?2, first_queued_at = ?2,
    updated_at = ?2, last_error = NULL WHERE id = ?1 AND state <> 'linked'";

const ATTACH: &str =
    "INSERT INTO event_links (event_pk, link_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING";

/// The events waiting on a link, their state computed again.
static RECOMPUTE_FOR_LINK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE events SET state = {EVENT_STATE}
         WHERE id IN (SELECT event_pk FROM event_links WHERE link_id = ?1)
           AND {HELD_BY_OPERATOR} AND resolve_due IS NULL"
    )
});

/// One event's state computed again after a completion changed one of its links.
static RECOMPUTE_EVENT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE events SET state = {EVENT_STATE}
         WHERE {HELD_BY_OPERATOR} AND resolve_due IS NULL AND id = ?1"
    )
});

/// One event's state computed again after a replay or a resolution gave it links.
static RECOMPUTE_EVENT_CLEARING_REASON: LazyLock<String> = LazyLock::new(|| {
    format!("UPDATE events SET state = {EVENT_STATE}, reason = NULL WHERE id = ?1")
});

const INSERT_ATTEMPT: &str = "INSERT INTO attempts
    (link_id, at, status_code, error, response_excerpt, duration_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The first-queued time of the oldest pending link, lead resolution or object creation: each
/// a `MIN` over the rows a partial index already lists.
const OLDEST_PENDING: &str = "SELECT MIN(t) FROM (
    SELECT MIN(first_queued_at) AS t FROM links WHERE due_at IS NOT NULL
    UNION ALL SELECT MIN(resolve_first) FROM events WHERE resolve_due IS NOT NULL
    UNION ALL SELECT MIN(first_at) FROM objects WHERE due_at IS NOT NULL)";

/// Alert slots older than this are deleted (an interval is at most a day).
const ALERT_SLOT_KEEP_MS: Millis = 2 * 86_400_000;

/// Linked is a fact, whoever holds the lease now.
const MARK_LINKED: &str = "UPDATE links SET state = 'linked', due_at = NULL, locked_until = 0,
    last_error = NULL, updated_at = ?2 WHERE id = ?1";

/// A pair whose every event was discarded while its call was in flight is not due again.
static RETRY_LINK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE links SET attempts = attempts + ?3,
         due_at = CASE WHEN {PAIR_WANTED} THEN ?4 ELSE NULL END, locked_until = 0,
         last_error = ?5, updated_at = ?6 WHERE id = ?1 AND lease = ?2 AND state = 'pending'"
    )
});

/// The event's pending pairs that no live event wants any more are not due.
static HOLD_UNWANTED_PAIRS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE links SET due_at = NULL
         WHERE id IN (SELECT link_id FROM event_links WHERE event_pk = ?1)
           AND state = 'pending' AND due_at IS NOT NULL AND NOT {PAIR_WANTED}"
    )
});

/// A pending pair that was held (every event wanting it discarded) is due again: a live event
/// wants it now.
pub(super) const WAKE_PAIR: &str =
    "UPDATE links SET due_at = ?2 WHERE id = ?1 AND state = 'pending' AND due_at IS NULL";

const KILL_LINK: &str = "UPDATE links SET state = 'dead', attempts = attempts + 1, due_at = NULL,
    locked_until = 0, last_error = ?3, updated_at = ?4
    WHERE id = ?1 AND lease = ?2 AND state = 'pending'";

const RELEASE_LINK: &str = "UPDATE links SET locked_until = 0 WHERE id = ?1 AND lease = ?2";

const EVENTS_OF_LINK: &str = "SELECT event_pk FROM event_links WHERE link_id = ?1";

const DROP_ORPHAN: &str =
    "DELETE FROM links WHERE id = ?1 AND state <> 'linked' AND locked_until <= ?2
    AND NOT EXISTS (SELECT 1 FROM event_links WHERE link_id = ?1)";

const DROP_ATTEMPTS: &str = "DELETE FROM attempts WHERE link_id = ?1";

const INSERT_MAPPING: &str =
    "INSERT INTO mappings (source, key, lead_id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING";

const RECORD_VERSION: &str =
    "INSERT INTO schema_version (version, name, applied_at) VALUES (?1, ?2, ?3)";

/// Where the database is: a file, or (`sqlite::memory:`) a private in-memory database shared by
/// this store's connections.
#[derive(Debug, Clone)]
pub(super) enum Target {
    File(PathBuf),
    Memory(String),
}

impl Target {
    /// `sqlite://PATH`, `sqlite:PATH` (a query string after `?` is ignored), `sqlite::memory:`.
    pub(super) fn parse(url: &str) -> Result<Target> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| StoreError::Invalid(format!("{url:?} is not a sqlite: URL")))?;
        let path = rest.split('?').next().unwrap_or_default();
        if path == ":memory:" {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(Target::Memory(format!(
                "file:sprintlink-memory-{}-{n}?mode=memory&cache=shared",
                std::process::id()
            )));
        }
        if path.is_empty() {
            return Err(StoreError::Invalid(
                "a sqlite: URL names no database file".into(),
            ));
        }
        Ok(Target::File(PathBuf::from(percent_decoded(path))))
    }

    fn open(&self, flags: OpenFlags) -> Result<Connection> {
        let conn = match self {
            Target::File(p) => Connection::open_with_flags(p, flags)?,
            Target::Memory(uri) => Connection::open_with_flags(
                uri,
                (flags | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_READ_WRITE)
                    - OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?,
        };
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    fn exists(&self) -> bool {
        match self {
            Target::File(p) => p.exists(),
            Target::Memory(_) => false,
        }
    }
}

/// `%XX` escapes in a URL's path, as sqlx read them.
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = path
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const RW: OpenFlags = OpenFlags::SQLITE_OPEN_READ_WRITE.union(OpenFlags::SQLITE_OPEN_NO_MUTEX);
const CREATE: OpenFlags = OpenFlags::SQLITE_OPEN_CREATE;

/// A connection in WAL mode with the settings every connection of the store has.
fn open_conn(target: &Target, flags: OpenFlags, busy: Duration) -> Result<Connection> {
    let conn = target.open(flags)?;
    conn.busy_timeout(busy)?;
    if !flags.contains(OpenFlags::SQLITE_OPEN_READ_ONLY) {
        // Before WAL mode, which writes the first page: a new database takes the mode with its
        // first table; on an existing one this does nothing (`ensure_incremental_vacuum`).
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA temp_store = MEMORY;")?;
    Ok(conn)
}

/// The writer keeps the hot index pages of a large queue in its own cache (16 MiB rather than
/// the default 2 MiB), instead of reading them back from the OS per statement. It never
/// checkpoints: a commit that had to copy the log into the database file took ten times as long
/// as the others, so that copy runs beside it (`checkpoint`).
fn open_writer(target: &Target) -> Result<Connection> {
    let conn = open_conn(target, RW | CREATE, Duration::from_secs(5))?;
    conn.execute_batch(
        "PRAGMA cache_size = -16384; PRAGMA wal_autocheckpoint = 0;
         PRAGMA journal_size_limit = 67108864;",
    )?;
    Ok(conn)
}

fn open_reader(target: &Target) -> Result<Connection> {
    open_conn(
        target,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        Duration::from_secs(5),
    )
}

fn open_checkpointer(target: &Target) -> Result<Connection> {
    open_conn(target, RW, Duration::from_millis(100))
}

/// Brings a SQLite database to this binary's schema version (or, without `apply`, only says
/// what is pending), in one `BEGIN IMMEDIATE` transaction, so a second process waits.
fn migrate_conn(conn: &mut Connection, apply: bool) -> Result<migrate::Status> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(migrate::VERSION_TABLE)?;
    let current: i64 = tx.query_row(migrate::CURRENT_VERSION, [], |r| r.get(0))?;
    let status = migrate::status(migrate::SQLITE, current)?;
    if !apply {
        tx.rollback()?;
        return Ok(status);
    }
    for m in migrate::plan(migrate::SQLITE, current)? {
        tx.execute_batch(m.sql())?;
        tx.execute(
            RECORD_VERSION,
            params![m.version, m.name, migrate::applied_at()],
        )?;
    }
    tx.commit()?;
    retention::ensure_incremental_vacuum(conn)?;
    Ok(status)
}

/// `store::migrate` for SQLite: a file that does not exist yet is not created by a dry run.
pub(super) async fn migrate(url: &str, apply: bool) -> Result<migrate::Status> {
    let target = Target::parse(url)?;
    tokio::task::spawn_blocking(move || {
        if !apply && !target.exists() {
            return migrate::status(migrate::SQLITE, 0);
        }
        let flags = if apply { RW | CREATE } else { RW };
        let mut conn = open_conn(&target, flags, Duration::from_secs(5))?;
        let status = migrate_conn(&mut conn, apply);
        let _ = conn.close();
        status
    })
    .await
    .map_err(|e| StoreError::Broken(Cause::new(e)))?
}

/// `store::backup` for SQLite.
pub(super) async fn backup(url: &str, to: &std::path::Path) -> Result<()> {
    retention::backup(url, to).await
}

pub struct SqliteStore {
    target: Target,
    writer: Arc<WriterHandle>,
    reads: Arc<Reads>,
    checkpointer: std::sync::Mutex<Option<Checkpointer>>,
    /// Stops the search indexer (`search_index`).
    stop: tokio_util::sync::CancellationToken,
}

impl SqliteStore {
    pub async fn open(url: &str) -> Result<Self> {
        let target = Target::parse(url)?;
        let store = tokio::task::spawn_blocking(move || {
            let mut write = open_writer(&target)?;
            migrate_conn(&mut write, true)?;
            let reads = Reads::open(target.clone())?;
            let checkpoint_conn = open_checkpointer(&target)?;
            let writer = Arc::new(WriterHandle::spawn(write, target.clone())?);
            let checkpointer = Checkpointer::spawn(checkpoint_conn, &writer)?;
            Ok::<_, StoreError>(SqliteStore {
                target,
                writer,
                reads,
                checkpointer: std::sync::Mutex::new(Some(checkpointer)),
                stop: tokio_util::sync::CancellationToken::new(),
            })
        })
        .await
        .map_err(|e| StoreError::Broken(Cause::new(e)))??;
        search_index::spawn(store.writer.clone(), store.stop.clone());
        Ok(store)
    }

    /// Stops the checkpointer, lets the queued writes finish and closes the writer (folding the
    /// log back into the database file).
    async fn close_writer(&self) -> Result<()> {
        self.stop.cancel();
        let checkpointer = self.checkpointer.lock().ok().and_then(|mut c| c.take());
        if let Some(c) = checkpointer {
            tokio::task::spawn_blocking(move || c.stop())
                .await
                .map_err(|e| StoreError::Broken(Cause::new(e)))?;
        }
        self.writer.close().await
    }

    /// A write transaction on the writer's thread; rolled back if `f` fails.
    async fn write_tx<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.writer.run_tx(f).await
    }

    /// The `SELECT` of `list_events` and its parameters.
    fn list_sql(f: &EventFilter) -> (String, Vec<Value>) {
        let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM events WHERE 1 = 1");
        let mut values: Vec<Value> = Vec::new();
        let mut cond = |values: &mut Vec<Value>, v: Value, clause: &str| {
            values.push(v);
            sql.push_str(&clause.replace("?N", &format!("?{}", values.len())));
        };
        if let Some(s) = f.state {
            cond(
                &mut values,
                Value::Text(s.as_str().into()),
                " AND state = ?N",
            );
        }
        if let Some(s) = &f.source {
            cond(&mut values, Value::Text(s.clone()), " AND source = ?N");
        }
        if let Some(o) = &f.object_id {
            cond(
                &mut values,
                Value::Text(o.clone()),
                &format!(
                    " AND object_id = ?N AND id IN ({})",
                    search_index::events_of_objects("= ?N")
                ),
            );
        }
        if let Some(l) = &f.lead_id {
            cond(
                &mut values,
                Value::Text(l.clone()),
                &format!(
                    " AND id IN (SELECT event_pk FROM event_links WHERE link_id IN ({}))",
                    search_index::links_of_leads("= ?N")
                ),
            );
        }
        if let Some(t) = f.since {
            cond(&mut values, Value::Integer(t), " AND received_at >= ?N");
        }
        if let Some(t) = f.until {
            cond(&mut values, Value::Integer(t), " AND received_at < ?N");
        }
        if let Some(q) = &f.q {
            // An id prefix as a range of the (event_id, source) index, or a lead key through
            // the mapping table to its leads' links.
            cond(&mut values, Value::Text(q.clone()), " AND ((event_id >= ?N");
            cond(
                &mut values,
                Value::Text(prefix_end(q)),
                " AND event_id < ?N)",
            );
            let (key, lower) = (values.len() + 1, values.len() + 2);
            values.push(Value::Text(q.clone()));
            cond(
                &mut values,
                Value::Text(q.to_lowercase()),
                &format!(
                    " OR id IN (SELECT event_pk FROM event_links WHERE link_id IN ({})))",
                    search_index::links_of_leads(&format!(
                        "IN (SELECT lead_id FROM mappings WHERE key IN (?{key}, ?{lower}))"
                    ))
                ),
            );
        }
        if let Some(b) = f.before {
            cond(&mut values, Value::Integer(b.0), " AND id < ?N");
        }
        cond(
            &mut values,
            Value::Integer(f.limit),
            " ORDER BY id DESC LIMIT ?N",
        );
        (sql, values)
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.reads.run(move |conn| f(conn)).await
    }
}

fn summary(r: &Row<'_>) -> rusqlite::Result<EventSummary> {
    Ok(EventSummary {
        pk: r.get(0)?,
        event_id: r.get(1)?,
        source: r.get(2)?,
        state: r.get(3)?,
        received_at: r.get(4)?,
        object_id: r.get(5)?,
        event_type: r.get(6)?,
        reason: r.get(7)?,
    })
}

fn summaries(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<EventSummary>> {
    let mut st = conn.prepare_cached(sql)?;
    let rows = st.query_map(params, summary)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Removes a pair that is not linked and that no event names any more, with its attempts,
/// unless (given `now`) a call for it is in flight.
fn drop_orphan(db: &Connection, link_id: LinkId, now: Option<Millis>) -> Result<()> {
    let gone = db
        .prepare_cached(DROP_ORPHAN)?
        .execute(params![link_id, now.unwrap_or(i64::MAX)])?
        > 0;
    if gone {
        db.prepare_cached(DROP_ATTEMPTS)?
            .execute(params![link_id])?;
    }
    Ok(())
}

/// Creates or finds each pair and attaches it to the event (a replay makes every unlinked pair
/// due now).
fn attach_links(
    db: &Connection,
    pk: EventPk,
    object_id: &ObjectId,
    leads: &[LeadId],
    now: Millis,
) -> Result<()> {
    let mut upsert = db.prepare_cached(UPSERT_LINK)?;
    let mut attach = db.prepare_cached(ATTACH)?;
    for lead in leads {
        let (link_id, state): (i64, LinkState) = upsert
            .query_row(params![object_id, lead, now], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        attach.execute(params![pk, link_id])?;
        if state == LinkState::Linked {
            continue;
        }
        db.prepare_cached(REVIVE_LINK)?
            .execute(params![link_id, now])?;
        if state == LinkState::Dead {
            // Other events waiting on a pair that was dead are queued again too.
            db.prepare_cached(&RECOMPUTE_FOR_LINK)?
                .execute(params![link_id])?;
        }
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    /// A group commit: one job on the writer's thread, `BEGIN IMMEDIATE`, the new events in one
    /// synchronous pass (`group::insert`), `COMMIT`.
    async fn ingest(&self, events: &[NewEvent]) -> Result<Vec<IngestOutcome>> {
        let events = events.to_vec();
        self.write_tx(move |db| group::insert(db, &events)).await
    }

    async fn claim_links(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<LinkJob>> {
        let lease = lease_token();
        let jobs = self
            .writer
            .run(move |db| {
                let mut st = db.prepare_cached(CLAIM_LINKS)?;
                let rows = st.query_map(params![lease_until, lease, now, limit], |r| {
                    Ok(LinkJob {
                        link_id: r.get(0)?,
                        lease,
                        object_id: r.get(1)?,
                        lead_id: r.get(2)?,
                        attempts: r.get(3)?,
                        first_queued_at: r.get(4)?,
                        events: Vec::new(),
                        trace: None,
                    })
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await?;
        if jobs.is_empty() {
            return Ok(jobs);
        }
        // The claim is committed; the events each pair serves (so every log line about a
        // delivery names them) are a read, which need not keep ingest waiting for the writer.
        self.read(move |db| {
            let mut jobs = jobs;
            let mut st = db.prepare_cached(EVENT_KEYS_OF_LINK)?;
            for job in &mut jobs {
                let keys = st.query_map(params![job.link_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, Option<String>>(2)?))
                })?;
                for key in keys {
                    let (source, event_id, trace) = key?;
                    job.events.push((source, event_id));
                    job.trace = job.trace.take().or(trace);
                }
            }
            Ok(jobs)
        })
        .await
    }

    /// Records each completion in order, then computes again once the states of the events
    /// whose links changed.
    async fn complete_links(&self, done: &[Completion], now: Millis) -> Result<()> {
        let done = done.to_vec();
        self.write_tx(move |db| {
            let mut changed: Vec<LinkId> = Vec::new();
            for c in &done {
                if let Some(a) = &c.attempt {
                    db.prepare_cached(INSERT_ATTEMPT)?.execute(params![
                        c.link_id,
                        a.at,
                        a.status_code,
                        a.error,
                        a.response_excerpt,
                        a.duration_ms
                    ])?;
                }
                let changed_state = match &c.update {
                    LinkUpdate::Linked => {
                        db.prepare_cached(MARK_LINKED)?
                            .execute(params![c.link_id, now])?
                            > 0
                    }
                    LinkUpdate::Retry {
                        due_at,
                        counted,
                        error,
                    } => {
                        db.prepare_cached(&RETRY_LINK)?.execute(params![
                            c.link_id,
                            c.lease,
                            i64::from(*counted),
                            due_at,
                            error,
                            now
                        ])?;
                        false
                    }
                    LinkUpdate::Dead { error } => {
                        db.prepare_cached(KILL_LINK)?
                            .execute(params![c.link_id, c.lease, error, now])?
                            > 0
                    }
                    LinkUpdate::Release => {
                        db.prepare_cached(RELEASE_LINK)?
                            .execute(params![c.link_id, c.lease])?;
                        false
                    }
                };
                if changed_state {
                    changed.push(c.link_id);
                }
                // A replay let this pair go while its call was in flight: now that the call
                // is over, it goes unless it was linked (a linked pair is kept, never resent).
                if !matches!(c.update, LinkUpdate::Linked) {
                    drop_orphan(db, c.link_id, None)?;
                }
            }
            // Their events, recomputed once all the batch's links have their new state.
            let mut events: Vec<i64> = Vec::new();
            let mut of_link = db.prepare_cached(EVENTS_OF_LINK)?;
            for link_id in changed {
                let pks = of_link.query_map(params![link_id], |r| r.get(0))?;
                for pk in pks {
                    events.push(pk?);
                }
            }
            events.sort_unstable();
            events.dedup();
            let mut recompute = db.prepare_cached(&RECOMPUTE_EVENT)?;
            for pk in events {
                recompute.execute(params![pk])?;
            }
            Ok(())
        })
        .await
    }

    async fn claim_resolves(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<ResolveJob>> {
        let lease = lease_token();
        self.writer
            .run(move |db| {
                let mut st = db.prepare_cached(CLAIM_RESOLVES)?;
                let rows = st.query_map(params![lease_until, lease, now, limit], |r| {
                    Ok(ResolveJob {
                        event_pk: r.get(0)?,
                        lease,
                        source: r.get(1)?,
                        event_id: r.get(2)?,
                        request: request_at(r, 3)?,
                        attempts: r.get(8)?,
                        first_at: r.get(9)?,
                        trace: r.get(10)?,
                    })
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await
    }

    async fn complete_resolve(
        &self,
        job: &ResolveJob,
        update: ResolveUpdate,
        now: Millis,
    ) -> Result<()> {
        let (pk, lease) = (job.event_pk, job.lease);
        self.write_tx(move |db| {
            // Only the lease holder may decide; a stale worker's answer is dropped.
            let object_id: Option<Option<ObjectId>> = db
                .prepare_cached(
                    "SELECT object_id FROM events WHERE id = ?1 AND resolve_lease = ?2 AND resolve_due IS NOT NULL",
                )?
                .query_row(params![pk, lease], |r| r.get(0))
                .optional()?;
            let Some(object_id) = object_id else {
                return Ok(());
            };
            match update {
                ResolveUpdate::Create {
                    definition_id,
                    leads,
                } => {
                    db.prepare_cached(
                        "UPDATE events SET resolve_due = NULL, resolve_locked_until = 0 WHERE id = ?1",
                    )?
                    .execute(params![pk])?;
                    objects::want_object(db, pk, &definition_id, &leads, now)?;
                }
                ResolveUpdate::Links(leads) => {
                    db.prepare_cached(
                        "UPDATE events SET resolve_due = NULL, resolve_locked_until = 0 WHERE id = ?1",
                    )?
                    .execute(params![pk])?;
                    attach_links(db, pk, &object_id.clone().unwrap_or_default(), &leads, now)?;
                    db.prepare_cached(&RECOMPUTE_EVENT_CLEARING_REASON)?
                        .execute(params![pk])?;
                }
                ResolveUpdate::Parked(ref reason) | ResolveUpdate::Dead(ref reason) => {
                    let state = if matches!(update, ResolveUpdate::Parked(_)) {
                        EventState::Parked
                    } else {
                        EventState::Dead
                    };
                    db.prepare_cached(
                        "UPDATE events SET state = ?2, reason = ?3, resolve_due = NULL,
                         resolve_locked_until = 0 WHERE id = ?1",
                    )?
                    .execute(params![pk, state, reason])?;
                }
                ResolveUpdate::Retry {
                    due_at,
                    counted,
                    error,
                } => {
                    db.prepare_cached(
                        "UPDATE events SET resolve_due = ?2, resolve_locked_until = 0,
                         resolve_attempts = resolve_attempts + ?3, reason = ?4 WHERE id = ?1",
                    )?
                    .execute(params![pk, due_at, i64::from(counted), error])?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        self.read(|db| {
            let links: Option<i64> = db
                .prepare_cached(
                    "SELECT MIN(CASE WHEN locked_until > due_at THEN locked_until ELSE due_at END)
                     FROM links WHERE due_at IS NOT NULL",
                )?
                .query_row([], |r| r.get(0))?;
            let events: Option<i64> = db
                .prepare_cached(
                    "SELECT MIN(CASE WHEN resolve_locked_until > resolve_due THEN resolve_locked_until
                     ELSE resolve_due END) FROM events WHERE resolve_due IS NOT NULL",
                )?
                .query_row([], |r| r.get(0))?;
            let objects: Option<i64> = db
                .prepare_cached(
                    "SELECT MIN(CASE WHEN locked_until > due_at THEN locked_until ELSE due_at END)
                     FROM objects WHERE due_at IS NOT NULL",
                )?
                .query_row([], |r| r.get(0))?;
            Ok([links, events, objects].into_iter().flatten().min())
        })
        .await
    }

    async fn claim_objects(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<ObjectJob>> {
        let lease = lease_token();
        self.write_tx(move |db| objects::claim(db, now, lease_until, lease, limit))
            .await
    }

    async fn object_sending(&self, job: &ObjectJob, now: Millis) -> Result<bool> {
        let job = job.clone();
        self.writer
            .run(move |db| objects::sending(db, &job, now))
            .await
    }

    async fn complete_object(&self, done: &ObjectCompletion, now: Millis) -> Result<()> {
        let done = done.clone();
        self.write_tx(move |db| objects::complete(db, &done, now))
            .await
    }

    /// Newest first, by id. SQLite keeps no statistics, so for a time range it would always
    /// walk the ids from the newest, reading every newer event before the range (341 ms for
    /// the oldest second of 1,000,000). So a time range without a more selective filter is
    /// first counted on `events_received`, up to `SMALL_TIME_RANGE` entries; a range that
    /// small is read through that index and sorted (a few ms), a larger one by the id walk,
    /// which then meets matches soon unless the range is large and far in the past.
    async fn list_events(&self, f: &EventFilter) -> Result<Vec<EventSummary>> {
        let time_range = (f.since.is_some() || f.until.is_some())
            && f.object_id.is_none()
            && f.lead_id.is_none()
            && f.q.is_none();
        let range = (
            f.since.unwrap_or(Millis::MIN),
            f.until.unwrap_or(Millis::MAX),
        );
        let (sql, values) = Self::list_sql(f);
        self.read(move |db| {
            let indexed = time_range && {
                let n: i64 = db
                    .prepare_cached(COUNT_TIME_RANGE)?
                    .query_row(params![range.0, range.1, SMALL_TIME_RANGE + 1], |r| {
                        r.get(0)
                    })?;
                n <= SMALL_TIME_RANGE
            };
            let sql = if indexed {
                sql.replacen(
                    "FROM events WHERE",
                    "FROM events INDEXED BY events_received WHERE",
                    1,
                )
            } else {
                sql
            };
            summaries(db, &sql, rusqlite::params_from_iter(values))
        })
        .await
    }

    async fn find_events(&self, event_id: &str, source: Option<&str>) -> Result<Vec<EventSummary>> {
        let (event_id, source) = (event_id.to_string(), source.map(str::to_string));
        self.read(move |db| match source {
            Some(s) => summaries(
                db,
                &format!(
                    "SELECT {SUMMARY_COLUMNS} FROM events WHERE event_id = ?1 AND source = ?2"
                ),
                params![event_id, s],
            ),
            None => summaries(
                db,
                &format!("SELECT {SUMMARY_COLUMNS} FROM events WHERE event_id = ?1 ORDER BY id"),
                params![event_id],
            ),
        })
        .await
    }

    async fn event_detail(&self, pk: EventPk, page: LinkPage) -> Result<Option<EventDetail>> {
        self.reads
            .run(move |conn| {
                // One snapshot (a deferred transaction: taken by the first read, held to the
                // end) for the event, its links and their attempts, so that a delivery committing
                // meanwhile cannot show a link's new state beside its old attempts.
                let tx = conn.transaction()?;
                let row = tx
                    .prepare_cached(&format!(
                        "SELECT {SUMMARY_COLUMNS}, {REQUEST_COLUMNS}, body_removed_at, trace_context
                         FROM events WHERE id = ?1"
                    ))?
                    .query_row(params![pk], |r| {
                        Ok((summary(r)?, request_at(r, 8)?, r.get(13)?, r.get(14)?))
                    })
                    .optional()?;
                let Some((summary, body, body_removed_at, trace)) = row else {
                    return Ok(None);
                };
                // One row more than the page, to know whether another page follows.
                let mut link_rows: Vec<(i64, ObjectId, LeadId, LinkState, Option<i64>)> = tx
                    .prepare_cached(
                        "SELECT l.id, l.object_id, l.lead_id, l.state, l.due_at FROM links l
                         JOIN event_links el ON el.link_id = l.id
                         WHERE el.event_pk = ?1 AND el.link_id > ?2 ORDER BY el.link_id LIMIT ?3",
                    )?
                    .query_map(
                        params![
                            pk,
                            page.after.unwrap_or(LinkId(i64::MIN)),
                            page.limit.saturating_add(1)
                        ],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )?
                    .collect::<rusqlite::Result<_>>()?;
                let more = link_rows.len() as i64 > page.limit;
                link_rows.truncate(page.limit.max(0) as usize);
                let mut links = Vec::with_capacity(link_rows.len());
                let mut attempts_of = tx.prepare_cached(
                    "SELECT at, status_code, error, response_excerpt, duration_ms FROM attempts
                     WHERE link_id = ?1 ORDER BY id DESC LIMIT 100",
                )?;
                for (link_id, object_id, lead_id, state, due_at) in link_rows {
                    let mut attempts = attempts_of
                        .query_map(params![link_id], |a| {
                            Ok(Attempt {
                                at: a.get(0)?,
                                status_code: a.get(1)?,
                                error: a.get(2)?,
                                response_excerpt: a.get(3)?,
                                duration_ms: a.get(4)?,
                            })
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    attempts.reverse();
                    links.push(LinkDetail {
                        link_id: LinkId(link_id),
                        object_id,
                        lead_id,
                        state,
                        next_attempt_at: due_at,
                        attempts,
                    });
                }
                drop(attempts_of);
                let object = objects::detail(&tx, pk)?;
                tx.commit()?;
                let more_links_after = if more {
                    links.last().map(|l| l.link_id)
                } else {
                    None
                };
                Ok(Some(EventDetail {
                    summary,
                    request: body,
                    body_removed_at,
                    trace,
                    object,
                    links,
                    more_links_after,
                }))
            })
            .await
    }

    async fn event_request(&self, pk: EventPk) -> Result<Option<StoredRequest>> {
        self.read(move |db| {
            Ok(db
                .prepare_cached(&format!(
                    "SELECT {REQUEST_COLUMNS} FROM events WHERE id = ?1"
                ))?
                .query_row(params![pk], |r| request_at(r, 0))
                .optional()?)
        })
        .await
    }

    async fn replay(
        &self,
        pk: EventPk,
        object_id: Option<&ObjectId>,
        plan: Plan,
        now: Millis,
    ) -> Result<()> {
        let object_id = object_id.cloned();
        self.write_tx(move |db| {
            // An event whose object was created before links that object: it is never created
            // twice.
            let (object_id, plan) = match plan {
                Plan::Create { definition_id, leads } => match objects::created_id(db, pk)? {
                    Some(id) => (Some(id), Plan::Links(leads)),
                    None => (object_id, Plan::Create { definition_id, leads }),
                },
                other => (object_id, other),
            };
            // Links this event no longer asks for, and that are not linked, are let go; a
            // pair no other event wants is removed with its history so it is never sent.
            let detached: Vec<i64> = db
                .prepare_cached(
                    "DELETE FROM event_links WHERE event_pk = ?1
                       AND link_id IN (SELECT id FROM links WHERE state <> 'linked') RETURNING link_id",
                )?
                .query_map(params![pk], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            // A pair the new plan names again keeps its row and its attempt history: it is
            // attached again below.
            let wanted: &[LeadId] = match (&plan, &object_id) {
                (Plan::Links(leads), Some(_)) => leads,
                _ => &[],
            };
            for link_id in detached {
                let pair: Option<(ObjectId, LeadId)> = db
                    .prepare_cached("SELECT object_id, lead_id FROM links WHERE id = ?1")?
                    .query_row(params![link_id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if pair.is_some_and(|(o, l)| Some(&o) == object_id.as_ref() && wanted.contains(&l)) {
                    continue;
                }
                // A pair whose call is in flight stays until that call's outcome is recorded
                // (`complete_links` removes it then, unless it was linked).
                drop_orphan(db, LinkId(link_id), Some(now))?;
            }
            // A created object's id stays on the event whatever the new plan.
            let object_id = match object_id {
                Some(id) => Some(id),
                None => objects::created_id(db, pk)?,
            };
            match plan {
                Plan::Parked(reason) => {
                    db.prepare_cached(
                        "UPDATE events SET state = 'parked', reason = ?2, object_id = ?3,
                         resolve_due = NULL WHERE id = ?1",
                    )?
                    .execute(params![pk, reason, object_id])?;
                    objects::hold_object(db, pk)?;
                }
                Plan::Resolve => {
                    db.prepare_cached(
                        "UPDATE events SET state = 'queued', reason = NULL, object_id = ?3, resolve_due = ?2,
                         resolve_locked_until = 0, resolve_attempts = 0, resolve_first = ?2 WHERE id = ?1",
                    )?
                    .execute(params![pk, now, object_id])?;
                    objects::hold_object(db, pk)?;
                }
                Plan::Create {
                    definition_id,
                    leads,
                } => {
                    objects::want_object(db, pk, definition_id.as_str(), &leads, now)?;
                }
                Plan::Links(leads) => {
                    db.prepare_cached(
                        "UPDATE events SET object_id = ?2, resolve_due = NULL WHERE id = ?1",
                    )?
                    .execute(params![pk, object_id])?;
                    attach_links(db, pk, &object_id.clone().unwrap_or_default(), &leads, now)?;
                    db.prepare_cached(&RECOMPUTE_EVENT_CLEARING_REASON)?
                        .execute(params![pk])?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn discard(&self, pk: EventPk, reason: &str, _now: Millis) -> Result<()> {
        let reason = reason.to_string();
        self.write_tx(move |db| {
            db.prepare_cached(
                "UPDATE events SET state = ?2, reason = ?3, resolve_due = NULL,
                 resolve_locked_until = 0 WHERE id = ?1",
            )?
            .execute(params![pk, EventState::Discarded, reason])?;
            objects::hold_object(db, pk)?;
            db.prepare_cached(&HOLD_UNWANTED_PAIRS)?
                .execute(params![pk])?;
            Ok(())
        })
        .await
    }

    async fn stats(&self) -> Result<Stats> {
        fn count_by(db: &Connection, sql: &str) -> Result<Vec<(String, i64)>> {
            let mut st = db.prepare_cached(sql)?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        }
        fn count(db: &Connection, sql: &str) -> Result<i64> {
            Ok(db.prepare_cached(sql)?.query_row([], |r| r.get(0))?)
        }
        // Each is a scan of a large queue's index; on connections of their own they run side
        // by side.
        let (events_by_state, links_by_state, pending_links, resolving, oldest) = tokio::try_join!(
            self.read(|db| count_by(db, "SELECT state, COUNT(*) FROM events GROUP BY state")),
            self.read(|db| count_by(db, "SELECT state, COUNT(*) FROM links GROUP BY state")),
            self.read(|db| count(db, "SELECT COUNT(*) FROM links WHERE due_at IS NOT NULL")),
            self.read(|db| count(
                db,
                "SELECT (SELECT COUNT(*) FROM events WHERE resolve_due IS NOT NULL)
                      + (SELECT COUNT(*) FROM objects WHERE due_at IS NOT NULL)"
            )),
            // Three MINs, each the first entry of a partial index (migration 6).
            self.read(|db| Ok(db
                .prepare_cached(OLDEST_PENDING)?
                .query_row([], |r| r.get(0))?)),
        )?;
        Stats::from_counts(
            events_by_state,
            links_by_state,
            pending_links,
            resolving,
            oldest,
        )
    }

    /// A write, not a `SELECT 1`: a database that answers but cannot commit is not ready.
    async fn ping(&self) -> Result<()> {
        let at = now_ms();
        self.writer
            .run(move |db| {
                db.prepare_cached(
                    "INSERT INTO heartbeat (id, at) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                )?
                .execute(params![at])?;
                Ok(())
            })
            .await
    }

    async fn mapping_get(&self, source: &str, key: &str) -> Result<Vec<String>> {
        let (source, key) = (source.to_string(), key.to_string());
        self.read(move |db| {
            let mut st = db.prepare_cached(
                "SELECT lead_id FROM mappings WHERE source = ?1 AND key = ?2 ORDER BY lead_id",
            )?;
            let rows = st.query_map(params![source, key], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn mapping_put(&self, source: &str, key: &str, lead_ids: &[String]) -> Result<()> {
        let (source, key, lead_ids) = (source.to_string(), key.to_string(), lead_ids.to_vec());
        self.write_tx(move |db| {
            db.prepare_cached("DELETE FROM mappings WHERE source = ?1 AND key = ?2")?
                .execute(params![source, key])?;
            let mut insert = db.prepare_cached(INSERT_MAPPING)?;
            for lead in &lead_ids {
                insert.execute(params![source, key, lead])?;
            }
            Ok(())
        })
        .await
    }

    async fn mapping_delete(&self, source: &str, key: &str) -> Result<bool> {
        let (source, key) = (source.to_string(), key.to_string());
        self.writer
            .run(move |db| {
                Ok(db
                    .prepare_cached("DELETE FROM mappings WHERE source = ?1 AND key = ?2")?
                    .execute(params![source, key])?
                    > 0)
            })
            .await
    }

    async fn mapping_list(
        &self,
        source: &str,
        after: Option<(String, String)>,
        limit: i64,
    ) -> Result<Vec<(String, String)>> {
        let source = source.to_string();
        let (key, lead) = after.unwrap_or_default();
        self.read(move |db| {
            // A row value over the primary key (source, key, lead_id): one range scan.
            let mut st = db.prepare_cached(
                "SELECT key, lead_id FROM mappings WHERE source = ?1 AND (key, lead_id) > (?2, ?3)
                 ORDER BY key, lead_id LIMIT ?4",
            )?;
            let rows = st.query_map(params![source, key, lead, limit], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn mapping_import(&self, source: &str, rows: &[(String, String)]) -> Result<usize> {
        let (source, rows) = (source.to_string(), rows.to_vec());
        self.write_tx(move |db| {
            let mut insert = db.prepare_cached(INSERT_MAPPING)?;
            for (key, lead) in &rows {
                insert.execute(params![source, key, lead])?;
            }
            Ok(rows.len())
        })
        .await
    }

    async fn remove_bodies(
        &self,
        delivered_before: Millis,
        now: Millis,
        limit: i64,
    ) -> Result<u64> {
        self.writer
            .run_background(move |db| {
                retention::remove_bodies(db, delivered_before, now, limit, retention::STEP_BUDGET)
            })
            .await
    }

    async fn prune_delivered(
        &self,
        delivered_before: Millis,
        now: Millis,
        limit: i64,
    ) -> Result<u64> {
        self.writer
            .run_background(move |db| {
                retention::prune_delivered(db, delivered_before, now, limit, retention::STEP_BUDGET)
            })
            .await
    }

    async fn prune_failed(&self, received_before: Millis, now: Millis, limit: i64) -> Result<u64> {
        self.writer
            .run_background(move |db| {
                retention::prune_failed(db, received_before, now, limit, retention::STEP_BUDGET)
            })
            .await
    }

    async fn reclaim_space(&self, pages: i64) -> Result<bool> {
        self.writer
            .run_background(move |db| retention::reclaim(db, pages))
            .await
    }

    async fn storage_bytes(&self) -> Result<i64> {
        match &self.target {
            Target::File(path) => Ok(retention::file_bytes(path)),
            Target::Memory(_) => {
                self.read(|db| {
                    Ok(db.query_row(
                        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                        [],
                        |r| r.get(0),
                    )?)
                })
                .await
            }
        }
    }

    async fn oldest_pending_at(&self) -> Result<Option<Millis>> {
        self.read(|db| {
            Ok(db
                .prepare_cached(OLDEST_PENDING)?
                .query_row([], |r| r.get(0))?)
        })
        .await
    }

    async fn claim_alert_slot(
        &self,
        target: i64,
        kind: &str,
        window_start: Millis,
    ) -> Result<bool> {
        let kind = kind.to_string();
        let now = now_ms();
        self.writer
            .run(move |db| {
                db.prepare_cached("DELETE FROM alert_slots WHERE window_start < ?1")?
                    .execute(params![now.saturating_sub(ALERT_SLOT_KEEP_MS)])?;
                Ok(db
                    .prepare_cached(
                        "INSERT INTO alert_slots (target, kind, window_start, claimed_at)
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![target, kind, window_start, now])?
                    == 1)
            })
            .await
    }

    async fn delivery_pause(&self) -> Result<Option<Pause>> {
        self.read(|db| {
            let row: Option<(Option<String>, Option<Millis>)> = db
                .prepare_cached("SELECT reason, paused_until FROM delivery_control WHERE id = 1")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match row {
                Some((Some(reason), until)) => Ok(Some(Pause {
                    reason: parse_state(&reason)?,
                    until,
                })),
                _ => Ok(None),
            }
        })
        .await
    }

    async fn set_delivery_pause(&self, pause: Option<Pause>, now: Millis) -> Result<()> {
        let reason = pause.map(|p| p.reason.as_str());
        let until = pause.and_then(|p| p.until);
        self.writer
            .run(move |db| {
                db.prepare_cached(SET_PAUSE)?
                    .execute(params![reason, until, now])?;
                Ok(())
            })
            .await
    }

    async fn throttle_pause(&self, until: Millis, now: Millis) -> Result<()> {
        self.writer
            .run(move |db| {
                db.prepare_cached(THROTTLE_PAUSE)?
                    .execute(params![until, now])?;
                Ok(())
            })
            .await
    }

    async fn close(&self) {
        if let Err(e) = self.close_writer().await {
            tracing::warn!(error = %e, "closing the database writer failed");
        }
        self.reads.close();
    }
}

#[cfg(test)]
mod tests;
