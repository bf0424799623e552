//! What the admin API and the dashboard both do to stored events: find one by its id, and
//! replay it with today's configuration. No HTTP here: callers turn the errors into answers.

use crate::config::SourceConfig;
use crate::mapping::{self, Input};
use crate::store::{EventSummary, Plan, Store, StoreError, now_ms};

/// Why `find_one` found no single event.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("no event with id {0:?}")]
    NotFound(String),
    #[error("{count} sources have an event {event_id:?}: add ?source=NAME")]
    Ambiguous { event_id: String, count: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The one event with this id; `source` disambiguates ids that two sources share.
pub async fn find_one(
    store: &dyn Store,
    event_id: &str,
    source: Option<&str>,
) -> Result<EventSummary, FindError> {
    let mut found = store.find_events(event_id, source).await?;
    match found.len() {
        0 => Err(FindError::NotFound(event_id.to_string())),
        1 => Ok(found.remove(0)),
        count => Err(FindError::Ambiguous {
            event_id: event_id.to_string(),
            count,
        }),
    }
}

/// Maps the stored event again with `source` (today's configuration of its source, `None` when
/// it is no longer configured) and queues every link not linked.
pub async fn replay(
    store: &dyn Store,
    source: Option<&SourceConfig>,
    e: &EventSummary,
) -> Result<(), StoreError> {
    let request = store.event_request(e.pk).await?.unwrap_or_default();
    // The stored bytes, read as their content type says: exactly what the request carried.
    let (object_id, plan) = match (source, Input::read(&request)) {
        (Some(source), Ok(input)) => mapping::plan(source, &input),
        (None, _) => (
            e.object_id.clone(),
            Plan::Parked(format!("source {:?} is no longer configured", e.source)),
        ),
        (_, Err(err)) => (
            e.object_id.clone(),
            Plan::Parked(format!("the stored body cannot be read: {err}")),
        ),
    };
    store
        .replay(e.pk, object_id.as_ref(), plan, now_ms())
        .await?;
    tracing::info!(event_id = %e.event_id, source = %e.source, "event replayed");
    Ok(())
}
