//! The custom objects sprintlink creates (`[sources.object]`), in SQLite's dialect: one row per
//! event in `objects`, its attempts in `object_attempts`. Links are attached only once the new
//! id is committed.

use rusqlite::{Connection, OptionalExtension, params};

use super::{EVENT_STATE, attach_links};
use crate::store::shared::{LOST_ANSWER, lost_attempt};
use crate::store::{
    Attempt, EventState, Millis, ObjectAttempt, ObjectCompletion, ObjectDetail, ObjectJob,
    ObjectState, ObjectUpdate, Result,
};
use crate::store::{EventPk, LeadId, ObjectId};

const CLAIM: &str = "UPDATE objects SET locked_until = ?1, lease = ?2
    WHERE event_pk IN (SELECT event_pk FROM objects WHERE due_at IS NOT NULL AND due_at <= ?3
                       AND locked_until <= ?3 ORDER BY due_at LIMIT ?4)
    RETURNING event_pk, definition_id, attempts, first_at, sending_at";

const INSERT_ATTEMPT: &str = "INSERT INTO object_attempts
    (event_pk, at, status_code, error, response_excerpt, duration_ms, outcome)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

fn insert_attempt(db: &Connection, pk: EventPk, a: &ObjectAttempt) -> Result<()> {
    db.prepare_cached(INSERT_ATTEMPT)?.execute(params![
        pk,
        a.attempt.at,
        a.attempt.status_code,
        a.attempt.error,
        a.attempt.response_excerpt,
        a.attempt.duration_ms,
        a.outcome
    ])?;
    Ok(())
}

/// The event wants its object (created from `definition_id`) linked to `leads`: an object
/// created before is reused, its links attached at once; otherwise the creation is due now.
/// A creation in flight keeps its lease.
pub(super) fn want_object(
    db: &Connection,
    pk: EventPk,
    definition_id: &str,
    leads: &[LeadId],
    now: Millis,
) -> Result<()> {
    let leads_json = serde_json::to_string(leads).unwrap_or_else(|_| "[]".into());
    let created: Option<Option<ObjectId>> = db
        .prepare_cached("SELECT object_id FROM objects WHERE event_pk = ?1 AND state = 'created'")?
        .query_row(params![pk], |r| r.get(0))
        .optional()?;
    if let Some(Some(object_id)) = created {
        db.prepare_cached("UPDATE objects SET leads = ?2 WHERE event_pk = ?1")?
            .execute(params![pk, leads_json])?;
        db.prepare_cached(
            "UPDATE events SET object_id = ?2, resolve_due = NULL, state = 'queued', reason = NULL WHERE id = ?1",
        )?
        .execute(params![pk, object_id])?;
        attach_links(db, pk, &object_id, leads, now)?;
        db.prepare_cached(&format!(
            "UPDATE events SET state = {EVENT_STATE}, reason = NULL WHERE id = ?1"
        ))?
        .execute(params![pk])?;
        return Ok(());
    }
    db.prepare_cached(
        "INSERT INTO objects (event_pk, definition_id, state, leads, attempts, due_at, first_at)
         VALUES (?1, ?2, 'pending', ?3, 0, ?4, ?4)
         ON CONFLICT (event_pk) DO UPDATE SET definition_id = excluded.definition_id,
           state = 'pending', leads = excluded.leads, attempts = 0, due_at = excluded.due_at,
           first_at = excluded.first_at, last_error = NULL",
    )?
    .execute(params![pk, definition_id, leads_json, now])?;
    db.prepare_cached(
        "UPDATE events SET state = 'queued', reason = NULL, resolve_due = NULL WHERE id = ?1",
    )?
    .execute(params![pk])?;
    Ok(())
}

/// A parked or discarded event creates nothing until it is replayed.
pub(super) fn hold_object(db: &Connection, pk: EventPk) -> Result<()> {
    db.prepare_cached(
        "UPDATE objects SET due_at = NULL WHERE event_pk = ?1 AND state = 'pending'",
    )?
    .execute(params![pk])?;
    Ok(())
}

/// The id of the event's object, once created.
pub(super) fn created_id(db: &Connection, pk: EventPk) -> Result<Option<ObjectId>> {
    Ok(db
        .prepare_cached("SELECT object_id FROM objects WHERE event_pk = ?1 AND state = 'created'")?
        .query_row(params![pk], |r| r.get::<_, Option<ObjectId>>(0))
        .optional()?
        .flatten())
}

pub(super) fn claim(
    db: &Connection,
    now: Millis,
    lease_until: Millis,
    lease: i64,
    limit: i64,
) -> Result<Vec<ObjectJob>> {
    let rows: Vec<(i64, String, i64, Millis, Option<Millis>)> = db
        .prepare_cached(CLAIM)?
        .query_map(params![lease_until, lease, now, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut jobs = Vec::with_capacity(rows.len());
    for (pk, definition_id, attempts, first_at, sending_at) in rows {
        let lost = sending_at.is_some();
        if let Some(at) = sending_at {
            insert_attempt(db, EventPk(pk), &lost_attempt(at))?;
            db.prepare_cached(
                "UPDATE objects SET sending_at = NULL, attempts = attempts + 1, last_error = ?2 WHERE event_pk = ?1",
            )?
            .execute(params![pk, LOST_ANSWER])?;
        }
        type Row = (String, String, crate::store::StoredRequest, Option<String>);
        let (source, event_id, request, trace): Row = db
            .prepare_cached(
                "SELECT source, event_id, raw_body, body, content_type, request_headers, request_query,
                        trace_context
                 FROM events WHERE id = ?1",
            )?
            .query_row(params![pk], |r| {
                Ok((r.get(0)?, r.get(1)?, super::request_at(r, 2)?, r.get(7)?))
            })?;
        jobs.push(ObjectJob {
            event_pk: EventPk(pk),
            lease,
            source,
            event_id,
            request,
            definition_id,
            attempts: attempts + i64::from(lost),
            first_at,
            lost,
            trace,
        });
    }
    Ok(jobs)
}

pub(super) fn sending(db: &Connection, job: &ObjectJob, now: Millis) -> Result<bool> {
    Ok(db
        .prepare_cached(
            "UPDATE objects SET sending_at = ?3 WHERE event_pk = ?1 AND lease = ?2
             AND state = 'pending' AND locked_until > ?3",
        )?
        .execute(params![job.event_pk, job.lease, now])?
        > 0)
}

pub(super) fn complete(db: &Connection, c: &ObjectCompletion, now: Millis) -> Result<()> {
    let pk = c.event_pk;
    if let Some(a) = &c.attempt {
        insert_attempt(db, pk, a)?;
    }
    match &c.update {
        // Created is a fact, whoever holds the lease now; the first id stored stays the
        // event's object.
        ObjectUpdate::Created(object_id) => {
            let row: Option<(ObjectState, String)> = db
                .prepare_cached("SELECT state, leads FROM objects WHERE event_pk = ?1")?
                .query_row(params![pk], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((state, leads)) = row else {
                return Ok(());
            };
            if state == ObjectState::Created {
                return Ok(());
            }
            db.prepare_cached(
                "UPDATE objects SET state = 'created', object_id = ?2, due_at = NULL,
                 locked_until = 0, sending_at = NULL, last_error = NULL WHERE event_pk = ?1",
            )?
            .execute(params![pk, object_id])?;
            let leads: Vec<LeadId> = serde_json::from_str(&leads).unwrap_or_default();
            let event: Option<(EventState, Option<Millis>)> = db
                .prepare_cached(
                    "UPDATE events SET object_id = ?2 WHERE id = ?1 RETURNING state, resolve_due",
                )?
                .query_row(params![pk, object_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            // An event replayed meanwhile into a plan that parks it, or that resolves its leads
            // again, keeps the id for that plan, and sends nothing now.
            if let Some((state, None)) = event
                && !matches!(state, EventState::Parked | EventState::Discarded)
            {
                attach_links(db, pk, object_id, &leads, now)?;
                db.prepare_cached(&format!(
                    "UPDATE events SET state = {EVENT_STATE}, reason = NULL WHERE id = ?1"
                ))?
                .execute(params![pk])?;
            }
        }
        ObjectUpdate::Retry {
            due_at,
            counted,
            error,
        } => {
            db.prepare_cached(
                "UPDATE objects SET attempts = attempts + ?3, due_at = CASE WHEN due_at IS NULL THEN NULL ELSE ?4 END,
                 locked_until = 0, sending_at = NULL, last_error = ?5
                 WHERE event_pk = ?1 AND lease = ?2 AND state = 'pending'",
            )?
            .execute(params![pk, c.lease, i64::from(*counted), due_at, error])?;
        }
        ObjectUpdate::Dead(error) => {
            let killed = db
                .prepare_cached(
                    "UPDATE objects SET state = 'dead', attempts = attempts + 1, due_at = NULL,
                     locked_until = 0, sending_at = NULL, last_error = ?3
                     WHERE event_pk = ?1 AND lease = ?2 AND state = 'pending'",
                )?
                .execute(params![pk, c.lease, error])?
                > 0;
            if killed {
                db.prepare_cached(
                    "UPDATE events SET state = 'dead', reason = ?2 WHERE id = ?1 AND state = 'queued'",
                )?
                .execute(params![pk, format!("object creation: {error}")])?;
            }
        }
        ObjectUpdate::Release => {
            db.prepare_cached(
                "UPDATE objects SET locked_until = 0, sending_at = NULL WHERE event_pk = ?1 AND lease = ?2",
            )?
            .execute(params![pk, c.lease])?;
        }
    }
    Ok(())
}

/// The event's object with its latest 100 attempts, oldest first.
pub(super) fn detail(db: &Connection, pk: EventPk) -> Result<Option<ObjectDetail>> {
    let row: Option<(Option<ObjectId>, String, ObjectState, Option<Millis>)> = db
        .prepare_cached(
            "SELECT object_id, definition_id, state, due_at FROM objects WHERE event_pk = ?1",
        )?
        .query_row(params![pk], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((object_id, definition_id, state, due_at)) = row else {
        return Ok(None);
    };
    let mut attempts = db
        .prepare_cached(
            "SELECT at, status_code, error, response_excerpt, duration_ms, outcome
             FROM object_attempts WHERE event_pk = ?1 ORDER BY id DESC LIMIT 100",
        )?
        .query_map(params![pk], |a| {
            Ok(ObjectAttempt {
                outcome: a.get(5)?,
                attempt: Attempt {
                    at: a.get(0)?,
                    status_code: a.get(1)?,
                    error: a.get(2)?,
                    response_excerpt: a.get(3)?,
                    duration_ms: a.get(4)?,
                },
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    attempts.reverse();
    Ok(Some(ObjectDetail {
        object_id,
        definition_id,
        state,
        next_attempt_at: due_at,
        attempts,
    }))
}
