//! What the two backends share that is not tied to a dialect: SQL fragments without parameters
//! that both run as they are, and the lease token.

/// An event's state from its links, as an SQL expression over the row `events` (no
/// parameters; the same text on both backends). Each link's state is looked up by primary key:
/// given a join instead, both SQLite 3.51 (no statistics) and PostgreSQL (before autovacuum's
/// first ANALYZE) chose to read every link in that state through `links_state`, which made each
/// recomputation, one per delivered link, scan the whole queue.
pub(super) const EVENT_STATE: &str = "CASE
      WHEN EXISTS (SELECT 1 FROM event_links el WHERE el.event_pk = events.id
                   AND (SELECT l.state FROM links l WHERE l.id = el.link_id) = 'dead') THEN 'dead'
      WHEN EXISTS (SELECT 1 FROM event_links el WHERE el.event_pk = events.id
                   AND (SELECT l.state FROM links l WHERE l.id = el.link_id) = 'pending') THEN 'queued'
      ELSE 'delivered' END";

/// An event whose state its links no longer decide: parked or discarded, it waits for an
/// operator's replay (appended to every recomputation's `WHERE`).
pub(super) const HELD_BY_OPERATOR: &str = "state NOT IN ('parked', 'discarded')";

/// The pair `?1`/`$1` is wanted by an event that is not discarded: otherwise it is not due.
/// Each event is looked up by primary key (see `EVENT_STATE`).
pub(super) const PAIR_WANTED: &str =
    "EXISTS (SELECT 1 FROM event_links el WHERE el.link_id = links.id
      AND (SELECT e.state FROM events e WHERE e.id = el.event_pk) <> 'discarded')";

/// The highest code point: a text starting with `q` sorts (by bytes, UTF-8 or "C" collation)
/// at or after `q` and before `q` followed by this.
pub(super) fn prefix_end(q: &str) -> String {
    format!("{q}\u{10FFFF}")
}

/// The columns of an `EventSummary`, in the order both backends read them.
pub(super) const SUMMARY_COLUMNS: &str =
    "id, event_id, source, state, received_at, object_id, event_type, reason";

/// A fresh lease for a claim: never 0, the value of "not leased".
pub(super) fn lease_token() -> i64 {
    (fastrand::u64(1..u64::MAX) >> 1) as i64
}

/// What an operator reads on an object creation attempt whose answer never came back to be
/// recorded.
pub(super) const LOST_ANSWER: &str = "answer unknown: the creation was sent but its answer was never recorded (the process stopped or its lease ran out); SprintHub may hold an object that is not linked";

/// The attempt a claim records for a creation found sent but never answered.
pub(super) fn lost_attempt(at: super::Millis) -> super::ObjectAttempt {
    super::ObjectAttempt {
        outcome: super::CreationOutcome::Unknown,
        attempt: super::Attempt {
            at,
            status_code: None,
            error: Some(LOST_ANSWER.into()),
            response_excerpt: None,
            duration_ms: 0,
        },
    }
}
