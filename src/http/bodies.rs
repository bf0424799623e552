//! Request and response bodies, each defined once: the type a handler serialises (or
//! deserialises) is the schema `/openapi.json` publishes, so the document cannot drift from the
//! answers. Made from the store's views; they hold no logic beyond that conversion.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::domain::{CreationOutcome, EventState, LinkState, ObjectState};
use crate::store::EventSummary;

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
            received_at: crate::http::admin::rfc3339(e.received_at),
            object_id: e.object_id.clone(),
            event_type: e.event_type.clone(),
            reason: e.reason.clone(),
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
