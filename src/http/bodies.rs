//! Request and response bodies, each defined once: the type a handler serialises (or
//! deserialises) is the schema `/openapi.json` publishes, so the document cannot drift from the
//! answers. Made from the store's views; they hold no logic beyond that conversion.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::domain::{CreationOutcome, EventState, LinkState, ObjectId, ObjectState, PauseReason};
use crate::http::admin::rfc3339;
use crate::store::{Attempt, EventDetail, EventSummary, LinkDetail, ObjectAttempt, ObjectDetail};
use crate::telemetry::traces::TraceContext;

/// The states' schemas, made from the states themselves.
fn state_schema(values: &[&'static str], description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
        .description(Some(description))
        .into()
}

/// A state's schema: its `ALL` values, under its type's name.
macro_rules! state_schema {
    ($ty:ident, $description:expr) => {
        impl PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                state_schema(&$ty::ALL.map($ty::as_str), $description)
            }
        }
        impl ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                stringify!($ty).into()
            }
        }
    };
}

state_schema!(
    EventState,
    "An event's state: `queued` (links pending), `delivered` (every link linked), \
     `parked` (object id or lead missing, or no lead found: waits for an operator), \
     `dead` (a link, the resolution or the object's creation failed for good), \
     `discarded` (an operator discarded it: nothing is sent for it until it is replayed)."
);
state_schema!(LinkState, "A link's state.");
state_schema!(
    ObjectState,
    "The state of an object sprintlink creates: `pending`, `created` (its id is stored), `dead`."
);
state_schema!(
    CreationOutcome,
    "How an object creation attempt ended. `unknown`: the request may have reached SprintHub \
     but its answer was lost (timeout, dropped connection, crash); it is tried again, so \
     SprintHub may hold one extra, unlinked object."
);

/// `202` of `POST /webhooks/{source}`: the event is committed to storage.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAccepted {
    pub event_id: String,
    /// `queued`: links will be made; `parked`: waits for an operator (see `reason`).
    #[schema(pattern = "^(queued|parked)$")]
    pub status: &'static str,
    /// Only when parked: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `200` of `POST /webhooks/{source}`: a duplicate of a stored event (`event_id` given), or a
/// type not in `accept_types`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookNoop {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[schema(pattern = "^(duplicate|ignored)$")]
    pub status: &'static str,
}
state_schema!(
    PauseReason,
    "Why delivery is paused: `operator` (`POST /admin/delivery/pause`) or `throttled` \
     (SprintHub answered \"too many requests\"; every replica waits at least 60 s)."
);

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    #[schema(pattern = "^(ready|not_ready)$")]
    pub status: &'static str,
    pub checks: ReadinessChecks,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadinessChecks {
    /// `ok`, or `failing: ...`.
    pub storage: String,
    /// `ok`, or `draining` after SIGTERM.
    pub accepting: &'static str,
}

/// One event in a list.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = EventSummary)]
pub struct EventView {
    pub event_id: String,
    pub source: String,
    pub state: EventState,
    #[schema(format = DateTime)]
    pub received_at: String,
    #[schema(required = true)]
    pub object_id: Option<String>,
    #[schema(required = true)]
    pub event_type: Option<String>,
    /// Why the event is parked or dead, when it is.
    #[schema(required = true)]
    pub reason: Option<String>,
}

impl From<&EventSummary> for EventView {
    fn from(e: &EventSummary) -> Self {
        EventView {
            event_id: e.event_id.clone(),
            source: e.source.clone(),
            state: e.state,
            received_at: rfc3339(e.received_at),
            object_id: e.object_id.clone().map(ObjectId::into_string),
            event_type: e.event_type.clone(),
            reason: e.reason.clone(),
        }
    }
}

/// One call to SprintHub.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AttemptDoc)]
pub struct AttemptView {
    #[schema(format = DateTime)]
    pub at: String,
    /// Null when no answer came (connection error, timeout).
    #[schema(required = true)]
    pub status_code: Option<i64>,
    #[schema(required = true)]
    pub error: Option<String>,
    /// The first 2 KiB of SprintHub's answer.
    #[schema(required = true)]
    pub response_excerpt: Option<String>,
    pub duration_ms: i64,
}

impl From<&Attempt> for AttemptView {
    fn from(a: &Attempt) -> Self {
        AttemptView {
            at: rfc3339(a.at),
            status_code: a.status_code,
            error: a.error.clone(),
            response_excerpt: a.response_excerpt.clone(),
            duration_ms: a.duration_ms,
        }
    }
}

/// One (object, lead) pair of an event, with its attempts.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = LinkDoc)]
pub struct LinkView {
    pub object_id: String,
    pub lead_id: String,
    pub state: LinkState,
    #[schema(required = true, format = DateTime)]
    pub next_attempt_at: Option<String>,
    pub attempts: Vec<AttemptView>,
}

impl From<&LinkDetail> for LinkView {
    fn from(l: &LinkDetail) -> Self {
        LinkView {
            object_id: l.object_id.to_string(),
            lead_id: l.lead_id.to_string(),
            state: l.state,
            next_attempt_at: l.next_attempt_at.map(rfc3339),
            attempts: l.attempts.iter().map(AttemptView::from).collect(),
        }
    }
}

/// One object creation attempt.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ObjectAttemptDoc)]
pub struct ObjectAttemptView {
    pub outcome: CreationOutcome,
    #[serde(flatten)]
    pub attempt: AttemptView,
}

impl From<&ObjectAttempt> for ObjectAttemptView {
    fn from(a: &ObjectAttempt) -> Self {
        ObjectAttemptView {
            outcome: a.outcome,
            attempt: AttemptView::from(&a.attempt),
        }
    }
}

/// The custom object sprintlink creates for an event (sources with `[sources.object]`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ObjectDoc)]
pub struct ObjectView {
    /// Known once SprintHub created it; the event's links use it.
    #[schema(required = true)]
    pub object_id: Option<String>,
    pub definition_id: String,
    pub state: ObjectState,
    #[schema(required = true, format = DateTime)]
    pub next_attempt_at: Option<String>,
    pub attempts: Vec<ObjectAttemptView>,
}

impl From<&ObjectDetail> for ObjectView {
    fn from(o: &ObjectDetail) -> Self {
        ObjectView {
            object_id: o.object_id.clone().map(ObjectId::into_string),
            definition_id: o.definition_id.clone(),
            state: o.state,
            next_attempt_at: o.next_attempt_at.map(rfc3339),
            attempts: o.attempts.iter().map(ObjectAttemptView::from).collect(),
        }
    }
}

/// `GET /admin/events/{event_id}`: an event with its body, links and every attempt.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = EventDetail)]
pub struct EventDocument {
    pub event_id: String,
    pub source: String,
    pub state: EventState,
    #[schema(format = DateTime)]
    pub received_at: String,
    #[schema(required = true)]
    pub object_id: Option<String>,
    #[schema(required = true)]
    pub event_type: Option<String>,
    /// Why the event is parked or dead, when it is.
    #[schema(required = true)]
    pub reason: Option<String>,
    /// The body as received, as text (bytes that are not UTF-8 shown as U+FFFD); null once
    /// retention removed it (`body_removed_at`), while a body the sender sent empty is `""`.
    /// Release 0.1.0 showed the parsed JSON here; that is now `body_json`.
    #[schema(required = true)]
    pub body: Option<String>,
    /// When retention (`retention.bodies`) removed the body; null while it is kept.
    #[schema(required = true, format = DateTime)]
    pub body_removed_at: Option<String>,
    /// The request's `Content-Type`; null when it had none (read as JSON).
    #[schema(required = true)]
    pub content_type: Option<String>,
    /// What the references saw: the parsed JSON body, or the object a form or multipart body
    /// reads as (a file part as `{filename, content_type, size}`); null when the stored body
    /// cannot be read with today's parser.
    #[schema(value_type = Value, required = true)]
    pub body_json: Value,
    /// The object sprintlink creates for this event; null for sources whose sender sends the
    /// object's id.
    #[schema(required = true)]
    pub object: Option<ObjectView>,
    /// One page of the event's links (`links_limit`, 100 by default).
    pub links: Vec<LinkView>,
    /// Pass as `links_cursor` for the next page of links; null on the last page.
    #[schema(required = true)]
    pub next_links_cursor: Option<String>,
    /// The OpenTelemetry trace (32 lowercase hex digits) of the webhook that stored the event
    /// and of the SprintHub calls made for it; null when it was stored with tracing off.
    #[schema(required = true)]
    pub trace_id: Option<String>,
}

impl From<&EventDetail> for EventDocument {
    fn from(d: &EventDetail) -> Self {
        let e = &d.summary;
        EventDocument {
            event_id: e.event_id.clone(),
            source: e.source.clone(),
            state: e.state,
            received_at: rfc3339(e.received_at),
            object_id: e.object_id.clone().map(ObjectId::into_string),
            event_type: e.event_type.clone(),
            reason: e.reason.clone(),
            body: d.body_removed_at.is_none().then(|| d.request.body_text()),
            body_removed_at: d.body_removed_at.map(rfc3339),
            content_type: d.request.content_type.clone(),
            body_json: match d.body_removed_at {
                Some(_) => Value::Null,
                None => crate::mapping::Input::read(&d.request).map_or(Value::Null, |i| i.body),
            },
            object: d.object.as_ref().map(ObjectView::from),
            links: d.links.iter().map(LinkView::from).collect(),
            next_links_cursor: d.more_links_after.map(|after| after.to_string()),
            trace_id: d
                .trace
                .as_deref()
                .and_then(|t| TraceContext::parse(t).ok())
                .map(|t| t.trace_id_hex()),
        }
    }
}

/// `GET /admin/events`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub events: Vec<EventView>,
    /// Pass as `cursor` for the next (older) page; null on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// `202` of `POST /admin/events/{event_id}/replay`: the event after the replay.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    pub event_id: String,
    pub source: String,
    pub state: EventState,
}

/// `POST /admin/events/{event_id}/discard`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscardRequest {
    /// Why, for whoever reads the event later (1 to 1000 characters).
    #[schema(min_length = 1, max_length = 1000)]
    pub reason: String,
}

/// `200` of `POST /admin/events/{event_id}/discard`: the event after the discard.
#[derive(Debug, Serialize, ToSchema)]
pub struct Discarded {
    pub event_id: String,
    pub source: String,
    pub state: EventState,
    pub reason: String,
}

/// Which events `POST /admin/replay` replays.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayManyRequest {
    /// Default `dead`.
    #[schema(pattern = "^(dead|parked|queued|discarded)$")]
    pub state: Option<String>,
    /// Default: every source.
    pub source: Option<String>,
    /// Only events of this object id.
    pub object_id: Option<String>,
    /// Only events with a link to this lead id.
    pub lead_id: Option<String>,
    /// Only events received at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only events received before this time (RFC 3339).
    pub until: Option<String>,
    /// An event id prefix, or a lead key of a mapping table (events linked to its leads).
    pub q: Option<String>,
    /// Events replayed by this call, 1 to 500 (default 100).
    #[schema(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous call.
    pub cursor: Option<String>,
}

/// `202` of `POST /admin/replay`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayedMany {
    /// Events replayed by this call.
    pub replayed: u64,
    /// Pass as `cursor` to go on; null when every matching event has been visited.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// A lead id: a number, or a string when it is not all digits.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum LeadId {
    #[schema(value_type = i64)]
    Number(serde_json::Number),
    Text(String),
}

impl LeadId {
    /// As SprintHub's JSON has it: a number when the stored id is all digits.
    pub fn from_stored(id: &str) -> LeadId {
        match crate::mapping::id_json(id) {
            Value::Number(n) => LeadId::Number(n),
            _ => LeadId::Text(id.to_string()),
        }
    }
}

/// The body of `PUT /admin/mappings/{source}/{key}`. Ids are checked one by one by the
/// handler, which names the first unusable one.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MappingRequest {
    /// At least one lead id.
    #[schema(min_items = 1, value_type = Vec<LeadId>)]
    pub lead_ids: Vec<Value>,
}

/// A key and the lead ids it maps to.
#[derive(Debug, Serialize, ToSchema)]
pub struct Mapping {
    pub source: String,
    /// The key as lookups compare it (emails in lower case).
    pub key: String,
    pub lead_ids: Vec<LeadId>,
}

impl Mapping {
    pub fn new(source: String, key: String, ids: &[String]) -> Mapping {
        Mapping {
            source,
            key,
            lead_ids: ids.iter().map(|i| LeadId::from_stored(i)).collect(),
        }
    }
}

/// `POST /admin/mappings/{source}` (CSV import).
#[derive(Debug, Serialize, ToSchema)]
pub struct Imported {
    pub imported: u64,
}

/// `GET /admin/delivery` and the answer of pause and resume: the deployment's delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryStatus {
    /// True while no replica claims or sends anything (webhooks are still accepted).
    pub paused: bool,
    /// When the pause ends by itself; null when running or paused until resumed.
    #[schema(required = true, format = DateTime)]
    pub paused_until: Option<String>,
    #[schema(required = true)]
    pub reason: Option<PauseReason>,
    /// For the whole deployment; 0 means unlimited.
    pub rate_limit_per_second: f64,
    /// Calls in flight at once, for the whole deployment.
    pub concurrency: u64,
    /// Calls in flight now, on every replica (as of their last heartbeat, within a second).
    pub in_flight: u64,
    /// Replicas sharing the work (live heartbeats on PostgreSQL; 1 on SQLite).
    pub replicas: u64,
}

/// The optional body of `POST /admin/delivery/pause`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// Resume by itself after this many minutes (fractions allowed); absent: until resumed.
    #[schema(exclusive_minimum = 0, maximum = 1000000)]
    pub minutes: Option<f64>,
}
