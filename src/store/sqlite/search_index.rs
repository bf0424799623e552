//! The search indexes on a lead id and on an object id, kept off the ingest path (schema version
//! 9). Both values are random with respect to arrival, so indexing them inside the group commit
//! cost about one more page of the write-ahead log per event and per index. Instead the writer's
//! background lane copies every row above its table's mark into `lead_links` / `event_objects`
//! in batches, where many entries share each page written, and moves the mark. A search reads
//! the index plus the rows above the mark (those written since the last batch, found by row id),
//! so it answers the same whether the indexer has caught up or not.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio_util::sync::CancellationToken;

use super::writer::WriterHandle;
use crate::store::{Result, StoreError};

/// Rows indexed per table and background step: a few milliseconds of writer time, which a
/// group commit arriving meanwhile waits for. A step that finds a full batch is followed at
/// once by the next, so the indexer keeps up with any ingest rate the writer can take.
pub(super) const STEP: i64 = 1000;

/// How often the indexer looks for new rows when it has caught up.
const PERIOD: Duration = Duration::from_millis(200);

/// One index kept by the background lane: the rows of `table` (`id`, `column`) as entries
/// `(column, pk)` of `entries`, up to the mark named after `entries`.
struct Deferred {
    table: &'static str,
    column: &'static str,
    entries: &'static str,
    pk: &'static str,
}

const LEADS: Deferred = Deferred {
    table: "links",
    column: "lead_id",
    entries: "lead_links",
    pk: "link_id",
};

const OBJECTS: Deferred = Deferred {
    table: "events",
    column: "object_id",
    entries: "event_objects",
    pk: "event_pk",
};

impl Deferred {
    /// The ids of the rows whose value satisfies `test` (`= ?1`, `IN (SELECT ...)`): those
    /// indexed, and those above the mark.
    fn ids(&self, test: &str) -> String {
        let Deferred {
            table,
            column,
            entries,
            pk,
        } = self;
        format!(
            "SELECT {pk} FROM {entries} WHERE {column} {test}
             UNION ALL SELECT id FROM {table}
               WHERE id > (SELECT upto FROM index_marks WHERE name = '{entries}')
                 AND {column} {test}"
        )
    }

    /// Indexes up to `limit` rows above the mark and moves the mark past them; answers how many.
    fn step(&self, db: &Connection, limit: i64) -> Result<i64> {
        let Deferred {
            table,
            column,
            entries,
            pk,
        } = self;
        let upto: i64 = db
            .prepare_cached(&format!(
                "SELECT upto FROM index_marks WHERE name = '{entries}'"
            ))?
            .query_row([], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let (last, n): (Option<i64>, i64) = db
            .prepare_cached(&format!(
                "SELECT MAX(id), COUNT(*) FROM (SELECT id FROM {table} WHERE id > ?1 ORDER BY id LIMIT ?2)"
            ))?
            .query_row(params![upto, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let Some(last) = last else {
            return Ok(0);
        };
        db.prepare_cached(&format!(
            "INSERT OR IGNORE INTO {entries} ({column}, {pk})
             SELECT {column}, id FROM {table}
             WHERE id > ?1 AND id <= ?2 AND {column} IS NOT NULL ORDER BY {column}, id"
        ))?
        .execute(params![upto, last])?;
        db.prepare_cached(&format!(
            "INSERT OR REPLACE INTO index_marks (name, upto) VALUES ('{entries}', ?1)"
        ))?
        .execute(params![last])?;
        Ok(n)
    }
}

/// Link ids of the leads that satisfy `test` (a condition on a lead id, e.g. `= ?3`).
pub(super) fn links_of_leads(test: &str) -> String {
    LEADS.ids(test)
}

/// Event pks of the object ids that satisfy `test`.
pub(super) fn events_of_objects(test: &str) -> String {
    OBJECTS.ids(test)
}

/// One step of each index; answers the most rows either indexed.
pub(super) fn step(db: &Connection, limit: i64) -> Result<i64> {
    Ok(LEADS.step(db, limit)?.max(OBJECTS.step(db, limit)?))
}

/// Runs `step` until `stop`: in the writer's background lane while it keeps up (after `PERIOD`
/// when a step found less than a full batch), and, behind a full batch, as an ordinary job in
/// turn with the group commits, so that a load that never leaves the writer idle does not leave
/// the indexes ever further behind. Losing a step in a crash is harmless: each mark moves with
/// its entries.
pub(super) fn spawn(writer: Arc<WriterHandle>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut behind = false;
        loop {
            let done = if behind {
                writer.run_tx(|db| step(db, STEP)).await
            } else {
                writer.run_background(|db| step(db, STEP)).await
            };
            let n = match done {
                Ok(n) => n,
                Err(StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "updating the search indexes failed; trying again");
                    0
                }
            };
            behind = n >= STEP;
            if !behind {
                tokio::select! {
                    _ = tokio::time::sleep(PERIOD) => {}
                    _ = stop.cancelled() => return,
                }
            } else if stop.is_cancelled() {
                return;
            }
        }
    });
}
