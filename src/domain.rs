//! The service's vocabulary, shared by every layer and importing nothing of the crate: the states
//! an event and a link go through, and the ids that cross module borders. States are stored as
//! the lower-case text release 0.1.0 wrote, so old rows read back; parsing a stored state that is
//! none of these is an error, not a guess.

use std::fmt;
use std::str::FromStr;

/// Where an event stands. `Delivered` once every link it asked for is linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventState {
    /// Waiting for lead resolution or for its links.
    Queued,
    Delivered,
    /// Waits for an operator (no lead, a lead key nobody knows); `reason` says why.
    Parked,
    /// A link or the resolution failed for good.
    Dead,
    /// An operator said it must not be delivered (`POST /admin/events/{id}/discard`): none of
    /// its pending links is sent for it, and it stays so until replayed.
    Discarded,
}

impl EventState {
    pub const ALL: [EventState; 5] = [
        EventState::Queued,
        EventState::Delivered,
        EventState::Parked,
        EventState::Dead,
        EventState::Discarded,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            EventState::Queued => "queued",
            EventState::Delivered => "delivered",
            EventState::Parked => "parked",
            EventState::Dead => "dead",
            EventState::Discarded => "discarded",
        }
    }

    /// The states an operator can replay (`POST /admin/replay`).
    pub const fn replayable(self) -> bool {
        matches!(
            self,
            EventState::Dead | EventState::Parked | EventState::Queued | EventState::Discarded
        )
    }

    /// The states an operator can discard: any not yet delivered.
    pub const fn discardable(self) -> bool {
        !matches!(self, EventState::Delivered)
    }
}

/// Where one (object, lead) pair stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkState {
    /// Not yet accepted by SprintHub; due at `due_at`.
    Pending,
    Linked,
    Dead,
}

impl LinkState {
    pub const ALL: [LinkState; 3] = [LinkState::Pending, LinkState::Linked, LinkState::Dead];

    pub const fn as_str(self) -> &'static str {
        match self {
            LinkState::Pending => "pending",
            LinkState::Linked => "linked",
            LinkState::Dead => "dead",
        }
    }
}

/// Where the custom object of an event that asks sprintlink to create it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectState {
    /// Not yet created; due at `due_at`. Its links wait for it.
    Pending,
    /// SprintHub answered with the new object's id, which is stored: never created again.
    Created,
    /// SprintHub refused it for good (or retries ran out); the event is dead.
    Dead,
}

impl ObjectState {
    pub const ALL: [ObjectState; 3] = [
        ObjectState::Pending,
        ObjectState::Created,
        ObjectState::Dead,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ObjectState::Pending => "pending",
            ObjectState::Created => "created",
            ObjectState::Dead => "dead",
        }
    }
}

/// How one object creation attempt ended, as recorded and counted
/// (`sprintlink_object_creations_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CreationOutcome {
    /// SprintHub answered with the new id.
    Created,
    /// SprintHub answered with a failure: nothing was created.
    Failed,
    /// The request may have reached SprintHub but its answer was lost (a timeout, a dropped
    /// connection, a crash after sending): SprintHub may hold an object nobody links.
    Unknown,
}

impl CreationOutcome {
    pub const ALL: [CreationOutcome; 3] = [
        CreationOutcome::Created,
        CreationOutcome::Failed,
        CreationOutcome::Unknown,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            CreationOutcome::Created => "created",
            CreationOutcome::Failed => "failed",
            CreationOutcome::Unknown => "unknown",
        }
    }
}

/// Why delivery is paused for the whole deployment (`GET /admin/delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PauseReason {
    /// An operator paused it (`POST /admin/delivery/pause`).
    Operator,
    /// SprintHub answered "too many requests": every replica waits at least 60 s.
    Throttled,
}

impl PauseReason {
    pub const ALL: [PauseReason; 2] = [PauseReason::Operator, PauseReason::Throttled];

    pub const fn as_str(self) -> &'static str {
        match self {
            PauseReason::Operator => "operator",
            PauseReason::Throttled => "throttled",
        }
    }
}

/// A stored or requested state text that is not one of the states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

macro_rules! text_enum {
    ($ty:ident) => {
        impl FromStr for $ty {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                $ty::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| UnknownState(s.to_string()))
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}
text_enum!(EventState);
text_enum!(LinkState);
text_enum!(ObjectState);
text_enum!(CreationOutcome);
text_enum!(PauseReason);

/// Ids that cross module borders: each its own type, so an event's row number cannot be
/// passed where a link's is expected (or a lease, or an attempt count, all `i64` too), nor a
/// lead id where an object id is. Stored as the plain column they always were.
macro_rules! int_id {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty(pub i64);
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
int_id!(
    /// The store's row number of an event: internal (keyset pages, joins), never the sender's
    /// event id.
    EventPk
);
int_id!(
    /// The store's row number of an (object, lead) pair.
    LinkId
);

macro_rules! text_id {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $ty(String);
        impl $ty {
            pub fn new(id: impl Into<String>) -> $ty {
                $ty(id.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_string(self) -> String {
                self.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<String> for $ty {
            fn from(id: String) -> $ty {
                $ty(id)
            }
        }
        impl From<&str> for $ty {
            fn from(id: &str) -> $ty {
                $ty(id.to_string())
            }
        }
        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map($ty)
            }
        }
    };
}
text_id!(
    /// A SprintHub custom object's id, as text (SprintHub answers numbers, senders send either).
    ObjectId
);
text_id!(
    /// A SprintHub lead's id, as text.
    LeadId
);

/// RFC 3339 in UTC with milliseconds, from Unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_the_text_release_0_1_0_wrote() {
        for (text, state) in [
            ("queued", EventState::Queued),
            ("delivered", EventState::Delivered),
            ("parked", EventState::Parked),
            ("dead", EventState::Dead),
            ("discarded", EventState::Discarded),
        ] {
            assert_eq!(text.parse::<EventState>(), Ok(state));
            assert_eq!(state.to_string(), text);
        }
        for (text, state) in [
            ("pending", LinkState::Pending),
            ("linked", LinkState::Linked),
            ("dead", LinkState::Dead),
        ] {
            assert_eq!(text.parse::<LinkState>(), Ok(state));
            assert_eq!(serde_json::to_value(state).unwrap(), text);
        }
        for state in ObjectState::ALL {
            assert_eq!(state.as_str().parse::<ObjectState>(), Ok(state));
        }
        for outcome in CreationOutcome::ALL {
            assert_eq!(outcome.as_str().parse::<CreationOutcome>(), Ok(outcome));
        }
        assert_eq!(
            "Dead".parse::<EventState>(),
            Err(UnknownState("Dead".into()))
        );
    }
}
