//! PostgreSQL for several replicas, through sqlx: plain SQL in PostgreSQL's dialect (`$n`
//! parameters). Claims use `FOR UPDATE SKIP LOCKED`, and the unique constraints (not in-process
//! locks) keep events and pairs single. Group commits and completions write many rows per
//! statement (`MultiRow`).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Row};

use super::shared::{
    EVENT_STATE, HELD_BY_OPERATOR, PAIR_WANTED, SUMMARY_COLUMNS, lease_token, prefix_end,
};
use super::*;

mod objects;
mod retention;
mod wake;

/// States read from and bound as their text column, so a row struct holds the enum.
macro_rules! state_column {
    ($ty:ty) => {
        impl sqlx::Type<sqlx::Postgres> for $ty {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }
        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $ty {
            fn decode(
                v: sqlx::postgres::PgValueRef<'r>,
            ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
                Ok(<&str as sqlx::Decode<sqlx::Postgres>>::decode(v)?.parse()?)
            }
        }
        impl sqlx::Encode<'_, sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }
    };
}
state_column!(EventState);
state_column!(LinkState);
state_column!(ObjectState);
state_column!(CreationOutcome);

/// Ids read from and bound as their BIGINT or text column.
macro_rules! id_column {
    ($ty:ty, int) => {
        impl sqlx::Type<sqlx::Postgres> for $ty {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <i64 as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <i64 as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }
        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $ty {
            fn decode(
                v: sqlx::postgres::PgValueRef<'r>,
            ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
                Ok(Self(<i64 as sqlx::Decode<sqlx::Postgres>>::decode(v)?))
            }
        }
        impl sqlx::Encode<'_, sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <i64 as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.0, buf)
            }
        }
    };
    ($ty:ty, text) => {
        impl sqlx::Type<sqlx::Postgres> for $ty {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }
        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $ty {
            fn decode(
                v: sqlx::postgres::PgValueRef<'r>,
            ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
                Ok(<&str as sqlx::Decode<sqlx::Postgres>>::decode(v)?.into())
            }
        }
        impl sqlx::Encode<'_, sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }
    };
}
id_column!(EventPk, int);
id_column!(LinkId, int);
id_column!(ObjectId, text);
id_column!(LeadId, text);

const CLAIM_LINKS: &str = "UPDATE links SET locked_until = $1, lease = $2
    WHERE id IN (SELECT id FROM links WHERE due_at IS NOT NULL AND due_at <= $3 AND locked_until <= $3
                 ORDER BY due_at LIMIT $4 FOR UPDATE SKIP LOCKED)
    RETURNING id, object_id, lead_id, attempts, first_queued_at";
const CLAIM_RESOLVES: &str = "UPDATE events SET resolve_locked_until = $1, resolve_lease = $2
    WHERE id IN (SELECT id FROM events WHERE resolve_due IS NOT NULL AND resolve_due <= $3
                 AND resolve_locked_until <= $3 ORDER BY resolve_due LIMIT $4 FOR UPDATE SKIP LOCKED)
    RETURNING id, source, event_id, raw_body, body, content_type, request_headers, request_query,
              resolve_attempts, resolve_first, trace_context";

/// The columns of a `StoredRequest`, as `request_of` reads them.
const REQUEST_COLUMNS: &str = "raw_body, body, content_type, request_headers, request_query";

/// The stored request of a row holding `REQUEST_COLUMNS`.
fn request_of(r: &sqlx::postgres::PgRow) -> std::result::Result<StoredRequest, sqlx::Error> {
    Ok(StoredRequest::from_columns(
        r.try_get("raw_body")?,
        r.try_get("body")?,
        r.try_get("content_type")?,
        r.try_get("request_headers")?,
        r.try_get("request_query")?,
    ))
}

/// Creates the pair, or finds it (the update takes the row lock, which orders this against a
/// concurrent completion of the same pair) and says in which state it is. A pending pair held
/// because every event wanting it was discarded is due again: a live event wants it now.
const UPSERT_LINK: &str =
    "INSERT INTO links (object_id, lead_id, state, attempts, due_at, first_queued_at, updated_at)
    VALUES ($1, $2, 'pending', 0, $3, $3, $3)
    ON CONFLICT (object_id, lead_id) DO UPDATE SET updated_at = links.updated_at,
      due_at = CASE WHEN links.state = 'pending' AND links.due_at IS NULL THEN excluded.due_at
               ELSE links.due_at END
    RETURNING id, state";

/// Makes a pair that is not linked due now with a fresh attempt budget: a dead pair named by a
/// new event, or any unlinked pair of a replayed event. A linked pair is never touched.
const REVIVE_LINK: &str =
    "UPDATE links SET state = 'pending', attempts = 0, due_at = $2, first_queued_at = $2,
    updated_at = $2, last_error = NULL WHERE id = $1 AND state <> 'linked'";

const ATTACH: &str =
    "INSERT INTO event_links (event_pk, link_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";

/// The group commit and the completions cut their rows into chunks of these
/// sizes, largest first, and write each chunk with one multi-row statement: a batch of n rows
/// takes as many statements per table as n has binary digits set, and there are few enough
/// distinct statement texts to stay prepared in the connection's statement cache.
const CHUNK_SIZES: [usize; 9] = [256, 128, 64, 32, 16, 8, 4, 2, 1];

/// `items` cut into chunks whose lengths are in `CHUNK_SIZES`.
fn chunks<T>(items: &[T]) -> Vec<&[T]> {
    chunks_upto(items, usize::MAX)
}

/// Most ids a statement looks up through a non-unique index (`event_links.link_id`). Without
/// statistics (a new database, before autovacuum's first ANALYZE) PostgreSQL guesses 0.5 % of the
/// table per value, and from about 32 values on it chose to read the whole table instead.
const LOOKUP_CHUNK: usize = 16;

/// `items` cut into chunks of at most `max` whose lengths are in `CHUNK_SIZES`.
fn chunks_upto<T>(items: &[T], max: usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let size = CHUNK_SIZES
            .into_iter()
            .find(|s| *s <= rest.len() && *s <= max)
            .unwrap_or(1);
        let (head, tail) = rest.split_at(size);
        out.push(head);
        rest = tail;
    }
    out
}

/// One statement text per chunk size, built on first use: `head`, then `rows` copies of `row`,
/// then `tail`; each `{}` in them is the next numbered parameter (`$1`, `$2`, ...).
struct MultiRow {
    texts: std::sync::OnceLock<Vec<String>>,
    head: fn() -> String,
    row: &'static str,
    tail: &'static str,
}

impl MultiRow {
    const fn new(head: fn() -> String, row: &'static str, tail: &'static str) -> Self {
        MultiRow {
            texts: std::sync::OnceLock::new(),
            head,
            row,
            tail,
        }
    }

    fn sql(&'static self, rows: usize) -> &'static str {
        let texts = self.texts.get_or_init(|| {
            CHUNK_SIZES
                .iter()
                .map(|n| {
                    let rows = vec![self.row; *n].join(", ");
                    let text = format!("{}{rows}{}", (self.head)(), self.tail);
                    let mut parts = text.split("{}");
                    let mut sql = String::from(parts.next().unwrap_or_default());
                    for (i, part) in parts.enumerate() {
                        sql.push_str(&format!("${}", i + 1));
                        sql.push_str(part);
                    }
                    sql
                })
                .collect()
        });
        let i = CHUNK_SIZES
            .iter()
            .position(|s| *s == rows)
            .expect("a chunk has one of the chunk sizes");
        &texts[i]
    }
}

/// Inserts events, skipping any this source already has; answers the key of each new one.
static INSERT_EVENTS: MultiRow = MultiRow::new(
    || {
        "INSERT INTO events
    (source, event_id, event_type, received_at, object_id, state, reason, body, raw_body,
     content_type, request_headers, request_query, resolve_due, resolve_first, trace_context)
    VALUES "
            .into()
    },
    "({}, {}, {}, {}, {}, {}, {}, '', {}, {}, {}, {}, {}, {}, {})",
    " ON CONFLICT (source, event_id) DO NOTHING RETURNING id, source, event_id",
);

/// `UPSERT_LINK` for many distinct pairs (PostgreSQL refuses to update one row twice in one
/// statement), binding object id, lead id and three times the time; answers each pair with the
/// state it was in.
static UPSERT_LINKS: MultiRow = MultiRow::new(
    || {
        "INSERT INTO links (object_id, lead_id, state, attempts, due_at, first_queued_at, updated_at)
    VALUES "
            .into()
    },
    "({}, {}, 'pending', 0, {}, {}, {})",
    " ON CONFLICT (object_id, lead_id) DO UPDATE SET updated_at = links.updated_at,
      due_at = CASE WHEN links.state = 'pending' AND links.due_at IS NULL THEN excluded.due_at
               ELSE links.due_at END
    RETURNING id, object_id, lead_id, state",
);

/// `ATTACH` for many rows.
static ATTACH_MANY: MultiRow = MultiRow::new(
    || "INSERT INTO event_links (event_pk, link_id) VALUES ".into(),
    "({}, {})",
    " ON CONFLICT DO NOTHING",
);

/// New events whose every pair was already linked.
static MARK_DELIVERED: MultiRow = MultiRow::new(
    || "UPDATE events SET state = 'delivered' WHERE id IN (".into(),
    "{}",
    ")",
);

/// The attempts of a group of completions.
static INSERT_ATTEMPTS: MultiRow = MultiRow::new(
    || {
        "INSERT INTO attempts (link_id, at, status_code, error, response_excerpt, duration_ms) VALUES "
            .into()
    },
    "({}, {}, {}, {}, {}, {})",
    "",
);

/// Pairs SprintHub accepted (the time first): linked is a fact, whoever holds the lease now.
static MARK_LINKED: MultiRow = MultiRow::new(
    || {
        "UPDATE links SET state = 'linked', due_at = NULL, locked_until = 0, last_error = NULL,
    updated_at = {} WHERE id IN ("
            .into()
    },
    "{}",
    ") RETURNING id",
);

/// The events attached to some links.
static EVENTS_OF_LINKS: MultiRow = MultiRow::new(
    || "SELECT DISTINCT event_pk FROM event_links WHERE link_id IN (".into(),
    "{}",
    ")",
);

/// `(source, event_id, trace_context)` of the events some links serve, oldest first. Each event
/// is looked up by primary key: as a join, PostgreSQL without statistics hashed the whole events
/// table.
static EVENT_KEYS_OF_LINKS: MultiRow = MultiRow::new(
    || {
        "SELECT el.link_id,
           (SELECT e.source FROM events e WHERE e.id = el.event_pk) AS source,
           (SELECT e.event_id FROM events e WHERE e.id = el.event_pk) AS event_id,
           (SELECT e.trace_context FROM events e WHERE e.id = el.event_pk) AS trace_context
         FROM event_links el WHERE el.link_id IN ("
            .into()
    },
    "{}",
    ") ORDER BY el.event_pk",
);

/// Computes the state of some events again from their links. Given by primary key rather than
/// as a subquery over `event_links`: without statistics (before autovacuum's first ANALYZE),
/// PostgreSQL planned the subquery form as a scan of every event.
static RECOMPUTE_EVENTS: MultiRow = MultiRow::new(
    || {
        format!(
            "UPDATE events SET state = {EVENT_STATE}
         WHERE {HELD_BY_OPERATOR} AND resolve_due IS NULL AND id IN ("
        )
    },
    "{}",
    ")",
);

fn recompute_for_link_sql() -> String {
    format!(
        "UPDATE events SET state = {EVENT_STATE}
         WHERE id IN (SELECT event_pk FROM event_links WHERE link_id = $1)
           AND {HELD_BY_OPERATOR} AND resolve_due IS NULL"
    )
}

fn recompute_event_sql() -> String {
    format!("UPDATE events SET state = {EVENT_STATE}, reason = NULL WHERE id = $1")
}

/// A pair whose every event was discarded while its call was in flight is not due again.
static RETRY_LINK: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE links SET attempts = attempts + $3,
         due_at = CASE WHEN {PAIR_WANTED} THEN $4 ELSE NULL END, locked_until = 0,
         last_error = $5, updated_at = $6 WHERE id = $1 AND lease = $2 AND state = 'pending'"
    )
});

/// The event's pending pairs that no live event wants any more are not due.
static HOLD_UNWANTED_PAIRS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE links SET due_at = NULL
         WHERE id IN (SELECT link_id FROM event_links WHERE event_pk = $1)
           AND state = 'pending' AND due_at IS NOT NULL AND NOT {PAIR_WANTED}"
    )
});

/// When the oldest waiting job was queued: a pending link, a lead resolution or an object
/// creation. Each MIN is the first entry of a partial index (migration 6).
const OLDEST_PENDING: &str = "SELECT LEAST(
      (SELECT MIN(first_queued_at) FROM links WHERE due_at IS NOT NULL),
      (SELECT MIN(resolve_first) FROM events WHERE resolve_due IS NOT NULL),
      (SELECT MIN(first_at) FROM objects WHERE due_at IS NOT NULL))";

const RECORD_VERSION: &str =
    "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)";

/// `store::migrate` for PostgreSQL.
pub(super) async fn migrate(url: &str, apply: bool) -> Result<migrate::Status> {
    let opts = sqlx::postgres::PgConnectOptions::from_str(url)?;
    let mut conn = sqlx::ConnectOptions::connect(&opts).await?;
    let status = migrate_conn(&mut conn, apply).await;
    let _ = sqlx::Connection::close(conn).await;
    status
}

/// Brings a PostgreSQL database to this binary's schema version (or, without `apply`, only
/// says what is pending), under an advisory lock: of replicas starting together on an older
/// database one migrates, the others wait for it and then find nothing pending.
pub(super) async fn migrate_conn(
    conn: &mut sqlx::PgConnection,
    apply: bool,
) -> Result<migrate::Status> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(727465)")
        .execute(&mut *tx)
        .await?;
    sqlx::query(migrate::VERSION_TABLE)
        .execute(&mut *tx)
        .await?;
    let current: i64 = sqlx::query_scalar(migrate::CURRENT_VERSION)
        .fetch_one(&mut *tx)
        .await?;
    let status = migrate::status(migrate::POSTGRES, current)?;
    if !apply {
        tx.rollback().await?;
        return Ok(status);
    }
    for m in migrate::plan(migrate::POSTGRES, current)? {
        sqlx::raw_sql(m.sql()).execute(&mut *tx).await?;
        sqlx::query(RECORD_VERSION)
            .bind(m.version)
            .bind(m.name)
            .bind(migrate::applied_at())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(status)
}

/// A `q` prefix matched by at most this many event ids is searched as a union (see
/// `list_events`).
const SMALL_PREFIX: i64 = 1_000;

/// The event ids with a prefix, counted up to `$3` on `events_event_id_c`.
const COUNT_PREFIX: &str = "SELECT COUNT(*) FROM (SELECT 1 FROM events
    WHERE event_id COLLATE \"C\" >= $1 AND event_id COLLATE \"C\" < $2 LIMIT $3) s";

/// PostgreSQL for several replicas: claims use `FOR UPDATE SKIP LOCKED`, and the unique
/// constraints (not in-process locks) keep events and pairs single.
pub struct PostgresStore {
    write: sqlx::PgPool,
    read: sqlx::PgPool,
    /// Wakes the other replicas after an ingest queued work (`wake`).
    waker: std::sync::Arc<wake::Waker>,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<Self> {
        use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
        let opts = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(opts);
        // The first readiness check and the worker's two claims each want a connection as soon
        // as the service serves. Opened on demand, one after the other, each TLS handshake
        // (~100 ms even on loopback, mostly delayed-ACK stalls) added to the start-up; opened
        // together here they cost one.
        let (first, second, third) = tokio::join!(pool.acquire(), pool.acquire(), pool.acquire());
        let (mut conn, _second, _third) = (first?, second?, third?);
        migrate_conn(&mut conn, true).await?;
        Ok(PostgresStore {
            waker: wake::Waker::spawn(pool.clone()),
            write: pool.clone(),
            read: pool,
        })
    }

    async fn writer(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        Ok(self.write.acquire().await?)
    }

    async fn close_writer(&self) -> Result<()> {
        self.write.close().await;
        self.waker.stop();
        Ok(())
    }

    /// A group commit: the new events of the group in one transaction, a few multi-row
    /// statements per chunk of events rather than several statements per event, with the same
    /// outcome as inserting the events one after the other (`attach_links` with `replay = false`).
    async fn ingest_group(&self, events: &[NewEvent]) -> Result<Vec<IngestOutcome>> {
        use std::collections::{HashMap, HashSet};
        // PostgreSQL text cannot hold NUL. Ids with one are refused at the HTTP edge; what
        // describes an event (its type, body, reason) is stored with NUL replaced instead.
        let cleaned: Vec<NewEvent>;
        let events = if events.iter().any(|e| e.has_nul()) {
            cleaned = events.iter().map(NewEvent::without_nul).collect();
            &cleaned[..]
        } else {
            events
        };
        let mut w = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        // An id repeated within the batch is a duplicate of its first occurrence.
        let mut out = vec![IngestOutcome::Duplicate; events.len()];
        let mut seen = HashSet::with_capacity(events.len());
        let mut firsts: Vec<&NewEvent> = events
            .iter()
            .filter(|e| seen.insert((e.source.as_str(), e.event_id.as_str())))
            .collect();
        // In key order, so that replicas meeting the same ids in concurrent transactions
        // (a sender retrying while its first request is in flight) wait in one order.
        firsts.sort_unstable_by_key(|e| (e.source.as_str(), e.event_id.as_str()));
        // source -> event id -> pk, for the events that were new.
        let mut pk_of: HashMap<String, HashMap<String, i64>> = HashMap::new();
        for chunk in chunks(&firsts) {
            let mut q = sqlx::query(INSERT_EVENTS.sql(chunk.len()));
            for e in chunk {
                let (state, reason, resolve_due) = match &e.plan {
                    Plan::Parked(r) => (EventState::Parked, Some(r.as_str()), None),
                    Plan::Links(_) | Plan::Create { .. } => (EventState::Queued, None, None),
                    Plan::Resolve => (EventState::Queued, None, Some(e.received_at)),
                };
                q = q
                    .bind(&e.source)
                    .bind(&e.event_id)
                    .bind(&e.event_type)
                    .bind(e.received_at)
                    .bind(&e.object_id)
                    .bind(state)
                    .bind(reason)
                    .bind(&e.request.body[..])
                    .bind(&e.request.content_type)
                    .bind(StoredRequest::map_text(&e.request.headers))
                    .bind(StoredRequest::map_text(&e.request.query))
                    .bind(resolve_due)
                    .bind(e.received_at)
                    .bind(&e.trace);
            }
            for r in q.fetch_all(&mut *tx).await? {
                pk_of
                    .entry(r.try_get("source")?)
                    .or_default()
                    .insert(r.try_get("event_id")?, r.try_get("id")?);
            }
        }
        // The pairs the new events name, each once: (object id, lead id, due from).
        let mut pairs: Vec<(&str, &str, Millis)> = Vec::new();
        let mut pair_ix: HashMap<(&str, &str), usize> = HashMap::new();
        // (event pk, the indexes of its pairs) for the events that ask for links.
        let mut wants: Vec<(i64, Vec<usize>)> = Vec::new();
        let mut done = HashSet::with_capacity(events.len());
        // (event pk, definition id, leads, at) for the events whose object sprintlink creates.
        let mut creates: Vec<(i64, &str, &[LeadId], Millis)> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let pk = pk_of
                .get(e.source.as_str())
                .and_then(|m| m.get(e.event_id.as_str()));
            let Some(&pk) = pk else { continue };
            if !done.insert(pk) {
                continue;
            }
            out[i] = match &e.plan {
                Plan::Parked(_) => IngestOutcome::Parked,
                Plan::Resolve => IngestOutcome::Queued,
                Plan::Create {
                    definition_id,
                    leads,
                } => {
                    creates.push((pk, definition_id.as_str(), leads.as_slice(), e.received_at));
                    IngestOutcome::Queued
                }
                Plan::Links(leads) => {
                    let obj = e.object_id.as_ref().map_or("", ObjectId::as_str);
                    let ix = leads
                        .iter()
                        .map(|lead| {
                            *pair_ix.entry((obj, lead.as_str())).or_insert_with(|| {
                                pairs.push((obj, lead.as_str(), e.received_at));
                                pairs.len() - 1
                            })
                        })
                        .collect();
                    wants.push((pk, ix));
                    IngestOutcome::Queued
                }
            };
        }
        // Create or find every pair; the answer is the state it was in. In key order, so
        // that replicas writing overlapping pairs take the row locks in the same order.
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_unstable_by_key(|&i| (pairs[i].0, pairs[i].1));
        let mut link: Vec<(i64, LinkState)> = vec![(0, LinkState::Pending); pairs.len()];
        for chunk in chunks(&order) {
            let mut q = sqlx::query(UPSERT_LINKS.sql(chunk.len()));
            for &i in chunk {
                let (obj, lead, at) = pairs[i];
                q = q.bind(obj).bind(lead).bind(at).bind(at).bind(at);
            }
            for r in q.fetch_all(&mut *tx).await? {
                let (obj, lead): (String, String) =
                    (r.try_get("object_id")?, r.try_get("lead_id")?);
                let i = *pair_ix.get(&(obj.as_str(), lead.as_str())).ok_or_else(|| {
                    StoreError::broken(format!("unexpected pair ({obj}, {lead}) returned"))
                })?;
                link[i] = (r.try_get("id")?, r.try_get("state")?);
            }
        }
        if link.iter().any(|(id, _)| *id == 0) {
            return Err(StoreError::broken("a pair was not returned by its upsert"));
        }
        let mut attach: Vec<(i64, i64)> = Vec::new();
        let mut attached = HashSet::new();
        let mut delivered: Vec<i64> = Vec::new();
        for (pk, ix) in &wants {
            let mut all_linked = true;
            for &i in ix {
                if attached.insert((*pk, link[i].0)) {
                    attach.push((*pk, link[i].0));
                }
                all_linked &= link[i].1 == LinkState::Linked;
            }
            if all_linked {
                delivered.push(*pk);
            }
        }
        for chunk in chunks(&attach) {
            let mut q = sqlx::query(ATTACH_MANY.sql(chunk.len()));
            for (pk, link_id) in chunk {
                q = q.bind(*pk).bind(*link_id);
            }
            q.execute(&mut *tx).await?;
        }
        // A dead pair named again comes back to life, and so do the events waiting on it.
        let dead: Vec<(i64, Millis)> = pairs
            .iter()
            .zip(&link)
            .filter(|(_, (_, state))| *state == LinkState::Dead)
            .map(|((_, _, at), (id, _))| (*id, *at))
            .collect();
        for (link_id, at) in &dead {
            sqlx::query(REVIVE_LINK)
                .bind(*link_id)
                .bind(*at)
                .execute(&mut *tx)
                .await?;
        }
        let recompute = recompute_for_link_sql();
        for (link_id, _) in &dead {
            sqlx::query(AssertSqlSafe(recompute.clone()))
                .bind(*link_id)
                .execute(&mut *tx)
                .await?;
        }
        for chunk in chunks(&delivered) {
            let mut q = sqlx::query(MARK_DELIVERED.sql(chunk.len()));
            for pk in chunk {
                q = q.bind(*pk);
            }
            q.execute(&mut *tx).await?;
        }
        for (pk, definition_id, leads, at) in creates {
            objects::want_object(&mut tx, EventPk(pk), definition_id, leads, at).await?;
        }
        tx.commit().await?;
        // The other replicas' workers wake instead of waiting for a poll.
        if out.iter().any(|o| matches!(o, IngestOutcome::Queued)) {
            self.waker.wake();
        }
        Ok(out)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ingest(&self, events: &[NewEvent]) -> Result<Vec<IngestOutcome>> {
        self.ingest_group(events).await
    }

    async fn claim_links(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<LinkJob>> {
        let lease = lease_token();
        let mut w = self.writer().await?;
        let rows = sqlx::query(CLAIM_LINKS)
            .bind(lease_until)
            .bind(lease)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *w)
            .await?;
        let mut jobs = rows
            .iter()
            .map(|r| {
                Ok(LinkJob {
                    link_id: r.try_get("id")?,
                    lease,
                    object_id: r.try_get("object_id")?,
                    lead_id: r.try_get("lead_id")?,
                    attempts: r.try_get("attempts")?,
                    first_queued_at: r.try_get("first_queued_at")?,
                    events: Vec::new(),
                    trace: None,
                })
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
        // The claim is committed; the events each pair serves (so every log line about a
        // delivery names them) are a read, which need not keep ingest waiting for the writer.
        drop(w);
        let ids: Vec<LinkId> = jobs.iter().map(|j| j.link_id).collect();
        for chunk in chunks_upto(&ids, LOOKUP_CHUNK) {
            let mut q = sqlx::query(EVENT_KEYS_OF_LINKS.sql(chunk.len()));
            for id in chunk {
                q = q.bind(*id);
            }
            for r in q.fetch_all(&self.read).await? {
                let link_id: LinkId = r.try_get("link_id")?;
                if let Some(job) = jobs.iter_mut().find(|j| j.link_id == link_id) {
                    job.events
                        .push((r.try_get("source")?, r.try_get("event_id")?));
                    let trace: Option<String> = r.try_get("trace_context")?;
                    job.trace = job.trace.take().or(trace);
                }
            }
        }
        Ok(jobs)
    }

    async fn complete_links(&self, done: &[Completion], now: Millis) -> Result<()> {
        let mut w = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        // With each link once in the batch, the attempts, the linked pairs and the events
        // to recompute take one statement per chunk. A link completed twice in one batch
        // (its lease ran out while its call went on) keeps the one-by-one order.
        let mut seen = std::collections::HashSet::with_capacity(done.len());
        let distinct = done.iter().all(|c| seen.insert(c.link_id));
        if distinct {
            let attempts: Vec<(LinkId, &Attempt)> = done
                .iter()
                .filter_map(|c| Some((c.link_id, c.attempt.as_ref()?)))
                .collect();
            for chunk in chunks(&attempts) {
                let mut q = sqlx::query(INSERT_ATTEMPTS.sql(chunk.len()));
                for (link_id, a) in chunk {
                    q = q
                        .bind(*link_id)
                        .bind(a.at)
                        .bind(a.status_code)
                        .bind(&a.error)
                        .bind(&a.response_excerpt)
                        .bind(a.duration_ms);
                }
                q.execute(&mut *tx).await?;
            }
        }
        // Links whose state changed: their events' states are computed again.
        let mut changed: Vec<LinkId> = Vec::new();
        let mut linked: Vec<LinkId> = Vec::new();
        for c in done {
            if !distinct && let Some(a) = &c.attempt {
                sqlx::query(
                    "INSERT INTO attempts (link_id, at, status_code, error, response_excerpt, duration_ms)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(c.link_id)
                .bind(a.at)
                .bind(a.status_code)
                .bind(&a.error)
                .bind(&a.response_excerpt)
                .bind(a.duration_ms)
                .execute(&mut *tx)
                .await?;
            }
            let changed_state = match &c.update {
                LinkUpdate::Linked if distinct => {
                    linked.push(c.link_id);
                    false
                }
                // Linked is a fact, whoever holds the lease now.
                LinkUpdate::Linked => {
                    sqlx::query(
                        "UPDATE links SET state = 'linked', due_at = NULL, locked_until = 0,
                     last_error = NULL, updated_at = $2 WHERE id = $1",
                    )
                    .bind(c.link_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                        > 0
                }
                LinkUpdate::Retry {
                    due_at,
                    counted,
                    error,
                } => {
                    sqlx::query(AssertSqlSafe(RETRY_LINK.as_str()))
                        .bind(c.link_id)
                        .bind(c.lease)
                        .bind(i64::from(*counted))
                        .bind(*due_at)
                        .bind(error)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    false
                }
                LinkUpdate::Dead { error } => {
                    sqlx::query(
                        "UPDATE links SET state = 'dead', attempts = attempts + 1, due_at = NULL,
                     locked_until = 0, last_error = $3, updated_at = $4
                     WHERE id = $1 AND lease = $2 AND state = 'pending'",
                    )
                    .bind(c.link_id)
                    .bind(c.lease)
                    .bind(error)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                        > 0
                }
                LinkUpdate::Release => {
                    sqlx::query("UPDATE links SET locked_until = 0 WHERE id = $1 AND lease = $2")
                        .bind(c.link_id)
                        .bind(c.lease)
                        .execute(&mut *tx)
                        .await?;
                    false
                }
            };
            if changed_state {
                changed.push(c.link_id);
            }
            // A replay let this pair go while its call was in flight: now that the call
            // is over, it goes unless it was linked (a linked pair is kept, never resent).
            if !matches!(c.update, LinkUpdate::Linked) {
                Self::drop_orphan(&mut tx, c.link_id, None).await?;
            }
        }
        for chunk in chunks(&linked) {
            let mut q = sqlx::query_scalar::<_, i64>(MARK_LINKED.sql(chunk.len())).bind(now);
            for link_id in chunk {
                q = q.bind(*link_id);
            }
            changed.extend(q.fetch_all(&mut *tx).await?.into_iter().map(LinkId));
        }
        // Their events, recomputed once all the batch's links have their new state.
        let mut events: Vec<i64> = Vec::new();
        for chunk in chunks_upto(&changed, LOOKUP_CHUNK) {
            let mut q = sqlx::query_scalar::<_, i64>(EVENTS_OF_LINKS.sql(chunk.len()));
            for link_id in chunk {
                q = q.bind(*link_id);
            }
            events.extend(q.fetch_all(&mut *tx).await?);
        }
        events.sort_unstable();
        events.dedup();
        for chunk in chunks(&events) {
            let mut q = sqlx::query(RECOMPUTE_EVENTS.sql(chunk.len()));
            for pk in chunk {
                q = q.bind(*pk);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim_resolves(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<ResolveJob>> {
        let lease = lease_token();
        let mut w = self.writer().await?;
        let rows = sqlx::query(CLAIM_RESOLVES)
            .bind(lease_until)
            .bind(lease)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *w)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ResolveJob {
                    event_pk: r.try_get("id")?,
                    lease,
                    source: r.try_get("source")?,
                    event_id: r.try_get("event_id")?,
                    request: request_of(r)?,
                    attempts: r.try_get("resolve_attempts")?,
                    first_at: r.try_get("resolve_first")?,
                    trace: r.try_get("trace_context")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn complete_resolve(
        &self,
        job: &ResolveJob,
        update: ResolveUpdate,
        now: Millis,
    ) -> Result<()> {
        let mut w = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        // Only the lease holder may decide; a stale worker's answer is dropped.
        let object_id: Option<Option<ObjectId>> = sqlx::query_scalar(
            "SELECT object_id FROM events WHERE id = $1 AND resolve_lease = $2 AND resolve_due IS NOT NULL",
        )
        .bind(job.event_pk)
        .bind(job.lease)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(object_id) = object_id else {
            return Ok(());
        };
        match update {
            ResolveUpdate::Create {
                definition_id,
                leads,
            } => {
                sqlx::query(
                    "UPDATE events SET resolve_due = NULL, resolve_locked_until = 0 WHERE id = $1",
                )
                .bind(job.event_pk)
                .execute(&mut *tx)
                .await?;
                objects::want_object(&mut tx, job.event_pk, &definition_id, &leads, now).await?;
            }
            ResolveUpdate::Links(leads) => {
                sqlx::query(
                    "UPDATE events SET resolve_due = NULL, resolve_locked_until = 0 WHERE id = $1",
                )
                .bind(job.event_pk)
                .execute(&mut *tx)
                .await?;
                let obj = object_id.unwrap_or_default();
                Self::attach_links(&mut tx, job.event_pk, &obj, &leads, now, true).await?;
                sqlx::query(AssertSqlSafe(recompute_event_sql()))
                    .bind(job.event_pk)
                    .execute(&mut *tx)
                    .await?;
            }
            ResolveUpdate::Parked(ref reason) | ResolveUpdate::Dead(ref reason) => {
                let state = if matches!(update, ResolveUpdate::Parked(_)) {
                    EventState::Parked
                } else {
                    EventState::Dead
                };
                sqlx::query(
                    "UPDATE events SET state = $2, reason = $3, resolve_due = NULL, resolve_locked_until = 0 WHERE id = $1",
                )
                .bind(job.event_pk)
                .bind(state)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
            }
            ResolveUpdate::Retry {
                due_at,
                counted,
                error,
            } => {
                sqlx::query(
                    "UPDATE events SET resolve_due = $2, resolve_locked_until = 0,
                     resolve_attempts = resolve_attempts + $3, reason = $4 WHERE id = $1",
                )
                .bind(job.event_pk)
                .bind(due_at)
                .bind(i64::from(counted))
                .bind(error)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        let links: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(CASE WHEN locked_until > due_at THEN locked_until ELSE due_at END) FROM links WHERE due_at IS NOT NULL",
        )
        .fetch_one(&self.read)
        .await?;
        let events: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(CASE WHEN resolve_locked_until > resolve_due THEN resolve_locked_until ELSE resolve_due END) FROM events WHERE resolve_due IS NOT NULL",
        )
        .fetch_one(&self.read)
        .await?;
        let objects: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(CASE WHEN locked_until > due_at THEN locked_until ELSE due_at END) FROM objects WHERE due_at IS NOT NULL",
        )
        .fetch_one(&self.read)
        .await?;
        Ok([links, events, objects].into_iter().flatten().min())
    }

    async fn claim_objects(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<ObjectJob>> {
        let lease = lease_token();
        let mut w = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        let jobs = objects::claim(&mut tx, now, lease_until, lease, limit).await?;
        tx.commit().await?;
        Ok(jobs)
    }

    async fn object_sending(&self, job: &ObjectJob, now: Millis) -> Result<bool> {
        let mut w = self.writer().await?;
        objects::sending(&mut w, job, now).await
    }

    async fn complete_object(&self, done: &ObjectCompletion, now: Millis) -> Result<()> {
        let mut w = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        objects::complete(&mut tx, done, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_events(&self, f: &EventFilter) -> Result<Vec<EventSummary>> {
        enum Bound {
            Text(String),
            Int(i64),
        }
        let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM events WHERE 1 = 1");
        let mut values: Vec<Bound> = Vec::new();
        let mut cond = |values: &mut Vec<Bound>, v: Bound, clause: &str| {
            values.push(v);
            sql.push_str(&clause.replace("$N", &format!("${}", values.len())));
        };
        if let Some(s) = f.state {
            cond(
                &mut values,
                Bound::Text(s.as_str().into()),
                " AND state = $N",
            );
        }
        if let Some(s) = &f.source {
            cond(&mut values, Bound::Text(s.clone()), " AND source = $N");
        }
        if let Some(o) = &f.object_id {
            cond(&mut values, Bound::Text(o.clone()), " AND object_id = $N");
        }
        if let Some(l) = &f.lead_id {
            cond(
                &mut values,
                Bound::Text(l.clone()),
                " AND id IN (SELECT el.event_pk FROM links l JOIN event_links el ON el.link_id = l.id
                   WHERE l.lead_id = $N)",
            );
        }
        if let Some(t) = f.since {
            cond(&mut values, Bound::Int(t), " AND received_at >= $N");
        }
        if let Some(t) = f.until {
            cond(&mut values, Bound::Int(t), " AND received_at < $N");
        }
        if let Some(q) = &f.q {
            // An id prefix as a byte-order range of `events_event_id_c`, or a lead key through
            // the mapping table to its leads' links. Written as an OR, the planner walks the
            // ids from the newest testing each row (580 ms at 1,000,000 for a prefix of a few
            // events): fine when the prefix matches many events, since the walk then meets 50
            // soon. So the prefix is counted first (at most `SMALL_PREFIX` index entries); a
            // prefix that few match becomes an array of the two id sets (`= ANY(ARRAY(..))`,
            // computed once: as `IN (.. UNION ALL ..)` the planner, misjudging the lead-key
            // side, merge-joined it against the whole id index, 307 ms), then read by id.
            let few: i64 = sqlx::query_scalar(COUNT_PREFIX)
                .bind(q)
                .bind(prefix_end(q))
                .bind(SMALL_PREFIX + 1)
                .fetch_one(&self.read)
                .await?;
            let (prefix, or, end) = if few <= SMALL_PREFIX {
                (
                    " AND id = ANY(ARRAY((SELECT id FROM events WHERE event_id COLLATE \"C\" >= $N",
                    " UNION ALL (SELECT el.event_pk FROM mappings m JOIN links l ON l.lead_id = m.lead_id
                   JOIN event_links el ON el.link_id = l.id WHERE m.key IN ($N",
                    ", $N))))",
                )
            } else {
                (
                    " AND ((event_id COLLATE \"C\" >= $N",
                    " OR id IN (SELECT el.event_pk FROM mappings m JOIN links l ON l.lead_id = m.lead_id
                   JOIN event_links el ON el.link_id = l.id WHERE m.key IN ($N",
                    ", $N)))",
                )
            };
            cond(&mut values, Bound::Text(q.clone()), prefix);
            cond(
                &mut values,
                Bound::Text(prefix_end(q)),
                " AND event_id COLLATE \"C\" < $N)",
            );
            cond(&mut values, Bound::Text(q.clone()), or);
            cond(&mut values, Bound::Text(q.to_lowercase()), end);
        }
        if let Some(b) = f.before {
            cond(&mut values, Bound::Int(b.0), " AND id < $N");
        }
        cond(
            &mut values,
            Bound::Int(f.limit),
            " ORDER BY id DESC LIMIT $N",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for v in values {
            q = match v {
                Bound::Text(t) => q.bind(t),
                Bound::Int(i) => q.bind(i),
            };
        }
        let rows = q.fetch_all(&self.read).await?;
        rows.iter().map(summary).collect()
    }

    async fn find_events(&self, event_id: &str, source: Option<&str>) -> Result<Vec<EventSummary>> {
        let rows = match source {
            Some(s) => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {SUMMARY_COLUMNS} FROM events WHERE event_id = $1 AND source = $2"
                )))
                .bind(event_id)
                .bind(s)
                .fetch_all(&self.read)
                .await?
            }
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {SUMMARY_COLUMNS} FROM events WHERE event_id = $1 ORDER BY id"
                )))
                .bind(event_id)
                .fetch_all(&self.read)
                .await?
            }
        };
        rows.iter().map(summary).collect()
    }

    async fn event_detail(&self, pk: EventPk, page: LinkPage) -> Result<Option<EventDetail>> {
        // One snapshot for the event, its links and their attempts, so that a delivery
        // committing meanwhile cannot show a link's new state beside its old attempts.
        let mut tx = self
            .read
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SUMMARY_COLUMNS}, {REQUEST_COLUMNS}, body_removed_at, trace_context FROM events WHERE id = $1"
        )))
        .bind(pk)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let request = request_of(&row)?;
        let body_removed_at: Option<i64> = row.try_get("body_removed_at")?;
        let trace: Option<String> = row.try_get("trace_context")?;
        let summary = summary(&row)?;
        // One row more than the page, to know whether another page follows.
        let mut link_rows = sqlx::query(
            "SELECT l.id, l.object_id, l.lead_id, l.state, l.due_at FROM links l
             JOIN event_links el ON el.link_id = l.id
             WHERE el.event_pk = $1 AND el.link_id > $2 ORDER BY el.link_id LIMIT $3",
        )
        .bind(pk)
        .bind(page.after.unwrap_or(LinkId(i64::MIN)))
        .bind(page.limit.saturating_add(1))
        .fetch_all(&mut *tx)
        .await?;
        let more = link_rows.len() as i64 > page.limit;
        link_rows.truncate(page.limit.max(0) as usize);
        let mut links = Vec::with_capacity(link_rows.len());
        for r in &link_rows {
            let link_id: i64 = r.try_get("id")?;
            let attempts = sqlx::query(
                "SELECT at, status_code, error, response_excerpt, duration_ms FROM attempts
                 WHERE link_id = $1 ORDER BY id DESC LIMIT 100",
            )
            .bind(link_id)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .rev()
            .map(|a| {
                Ok(Attempt {
                    at: a.try_get("at")?,
                    status_code: a.try_get("status_code")?,
                    error: a.try_get("error")?,
                    response_excerpt: a.try_get("response_excerpt")?,
                    duration_ms: a.try_get("duration_ms")?,
                })
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
            links.push(LinkDetail {
                link_id: LinkId(link_id),
                object_id: r.try_get("object_id")?,
                lead_id: r.try_get("lead_id")?,
                state: r.try_get("state")?,
                next_attempt_at: r.try_get("due_at")?,
                attempts,
            });
        }
        let object = objects::detail(&mut tx, pk).await?;
        tx.commit().await?;
        let more_links_after = if more {
            links.last().map(|l| l.link_id)
        } else {
            None
        };
        Ok(Some(EventDetail {
            summary,
            request,
            body_removed_at,
            trace,
            object,
            links,
            more_links_after,
        }))
    }

    async fn event_request(&self, pk: EventPk) -> Result<Option<StoredRequest>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {REQUEST_COLUMNS} FROM events WHERE id = $1"
        )))
        .bind(pk)
        .fetch_optional(&self.read)
        .await?;
        Ok(row.as_ref().map(request_of).transpose()?)
    }

    async fn replay(
        &self,
        pk: EventPk,
        object_id: Option<&ObjectId>,
        plan: Plan,
        now: Millis,
    ) -> Result<()> {
        let mut w = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        // An event whose object was created before links that object: it is never created
        // twice. Its id stays on the event whatever the new plan.
        let created = objects::created_id(&mut tx, pk).await?;
        let plan = match (plan, &created) {
            (Plan::Create { leads, .. }, Some(_)) => Plan::Links(leads),
            (other, _) => other,
        };
        let object_id = object_id.or(created.as_ref());
        // Links this event no longer asks for, and that are not linked, are let go; a
        // pair no other event wants is removed with its history so it is never sent.
        let detached: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM event_links WHERE event_pk = $1
               AND link_id IN (SELECT id FROM links WHERE state <> 'linked') RETURNING link_id",
        )
        .bind(pk)
        .fetch_all(&mut *tx)
        .await?;
        // A pair the new plan names again keeps its row and its attempt history: it is
        // attached again below.
        let wanted: &[LeadId] = match (&plan, object_id) {
            (Plan::Links(leads), Some(_)) => leads,
            _ => &[],
        };
        for link_id in detached {
            let pair: Option<(ObjectId, LeadId)> =
                sqlx::query_as("SELECT object_id, lead_id FROM links WHERE id = $1")
                    .bind(link_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if pair.is_some_and(|(o, l)| Some(&o) == object_id && wanted.contains(&l)) {
                continue;
            }
            // A pair whose call is in flight stays until that call's outcome is recorded
            // (`complete_links` removes it then, unless it was linked).
            Self::drop_orphan(&mut tx, LinkId(link_id), Some(now)).await?;
        }
        match plan {
            Plan::Parked(reason) => {
                sqlx::query("UPDATE events SET state = 'parked', reason = $2, object_id = $3, resolve_due = NULL WHERE id = $1")
                    .bind(pk)
                    .bind(reason)
                    .bind(object_id)
                    .execute(&mut *tx)
                    .await?;
                objects::hold_object(&mut tx, pk).await?;
            }
            Plan::Create {
                definition_id,
                leads,
            } => {
                objects::want_object(&mut tx, pk, definition_id.as_str(), &leads, now).await?;
            }
            Plan::Resolve => {
                sqlx::query(
                    "UPDATE events SET state = 'queued', reason = NULL, object_id = $3, resolve_due = $2,
                     resolve_locked_until = 0, resolve_attempts = 0, resolve_first = $2 WHERE id = $1",
                )
                .bind(pk)
                .bind(now)
                .bind(object_id)
                .execute(&mut *tx)
                .await?;
                objects::hold_object(&mut tx, pk).await?;
            }
            Plan::Links(leads) => {
                sqlx::query("UPDATE events SET object_id = $2, resolve_due = NULL WHERE id = $1")
                    .bind(pk)
                    .bind(object_id)
                    .execute(&mut *tx)
                    .await?;
                Self::attach_links(
                    &mut tx,
                    pk,
                    &object_id.cloned().unwrap_or_default(),
                    &leads,
                    now,
                    true,
                )
                .await?;
                sqlx::query(AssertSqlSafe(recompute_event_sql()))
                    .bind(pk)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn discard(&self, pk: EventPk, reason: &str, _now: Millis) -> Result<()> {
        let mut w = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        sqlx::query(
            "UPDATE events SET state = $2, reason = $3, resolve_due = NULL,
             resolve_locked_until = 0 WHERE id = $1",
        )
        .bind(pk)
        .bind(EventState::Discarded)
        .bind(without_nul(reason))
        .execute(&mut *tx)
        .await?;
        objects::hold_object(&mut tx, pk).await?;
        sqlx::query(AssertSqlSafe(HOLD_UNWANTED_PAIRS.as_str()))
            .bind(pk)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn stats(&self) -> Result<Stats> {
        let count_by = |sql: &'static str| async move {
            let rows = sqlx::query(sql).fetch_all(&self.read).await?;
            rows.iter()
                .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?)))
                .collect::<std::result::Result<Vec<_>, sqlx::Error>>()
        };
        let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.read);
        // Each is a scan of a large queue's index; on connections of their own they run
        // side by side.
        let (events_by_state, links_by_state, pending_links, resolving, oldest) = tokio::try_join!(
            count_by("SELECT state, COUNT(*) FROM events GROUP BY state"),
            count_by("SELECT state, COUNT(*) FROM links GROUP BY state"),
            count("SELECT COUNT(*) FROM links WHERE due_at IS NOT NULL"),
            count(
                "SELECT (SELECT COUNT(*) FROM events WHERE resolve_due IS NOT NULL)
                      + (SELECT COUNT(*) FROM objects WHERE due_at IS NOT NULL)"
            ),
            sqlx::query_scalar::<_, Option<i64>>(OLDEST_PENDING).fetch_one(&self.read),
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
        let mut w = self.writer().await?;
        sqlx::query("INSERT INTO heartbeat (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = excluded.at")
            .bind(now_ms())
            .execute(&mut *w)
            .await?;
        Ok(())
    }

    async fn mapping_get(&self, source: &str, key: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT lead_id FROM mappings WHERE source = $1 AND key = $2 ORDER BY lead_id",
        )
        .bind(source)
        .bind(key)
        .fetch_all(&self.read)
        .await?)
    }

    async fn mapping_put(&self, source: &str, key: &str, lead_ids: &[String]) -> Result<()> {
        let mut w = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        sqlx::query("DELETE FROM mappings WHERE source = $1 AND key = $2")
            .bind(source)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        for lead in lead_ids {
            sqlx::query("INSERT INTO mappings (source, key, lead_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(source)
                .bind(key)
                .bind(lead)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn mapping_delete(&self, source: &str, key: &str) -> Result<bool> {
        let mut w = self.writer().await?;
        Ok(
            sqlx::query("DELETE FROM mappings WHERE source = $1 AND key = $2")
                .bind(source)
                .bind(key)
                .execute(&mut *w)
                .await?
                .rows_affected()
                > 0,
        )
    }

    async fn mapping_list(
        &self,
        source: &str,
        after: Option<(String, String)>,
        limit: i64,
    ) -> Result<Vec<(String, String)>> {
        let (key, lead) = after.unwrap_or_default();
        // A row value over the primary key (source, key, lead_id): one range scan.
        Ok(sqlx::query_as(
            "SELECT key, lead_id FROM mappings WHERE source = $1 AND (key, lead_id) > ($2, $3)
             ORDER BY key, lead_id LIMIT $4",
        )
        .bind(source)
        .bind(key)
        .bind(lead)
        .bind(limit)
        .fetch_all(&self.read)
        .await?)
    }

    async fn mapping_import(&self, source: &str, rows: &[(String, String)]) -> Result<usize> {
        let mut w = self.writer().await?;
        let mut tx = sqlx::Connection::begin(&mut *w).await?;
        for (key, lead) in rows {
            sqlx::query("INSERT INTO mappings (source, key, lead_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(source)
                .bind(key)
                .bind(lead)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    async fn remove_bodies(
        &self,
        delivered_before: Millis,
        now: Millis,
        limit: i64,
    ) -> Result<u64> {
        self.remove_bodies_batch(delivered_before, now, limit).await
    }

    async fn prune_delivered(
        &self,
        delivered_before: Millis,
        now: Millis,
        limit: i64,
    ) -> Result<u64> {
        self.prune_delivered_batch(delivered_before, now, limit)
            .await
    }

    async fn prune_failed(&self, received_before: Millis, now: Millis, limit: i64) -> Result<u64> {
        self.prune_failed_batch(received_before, now, limit).await
    }

    /// Autovacuum makes the space of deleted rows reusable; it is not given back to the file
    /// system (that takes `VACUUM FULL`, which locks the tables: an operator's decision).
    async fn reclaim_space(&self, _pages: i64) -> Result<bool> {
        Ok(false)
    }

    async fn storage_bytes(&self) -> Result<i64> {
        self.database_bytes().await
    }

    async fn oldest_pending_at(&self) -> Result<Option<Millis>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(t) FROM (
                SELECT MIN(first_queued_at) AS t FROM links WHERE due_at IS NOT NULL
                UNION ALL SELECT MIN(resolve_first) FROM events WHERE resolve_due IS NOT NULL
                UNION ALL SELECT MIN(first_at) FROM objects WHERE due_at IS NOT NULL) AS pending",
        )
        .fetch_one(&self.read)
        .await?)
    }

    /// The primary key decides between replicas: one INSERT wins, the others change nothing.
    async fn claim_alert_slot(
        &self,
        target: i64,
        kind: &str,
        window_start: Millis,
    ) -> Result<bool> {
        let now = now_ms();
        let mut w = self.writer().await?;
        sqlx::query("DELETE FROM alert_slots WHERE window_start < $1")
            .bind(now.saturating_sub(2 * 86_400_000))
            .execute(&mut *w)
            .await?;
        Ok(sqlx::query(
            "INSERT INTO alert_slots (target, kind, window_start, claimed_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(target)
        .bind(kind)
        .bind(window_start)
        .bind(now)
        .execute(&mut *w)
        .await?
        .rows_affected()
            == 1)
    }

    async fn delivery_pause(&self) -> Result<Option<Pause>> {
        let row: Option<(Option<String>, Option<Millis>)> =
            sqlx::query_as("SELECT reason, paused_until FROM delivery_control WHERE id = 1")
                .fetch_optional(&self.read)
                .await?;
        match row {
            Some((Some(reason), until)) => Ok(Some(Pause {
                reason: parse_state(&reason)?,
                until,
            })),
            _ => Ok(None),
        }
    }

    async fn set_delivery_pause(&self, pause: Option<Pause>, now: Millis) -> Result<()> {
        let mut w = self.writer().await?;
        sqlx::query(
            "INSERT INTO delivery_control (id, reason, paused_until, changed_at)
             VALUES (1, $1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET reason = excluded.reason,
               paused_until = excluded.paused_until, changed_at = excluded.changed_at",
        )
        .bind(pause.map(|p| p.reason.as_str()))
        .bind(pause.and_then(|p| p.until))
        .bind(now)
        .execute(&mut *w)
        .await?;
        Ok(())
    }

    async fn throttle_pause(&self, until: Millis, now: Millis) -> Result<()> {
        let mut w = self.writer().await?;
        sqlx::query(
            "INSERT INTO delivery_control (id, reason, paused_until, changed_at)
             VALUES (1, 'throttled', $1, $2)
             ON CONFLICT (id) DO UPDATE SET reason = 'throttled',
               paused_until = excluded.paused_until, changed_at = excluded.changed_at
             WHERE delivery_control.reason IS NULL
                OR (delivery_control.paused_until IS NOT NULL
                    AND delivery_control.paused_until < excluded.paused_until)",
        )
        .bind(until)
        .bind(now)
        .execute(&mut *w)
        .await?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        replica: &str,
        in_flight: i64,
        now: Millis,
        live_after: Millis,
    ) -> Result<Option<Vec<Replica>>> {
        let mut w = self.writer().await?;
        sqlx::query(
            "INSERT INTO delivery_replicas (replica_id, joined_at, last_seen, in_flight)
             VALUES ($1, $2, $2, $3)
             ON CONFLICT (replica_id) DO UPDATE SET last_seen = excluded.last_seen,
               in_flight = excluded.in_flight",
        )
        .bind(replica)
        .bind(now)
        .bind(in_flight)
        .execute(&mut *w)
        .await?;
        // Rows of replicas gone for good (crashed, never cleanly stopped) are forgotten after an hour.
        sqlx::query("DELETE FROM delivery_replicas WHERE last_seen < $1")
            .bind(live_after.saturating_sub(3_600_000))
            .execute(&mut *w)
            .await?;
        let rows: Vec<(String, Millis, i64)> = sqlx::query_as(
            "SELECT replica_id, joined_at, in_flight FROM delivery_replicas
             WHERE last_seen >= $1 ORDER BY joined_at, replica_id",
        )
        .bind(live_after)
        .fetch_all(&mut *w)
        .await?;
        Ok(Some(
            rows.into_iter()
                .map(|(id, joined_at, in_flight)| Replica {
                    id,
                    joined_at,
                    in_flight,
                })
                .collect(),
        ))
    }

    async fn leave(&self, replica: &str) -> Result<()> {
        let mut w = self.writer().await?;
        sqlx::query("DELETE FROM delivery_replicas WHERE replica_id = $1")
            .bind(replica)
            .execute(&mut *w)
            .await?;
        Ok(())
    }

    fn listen(&self, wake: std::sync::Arc<tokio::sync::Notify>) {
        let pool = self.read.clone();
        tokio::spawn(async move {
            // Reconnects after a lost connection; the worker's poll covers the gap.
            while !pool.is_closed() {
                let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection failed; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(WORK_CHANNEL).await {
                    tracing::debug!(error = %e, "LISTEN failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => wake.notify_one(),
                        // The connection was lost: wake once (work may have come meanwhile).
                        Ok(None) => wake.notify_one(),
                        Err(_) => break,
                    }
                    if pool.is_closed() {
                        return;
                    }
                }
            }
        });
    }

    async fn close(&self) {
        if let Err(e) = self.close_writer().await {
            tracing::warn!(error = %e, "closing the database writer failed");
        }
        self.read.close().await;
    }
}

impl PostgresStore {
    /// Removes a pair that is not linked and that no event names any more, with its
    /// attempts, unless (given `now`) a call for it is in flight.
    async fn drop_orphan(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        link_id: LinkId,
        now: Option<Millis>,
    ) -> Result<()> {
        let gone = sqlx::query(
            "DELETE FROM links WHERE id = $1 AND state <> 'linked' AND locked_until <= $2
               AND NOT EXISTS (SELECT 1 FROM event_links WHERE link_id = $1)",
        )
        .bind(link_id)
        .bind(now.unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await?
        .rows_affected()
            > 0;
        if gone {
            sqlx::query("DELETE FROM attempts WHERE link_id = $1")
                .bind(link_id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Creates or finds each pair and attaches it to the event; then the event is
    /// `delivered` at once if every pair was already linked.
    async fn attach_links(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        pk: EventPk,
        object_id: &ObjectId,
        leads: &[LeadId],
        now: Millis,
        replay: bool,
    ) -> Result<()> {
        let mut all_linked = true;
        let recompute = recompute_for_link_sql();
        for lead in leads {
            let row = sqlx::query(UPSERT_LINK)
                .bind(object_id)
                .bind(lead)
                .bind(now)
                .fetch_one(&mut **tx)
                .await?;
            let link_id: i64 = row.try_get("id")?;
            let state: LinkState = row.try_get("state")?;
            sqlx::query(ATTACH)
                .bind(pk)
                .bind(link_id)
                .execute(&mut **tx)
                .await?;
            if state == LinkState::Linked {
                continue;
            }
            all_linked = false;
            if state == LinkState::Dead || replay {
                sqlx::query(REVIVE_LINK)
                    .bind(link_id)
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
            }
            if state == LinkState::Dead {
                // Other events waiting on a pair that was dead are queued again too.
                sqlx::query(AssertSqlSafe(recompute.clone()))
                    .bind(link_id)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        if all_linked && !replay {
            sqlx::query("UPDATE events SET state = 'delivered' WHERE id = $1")
                .bind(pk)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

fn summary(r: &sqlx::postgres::PgRow) -> Result<EventSummary> {
    Ok(EventSummary {
        pk: r.try_get("id")?,
        event_id: r.try_get("event_id")?,
        source: r.try_get("source")?,
        state: r.try_get("state")?,
        received_at: r.try_get("received_at")?,
        object_id: r.try_get("object_id")?,
        event_type: r.try_get("event_type")?,
        reason: r.try_get("reason")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_everything_in_order() {
        for n in [0usize, 1, 3, 4, 63, 64, 65, 300, 513] {
            let items: Vec<usize> = (0..n).collect();
            let cs = chunks(&items);
            assert!(cs.iter().all(|c| CHUNK_SIZES.contains(&c.len())));
            assert_eq!(cs.concat(), items);
            let small = chunks_upto(&items, LOOKUP_CHUNK);
            assert!(small.iter().all(|c| c.len() <= LOOKUP_CHUNK));
            assert_eq!(small.concat(), items);
        }
        assert_eq!(INSERT_EVENTS.sql(4).matches("($").count(), 4);
        assert!(INSERT_EVENTS.sql(4).contains("$56)"));
        assert!(
            UPSERT_LINKS
                .sql(4)
                .contains("($16, $17, 'pending', 0, $18, $19, $20)")
        );
        assert!(MARK_DELIVERED.sql(4).ends_with("IN ($1, $2, $3, $4)"));
    }
}
