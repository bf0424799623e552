//! Retention on PostgreSQL: each call is one short transaction (the caller pauses between them).
//! Locks are taken in the order ingest and delivery take them, pairs (`links`) before events, so
//! a prune never deadlocks with them; the space of deleted rows is reused by PostgreSQL's
//! autovacuum rather than given back to the file system. Every statement reaches its rows
//! through an index (checked with EXPLAIN ANALYZE at 1,000,000 events: a batch of 500 takes
//! about 10 ms). Each transaction commits with `synchronous_commit = off` (`ASYNC_COMMIT`).

use sqlx::Row;

use super::PostgresStore;
use crate::store::{Millis, Result};

/// A prune's commit does not wait for its WAL flush, so it does not queue beside the fsyncs of
/// the group commits that acknowledge webhooks. Losing it in a crash is harmless: the rows come
/// back and the next pass removes them again (PostgreSQL stays consistent either way).
const ASYNC_COMMIT: &str = "SET LOCAL synchronous_commit = off";

/// Events delivered before `$1` whose body is still kept, oldest delivery first.
const REMOVE_BODIES: &str = "WITH due AS (
        SELECT id FROM events
        WHERE delivered_at IS NOT NULL AND body_removed_at IS NULL
          AND delivered_at < $1 AND state = 'delivered'
        ORDER BY delivered_at LIMIT $3 FOR UPDATE SKIP LOCKED)
    UPDATE events SET body = '', raw_body = NULL, request_headers = NULL, request_query = NULL,
    body_removed_at = $2 FROM due WHERE events.id = due.id
    RETURNING events.id";

/// What SprintHub answered holds the same personal data as the body.
const REMOVE_EXCERPTS: &str = "UPDATE attempts SET response_excerpt = NULL
    WHERE response_excerpt IS NOT NULL
      AND link_id IN (SELECT link_id FROM event_links WHERE event_pk = ANY($1))";

const DELIVERED_BEFORE: &str = "SELECT id FROM events
    WHERE delivered_at IS NOT NULL AND delivered_at < $1 AND state = 'delivered'
    ORDER BY delivered_at LIMIT $2";

/// The same condition again, on the rows locked: an event replayed meanwhile is kept.
const LOCK_DELIVERED: &str = "SELECT id FROM events
    WHERE id = ANY($1) AND delivered_at < $2 AND state = 'delivered' ORDER BY id FOR UPDATE";

const FAILED_BEFORE: &str = "SELECT id FROM events
    WHERE state IN ('dead', 'parked', 'discarded') AND received_at < $1
    ORDER BY received_at LIMIT $2";

const LOCK_FAILED: &str = "SELECT id FROM events
    WHERE id = ANY($1) AND state IN ('dead', 'parked', 'discarded') AND received_at < $2 ORDER BY id FOR UPDATE";

/// The pairs of some events, locked before the events (the order ingest and delivery use), so
/// that an event attached to one meanwhile is seen by the statements after this one.
const LOCK_PAIRS: &str = "SELECT id FROM links
    WHERE id IN (SELECT link_id FROM event_links WHERE event_pk = ANY($1)) ORDER BY id FOR UPDATE";

const DETACH: &str = "DELETE FROM event_links WHERE event_pk = ANY($1)";

const DELETE_EVENTS: &str = "DELETE FROM events WHERE id = ANY($1)";

/// A linked pair no event names any more keeps its row (it is never sent again) but not its
/// history.
const FORGET_LINKED_HISTORY: &str = "DELETE FROM attempts WHERE link_id IN (
    SELECT l.id FROM links l WHERE l.id = ANY($1) AND l.state = 'linked'
      AND NOT EXISTS (SELECT 1 FROM event_links el WHERE el.link_id = l.id))";

/// A pair not linked that no event names any more goes, unless its call is in flight.
const DROP_ORPHANS: &str = "DELETE FROM links l WHERE l.id = ANY($1) AND l.state <> 'linked'
    AND l.locked_until <= $2
    AND NOT EXISTS (SELECT 1 FROM event_links el WHERE el.link_id = l.id) RETURNING l.id";

const DROP_ATTEMPTS: &str = "DELETE FROM attempts WHERE link_id = ANY($1)";

impl PostgresStore {
    pub(super) async fn remove_bodies_batch(
        &self,
        before: Millis,
        now: Millis,
        limit: i64,
    ) -> Result<u64> {
        let mut tx = self.write.begin().await?;
        sqlx::query(ASYNC_COMMIT).execute(&mut *tx).await?;
        let ids: Vec<i64> = sqlx::query_scalar(REMOVE_BODIES)
            .bind(before)
            .bind(now)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        if !ids.is_empty() {
            sqlx::query(REMOVE_EXCERPTS)
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    /// Deletes at most `limit` events chosen by `select` and still matching `lock` once
    /// locked, with what only they needed (see `Store::prune_failed`).
    pub(super) async fn prune_batch(
        &self,
        select: &'static str,
        lock: &'static str,
        before: Millis,
        now: Millis,
        limit: i64,
    ) -> Result<u64> {
        let candidates: Vec<i64> = sqlx::query_scalar(select)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
        if candidates.is_empty() {
            return Ok(0);
        }
        let mut tx = self.write.begin().await?;
        sqlx::query(ASYNC_COMMIT).execute(&mut *tx).await?;
        let pairs: Vec<i64> = sqlx::query(LOCK_PAIRS)
            .bind(&candidates)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, sqlx::Error>>()?;
        let ids: Vec<i64> = sqlx::query_scalar(lock)
            .bind(&candidates)
            .bind(before)
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query(DETACH).bind(&ids).execute(&mut *tx).await?;
        sqlx::query(DELETE_EVENTS)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        if !pairs.is_empty() {
            sqlx::query(FORGET_LINKED_HISTORY)
                .bind(&pairs)
                .execute(&mut *tx)
                .await?;
            let gone: Vec<i64> = sqlx::query_scalar(DROP_ORPHANS)
                .bind(&pairs)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
            if !gone.is_empty() {
                sqlx::query(DROP_ATTEMPTS)
                    .bind(&gone)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(ids.len() as u64)
    }

    pub(super) async fn prune_delivered_batch(
        &self,
        before: Millis,
        now: Millis,
        limit: i64,
    ) -> Result<u64> {
        self.prune_batch(DELIVERED_BEFORE, LOCK_DELIVERED, before, now, limit)
            .await
    }

    pub(super) async fn prune_failed_batch(
        &self,
        before: Millis,
        now: Millis,
        limit: i64,
    ) -> Result<u64> {
        self.prune_batch(FAILED_BEFORE, LOCK_FAILED, before, now, limit)
            .await
    }

    pub(super) async fn database_bytes(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT pg_database_size(current_database())")
                .fetch_one(&self.read)
                .await?,
        )
    }
}
