//! Durable state: events, the links they ask for, every attempt, and the lead mapping table.
//! One trait with two implementations, each in its own plain code and dialect: SQLite through
//! rusqlite (`sqlite`: a writer thread, a read pool, a checkpointer) and PostgreSQL through sqlx
//! (`postgres`). Storage knows nothing of HTTP or of the worker: it records decisions made
//! elsewhere and hands out due jobs under a lease.

pub mod migrate;
mod postgres;
mod shared;
mod sqlite;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

pub use crate::domain::{
    CreationOutcome, EventPk, EventState, LeadId, LinkId, LinkState, ObjectId, ObjectState,
    PauseReason,
};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Milliseconds since the Unix epoch: the one time unit stored, the same on both backends.
pub type Millis = i64;

/// Why a storage call failed, classified once where the driver's error is seen, so callers can
/// tell a busy or closed store (retry later) from data the database refuses (retry without it).
/// Each keeps the driver's error as its source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No connection or writer within the wait, or the database was locked too long.
    #[error("storage timed out: {0}")]
    Timeout(Cause),
    /// The store is closed (the process is stopping) or its writer has stopped.
    #[error("the store is closed")]
    Closed,
    /// A constraint refused the row.
    #[error("storage conflict: {0}")]
    Conflict(Cause),
    /// The values cannot be stored as they are (PostgreSQL text holding NUL, an invalid encoding):
    /// the same statement with other values would succeed.
    #[error("storage refused the data: {0}")]
    Rejected(Cause),
    /// Anything else: an I/O error, a full disk, a broken connection or database.
    #[error("storage failed: {0}")]
    Broken(Cause),
    /// A request the store cannot make sense of (a bad URL), found before any I/O.
    #[error("{0}")]
    Invalid(String),
    /// The database was migrated by a newer release than this binary.
    #[error(
        "the database is at schema version {database}, newer than this sprintlink {} (schema version {binary}): run the release that migrated it, or a newer one",
        env!("CARGO_PKG_VERSION")
    )]
    SchemaTooNew { database: i64, binary: i64 },
}

/// The driver's error behind a `StoreError`, shared so the error can be handed to every member
/// of a failed group commit.
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Cause(Arc::new(e))
    }

    /// The driver's error itself.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }

    pub fn msg(text: impl Into<String>) -> Self {
        Cause(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
            text.into(),
        )))
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl StoreError {
    /// The data of this one request was refused; the others of its group may be written alone.
    pub fn is_data_error(&self) -> bool {
        matches!(self, StoreError::Rejected(_))
    }

    pub fn broken(text: impl Into<String>) -> Self {
        StoreError::Broken(Cause::msg(text))
    }
}

/// A state read back from a row: text no release wrote means the database is not ours.
pub(crate) fn parse_state<T: std::str::FromStr<Err = crate::domain::UnknownState>>(
    text: &str,
) -> Result<T> {
    text.parse()
        .map_err(|e: crate::domain::UnknownState| StoreError::Broken(Cause::new(e)))
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::error::ErrorKind;
        let class: fn(Cause) -> StoreError = match &e {
            sqlx::Error::PoolTimedOut => return StoreError::Timeout(Cause(Arc::new(e))),
            sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => return StoreError::Closed,
            sqlx::Error::Database(d) => match d.kind() {
                ErrorKind::UniqueViolation
                | ErrorKind::ForeignKeyViolation
                | ErrorKind::CheckViolation
                | ErrorKind::NotNullViolation => StoreError::Conflict,
                // PostgreSQL's class 22 (data exception): 22021 a NUL or invalid byte in text,
                // 22P05 an untranslatable character, 22001 a value too long.
                _ if d.code().is_some_and(|c| c.starts_with("22")) => StoreError::Rejected,
                // SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6), with extended codes.
                _ if d
                    .code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .is_some_and(|c| matches!(c & 0xff, 5 | 6)) =>
                {
                    StoreError::Timeout
                }
                _ => StoreError::Broken,
            },
            _ => StoreError::Broken,
        };
        class(Cause(Arc::new(e)))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        let class: fn(Cause) -> StoreError = match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Timeout,
            Some(ErrorCode::ConstraintViolation) => StoreError::Conflict,
            _ => StoreError::Broken,
        };
        class(Cause(Arc::new(e)))
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What to do with an event once it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Waits for an operator; the reason says why.
    Parked(String),
    /// Link the object to these leads.
    Links(Vec<LeadId>),
    /// The worker must first resolve the lead key.
    Resolve,
    /// Create the custom object (of this definition), then link it to these leads.
    Create {
        definition_id: crate::config::DefinitionId,
        leads: Vec<LeadId>,
    },
}

/// A webhook request as stored (SPEC 6.4): the body byte for byte, its `Content-Type`, and
/// the headers and query parameters some reference of its source names; nothing else, so no
/// credential is kept. A replay and the worker read the event from this alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredRequest {
    pub body: bytes::Bytes,
    pub content_type: Option<String>,
    /// Lower-case header name -> value.
    pub headers: std::collections::BTreeMap<String, String>,
    pub query: std::collections::BTreeMap<String, String>,
}

impl StoredRequest {
    /// A JSON body without headers (what release 0.1.0 stored, and what tests post).
    pub fn json(body: impl Into<bytes::Bytes>) -> StoredRequest {
        StoredRequest {
            body: body.into(),
            ..Default::default()
        }
    }

    /// The body as text, bytes that are not UTF-8 as U+FFFD: what an operator reads.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A map as the JSON text of its column; `None` (NULL) when empty, so JSON events cost
    /// nothing more to store.
    pub(crate) fn map_text(m: &std::collections::BTreeMap<String, String>) -> Option<String> {
        (!m.is_empty()).then(|| serde_json::to_string(m).unwrap_or_default())
    }

    /// The request from its columns. A row written before version 3 has no `raw_body`: its
    /// `body` text is the JSON it received.
    pub(crate) fn from_columns(
        raw_body: Option<Vec<u8>>,
        body_text: String,
        content_type: Option<String>,
        headers: Option<String>,
        query: Option<String>,
    ) -> StoredRequest {
        let map = |t: Option<String>| {
            t.and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default()
        };
        StoredRequest {
            body: raw_body.unwrap_or_else(|| body_text.into_bytes()).into(),
            content_type,
            headers: map(headers),
            query: map(query),
        }
    }
}

/// An accepted webhook, ready to be committed.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: String,
    pub event_id: String,
    pub event_type: Option<String>,
    pub received_at: Millis,
    pub request: StoredRequest,
    pub object_id: Option<ObjectId>,
    pub plan: Plan,
    /// The W3C `traceparent` of the webhook's span (`None`: tracing off). Stored as given; the
    /// worker's calls for the event continue this trace.
    pub trace: Option<String>,
}

impl NewEvent {
    /// Whether a text that describes the event (not an id) holds a NUL character. The body is
    /// stored as bytes and may hold anything; header and query values are stored as JSON text,
    /// which escapes NUL.
    fn has_nul(&self) -> bool {
        let reason = match &self.plan {
            Plan::Parked(r) => r.as_str(),
            _ => "",
        };
        [
            self.event_type.as_deref().unwrap_or(""),
            self.request.content_type.as_deref().unwrap_or(""),
            reason,
        ]
        .iter()
        .any(|t| t.contains('\0'))
    }

    /// The same event with NUL in its descriptive texts replaced by U+FFFD.
    fn without_nul(&self) -> NewEvent {
        let mut e = self.clone();
        e.event_type = e.event_type.map(|t| without_nul(&t));
        e.request.content_type = e.request.content_type.map(|t| without_nul(&t));
        if let Plan::Parked(r) = &e.plan {
            e.plan = Plan::Parked(without_nul(r));
        }
        e
    }
}

/// Text as PostgreSQL can store it: NUL replaced by U+FFFD.
pub fn without_nul(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestOutcome {
    Queued,
    Parked,
    Duplicate,
}

/// A link claimed for delivery under `lease` until the lease expires.
#[derive(Debug, Clone)]
pub struct LinkJob {
    pub link_id: LinkId,
    pub lease: i64,
    pub object_id: ObjectId,
    pub lead_id: LeadId,
    /// Attempts so far that count toward `max_attempts`.
    pub attempts: i64,
    pub first_queued_at: Millis,
    /// `(source, event_id)` of the events this pair serves, oldest first.
    pub events: Vec<(String, String)>,
    /// The stored trace context (`traceparent`) of the oldest of those events that has one.
    pub trace: Option<String>,
}

/// An event whose lead key must be resolved, claimed under `lease`.
#[derive(Debug, Clone)]
pub struct ResolveJob {
    pub event_pk: EventPk,
    pub lease: i64,
    pub source: String,
    pub event_id: String,
    pub request: StoredRequest,
    pub attempts: i64,
    pub first_at: Millis,
    /// The event's stored trace context (`traceparent`), if any.
    pub trace: Option<String>,
}

/// An event whose custom object must be created, claimed under `lease`.
#[derive(Debug, Clone)]
pub struct ObjectJob {
    pub event_pk: EventPk,
    pub lease: i64,
    pub source: String,
    pub event_id: String,
    pub request: StoredRequest,
    pub definition_id: String,
    /// Attempts so far that count toward `max_attempts` (a lost one included).
    pub attempts: i64,
    pub first_at: Millis,
    /// The previous claim had sent its creation and never recorded the answer (a crash, or a
    /// lease that ran out): the claim recorded that attempt as `unknown`.
    pub lost: bool,
    /// The event's stored trace context (`traceparent`), if any.
    pub trace: Option<String>,
}

/// One object creation attempt: the call, and what it means for the object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ObjectAttempt {
    pub outcome: CreationOutcome,
    #[serde(flatten)]
    pub attempt: Attempt,
}

/// The new state of an object after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectUpdate {
    /// SprintHub created it with this id: stored, then its links are queued.
    Created(ObjectId),
    Retry {
        due_at: Millis,
        counted: bool,
        error: String,
    },
    /// Refused for good; the event is dead with this reason.
    Dead(String),
    /// Give the job back untouched: nothing was sent (shutdown).
    Release,
}

#[derive(Debug, Clone)]
pub struct ObjectCompletion {
    pub event_pk: EventPk,
    pub lease: i64,
    pub attempt: Option<ObjectAttempt>,
    pub update: ObjectUpdate,
}

/// The custom object of an event that has sprintlink create it.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectDetail {
    /// Known once SprintHub created it.
    pub object_id: Option<ObjectId>,
    pub definition_id: String,
    pub state: ObjectState,
    pub next_attempt_at: Option<Millis>,
    pub attempts: Vec<ObjectAttempt>,
}

/// One call to SprintHub, as the admin API shows it. Never holds the API token.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Attempt {
    pub at: Millis,
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
    pub duration_ms: i64,
}

/// The new state of a delivered link.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkUpdate {
    Linked,
    /// Try again at `due_at`; `counted` says whether this attempt uses up one of `max_attempts`.
    Retry {
        due_at: Millis,
        counted: bool,
        error: String,
    },
    Dead {
        error: String,
    },
    /// Give the job back untouched (shutdown).
    Release,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub link_id: LinkId,
    pub lease: i64,
    pub attempt: Option<Attempt>,
    pub update: LinkUpdate,
}

/// The result of resolving an event's lead key.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolveUpdate {
    Links(Vec<LeadId>),
    Parked(String),
    Retry {
        due_at: Millis,
        counted: bool,
        error: String,
    },
    /// Resolution failed for good (a permanent error, or retries exhausted).
    Dead(String),
    /// The leads are known: create the event's object (or reuse the one created before), then
    /// link it to them.
    Create {
        definition_id: String,
        leads: Vec<LeadId>,
    },
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub state: Option<EventState>,
    pub source: Option<String>,
    /// Only events of this object id.
    pub object_id: Option<String>,
    /// Only events with a link to this lead.
    pub lead_id: Option<String>,
    /// Only events received at or after this time.
    pub since: Option<Millis>,
    /// Only events received before this time.
    pub until: Option<Millis>,
    /// Events whose id starts with this text, or linked to a lead that this key maps to in a
    /// mapping table (the lead key itself is not stored on the event).
    pub q: Option<String>,
    /// Only events older than this internal position (keyset pagination).
    pub before: Option<EventPk>,
    pub limit: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventSummary {
    #[serde(skip)]
    pub pk: EventPk,
    pub event_id: String,
    pub source: String,
    pub state: EventState,
    pub received_at: Millis,
    pub object_id: Option<ObjectId>,
    pub event_type: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkDetail {
    #[serde(skip)]
    pub link_id: LinkId,
    pub object_id: ObjectId,
    pub lead_id: LeadId,
    pub state: LinkState,
    pub next_attempt_at: Option<Millis>,
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventDetail {
    #[serde(flatten)]
    pub summary: EventSummary,
    #[serde(skip)]
    pub request: StoredRequest,
    /// When retention blanked the body (the stored body is then empty); `None` while kept.
    pub body_removed_at: Option<Millis>,
    /// The stored trace context (`traceparent`), when the event was stored with tracing on.
    #[serde(skip)]
    pub trace: Option<String>,
    /// The object sprintlink creates for this event, when its source asks for that.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectDetail>,
    /// One page of the event's links, in the order they were first stored.
    pub links: Vec<LinkDetail>,
    /// Where the next page of links starts (`LinkPage::after`), when there is one.
    #[serde(skip)]
    pub more_links_after: Option<LinkId>,
}

/// Which of an event's links an event document holds: an event may name up to 100 leads, and
/// each link carries its attempts.
#[derive(Debug, Clone, Copy)]
pub struct LinkPage {
    /// Only links stored after this position (the previous page's `more_links_after`).
    pub after: Option<LinkId>,
    pub limit: i64,
}

impl Default for LinkPage {
    fn default() -> Self {
        LinkPage {
            after: None,
            limit: 100,
        }
    }
}

/// Numbers for `/metrics` and the dashboard.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub events_by_state: Vec<(EventState, i64)>,
    pub links_by_state: Vec<(LinkState, i64)>,
    /// Pending links plus events waiting for lead resolution.
    pub queue_depth: i64,
    pub dead_links: i64,
    /// What the database takes on disk (`Store::storage_bytes`), when `/metrics` read it.
    pub storage_bytes: Option<i64>,
    /// When the oldest link, lead resolution or object creation still waiting was queued.
    pub oldest_pending_at: Option<Millis>,
}

impl Stats {
    /// The numbers from the four counts each backend runs (states as the rows hold them); the
    /// rest is derived from them.
    pub(crate) fn from_counts(
        events_by_state: Vec<(String, i64)>,
        links_by_state: Vec<(String, i64)>,
        pending_links: i64,
        resolving: i64,
        oldest_pending_at: Option<Millis>,
    ) -> Result<Stats> {
        let events_by_state = events_by_state
            .iter()
            .map(|(s, n)| Ok((parse_state(s)?, *n)))
            .collect::<Result<Vec<_>>>()?;
        let links_by_state = links_by_state
            .iter()
            .map(|(s, n)| Ok((parse_state(s)?, *n)))
            .collect::<Result<Vec<(LinkState, i64)>>>()?;
        let dead_links = links_by_state
            .iter()
            .find(|(s, _)| *s == LinkState::Dead)
            .map_or(0, |(_, n)| *n);
        Ok(Stats {
            events_by_state,
            links_by_state,
            queue_depth: pending_links + resolving,
            dead_links,
            storage_bytes: None,
            oldest_pending_at,
        })
    }
}

/// The deployment-wide delivery pause as stored: `until` None means until resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    pub reason: PauseReason,
    pub until: Option<Millis>,
}

impl Pause {
    /// Whether this pause still holds at `now`.
    pub fn holds(&self, now: Millis) -> bool {
        self.until.is_none_or(|u| u > now)
    }
}

/// A live replica as its heartbeat records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub id: String,
    pub joined_at: Millis,
    pub in_flight: i64,
}

/// The channel PostgreSQL replicas LISTEN on; ingest and replay NOTIFY it after committing.
pub const WORK_CHANNEL: &str = "sprintlink_work";

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Commits a batch of events in one transaction (group commit), one outcome per event.
    async fn ingest(&self, events: &[NewEvent]) -> Result<Vec<IngestOutcome>>;
    async fn claim_links(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<LinkJob>>;
    /// Records attempts and their consequences, in one transaction.
    async fn complete_links(&self, done: &[Completion], now: Millis) -> Result<()>;
    async fn claim_resolves(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<ResolveJob>>;
    async fn complete_resolve(
        &self,
        job: &ResolveJob,
        update: ResolveUpdate,
        now: Millis,
    ) -> Result<()>;
    /// Claims due object creations. A claimed row whose previous holder had sent its creation
    /// without recording the answer gets that attempt recorded as `unknown` (`ObjectJob::lost`).
    async fn claim_objects(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> Result<Vec<ObjectJob>>;
    /// Records, durably and before the call, that the creation is being sent; `false` when
    /// the lease is no longer this job's (then nothing may be sent).
    async fn object_sending(&self, job: &ObjectJob, now: Millis) -> Result<bool>;
    /// Records a creation attempt and its consequence in one transaction: a new id is
    /// committed with the event's links, before any of them is sent.
    async fn complete_object(&self, done: &ObjectCompletion, now: Millis) -> Result<()>;
    /// When the next job falls due, if any is waiting.
    async fn next_due(&self) -> Result<Option<Millis>>;
    async fn list_events(&self, filter: &EventFilter) -> Result<Vec<EventSummary>>;
    /// Events with this id (one per source at most), optionally of one source.
    async fn find_events(&self, event_id: &str, source: Option<&str>) -> Result<Vec<EventSummary>>;
    async fn event_detail(&self, pk: EventPk, links: LinkPage) -> Result<Option<EventDetail>>;
    /// The stored request of an event: what a replay maps.
    async fn event_request(&self, pk: EventPk) -> Result<Option<StoredRequest>>;
    /// Applies a fresh plan to an existing event: every link not yet linked is due now.
    async fn replay(
        &self,
        pk: EventPk,
        object_id: Option<&ObjectId>,
        plan: Plan,
        now: Millis,
    ) -> Result<()>;
    /// Marks the event `discarded` with the operator's reason: its resolution and object
    /// creation stop, and each of its pending pairs that no live event wants is no longer due.
    /// A replay brings it back.
    async fn discard(&self, pk: EventPk, reason: &str, now: Millis) -> Result<()>;
    async fn stats(&self) -> Result<Stats>;
    async fn ping(&self) -> Result<()>;
    async fn mapping_get(&self, source: &str, key: &str) -> Result<Vec<String>>;
    async fn mapping_put(&self, source: &str, key: &str, lead_ids: &[String]) -> Result<()>;
    async fn mapping_delete(&self, source: &str, key: &str) -> Result<bool>;
    /// One page of a source's `(key, lead id)` rows in key order, after the row `after`.
    async fn mapping_list(
        &self,
        source: &str,
        after: Option<(String, String)>,
        limit: i64,
    ) -> Result<Vec<(String, String)>>;
    /// Adds many `key -> lead id` rows in one transaction; returns how many rows were given.
    async fn mapping_import(&self, source: &str, rows: &[(String, String)]) -> Result<usize>;
    /// Retention, one step: blanks the bodies of at most `limit` events delivered before
    /// `delivered_before` (marking them `body_removed_at = now`) and the response excerpts of
    /// their links' attempts; answers how many events. A store may stop short of `limit` to
    /// keep the step short: only 0 means that none is left.
    async fn remove_bodies(&self, delivered_before: Millis, now: Millis, limit: i64)
    -> Result<u64>;
    /// Retention, one step: deletes at most `limit` events delivered before `delivered_before`
    /// (see `prune`); answers how many (only 0 means that none is left, as for `remove_bodies`).
    async fn prune_delivered(
        &self,
        delivered_before: Millis,
        now: Millis,
        limit: i64,
    ) -> Result<u64>;
    /// Retention, one step: deletes at most `limit` dead or parked events received before
    /// `received_before` (see `prune`); answers how many (only 0 means that none is left).
    async fn prune_failed(&self, received_before: Millis, now: Millis, limit: i64) -> Result<u64>;
    /// Gives at most `pages` freed pages back to the file system (SQLite's incremental vacuum;
    /// nothing on PostgreSQL, whose autovacuum reuses the space); answers whether more are left.
    async fn reclaim_space(&self, pages: i64) -> Result<bool>;
    /// What the database takes on disk, in bytes.
    async fn storage_bytes(&self) -> Result<i64>;
    /// When the oldest pending link or lead resolution was first queued (`None`: nothing waits).
    async fn oldest_pending_at(&self) -> Result<Option<Millis>>;
    /// Claims the right to send the notification of `kind` to alert target `target` for the
    /// interval starting at `window_start`: `true` for the one caller whose claim is first.
    async fn claim_alert_slot(&self, target: i64, kind: &str, window_start: Millis)
    -> Result<bool>;
    /// The stored delivery pause, if one is set (it may have run out: see [`Pause::holds`]).
    async fn delivery_pause(&self) -> Result<Option<Pause>>;
    /// Sets (operator pause) or clears (resume) the pause, whatever it was.
    async fn set_delivery_pause(&self, pause: Option<Pause>, now: Millis) -> Result<()>;
    /// A throttling answer: paused with reason `throttled` until `until`, unless a pause that
    /// lasts longer is already set (an operator's pause is never shortened).
    async fn throttle_pause(&self, until: Millis, now: Millis) -> Result<()>;
    /// Records this replica's heartbeat and answers the replicas seen since `live_after`, in
    /// the order they joined; `None` when the backend serves one replica only (SQLite).
    async fn heartbeat(
        &self,
        _replica: &str,
        _in_flight: i64,
        _now: Millis,
        _live_after: Millis,
    ) -> Result<Option<Vec<Replica>>> {
        Ok(None)
    }
    /// Removes this replica's heartbeat (a clean stop), so its share is taken over at once.
    async fn leave(&self, _replica: &str) -> Result<()> {
        Ok(())
    }
    /// Wakes `wake` whenever another replica commits new work (PostgreSQL LISTEN/NOTIFY);
    /// nothing on a backend with one replica, where the in-process wake-up suffices.
    fn listen(&self, _wake: Arc<tokio::sync::Notify>) {}
    /// Closes the pools, flushing SQLite's WAL.
    async fn close(&self);
}

// How the prune calls delete (the same on both backends): an event goes with its `event_links`
// rows. A pair it named that is linked keeps its `links` row forever, so that an event naming
// it later is delivered without a call, but loses its attempts once no event names it any more;
// a pair that is not linked and that no event names any more goes with its attempts (unless a
// call for it is in flight: the worker removes it when that call ends, as after a replay).

/// Opens the storage the URL names and brings its schema up to date.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url).await?))
    } else {
        Err(StoreError::Invalid(format!(
            "storage.url {:?} is neither sqlite: nor postgres://",
            crate::config::redact_url(url)
        )))
    }
}

/// `sprintlink backup`: a consistent copy of the SQLite database at `url`, written to `to`
/// (which must not exist) while the service may be running. PostgreSQL is refused, naming
/// `pg_dump`.
pub async fn backup(url: &str, to: &std::path::Path) -> Result<()> {
    if url.starts_with("sqlite:") {
        sqlite::backup(url, to).await
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Err(StoreError::Invalid(
            "sprintlink backup copies SQLite databases only; back up PostgreSQL with pg_dump \
             (for example `pg_dump --format=custom --file=sprintlink.dump DATABASE_URL`)"
                .into(),
        ))
    } else {
        Err(StoreError::Invalid(format!(
            "storage.url {:?} is neither sqlite: nor postgres://",
            crate::config::redact_url(url)
        )))
    }
}

/// Lists (`apply = false`) or applies the migrations the database at `url` is missing, without
/// starting anything else. A SQLite file that does not exist yet is not created by a dry run.
pub async fn migrate(url: &str, apply: bool) -> Result<migrate::Status> {
    if url.starts_with("sqlite:") {
        sqlite::migrate(url, apply).await
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        postgres::migrate(url, apply).await
    } else {
        Err(StoreError::Invalid(format!(
            "storage.url {:?} is neither sqlite: nor postgres://",
            crate::config::redact_url(url)
        )))
    }
}

/// The current time in the store's unit.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// How many bytes of a SprintHub answer are kept with an attempt.
pub const EXCERPT_BYTES: usize = 2048;
