//! The operator's API: see events, their links and every attempt, replay what failed, and keep
//! the lead mapping table. Behind one bearer token compared in constant time, with failed checks
//! throttled per client address (`crate::http::auth`); absent (404) when no token is configured. Every
//! rejection, the extractors' included, is the JSON error: bodies go through `ApiJson`/`ApiBytes`
//! under `server.max_body_bytes`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::AppState;
use crate::http::auth::{Peer, Verdict};
use crate::http::bodies::{
    DeliveryStatus, DiscardRequest, Discarded, EventDocument, EventList, EventView, Imported,
    Mapping, MappingRequest, PauseRequest, ReplayManyRequest, Replayed, ReplayedMany,
};
use crate::http::error::{
    ApiBytes, ApiJson, ApiPath as Path, ApiQuery as Query, AppError, BodyLimit,
};
use crate::operations::FindError;
use crate::store::{EventFilter, EventPk, EventState, EventSummary, LinkPage, Millis};

/// `POST /admin/replay`: events per call by default, and at most.
const REPLAY_LIMIT_DEFAULT: i64 = 100;
const REPLAY_LIMIT_MAX: i64 = 500;

/// The admin routes with their OpenAPI descriptions, behind `require_admin`.
pub fn routes(state: Arc<AppState>) -> OpenApiRouter<Arc<AppState>> {
    let limit = state.config.server.max_body_bytes;
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .routes(routes!(get_event))
        .routes(routes!(replay_event))
        .routes(routes!(discard_event))
        .routes(routes!(replay_many))
        .routes(routes!(import_mappings))
        .routes(routes!(get_mapping, put_mapping, delete_mapping))
        .routes(routes!(delivery_status))
        .routes(routes!(pause_delivery))
        .routes(routes!(resume_delivery))
        .route_layer(middleware::from_fn_with_state(state, require_admin))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)))
}

/// True when `presented` is the admin token; constant time in the token's contents.
pub fn token_matches(state: &AppState, presented: &str) -> bool {
    let expected = state.config.admin.token.expose().as_bytes();
    !expected.is_empty() && bool::from(expected.ct_eq(presented.as_bytes()))
}

/// Checks a presented admin token through the per-address throttle: `unauthorized` when wrong
/// (and counted), `too_many_requests` while the address is blocked.
pub fn check_token(state: &AppState, peer: Peer, presented: &str) -> Result<(), AppError> {
    match state
        .auth
        .throttle
        .attempt(peer.0, Instant::now(), || token_matches(state, presented))
    {
        Verdict::Allowed => Ok(()),
        Verdict::Denied => Err(AppError::Unauthorized),
        Verdict::Throttled(secs) => Err(AppError::TooManyRequests(secs)),
    }
}

/// Runs before any extractor of the admin routes, so nothing is read before the token is right.
async fn require_admin(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.config.admin.token.is_empty() {
        return AppError::NotFound("the admin API is off: set admin.token to enable it".into())
            .into_response();
    }
    // No Authorization header at all is not a guess: 401, not counted.
    let Some(auth) = req.headers().get(header::AUTHORIZATION) else {
        return AppError::Unauthorized.into_response();
    };
    let presented = auth
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if let Err(e) = check_token(&state, Peer::of(req.extensions()), presented) {
        return e.into_response();
    }
    next.run(req).await
}

/// RFC 3339 in UTC with milliseconds (shared with the alerts, which sit below `http`).
pub use crate::domain::rfc3339;

/// Unix milliseconds from RFC 3339 (`2026-01-02T03:04:05Z`, `...05.123+02:00`); `None` when
/// the text is not one. A `+` offset that a query string decoded into a space is read as `+`.
pub fn parse_rfc3339(text: &str) -> Option<Millis> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo) || d < 1 || d > days_in[(mo - 1) as usize] {
        return None;
    }
    // A leap second (60) is read as the last second of its minute.
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &text[start..i.min(start + 3)];
        millis = frac.parse::<i64>().ok()? * 10_i64.pow(3 - frac.len() as u32);
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-' | b' '), ..] if b.len() == i + 6 && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 60 + om) * 60;
            if *sign == b'-' { -o } else { o }
        }
        _ => return None,
    };
    // Howard Hinnant's days_from_civil.
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset;
    Some(secs * 1000 + millis)
}

/// The search fields of a list or a bulk replay, validated.
struct Search {
    object_id: Option<String>,
    lead_id: Option<String>,
    since: Option<Millis>,
    until: Option<Millis>,
    q: Option<String>,
}

/// Longest text a search field may hold.
const SEARCH_MAX: usize = 1000;

impl Search {
    fn parse(
        object_id: &Option<String>,
        lead_id: &Option<String>,
        since: &Option<String>,
        until: &Option<String>,
        q: &Option<String>,
    ) -> Result<Search, AppError> {
        let text = |name: &str, v: &Option<String>| -> Result<Option<String>, AppError> {
            match v.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                Some(v) if v.len() > SEARCH_MAX || v.contains('\0') => Err(AppError::BadRequest(
                    format!("{name} must be at most {SEARCH_MAX} bytes, without NUL"),
                )),
                v => Ok(v.map(str::to_string)),
            }
        };
        let time = |name: &str, v: &Option<String>| -> Result<Option<Millis>, AppError> {
            match v.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(t) => parse_rfc3339(t).map(Some).ok_or_else(|| {
                    AppError::BadRequest(format!(
                        "{name} must be an RFC 3339 time such as 2026-01-02T03:04:05Z, not {t:?}"
                    ))
                }),
            }
        };
        Ok(Search {
            object_id: text("object_id", object_id)?,
            lead_id: text("lead_id", lead_id)?,
            since: time("since", since)?,
            until: time("until", until)?,
            q: text("q", q)?,
        })
    }

    fn into_filter(self, filter: EventFilter) -> EventFilter {
        EventFilter {
            object_id: self.object_id,
            lead_id: self.lead_id,
            since: self.since,
            until: self.until,
            q: self.q,
            ..filter
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only events in this state.
    #[param(inline, value_type = Option<crate::domain::EventState>)]
    pub state: Option<String>,
    /// Only events of this source.
    pub source: Option<String>,
    /// Only events of this object id.
    pub object_id: Option<String>,
    /// Only events with a link to this lead id.
    pub lead_id: Option<String>,
    /// Only events received at or after this time (RFC 3339, e.g. `2026-01-02T03:04:05Z`).
    pub since: Option<String>,
    /// Only events received before this time (RFC 3339).
    pub until: Option<String>,
    /// An event id prefix, or a lead key of a mapping table: events whose id starts with it,
    /// or linked to a lead it maps to.
    pub q: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Validates list parameters into a storage filter.
pub fn filter_from(q: &ListQuery) -> Result<EventFilter, AppError> {
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<EventState>().map_err(|_| {
            let all: Vec<_> = EventState::ALL.iter().map(|s| s.as_str()).collect();
            AppError::BadRequest(format!("state must be one of {}", all.join(", ")))
        })?),
        None => None,
    };
    let before = event_cursor(q.cursor.as_deref())?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(AppError::BadRequest(
            "limit must be between 1 and 500".into(),
        ));
    }
    let search = Search::parse(&q.object_id, &q.lead_id, &q.since, &q.until, &q.q)?;
    Ok(search.into_filter(EventFilter {
        state,
        source: q.source.clone().filter(|s| !s.is_empty()),
        before,
        limit,
        ..Default::default()
    }))
}

/// List events, newest first.
#[utoipa::path(
    get,
    path = "/admin/events",
    tag = "admin",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of events; follow `next_cursor` for older ones", body = EventList),
        (status = 400, description = "`bad_request`: a bad state, limit, cursor or RFC 3339 time", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn list_events(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, AppError> {
    let filter = filter_from(&q)?;
    let events = state.store.list_events(&filter).await?;
    let next_cursor = (events.len() as i64 == filter.limit)
        .then(|| events.last().map(|e| e.pk.to_string()))
        .flatten();
    Ok(axum::Json(EventList {
        events: events.iter().map(EventView::from).collect(),
        next_cursor,
    })
    .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SourceQuery {
    /// The event's source, when two sources have an event with this id.
    pub source: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// The event's source, when two sources have an event with this id.
    pub source: Option<String>,
    /// Links per page, 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub links_limit: Option<i64>,
    /// The `next_links_cursor` of the previous page.
    pub links_cursor: Option<String>,
}

impl EventQuery {
    fn page(&self) -> Result<LinkPage, AppError> {
        let limit = self.links_limit.unwrap_or(100);
        if !(1..=500).contains(&limit) {
            return Err(AppError::BadRequest("links_limit must be 1 to 500".into()));
        }
        let after = match self.links_cursor.as_deref().filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => Some(c.parse::<i64>().map_err(|_| {
                AppError::BadRequest(format!("links_cursor {c:?} is not a cursor this API gave"))
            })?),
        };
        Ok(LinkPage {
            after: after.map(crate::store::LinkId),
            limit,
        })
    }
}

/// Finds the one event with this id; `source` disambiguates ids that two sources share.
pub async fn find_one(
    state: &AppState,
    event_id: &str,
    source: Option<&str>,
) -> Result<EventSummary, AppError> {
    crate::operations::find_one(&*state.store, event_id, source)
        .await
        .map_err(|e| match e {
            FindError::NotFound(_) => AppError::NotFound(e.to_string()),
            FindError::Ambiguous { .. } => AppError::Conflict(e.to_string()),
            FindError::Store(e) => e.into(),
        })
}

/// One event with its body, links and every attempt.
#[utoipa::path(
    get,
    path = "/admin/events/{event_id}",
    tag = "admin",
    params(("event_id" = String, Path, description = "The event id (unique per source)"), EventQuery),
    responses(
        (status = 200, description = "The event, with one page of its links (`next_links_cursor` names the next)", body = EventDocument),
        (status = 400, description = "`bad_request`: a malformed path or query", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: no such event, or the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "`conflict`: several sources have an event with this id; add `?source=`", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn get_event(
    State(state): State<Arc<AppState>>,
    Path(event_id): Path<String>,
    Query(q): Query<EventQuery>,
) -> Result<Response, AppError> {
    let page = q.page()?;
    let e = find_one(&state, &event_id, q.source.as_deref()).await?;
    let detail = state
        .store
        .event_detail(e.pk, page)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no event with id {event_id:?}")))?;
    Ok(axum::Json(EventDocument::from(&detail)).into_response())
}

/// The event a page's `cursor` names (the last one of the previous page); empty is none.
fn event_cursor(cursor: Option<&str>) -> Result<Option<EventPk>, AppError> {
    match cursor.filter(|c| !c.is_empty()) {
        Some(c) => c
            .parse::<i64>()
            .map(|pk| Some(EventPk(pk)))
            .map_err(|_| AppError::BadRequest("cursor is not one this API gave".into())),
        None => Ok(None),
    }
}

/// Maps the stored event again with today's configuration and queues every link not linked.
pub async fn replay(state: &AppState, e: &EventSummary) -> Result<(), AppError> {
    let source = state.sources.get(&e.source).map(|e| &e.source);
    crate::operations::replay(&*state.store, source, e).await?;
    state.wake.notify_one();
    Ok(())
}

/// Replay one event.
///
/// Maps the stored event again with today's configuration and queues every link not yet linked.
#[utoipa::path(
    post,
    path = "/admin/events/{event_id}/replay",
    tag = "admin",
    params(("event_id" = String, Path, description = "The event id (unique per source)"), SourceQuery),
    responses(
        (status = 202, description = "Replayed; the event's state after the replay", body = Replayed),
        (status = 400, description = "`bad_request`: a malformed path or query", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: no such event, or the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "`conflict`: several sources have an event with this id; add `?source=`", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn replay_event(
    State(state): State<Arc<AppState>>,
    Path(event_id): Path<String>,
    Query(q): Query<SourceQuery>,
) -> Result<Response, AppError> {
    let e = find_one(&state, &event_id, q.source.as_deref()).await?;
    replay(&state, &e).await?;
    let after = find_one(&state, &event_id, Some(&e.source)).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(Replayed {
            event_id: after.event_id,
            source: after.source,
            state: after.state,
        }),
    )
        .into_response())
}

/// Replay the events in a state (default `dead`), optionally narrowed by the filters of
/// `GET /admin/events`, a bounded number per call.
///
/// Each call replays at most `limit` events (default 100, at most 500), newest first, and answers
/// `next_cursor` while more may remain: call again with `"cursor"` set to it until it is null.
/// Events replayed by one call are not visited again by the next.
#[utoipa::path(
    post,
    path = "/admin/replay",
    tag = "admin",
    request_body(content = ReplayManyRequest, content_type = "application/json",
        example = json!({"state": "dead", "source": "erp", "limit": 100})),
    responses(
        (status = 202, description = "How many events this call replayed, and where the next call goes on", body = ReplayedMany),
        (status = 400, description = "`bad_request`: not `{\"state\", \"source\", \"object_id\", \"lead_id\", \"since\", \"until\", \"q\", \"limit\", \"cursor\"}`, a state other than dead, parked, queued, discarded, a bad RFC 3339 time, a limit outside 1 to 500, or a cursor this API did not give", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        crate::http::openapi::UnsupportedMediaType,
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn replay_many(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ReplayManyRequest>,
) -> Result<Response, AppError> {
    let wanted = match req.state.as_deref() {
        None => EventState::Dead,
        Some(s) => s
            .parse::<EventState>()
            .ok()
            .filter(|s| s.replayable())
            .ok_or_else(|| {
                AppError::BadRequest("state must be dead, parked, queued or discarded".into())
            })?,
    };
    let limit = req.limit.unwrap_or(REPLAY_LIMIT_DEFAULT);
    if !(1..=REPLAY_LIMIT_MAX).contains(&limit) {
        return Err(AppError::BadRequest(format!(
            "limit must be between 1 and {REPLAY_LIMIT_MAX}"
        )));
    }
    let before = event_cursor(req.cursor.as_deref())?;
    let search = Search::parse(&req.object_id, &req.lead_id, &req.since, &req.until, &req.q)?;
    let filter = search.into_filter(EventFilter {
        state: Some(wanted),
        source: req.source.filter(|s| !s.is_empty()),
        before,
        limit,
        ..Default::default()
    });
    let page = state.store.list_events(&filter).await?;
    for e in &page {
        replay(&state, e).await?;
    }
    let next_cursor = (page.len() as i64 == limit)
        .then(|| page.last().map(|e| e.pk.to_string()))
        .flatten();
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(ReplayedMany {
            replayed: page.len() as u64,
            next_cursor,
        }),
    )
        .into_response())
}

/// Discards the event: nothing more is sent for it, and it stays `discarded` until replayed.
pub async fn discard(state: &AppState, e: &EventSummary, reason: &str) -> Result<(), AppError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 1000 {
        return Err(AppError::BadRequest(
            "reason must be 1 to 1000 characters".into(),
        ));
    }
    if !e.state.discardable() {
        return Err(AppError::Conflict(format!(
            "event {:?} is {}: there is nothing left to discard",
            e.event_id, e.state
        )));
    }
    state
        .store
        .discard(e.pk, reason, crate::store::now_ms())
        .await?;
    tracing::info!(event_id = %e.event_id, source = %e.source, "event discarded");
    Ok(())
}

/// Discard one event.
///
/// None of its pending links is sent for it any more (a pair another live event wants is still
/// sent for that one); its lead resolution and object creation stop. A replay brings it back.
#[utoipa::path(
    post,
    path = "/admin/events/{event_id}/discard",
    tag = "admin",
    params(("event_id" = String, Path, description = "The event id (unique per source)"), SourceQuery),
    request_body(content = DiscardRequest, content_type = "application/json",
        example = json!({"reason": "sent by mistake"})),
    responses(
        (status = 200, description = "Discarded", body = Discarded),
        (status = 400, description = "`bad_request`: a malformed path or query, or not `{\"reason\"}` with 1 to 1000 characters", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: no such event, or the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "`conflict`: the event is delivered, or several sources have an event with this id (add `?source=`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        crate::http::openapi::UnsupportedMediaType,
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn discard_event(
    State(state): State<Arc<AppState>>,
    Path(event_id): Path<String>,
    Query(q): Query<SourceQuery>,
    ApiJson(req): ApiJson<DiscardRequest>,
) -> Result<Response, AppError> {
    let e = find_one(&state, &event_id, q.source.as_deref()).await?;
    discard(&state, &e, &req.reason).await?;
    let after = find_one(&state, &event_id, Some(&e.source)).await?;
    Ok(axum::Json(Discarded {
        event_id: after.event_id,
        source: after.source,
        state: after.state,
        reason: after.reason.unwrap_or_default(),
    })
    .into_response())
}

pub fn known_source<'a>(
    state: &'a AppState,
    source: &str,
) -> Result<&'a crate::config::SourceConfig, AppError> {
    state
        .sources
        .get(source)
        .map(|e| &e.source)
        .ok_or_else(|| AppError::UnknownSource(source.to_string()))
}

/// The key as the lookup compares it (emails case-insensitively).
pub fn mapping_key(source: &crate::config::SourceConfig, key: &str) -> String {
    crate::mapping::normalize_key(key, source.lead.lookup, source.lead.field)
}

/// The lead ids a key maps to.
#[utoipa::path(
    get,
    path = "/admin/mappings/{source}/{key}",
    tag = "admin",
    params(("source" = String, Path, description = "A configured source name"),
        ("key" = String, Path, description = "The lead key (an email is compared ignoring case)"),),
    responses(
        (status = 200, description = "The mapping", body = Mapping),
        (status = 400, description = "`bad_request`: a malformed path or query", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`unknown_source`, `not_found` (no mapping for the key), or the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn get_mapping(
    State(state): State<Arc<AppState>>,
    Path((source, key)): Path<(String, String)>,
) -> Result<Response, AppError> {
    let src = known_source(&state, &source)?;
    let key = mapping_key(src, &key);
    let ids = state.store.mapping_get(&source, &key).await?;
    if ids.is_empty() {
        return Err(AppError::NotFound(format!(
            "no mapping for key {key:?} in source {source}"
        )));
    }
    Ok(axum::Json(Mapping::new(source, key, &ids)).into_response())
}

/// Set the lead ids a key maps to.
#[utoipa::path(
    put,
    path = "/admin/mappings/{source}/{key}",
    tag = "admin",
    params(("source" = String, Path, description = "A configured source name"),
        ("key" = String, Path, description = "The lead key (an email is compared ignoring case)"),),
    request_body(content = MappingRequest, content_type = "application/json",
        example = json!({"lead_ids": [17]})),
    responses(
        (status = 200, description = "The mapping as stored", body = Mapping),
        (status = 400, description = "`bad_request`: not `{\"lead_ids\": [...]}` with at least one id", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        crate::http::openapi::UnsupportedMediaType,
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`unknown_source`, or the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn put_mapping(
    State(state): State<Arc<AppState>>,
    Path((source, key)): Path<(String, String)>,
    ApiJson(req): ApiJson<MappingRequest>,
) -> Result<Response, AppError> {
    let src = known_source(&state, &source)?;
    let key = mapping_key(src, &key);
    let ids: Option<Vec<String>> = req.lead_ids.iter().map(crate::mapping::id_text).collect();
    let ids = ids
        .filter(|i| !i.is_empty())
        .ok_or_else(|| AppError::BadRequest("lead_ids must be a non-empty list of ids".into()))?;
    state.store.mapping_put(&source, &key, &ids).await?;
    Ok(axum::Json(Mapping::new(source, key, &ids)).into_response())
}

/// Remove a key's mapping.
#[utoipa::path(
    delete,
    path = "/admin/mappings/{source}/{key}",
    tag = "admin",
    params(("source" = String, Path, description = "A configured source name"),
        ("key" = String, Path, description = "The lead key (an email is compared ignoring case)"),),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "`bad_request`: a malformed path or query", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`unknown_source`, `not_found` (no mapping for the key), or the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn delete_mapping(
    State(state): State<Arc<AppState>>,
    Path((source, key)): Path<(String, String)>,
) -> Result<Response, AppError> {
    let src = known_source(&state, &source)?;
    let key = mapping_key(src, &key);
    if state.store.mapping_delete(&source, &key).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(AppError::NotFound(format!(
            "no mapping for key {key:?} in source {source}"
        )))
    }
}

/// Parses `key,lead_id` lines (an optional header row, blank lines skipped); the first bad line
/// rejects the whole file.
pub fn parse_csv(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line
            .split(',')
            .map(|f| f.trim().trim_matches('"').trim())
            .collect();
        if n == 1
            && fields.len() == 2
            && fields[0].eq_ignore_ascii_case("key")
            && fields[1].eq_ignore_ascii_case("lead_id")
        {
            continue;
        }
        match fields.as_slice() {
            [key, lead]
                if !key.is_empty()
                    && crate::mapping::id_text(&Value::String(lead.to_string())).is_some() =>
            {
                rows.push((key.to_string(), lead.to_string()))
            }
            _ => return Err(format!("line {n}: expected key,lead_id, got {line:?}")),
        }
    }
    Ok(rows)
}

/// Import many `key,lead_id` rows from CSV.
///
/// A `key,lead_id` header row is allowed and blank lines are skipped; a malformed line rejects
/// the whole file, naming its line number.
#[utoipa::path(
    post,
    path = "/admin/mappings/{source}",
    tag = "admin",
    params(("source" = String, Path, description = "A configured source name")),
    request_body(content = String, content_type = "text/csv", description = "`key,lead_id` lines",
        example = json!("key,lead_id\nann@example.com,17\n")),
    responses(
        (status = 200, description = "How many rows were imported", body = Imported),
        (status = 400, description = "`bad_request`: not text/csv, not UTF-8, or a malformed line (named)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`unknown_source`, or the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn import_mappings(
    State(state): State<Arc<AppState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<Response, AppError> {
    let src = known_source(&state, &source)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("text/csv") && !ct.starts_with("text/plain") {
        // 400, not 415: the import's documented answer before the JSON routes had one.
        return Err(AppError::BadRequest(
            "send the file as Content-Type: text/csv".into(),
        ));
    }
    let n = import_csv(&state, src, &body).await?;
    Ok(axum::Json(Imported { imported: n as u64 }).into_response())
}

/// Imports `key,lead_id` CSV into a source's mapping table (the admin API's and the
/// dashboard's upload); a malformed line rejects the whole file, naming its line.
pub async fn import_csv(
    state: &AppState,
    src: &crate::config::SourceConfig,
    body: &[u8],
) -> Result<usize, AppError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| AppError::BadRequest("the CSV is not UTF-8".into()))?;
    let rows = parse_csv(text).map_err(AppError::BadRequest)?;
    let rows: Vec<(String, String)> = rows
        .into_iter()
        .map(|(k, l)| (mapping_key(src, &k), l))
        .collect();
    Ok(state.store.mapping_import(&src.name, &rows).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses_what_it_formats_and_offsets() {
        for ms in [0, 1_767_225_600_123, 951_782_400_000, -86_400_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(
            parse_rfc3339("2026-01-01T01:00:00+01:00"),
            parse_rfc3339("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2026-01-01T01:00:00 01:00"),
            parse_rfc3339("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2025-12-31T23:30:00-00:30"),
            parse_rfc3339("2026-01-01T00:00:00.000Z")
        );
        assert_eq!(
            parse_rfc3339("2026-01-01T00:00:00.5Z"),
            Some(1_767_225_600_500)
        );
        for bad in [
            "",
            "yesterday",
            "2026-01-01",
            "2026-01-01T00:00:00",
            "2026-02-30T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00+0100",
            "2026-01-01T00:00:00Zjunk",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn csv_with_header_blank_lines_and_a_bad_line() {
        assert_eq!(
            parse_csv("key,lead_id\na@b.com,17\n\nCUST-1, 18\n").unwrap(),
            vec![
                ("a@b.com".into(), "17".into()),
                ("CUST-1".into(), "18".into())
            ]
        );
        assert_eq!(
            parse_csv("a,1\nb\nc,3").unwrap_err(),
            "line 2: expected key,lead_id, got \"b\""
        );
        assert!(parse_csv("a,1,2").unwrap_err().starts_with("line 1"));
        assert!(parse_csv(",5").is_err());
    }
}

/// The longest pause with a duration: about two years (longer: pause until resumed).
const PAUSE_MINUTES_MAX: f64 = 1_000_000.0;

/// The deployment's delivery as stored now, with this replica's view of the fleet.
pub async fn delivery(state: &AppState) -> Result<DeliveryStatus, AppError> {
    let now = crate::store::now_ms();
    let pause = state.store.delivery_pause().await?.filter(|p| p.holds(now));
    let view = state.fleet.view();
    Ok(DeliveryStatus {
        paused: pause.is_some(),
        paused_until: pause.and_then(|p| p.until).map(rfc3339),
        reason: pause.map(|p| p.reason),
        rate_limit_per_second: state.config.sprinthub.rate_limit_per_second,
        concurrency: state.config.sprinthub.concurrency as u64,
        in_flight: view.in_flight.max(0) as u64,
        replicas: view.replicas as u64,
    })
}

/// Parses the optional body of a pause: `None` for an empty body (until resumed).
pub fn pause_until(body: &[u8], now: Millis) -> Result<Option<Millis>, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let req: PauseRequest = serde_json::from_slice(body).map_err(|e| {
        AppError::BadRequest(format!("the body must be {{\"minutes\": N}} or empty: {e}"))
    })?;
    match req.minutes {
        None => Ok(None),
        Some(m) if m.is_finite() && m > 0.0 && m <= PAUSE_MINUTES_MAX => {
            Ok(Some(now.saturating_add((m * 60_000.0).round() as i64)))
        }
        Some(_) => Err(AppError::BadRequest(format!(
            "minutes must be more than 0 and at most {PAUSE_MINUTES_MAX}"
        ))),
    }
}

/// Whether delivery is paused, why and until when, and the deployment's limits.
#[utoipa::path(
    get,
    path = "/admin/delivery",
    tag = "admin",
    responses(
        (status = 200, description = "The deployment's delivery", body = DeliveryStatus),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn delivery_status(State(state): State<Arc<AppState>>) -> Result<Response, AppError> {
    Ok(axum::Json(delivery(&state).await?).into_response())
}

/// Pause delivery for the whole deployment (every replica), for `minutes` or until resumed.
///
/// Stored, so it outlives restarts. Webhooks are still accepted and queued meanwhile. For a
/// SprintHub maintenance window, or while a wrong mapping is being fixed.
#[utoipa::path(
    post,
    path = "/admin/delivery/pause",
    tag = "admin",
    request_body(content = Option<PauseRequest>, content_type = "application/json",
        description = "Optional; without it (or without `minutes`) the pause lasts until resumed",
        example = json!({"minutes": 30})),
    responses(
        (status = 200, description = "Paused; the deployment's delivery now", body = DeliveryStatus),
        (status = 400, description = "`bad_request`: a body other than `{\"minutes\": N}` with 0 < N <= 1000000", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn pause_delivery(
    State(state): State<Arc<AppState>>,
    ApiBytes(body): ApiBytes,
) -> Result<Response, AppError> {
    let until = pause_until(&body, crate::store::now_ms())?;
    state.fleet.pause(until).await?;
    tracing::warn!(until = until.map(rfc3339), "delivery paused by an operator");
    Ok(axum::Json(delivery(&state).await?).into_response())
}

/// Resume delivery (after an operator's pause or a throttling pause).
#[utoipa::path(
    post,
    path = "/admin/delivery/resume",
    tag = "admin",
    responses(
        (status = 200, description = "Running; the deployment's delivery now", body = DeliveryStatus),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: the admin API is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []))
)]
async fn resume_delivery(State(state): State<Arc<AppState>>) -> Result<Response, AppError> {
    state.fleet.resume().await?;
    state.wake.notify_one();
    tracing::info!("delivery resumed by an operator");
    Ok(axum::Json(delivery(&state).await?).into_response())
}
