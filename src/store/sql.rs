//! The SQL behind `Store`, written once and instantiated for SQLite and PostgreSQL. Only the
//! schema and the claim statements differ between the two.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Row};

use super::*;

const SQLITE_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        source TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_type TEXT,
        received_at INTEGER NOT NULL,
        object_id TEXT,
        state TEXT NOT NULL,
        reason TEXT,
        body TEXT NOT NULL,
        resolve_due INTEGER,
        resolve_locked_until INTEGER NOT NULL DEFAULT 0,
        resolve_lease INTEGER NOT NULL DEFAULT 0,
        resolve_attempts INTEGER NOT NULL DEFAULT 0,
        resolve_first INTEGER NOT NULL DEFAULT 0,
        UNIQUE (source, event_id))",
    "CREATE TABLE IF NOT EXISTS links (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        object_id TEXT NOT NULL,
        lead_id TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        due_at INTEGER,
        locked_until INTEGER NOT NULL DEFAULT 0,
        lease INTEGER NOT NULL DEFAULT 0,
        first_queued_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_error TEXT,
        UNIQUE (object_id, lead_id))",
    "CREATE TABLE IF NOT EXISTS event_links (
        event_pk INTEGER NOT NULL,
        link_id INTEGER NOT NULL,
        PRIMARY KEY (event_pk, link_id))",
    "CREATE TABLE IF NOT EXISTS attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        link_id INTEGER NOT NULL,
        at INTEGER NOT NULL,
        status_code INTEGER,
        error TEXT,
        response_excerpt TEXT,
        duration_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS mappings (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        lead_id TEXT NOT NULL,
        PRIMARY KEY (source, key, lead_id))",
];

const PG_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS events (
        id BIGSERIAL PRIMARY KEY,
        source TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_type TEXT,
        received_at BIGINT NOT NULL,
        object_id TEXT,
        state TEXT NOT NULL,
        reason TEXT,
        body TEXT NOT NULL,
        resolve_due BIGINT,
        resolve_locked_until BIGINT NOT NULL DEFAULT 0,
        resolve_lease BIGINT NOT NULL DEFAULT 0,
        resolve_attempts BIGINT NOT NULL DEFAULT 0,
        resolve_first BIGINT NOT NULL DEFAULT 0,
        UNIQUE (source, event_id))",
    "CREATE TABLE IF NOT EXISTS links (
        id BIGSERIAL PRIMARY KEY,
        object_id TEXT NOT NULL,
        lead_id TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        due_at BIGINT,
        locked_until BIGINT NOT NULL DEFAULT 0,
        lease BIGINT NOT NULL DEFAULT 0,
        first_queued_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        last_error TEXT,
        UNIQUE (object_id, lead_id))",
    "CREATE TABLE IF NOT EXISTS event_links (
        event_pk BIGINT NOT NULL,
        link_id BIGINT NOT NULL,
        PRIMARY KEY (event_pk, link_id))",
    "CREATE TABLE IF NOT EXISTS attempts (
        id BIGSERIAL PRIMARY KEY,
        link_id BIGINT NOT NULL,
        at BIGINT NOT NULL,
        status_code BIGINT,
        error TEXT,
        response_excerpt TEXT,
        duration_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS mappings (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        lead_id TEXT NOT NULL,
        PRIMARY KEY (source, key, lead_id))",
];

/// Indexes (and the heartbeat row readiness writes) are the same text on both backends.
const INDEXES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS heartbeat (id BIGINT PRIMARY KEY, at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_state ON events (state, id)",
    "CREATE INDEX IF NOT EXISTS events_source ON events (source, id)",
    "CREATE INDEX IF NOT EXISTS events_event_id ON events (event_id)",
    "CREATE INDEX IF NOT EXISTS events_resolve ON events (resolve_due) WHERE resolve_due IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS links_due ON links (due_at) WHERE due_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS links_state ON links (state)",
    "CREATE INDEX IF NOT EXISTS event_links_link ON event_links (link_id)",
    "CREATE INDEX IF NOT EXISTS attempts_link ON attempts (link_id, id)",
];

const SQLITE_CLAIM_LINKS: &str = "UPDATE links SET locked_until = $1, lease = $2
    WHERE id IN (SELECT id FROM links WHERE due_at IS NOT NULL AND due_at <= $3 AND locked_until <= $3
                 ORDER BY due_at LIMIT $4)
    RETURNING id, object_id, lead_id, attempts, first_queued_at";
const PG_CLAIM_LINKS: &str = "UPDATE links SET locked_until = $1, lease = $2
    WHERE id IN (SELECT id FROM links WHERE due_at IS NOT NULL AND due_at <= $3 AND locked_until <= $3
                 ORDER BY due_at LIMIT $4 FOR UPDATE SKIP LOCKED)
    RETURNING id, object_id, lead_id, attempts, first_queued_at";
const SQLITE_CLAIM_RESOLVES: &str =
    "UPDATE events SET resolve_locked_until = $1, resolve_lease = $2
    WHERE id IN (SELECT id FROM events WHERE resolve_due IS NOT NULL AND resolve_due <= $3
                 AND resolve_locked_until <= $3 ORDER BY resolve_due LIMIT $4)
    RETURNING id, source, event_id, body, resolve_attempts, resolve_first";
const PG_CLAIM_RESOLVES: &str = "UPDATE events SET resolve_locked_until = $1, resolve_lease = $2
    WHERE id IN (SELECT id FROM events WHERE resolve_due IS NOT NULL AND resolve_due <= $3
                 AND resolve_locked_until <= $3 ORDER BY resolve_due LIMIT $4 FOR UPDATE SKIP LOCKED)
    RETURNING id, source, event_id, body, resolve_attempts, resolve_first";

const INSERT_EVENT: &str = "INSERT INTO events
    (source, event_id, event_type, received_at, object_id, state, reason, body, resolve_due, resolve_first)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    ON CONFLICT (source, event_id) DO NOTHING RETURNING id";

/// Creates the pair, or finds it (the no-op update takes the row lock, which orders this
/// against a concurrent completion of the same pair) and says in which state it is.
const UPSERT_LINK: &str =
    "INSERT INTO links (object_id, lead_id, state, attempts, due_at, first_queued_at, updated_at)
    VALUES ($1, $2, 'pending', 0, $3, $3, $3)
    ON CONFLICT (object_id, lead_id) DO UPDATE SET updated_at = links.updated_at
    RETURNING id, state";

/// Makes a pair that is not linked due now with a fresh attempt budget: a dead pair named by a
/// new event, or any unlinked pair of a replayed event. A linked pair is never touched.
const REVIVE_LINK: &str =
    "UPDATE links SET state = 'pending', attempts = 0, due_at = $2, first_queued_at = $2,
    updated_at = $2, last_error = NULL WHERE id = $1 AND state <> 'linked'";

const ATTACH: &str =
    "INSERT INTO event_links (event_pk, link_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";

const EVENT_STATE: &str = "CASE
      WHEN EXISTS (SELECT 1 FROM event_links el JOIN links l ON l.id = el.link_id
                   WHERE el.event_pk = events.id AND l.state = 'dead') THEN 'dead'
      WHEN EXISTS (SELECT 1 FROM event_links el JOIN links l ON l.id = el.link_id
                   WHERE el.event_pk = events.id AND l.state = 'pending') THEN 'queued'
      ELSE 'delivered' END";

fn recompute_for_link_sql() -> String {
    format!(
        "UPDATE events SET state = {EVENT_STATE}
         WHERE id IN (SELECT event_pk FROM event_links WHERE link_id = $1)
           AND state <> 'parked' AND resolve_due IS NULL"
    )
}

fn recompute_event_sql() -> String {
    format!("UPDATE events SET state = {EVENT_STATE}, reason = NULL WHERE id = $1")
}

const SUMMARY_COLUMNS: &str =
    "id, event_id, source, state, received_at, object_id, event_type, reason";

fn lease_token() -> i64 {
    // Never 0, the value of "not leased".
    (fastrand::u64(1..u64::MAX) >> 1) as i64
}

macro_rules! sql_store {
    ($name:ident, $db:ty, $pool:ty, $claim_links:expr, $claim_resolves:expr) => {
        #[async_trait]
        impl Store for $name {
            async fn ingest(&self, events: &[NewEvent]) -> Result<Vec<IngestOutcome>> {
                let mut tx = self.write.begin().await?;
                let mut out = Vec::with_capacity(events.len());
                for e in events {
                    let (state, reason, resolve_due) = match &e.plan {
                        Plan::Parked(r) => ("parked", Some(r.as_str()), None),
                        Plan::Links(_) => ("queued", None, None),
                        Plan::Resolve => ("queued", None, Some(e.received_at)),
                    };
                    let pk: Option<i64> = sqlx::query_scalar(INSERT_EVENT)
                        .bind(&e.source)
                        .bind(&e.event_id)
                        .bind(&e.event_type)
                        .bind(e.received_at)
                        .bind(&e.object_id)
                        .bind(state)
                        .bind(reason)
                        .bind(&e.body)
                        .bind(resolve_due)
                        .bind(e.received_at)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let Some(pk) = pk else {
                        out.push(IngestOutcome::Duplicate);
                        continue;
                    };
                    match &e.plan {
                        Plan::Parked(_) => out.push(IngestOutcome::Parked),
                        Plan::Resolve => out.push(IngestOutcome::Queued),
                        Plan::Links(leads) => {
                            let obj = e.object_id.as_deref().unwrap_or_default();
                            Self::attach_links(&mut tx, pk, obj, leads, e.received_at, false).await?;
                            out.push(IngestOutcome::Queued);
                        }
                    }
                }
                tx.commit().await?;
                Ok(out)
            }

            async fn claim_links(&self, now: Millis, lease_until: Millis, limit: i64) -> Result<Vec<LinkJob>> {
                let lease = lease_token();
                let rows = sqlx::query($claim_links)
                    .bind(lease_until)
                    .bind(lease)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(&self.write)
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(LinkJob {
                            link_id: r.try_get("id")?,
                            lease,
                            object_id: r.try_get("object_id")?,
                            lead_id: r.try_get("lead_id")?,
                            attempts: r.try_get("attempts")?,
                            first_queued_at: r.try_get("first_queued_at")?,
                        })
                    })
                    .collect::<std::result::Result<_, sqlx::Error>>()
                    .map_err(Into::into)
            }

            async fn complete_links(&self, done: &[Completion], now: Millis) -> Result<()> {
                let mut tx = self.write.begin().await?;
                let recompute = recompute_for_link_sql();
                for c in done {
                    if let Some(a) = &c.attempt {
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
                        // Linked is a fact, whoever holds the lease now.
                        LinkUpdate::Linked => sqlx::query(
                            "UPDATE links SET state = 'linked', due_at = NULL, locked_until = 0,
                             last_error = NULL, updated_at = $2 WHERE id = $1",
                        )
                        .bind(c.link_id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected() > 0,
                        LinkUpdate::Retry { due_at, counted, error } => {
                            sqlx::query(
                                "UPDATE links SET attempts = attempts + $3, due_at = $4, locked_until = 0,
                                 last_error = $5, updated_at = $6
                                 WHERE id = $1 AND lease = $2 AND state = 'pending'",
                            )
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
                        LinkUpdate::Dead { error } => sqlx::query(
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
                        .rows_affected() > 0,
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
                        sqlx::query(AssertSqlSafe(recompute.clone()))
                            .bind(c.link_id)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                tx.commit().await?;
                Ok(())
            }

            async fn claim_resolves(&self, now: Millis, lease_until: Millis, limit: i64) -> Result<Vec<ResolveJob>> {
                let lease = lease_token();
                let rows = sqlx::query($claim_resolves)
                    .bind(lease_until)
                    .bind(lease)
                    .bind(now)
                    .bind(limit)
                    .fetch_all(&self.write)
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(ResolveJob {
                            event_pk: r.try_get("id")?,
                            lease,
                            source: r.try_get("source")?,
                            event_id: r.try_get("event_id")?,
                            body: r.try_get("body")?,
                            attempts: r.try_get("resolve_attempts")?,
                            first_at: r.try_get("resolve_first")?,
                        })
                    })
                    .collect::<std::result::Result<_, sqlx::Error>>()
                    .map_err(Into::into)
            }

            async fn complete_resolve(&self, job: &ResolveJob, update: ResolveUpdate, now: Millis) -> Result<()> {
                let mut tx = self.write.begin().await?;
                // Only the lease holder may decide; a stale worker's answer is dropped.
                let object_id: Option<Option<String>> = sqlx::query_scalar(
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
                    ResolveUpdate::Links(leads) => {
                        sqlx::query("UPDATE events SET resolve_due = NULL, resolve_locked_until = 0 WHERE id = $1")
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
                        let state = if matches!(update, ResolveUpdate::Parked(_)) { "parked" } else { "dead" };
                        sqlx::query(
                            "UPDATE events SET state = $2, reason = $3, resolve_due = NULL, resolve_locked_until = 0 WHERE id = $1",
                        )
                        .bind(job.event_pk)
                        .bind(state)
                        .bind(reason)
                        .execute(&mut *tx)
                        .await?;
                    }
                    ResolveUpdate::Retry { due_at, counted, error } => {
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
                Ok(match (links, events) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                })
            }

            async fn list_events(&self, f: &EventFilter) -> Result<Vec<EventSummary>> {
                let mut sql = format!("SELECT {SUMMARY_COLUMNS} FROM events WHERE 1 = 1");
                let mut n = 0;
                let mut next = || {
                    n += 1;
                    n
                };
                if f.state.is_some() {
                    sql.push_str(&format!(" AND state = ${}", next()));
                }
                if f.source.is_some() {
                    sql.push_str(&format!(" AND source = ${}", next()));
                }
                if f.before.is_some() {
                    sql.push_str(&format!(" AND id < ${}", next()));
                }
                sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", next()));
                let mut q = sqlx::query(AssertSqlSafe(sql));
                if let Some(s) = &f.state {
                    q = q.bind(s);
                }
                if let Some(s) = &f.source {
                    q = q.bind(s);
                }
                if let Some(b) = f.before {
                    q = q.bind(b);
                }
                let rows = q.bind(f.limit).fetch_all(&self.read).await?;
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

            async fn event_detail(&self, pk: i64) -> Result<Option<EventDetail>> {
                let row = sqlx::query(AssertSqlSafe(format!(
                    "SELECT {SUMMARY_COLUMNS}, body FROM events WHERE id = $1"
                )))
                .bind(pk)
                .fetch_optional(&self.read)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let body: String = row.try_get("body")?;
                let summary = summary(&row)?;
                let link_rows = sqlx::query(
                    "SELECT l.id, l.object_id, l.lead_id, l.state, l.due_at FROM links l
                     JOIN event_links el ON el.link_id = l.id WHERE el.event_pk = $1 ORDER BY l.id",
                )
                .bind(pk)
                .fetch_all(&self.read)
                .await?;
                let mut links = Vec::with_capacity(link_rows.len());
                for r in &link_rows {
                    let link_id: i64 = r.try_get("id")?;
                    let attempts = sqlx::query(
                        "SELECT at, status_code, error, response_excerpt, duration_ms FROM attempts
                         WHERE link_id = $1 ORDER BY id DESC LIMIT 100",
                    )
                    .bind(link_id)
                    .fetch_all(&self.read)
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
                        link_id,
                        object_id: r.try_get("object_id")?,
                        lead_id: r.try_get("lead_id")?,
                        state: r.try_get("state")?,
                        next_attempt_at: r.try_get("due_at")?,
                        attempts,
                    });
                }
                Ok(Some(EventDetail { summary, body, links }))
            }

            async fn event_body(&self, pk: i64) -> Result<Option<String>> {
                Ok(sqlx::query_scalar("SELECT body FROM events WHERE id = $1")
                    .bind(pk)
                    .fetch_optional(&self.read)
                    .await?)
            }

            async fn replay(&self, pk: i64, object_id: Option<&str>, plan: Plan, now: Millis) -> Result<()> {
                let mut tx = self.write.begin().await?;
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
                let wanted: &[String] = match (&plan, object_id) {
                    (Plan::Links(leads), Some(_)) => leads,
                    _ => &[],
                };
                for link_id in detached {
                    let pair: Option<(String, String)> =
                        sqlx::query_as("SELECT object_id, lead_id FROM links WHERE id = $1")
                            .bind(link_id)
                            .fetch_optional(&mut *tx)
                            .await?;
                    if pair.is_some_and(|(o, l)| Some(o.as_str()) == object_id && wanted.contains(&l)) {
                        continue;
                    }
                    let orphan = sqlx::query("DELETE FROM links WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM event_links WHERE link_id = $1)")
                        .bind(link_id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected() > 0;
                    if orphan {
                        sqlx::query("DELETE FROM attempts WHERE link_id = $1").bind(link_id).execute(&mut *tx).await?;
                    }
                }
                match plan {
                    Plan::Parked(reason) => {
                        sqlx::query("UPDATE events SET state = 'parked', reason = $2, object_id = $3, resolve_due = NULL WHERE id = $1")
                            .bind(pk)
                            .bind(reason)
                            .bind(object_id)
                            .execute(&mut *tx)
                            .await?;
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
                    }
                    Plan::Links(leads) => {
                        sqlx::query("UPDATE events SET object_id = $2, resolve_due = NULL WHERE id = $1")
                            .bind(pk)
                            .bind(object_id)
                            .execute(&mut *tx)
                            .await?;
                        Self::attach_links(&mut tx, pk, object_id.unwrap_or_default(), &leads, now, true).await?;
                        sqlx::query(AssertSqlSafe(recompute_event_sql()))
                            .bind(pk)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
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
                let events_by_state = count_by("SELECT state, COUNT(*) FROM events GROUP BY state").await?;
                let links_by_state = count_by("SELECT state, COUNT(*) FROM links GROUP BY state").await?;
                let pending_links: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM links WHERE due_at IS NOT NULL")
                    .fetch_one(&self.read)
                    .await?;
                let resolving: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE resolve_due IS NOT NULL")
                    .fetch_one(&self.read)
                    .await?;
                let dead_links = links_by_state.iter().find(|(s, _)| s == "dead").map_or(0, |(_, n)| *n);
                Ok(Stats {
                    events_by_state,
                    links_by_state,
                    queue_depth: pending_links + resolving,
                    dead_links,
                })
            }

            /// A write, not a `SELECT 1`: a database that answers but cannot commit is not ready.
            async fn ping(&self) -> Result<()> {
                sqlx::query("INSERT INTO heartbeat (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = excluded.at")
                    .bind(now_ms())
                    .execute(&self.write)
                    .await?;
                Ok(())
            }

            async fn mapping_get(&self, source: &str, key: &str) -> Result<Vec<String>> {
                Ok(sqlx::query_scalar("SELECT lead_id FROM mappings WHERE source = $1 AND key = $2 ORDER BY lead_id")
                    .bind(source)
                    .bind(key)
                    .fetch_all(&self.read)
                    .await?)
            }

            async fn mapping_put(&self, source: &str, key: &str, lead_ids: &[String]) -> Result<()> {
                let mut tx = self.write.begin().await?;
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
                Ok(sqlx::query("DELETE FROM mappings WHERE source = $1 AND key = $2")
                    .bind(source)
                    .bind(key)
                    .execute(&self.write)
                    .await?
                    .rows_affected()
                    > 0)
            }

            async fn mapping_import(&self, source: &str, rows: &[(String, String)]) -> Result<usize> {
                let mut tx = self.write.begin().await?;
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

            async fn close(&self) {
                self.write.close().await;
                self.read.close().await;
            }
        }

        impl $name {
            /// Creates or finds each pair and attaches it to the event; then the event is
            /// `delivered` at once if every pair was already linked.
            async fn attach_links(
                tx: &mut sqlx::Transaction<'static, $db>,
                pk: i64,
                object_id: &str,
                leads: &[String],
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
                    let state: String = row.try_get("state")?;
                    sqlx::query(ATTACH).bind(pk).bind(link_id).execute(&mut **tx).await?;
                    if state == "linked" {
                        continue;
                    }
                    all_linked = false;
                    if state == "dead" || replay {
                        sqlx::query(REVIVE_LINK).bind(link_id).bind(now).execute(&mut **tx).await?;
                    }
                    if state == "dead" {
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
    };
}

fn summary<R: Row>(r: &R) -> Result<EventSummary>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    Option<String>: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
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

/// The embedded default: one file, WAL, `synchronous=FULL` so an acknowledged event survives a
/// power cut. All writes go through one connection (SQLite has one writer anyway), which makes
/// each claim statement atomic without `BEGIN IMMEDIATE`; reads use their own pool.
pub struct SqliteStore {
    write: sqlx::SqlitePool,
    read: sqlx::SqlitePool,
}

impl SqliteStore {
    pub async fn open(url: &str) -> Result<Self> {
        use sqlx::sqlite::{
            SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
        };
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .pragma("temp_store", "memory");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.clone())
            .await?;
        for stmt in SQLITE_SCHEMA.iter().chain(INDEXES) {
            sqlx::query(*stmt).execute(&write).await?;
        }
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.read_only(true))
            .await?;
        Ok(SqliteStore { write, read })
    }
}

/// PostgreSQL for several replicas: claims use `FOR UPDATE SKIP LOCKED`, and the unique
/// constraints (not in-process locks) keep events and pairs single.
pub struct PostgresStore {
    write: sqlx::PgPool,
    read: sqlx::PgPool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<Self> {
        use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
        let opts = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts)
            .await?;
        // Replicas starting together: the advisory lock lets one create the schema at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(727465)")
            .execute(&mut *tx)
            .await?;
        for stmt in PG_SCHEMA.iter().chain(INDEXES) {
            sqlx::query(*stmt).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(PostgresStore {
            write: pool.clone(),
            read: pool,
        })
    }
}

sql_store!(
    SqliteStore,
    sqlx::Sqlite,
    sqlx::SqlitePool,
    SQLITE_CLAIM_LINKS,
    SQLITE_CLAIM_RESOLVES
);
sql_store!(
    PostgresStore,
    sqlx::Postgres,
    sqlx::PgPool,
    PG_CLAIM_LINKS,
    PG_CLAIM_RESOLVES
);
