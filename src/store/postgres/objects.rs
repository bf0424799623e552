//! The custom objects sprintlink creates (`[sources.object]`), in PostgreSQL's dialect: one row
//! per event in `objects`, its attempts in `object_attempts`. Claims skip rows another replica
//! holds; links are attached only once the new id is committed.

use sqlx::{AssertSqlSafe, Row};

use super::{EVENT_STATE, PostgresStore};
use crate::store::shared::{LOST_ANSWER, lost_attempt};
use crate::store::{
    Attempt, EventState, Millis, ObjectAttempt, ObjectCompletion, ObjectDetail, ObjectJob,
    ObjectState, ObjectUpdate, Result,
};
use crate::store::{EventPk, LeadId, ObjectId};

type Tx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

const CLAIM: &str = "UPDATE objects SET locked_until = $1, lease = $2
    WHERE event_pk IN (SELECT event_pk FROM objects WHERE due_at IS NOT NULL AND due_at <= $3
                       AND locked_until <= $3 ORDER BY due_at LIMIT $4 FOR UPDATE SKIP LOCKED)
    RETURNING event_pk, definition_id, attempts, first_at, sending_at";

async fn insert_attempt(tx: &mut Tx<'_>, pk: EventPk, a: &ObjectAttempt) -> Result<()> {
    sqlx::query(
        "INSERT INTO object_attempts (event_pk, at, status_code, error, response_excerpt, duration_ms, outcome)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(pk)
    .bind(a.attempt.at)
    .bind(a.attempt.status_code)
    .bind(&a.attempt.error)
    .bind(&a.attempt.response_excerpt)
    .bind(a.attempt.duration_ms)
    .bind(a.outcome.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn recompute_sql() -> String {
    format!("UPDATE events SET state = {EVENT_STATE}, reason = NULL WHERE id = $1")
}

/// The id of the event's object, once created.
pub(super) async fn created_id(tx: &mut Tx<'_>, pk: EventPk) -> Result<Option<ObjectId>> {
    let id: Option<Option<ObjectId>> = sqlx::query_scalar(
        "SELECT object_id FROM objects WHERE event_pk = $1 AND state = 'created'",
    )
    .bind(pk)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(id.flatten())
}

/// The event wants its object (created from `definition_id`) linked to `leads`: an object
/// created before is reused, its links attached at once; otherwise the creation is due now.
/// A creation in flight keeps its lease.
pub(super) async fn want_object(
    tx: &mut Tx<'_>,
    pk: EventPk,
    definition_id: &str,
    leads: &[LeadId],
    now: Millis,
) -> Result<()> {
    let leads_json = serde_json::to_string(leads).unwrap_or_else(|_| "[]".into());
    if let Some(object_id) = created_id(tx, pk).await? {
        sqlx::query("UPDATE objects SET leads = $2 WHERE event_pk = $1")
            .bind(pk)
            .bind(&leads_json)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "UPDATE events SET object_id = $2, resolve_due = NULL, state = 'queued', reason = NULL WHERE id = $1",
        )
        .bind(pk)
        .bind(&object_id)
        .execute(&mut **tx)
        .await?;
        PostgresStore::attach_links(tx, pk, &object_id, leads, now, true).await?;
        sqlx::query(AssertSqlSafe(recompute_sql()))
            .bind(pk)
            .execute(&mut **tx)
            .await?;
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO objects (event_pk, definition_id, state, leads, attempts, due_at, first_at)
         VALUES ($1, $2, 'pending', $3, 0, $4, $4)
         ON CONFLICT (event_pk) DO UPDATE SET definition_id = excluded.definition_id,
           state = 'pending', leads = excluded.leads, attempts = 0, due_at = excluded.due_at,
           first_at = excluded.first_at, last_error = NULL",
    )
    .bind(pk)
    .bind(definition_id)
    .bind(&leads_json)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE events SET state = 'queued', reason = NULL, resolve_due = NULL WHERE id = $1",
    )
    .bind(pk)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A parked event creates nothing until it is replayed.
pub(super) async fn hold_object(tx: &mut Tx<'_>, pk: EventPk) -> Result<()> {
    sqlx::query("UPDATE objects SET due_at = NULL WHERE event_pk = $1 AND state = 'pending'")
        .bind(pk)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) async fn claim(
    tx: &mut Tx<'_>,
    now: Millis,
    lease_until: Millis,
    lease: i64,
    limit: i64,
) -> Result<Vec<ObjectJob>> {
    let rows = sqlx::query(CLAIM)
        .bind(lease_until)
        .bind(lease)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut **tx)
        .await?;
    let mut jobs = Vec::with_capacity(rows.len());
    for r in rows {
        let pk: i64 = r.try_get("event_pk")?;
        let sending_at: Option<i64> = r.try_get("sending_at")?;
        let attempts: i64 = r.try_get("attempts")?;
        let lost = sending_at.is_some();
        if let Some(at) = sending_at {
            insert_attempt(tx, EventPk(pk), &lost_attempt(at)).await?;
            sqlx::query(
                "UPDATE objects SET sending_at = NULL, attempts = attempts + 1, last_error = $2 WHERE event_pk = $1",
            )
            .bind(pk)
            .bind(LOST_ANSWER)
            .execute(&mut **tx)
            .await?;
        }
        let e = sqlx::query(
            "SELECT source, event_id, raw_body, body, content_type, request_headers, request_query,
                    trace_context
             FROM events WHERE id = $1",
        )
        .bind(pk)
        .fetch_one(&mut **tx)
        .await?;
        jobs.push(ObjectJob {
            event_pk: EventPk(pk),
            lease,
            source: e.try_get("source")?,
            event_id: e.try_get("event_id")?,
            request: super::request_of(&e)?,
            definition_id: r.try_get("definition_id")?,
            attempts: attempts + i64::from(lost),
            first_at: r.try_get("first_at")?,
            lost,
            trace: e.try_get("trace_context")?,
        });
    }
    Ok(jobs)
}

pub(super) async fn sending(
    conn: &mut sqlx::PgConnection,
    job: &ObjectJob,
    now: Millis,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE objects SET sending_at = $3 WHERE event_pk = $1 AND lease = $2
         AND state = 'pending' AND locked_until > $3",
    )
    .bind(job.event_pk)
    .bind(job.lease)
    .bind(now)
    .execute(conn)
    .await?
    .rows_affected()
        > 0)
}

pub(super) async fn complete(tx: &mut Tx<'_>, c: &ObjectCompletion, now: Millis) -> Result<()> {
    let pk = c.event_pk;
    if let Some(a) = &c.attempt {
        insert_attempt(tx, pk, a).await?;
    }
    match &c.update {
        // Created is a fact, whoever holds the lease now; the first id stored stays the
        // event's object. The row lock orders two replicas' answers.
        ObjectUpdate::Created(object_id) => {
            let row =
                sqlx::query("SELECT state, leads FROM objects WHERE event_pk = $1 FOR UPDATE")
                    .bind(pk)
                    .fetch_optional(&mut **tx)
                    .await?;
            let Some(row) = row else { return Ok(()) };
            let state: ObjectState = row.try_get("state")?;
            if state == ObjectState::Created {
                return Ok(());
            }
            let leads: String = row.try_get("leads")?;
            sqlx::query(
                "UPDATE objects SET state = 'created', object_id = $2, due_at = NULL,
                 locked_until = 0, sending_at = NULL, last_error = NULL WHERE event_pk = $1",
            )
            .bind(pk)
            .bind(object_id)
            .execute(&mut **tx)
            .await?;
            let leads: Vec<LeadId> = serde_json::from_str(&leads).unwrap_or_default();
            let event: Option<(EventState, Option<Millis>)> = sqlx::query_as(
                "UPDATE events SET object_id = $2 WHERE id = $1 RETURNING state, resolve_due",
            )
            .bind(pk)
            .bind(object_id)
            .fetch_optional(&mut **tx)
            .await?;
            // An event replayed meanwhile into a plan that parks it, or that resolves its leads
            // again, keeps the id for that plan, and sends nothing now.
            if let Some((state, None)) = event
                && !matches!(state, EventState::Parked | EventState::Discarded)
            {
                PostgresStore::attach_links(tx, pk, object_id, &leads, now, false).await?;
                sqlx::query(AssertSqlSafe(recompute_sql()))
                    .bind(pk)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        ObjectUpdate::Retry {
            due_at,
            counted,
            error,
        } => {
            sqlx::query(
                "UPDATE objects SET attempts = attempts + $3,
                 due_at = CASE WHEN due_at IS NULL THEN NULL ELSE $4 END,
                 locked_until = 0, sending_at = NULL, last_error = $5
                 WHERE event_pk = $1 AND lease = $2 AND state = 'pending'",
            )
            .bind(pk)
            .bind(c.lease)
            .bind(i64::from(*counted))
            .bind(*due_at)
            .bind(error)
            .execute(&mut **tx)
            .await?;
        }
        ObjectUpdate::Dead(error) => {
            let killed = sqlx::query(
                "UPDATE objects SET state = 'dead', attempts = attempts + 1, due_at = NULL,
                 locked_until = 0, sending_at = NULL, last_error = $3
                 WHERE event_pk = $1 AND lease = $2 AND state = 'pending'",
            )
            .bind(pk)
            .bind(c.lease)
            .bind(error)
            .execute(&mut **tx)
            .await?
            .rows_affected()
                > 0;
            if killed {
                sqlx::query(
                    "UPDATE events SET state = 'dead', reason = $2 WHERE id = $1 AND state = 'queued'",
                )
                .bind(pk)
                .bind(format!("object creation: {error}"))
                .execute(&mut **tx)
                .await?;
            }
        }
        ObjectUpdate::Release => {
            sqlx::query(
                "UPDATE objects SET locked_until = 0, sending_at = NULL WHERE event_pk = $1 AND lease = $2",
            )
            .bind(pk)
            .bind(c.lease)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// The event's object with its latest 100 attempts, oldest first.
pub(super) async fn detail(tx: &mut Tx<'_>, pk: EventPk) -> Result<Option<ObjectDetail>> {
    let row = sqlx::query(
        "SELECT object_id, definition_id, state, due_at FROM objects WHERE event_pk = $1",
    )
    .bind(pk)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let attempts = sqlx::query(
        "SELECT at, status_code, error, response_excerpt, duration_ms, outcome
         FROM object_attempts WHERE event_pk = $1 ORDER BY id DESC LIMIT 100",
    )
    .bind(pk)
    .fetch_all(&mut **tx)
    .await?
    .iter()
    .rev()
    .map(|a| {
        Ok(ObjectAttempt {
            outcome: a.try_get("outcome")?,
            attempt: Attempt {
                at: a.try_get("at")?,
                status_code: a.try_get("status_code")?,
                error: a.try_get("error")?,
                response_excerpt: a.try_get("response_excerpt")?,
                duration_ms: a.try_get("duration_ms")?,
            },
        })
    })
    .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
    Ok(Some(ObjectDetail {
        object_id: row.try_get("object_id")?,
        definition_id: row.try_get("definition_id")?,
        state: row.try_get("state")?,
        next_attempt_at: row.try_get("due_at")?,
        attempts,
    }))
}
