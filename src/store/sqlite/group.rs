//! SQLite's group commit: the new events of a group written in one synchronous pass on the
//! writer's thread, in arrival order, exactly as inserting them one by one would. The caller
//! (`SqliteStore::ingest`) wraps it in `BEGIN IMMEDIATE` ... `COMMIT` on the same thread.

use rusqlite::{Connection, OptionalExtension, params};

use super::{ATTACH, RECOMPUTE_FOR_LINK, REVIVE_LINK, WAKE_PAIR};
use crate::store::{
    EventPk, EventState, IngestOutcome, LinkState, NewEvent, ObjectId, Plan, Result, StoreError,
    StoredRequest,
};

const INSERT_EVENT: &str = "INSERT INTO events
    (source, event_id, event_type, received_at, object_id, state, reason, body, raw_body,
     content_type, request_headers, request_query, resolve_due, resolve_first, trace_context)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, '', ?8, ?9, ?10, ?11, ?12, ?4, ?13)
    ON CONFLICT (source, event_id) DO NOTHING";

/// A pair that does not exist yet; one that does is found by `FIND_PAIR` (no write).
const INSERT_PAIR: &str =
    "INSERT INTO links (object_id, lead_id, state, attempts, due_at, first_queued_at, updated_at)
    VALUES (?1, ?2, 'pending', 0, ?3, ?3, ?3) ON CONFLICT (object_id, lead_id) DO NOTHING";

const FIND_PAIR: &str = "SELECT id, state FROM links WHERE object_id = ?1 AND lead_id = ?2";

const MARK_DELIVERED: &str = "UPDATE events SET state = 'delivered' WHERE id = ?1";

/// Inserts each event unless its source already has its id, and for each new one that asks
/// for links creates or finds every pair and attaches it; a dead pair named again is revived
/// with the events waiting on it, and an event whose pairs are all linked is delivered at once.
/// Runs inside the caller's transaction, which is rolled back if this fails.
pub(super) fn insert(db: &Connection, events: &[NewEvent]) -> Result<Vec<IngestOutcome>> {
    let mut insert_event = db.prepare_cached(INSERT_EVENT)?;
    let mut insert_pair = db.prepare_cached(INSERT_PAIR)?;
    let mut find_pair = db.prepare_cached(FIND_PAIR)?;
    let mut attach = db.prepare_cached(ATTACH)?;
    let mut delivered = db.prepare_cached(MARK_DELIVERED)?;
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let (state, reason, resolve_due) = match &e.plan {
            Plan::Parked(r) => (EventState::Parked, Some(r.as_str()), None),
            Plan::Links(_) | Plan::Create { .. } => (EventState::Queued, None, None),
            Plan::Resolve => (EventState::Queued, None, Some(e.received_at)),
        };
        let inserted = insert_event.execute(params![
            e.source,
            e.event_id,
            e.event_type,
            e.received_at,
            e.object_id,
            state,
            reason,
            &e.request.body[..],
            e.request.content_type,
            StoredRequest::map_text(&e.request.headers),
            StoredRequest::map_text(&e.request.query),
            resolve_due,
            e.trace,
        ])?;
        if inserted == 0 {
            out.push(IngestOutcome::Duplicate);
            continue;
        }
        let pk = db.last_insert_rowid();
        let leads = match &e.plan {
            Plan::Parked(_) => {
                out.push(IngestOutcome::Parked);
                continue;
            }
            Plan::Resolve => {
                out.push(IngestOutcome::Queued);
                continue;
            }
            Plan::Create {
                definition_id,
                leads,
            } => {
                super::objects::want_object(
                    db,
                    EventPk(pk),
                    definition_id.as_str(),
                    leads,
                    e.received_at,
                )?;
                out.push(IngestOutcome::Queued);
                continue;
            }
            Plan::Links(leads) => leads,
        };
        let object_id = e.object_id.as_ref().map_or("", ObjectId::as_str);
        let mut all_linked = true;
        for lead in leads {
            let inserted = insert_pair.execute(params![object_id, lead, e.received_at])? == 1;
            let (link_id, state): (i64, LinkState) = if inserted {
                (db.last_insert_rowid(), LinkState::Pending)
            } else {
                find_pair
                    .query_row(params![object_id, lead], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?
                    .ok_or_else(|| {
                        StoreError::broken(format!(
                            "pair ({object_id}, {lead}) neither inserted nor found"
                        ))
                    })?
            };
            attach.execute(params![pk, link_id])?;
            if state == LinkState::Linked {
                continue;
            }
            all_linked = false;
            if state == LinkState::Pending && !inserted {
                // A pair held because every event wanting it was discarded: wanted again.
                db.prepare_cached(WAKE_PAIR)?
                    .execute(params![link_id, e.received_at])?;
            }
            if state == LinkState::Dead {
                // The pair comes back to life, and so do the other events waiting on it.
                db.prepare_cached(REVIVE_LINK)?
                    .execute(params![link_id, e.received_at])?;
                db.prepare_cached(&RECOMPUTE_FOR_LINK)?
                    .execute(params![link_id])?;
            }
        }
        if all_linked {
            delivered.execute(params![pk])?;
        }
        out.push(IngestOutcome::Queued);
    }
    Ok(out)
}
