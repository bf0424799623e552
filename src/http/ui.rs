//! The dashboard at `/ui`: server-rendered HTML over the admin API's data, no JavaScript and no
//! build step. Every dynamic value goes through `esc` (HTML) or `pct` (URL).
//!
//! Access is the admin token, either as `Authorization: Bearer` (scripts) or through the login
//! form, which sets a session cookie. The cookie never holds the token, nor anything derived
//! from it: it names a session kept server side (`crate::http::auth::Sessions`, keyed by a random
//! per-process secret), which ends when it expires, at logout, or when the process restarts.
//! Failed token checks are throttled per client address like the admin API's. Forms that change
//! something carry a CSRF token derived from the session, compared in constant time; the cookie
//! is also `SameSite=Strict`, and a session's POST that the browser marks as not same-origin
//! (`Sec-Fetch-Site`) is refused. POSTs are authenticated before their body is read, and form
//! bodies are capped at 8 KiB. Like the admin API, the dashboard answers 404 when no admin token
//! is configured.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::AppState;
use crate::http::admin::{self, ListQuery, SourceQuery, check_token};
use crate::http::auth::{Peer, SESSION_SECONDS};
use crate::http::error::AppError;
use crate::store::{
    Attempt, EventFilter, EventPk, EventState, EventSummary, LinkDetail, LinkPage, LinkState,
    Millis, now_ms,
};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "sprintlink_ui";
/// The most a dashboard form (login, logout, replay) may send.
const FORM_MAX_BYTES: usize = 8 * 1024;

/// The dashboard's routes with their OpenAPI descriptions, behind `guard`.
pub fn routes(state: Arc<AppState>) -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(overview))
        .routes(routes!(events_page))
        .routes(routes!(event_page))
        .routes(routes!(replay_action))
        .routes(routes!(pause_action))
        .routes(routes!(resume_action))
        .routes(routes!(bulk_action))
        .routes(routes!(mappings_page))
        .routes(routes!(mapping_set))
        .routes(routes!(mapping_delete))
        .routes(routes!(mapping_upload))
        .routes(routes!(login_page, login_submit))
        .routes(routes!(logout))
        .route_layer(middleware::from_fn_with_state(state, guard))
}

/// Off (404) without an admin token; browser hardening headers on every answer.
async fn guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.config.admin.token.is_empty() {
        return AppError::NotFound("the dashboard is off: set admin.token to enable it".into())
            .into_response();
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let csp = format!(
        "default-src 'none'; style-src '{}'; img-src data:; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
        style_hash()
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

// ------------------------------------------------------------------ authentication

/// How a request proved it holds the admin token.
enum Who {
    /// `Authorization: Bearer <token>`: no CSRF possible, none required.
    Bearer,
    /// A live session: its cookie value and the CSRF token of its forms.
    Session { value: String, csrf: String },
}

impl Who {
    fn csrf(&self) -> Option<&str> {
        match self {
            Who::Bearer => None,
            Who::Session { csrf, .. } => Some(csrf),
        }
    }
}

fn csrf_ok(who: &Who, presented: Option<&str>) -> bool {
    match who {
        Who::Bearer => true,
        Who::Session { csrf, .. } => {
            let presented = presented.unwrap_or("");
            bool::from(csrf.as_bytes().ct_eq(presented.as_bytes()))
        }
    }
}

/// A session's POST that the browser itself marks as coming from another origin: refused before
/// its body is read (browsers that send no `Sec-Fetch-Site` rely on the CSRF token alone).
fn cross_site(who: &Who, headers: &HeaderMap) -> bool {
    matches!(who, Who::Session { .. })
        && headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.eq_ignore_ascii_case("same-origin"))
}

/// Reads a form body of at most `FORM_MAX_BYTES`.
async fn read_form(headers: &HeaderMap, body: Body) -> Result<Vec<(String, String)>, AppError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > FORM_MAX_BYTES as u64) {
        return Err(AppError::PayloadTooLarge(FORM_MAX_BYTES));
    }
    let raw = axum::body::to_bytes(body, FORM_MAX_BYTES)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                AppError::PayloadTooLarge(FORM_MAX_BYTES)
            } else {
                AppError::BadRequest(format!("could not read the form: {e}"))
            }
        })?;
    Ok(form_fields(&raw))
}

fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
}

/// Who is asking: `Ok(None)` when nobody is signed in, `Err` when a bearer token is wrong (or
/// the address is throttled).
fn who(state: &AppState, headers: &HeaderMap, peer: Peer) -> Result<Option<Who>, AppError> {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let presented = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        return check_token(state, peer, presented).map(|()| Some(Who::Bearer));
    }
    let now_s = now_ms() / 1000;
    let sessions = &state.auth.sessions;
    Ok(cookies(headers)
        .filter(|(k, _)| *k == SESSION_COOKIE)
        .find(|(_, v)| sessions.valid(v, now_s))
        .map(|(_, v)| Who::Session {
            value: v.to_string(),
            csrf: sessions.csrf(v),
        }))
}

/// Why a dashboard request cannot go on.
enum Denied {
    /// Nobody is signed in: to the login page, then back to this path.
    Login(String),
    Error(AppError),
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Denied::Login(back) => see_other(&format!("/ui/login?next={}", pct(&back))),
            Denied::Error(e) => e.into_response(),
        }
    }
}

/// The signed-in caller, or why not.
fn gate(state: &AppState, headers: &HeaderMap, uri: &Uri, peer: Peer) -> Result<Who, Denied> {
    match who(state, headers, peer) {
        Ok(Some(w)) => Ok(w),
        Ok(None) => Err(Denied::Login(
            uri.path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/ui")
                .to_string(),
        )),
        Err(e) => Err(Denied::Error(e)),
    }
}

fn behind_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// `Secure` unless `admin.secure_cookies = false`, and always behind an https proxy.
fn secure_cookie(state: &AppState, headers: &HeaderMap) -> bool {
    state.config.admin.secure_cookies || behind_https(headers)
}

fn session_cookie(value: &str, max_age: i64, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={value}; Path=/ui; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Where to go after logging in: only a path of the dashboard itself.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.len() <= 1024
                && (n == "/ui" || n.starts_with("/ui/") || n.starts_with("/ui?"))
                && !n.contains("//")
                && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') =>
        {
            n
        }
        _ => "/ui",
    }
}

// ------------------------------------------------------------------ small helpers

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters: safe in a path segment and in
/// a query value.
pub fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes `application/x-www-form-urlencoded` bytes (`+` is a space; a bad escape is kept).
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    fn decode(raw: &[u8]) -> String {
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'+' => out.push(b' '),
                b'%' => match raw
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                {
                    Some(h) => {
                        let hex = std::str::from_utf8(h).unwrap_or("00");
                        out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                        i += 2;
                    }
                    None => out.push(b'%'),
                },
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.iter().position(|b| *b == b'=') {
            Some(i) => (decode(&pair[..i]), decode(&pair[i + 1..])),
            None => (decode(pair), String::new()),
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn see_other(location: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

/// `2025-11-29 08:06:01 UTC`.
fn when(ms: Millis) -> String {
    let r = admin::rfc3339(ms);
    format!("{} {} UTC", &r[..10], &r[11..19])
}

/// `12 s ago`, `in 3 min`.
fn relative(ms: Millis, now: Millis) -> String {
    let d = (now - ms) / 1000;
    let a = d.abs();
    let amount = if a < 5 {
        return "just now".into();
    } else if a < 60 {
        format!("{a} s")
    } else if a < 3600 {
        format!("{} min", a / 60)
    } else if a < 86_400 {
        format!("{} h", a / 3600)
    } else {
        format!("{} d", a / 86_400)
    };
    if d >= 0 {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

fn time_tag(ms: Millis, now: Millis) -> String {
    let r = admin::rfc3339(ms);
    format!(
        "<time datetime=\"{r}\" title=\"{r}\">{}</time> <span class=\"muted\">{}</span>",
        when(ms),
        relative(ms, now)
    )
}

/// A coloured badge for a state; the CSS class comes from the state, never from a value.
fn badge(text: &str, class: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", esc(text))
}

fn event_badge(s: EventState) -> String {
    let class = match s {
        EventState::Queued => "b-blue",
        EventState::Delivered => "b-green",
        EventState::Parked => "b-amber",
        EventState::Dead => "b-red",
        EventState::Discarded => "b-grey",
    };
    badge(s.as_str(), class)
}

fn link_badge(s: LinkState) -> String {
    let class = match s {
        LinkState::Pending => "b-blue",
        LinkState::Linked => "b-green",
        LinkState::Dead => "b-red",
    };
    badge(s.as_str(), class)
}

fn status_badge(code: Option<i64>) -> String {
    match code {
        Some(c) => {
            let class = match c {
                200..=299 => "b-green",
                400..=499 => "b-red",
                _ => "b-amber",
            };
            format!("<span class=\"badge mono {class}\">HTTP {c}</span>")
        }
        None => "<span class=\"badge b-grey\">no answer</span>".into(),
    }
}

fn event_href(e: &EventSummary) -> String {
    format!("/ui/events/{}?source={}", pct(&e.event_id), pct(&e.source))
}

// ------------------------------------------------------------------ layout

const CSS: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2937;background:#f4f5f7}
a{color:#1d4ed8;text-decoration:none}a:hover{text-decoration:underline}
.wrap{max-width:1120px;margin:0 auto;padding:0 24px}
header.top{background:#111827;color:#e5e7eb}
header.top .wrap{display:flex;align-items:center;gap:28px;height:56px}
.brand{color:#fff;font-weight:700;font-size:17px;letter-spacing:.2px}
.brand span{color:#60a5fa}
nav{display:flex;gap:4px;flex:1}
nav a{color:#d1d5db;padding:6px 12px;border-radius:6px}
nav a:hover{background:#1f2937;text-decoration:none;color:#fff}
nav a.active{background:#374151;color:#fff}
.who{color:#9ca3af;font-size:13px;display:flex;align-items:center;gap:12px}
.who form{margin:0}
main.wrap{padding-top:28px;padding-bottom:40px}
h1{font-size:22px;margin:0 0 18px;display:flex;align-items:center;gap:12px;flex-wrap:wrap}
h2{font-size:16px;margin:28px 0 12px}
.muted{color:#6b7280}
.mono,code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:13px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:18px 20px}
.cards{display:grid;grid-template-columns:repeat(5,1fr);gap:16px}
.stat{display:block;color:inherit}
.stat:hover{text-decoration:none;border-color:#93c5fd}
.stat .n{font-size:30px;font-weight:700;margin-top:6px}
.facts{display:flex;gap:28px;flex-wrap:wrap;margin-top:16px}
.facts b{font-size:16px}
table{width:100%;border-collapse:collapse;background:#fff;border:1px solid #e5e7eb;border-radius:10px;overflow:hidden}
th{text-align:left;font-size:12px;text-transform:uppercase;letter-spacing:.4px;color:#6b7280;background:#f9fafb;font-weight:600}
th,td{padding:9px 14px;border-bottom:1px solid #eef0f3;vertical-align:top}
tr:last-child td{border-bottom:0}
tbody tr:hover{background:#f9fafb}
td.reason{color:#6b7280;max-width:320px}
.badge{display:inline-block;padding:1px 10px;border-radius:999px;font-size:12px;font-weight:600;line-height:20px;white-space:nowrap}
.b-blue{background:#dbeafe;color:#1e40af}.b-green{background:#dcfce7;color:#166534}
.b-amber{background:#fef3c7;color:#92400e}.b-red{background:#fee2e2;color:#991b1b}.b-grey{background:#e5e7eb;color:#374151}
h1 .badge{font-size:13px;padding:3px 12px}
h1 .mono{font-size:19px;font-weight:600}
.filters{display:flex;gap:12px;align-items:end;margin-bottom:16px;flex-wrap:wrap}
.filters button{height:36px;padding-top:0;padding-bottom:0}
label{display:block;font-size:12px;color:#6b7280;margin-bottom:4px}
select,input[type=password],input[type=text],input[type=file]{font:inherit;height:36px;padding:0 10px;border:1px solid #d1d5db;border-radius:6px;background:#fff;min-width:160px}
button,.btn{font:inherit;font-weight:600;padding:7px 16px;border-radius:6px;border:1px solid #1d4ed8;background:#2563eb;color:#fff;cursor:pointer}
button:hover{background:#1d4ed8}
button.ghost{background:transparent;border-color:#4b5563;color:#d1d5db;padding:4px 12px;font-weight:500}
button.ghost:hover{background:#1f2937}
a.btn-light{display:inline-block;padding:7px 14px;border:1px solid #d1d5db;border-radius:6px;background:#fff;color:#374151;font-weight:500}
.pager{display:flex;justify-content:space-between;margin-top:14px}
dl{display:grid;grid-template-columns:140px 1fr;gap:8px 16px;margin:0}
dt{color:#6b7280}dd{margin:0;word-break:break-all}
.actions{display:flex;gap:10px;align-items:center}.actions form{margin:0}
.head{display:flex;justify-content:space-between;align-items:flex-start;gap:16px}
button.danger{background:#fff;border-color:#fca5a5;color:#991b1b;padding:3px 10px;font-weight:500}
button.danger:hover{background:#fef2f2}
.notice{background:#ecfdf5;border:1px solid #a7f3d0;color:#065f46;border-radius:8px;padding:10px 14px;margin-bottom:18px}
.error{background:#fef2f2;border:1px solid #fecaca;color:#991b1b;border-radius:8px;padding:10px 14px;margin-bottom:14px}
.link{margin-bottom:16px}
.link-head{display:flex;align-items:center;gap:12px;flex-wrap:wrap;margin-bottom:10px}
.timeline{list-style:none;margin:0;padding:0 0 0 18px;border-left:2px solid #e5e7eb}
.timeline li{position:relative;padding:2px 0 14px 14px}
.timeline li:last-child{padding-bottom:2px}
.timeline li::before{content:"";position:absolute;left:-25px;top:7px;width:12px;height:12px;border-radius:50%;background:#9ca3af;border:2px solid #fff}
.timeline li.ok::before{background:#16a34a}.timeline li.fail::before{background:#dc2626}.timeline li.retry::before{background:#d97706}
.t-head{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.t-error{color:#991b1b;margin-top:4px}
pre{background:#f8fafc;border:1px solid #e5e7eb;border-radius:8px;padding:12px 14px;overflow:auto;max-height:420px;margin:6px 0 0;white-space:pre-wrap;word-break:break-all}
.login{max-width:380px;margin:80px auto}
.login h1{justify-content:center}
.login input{width:100%;margin-bottom:14px}
.login button{width:100%}
footer{color:#9ca3af;font-size:12px;padding-bottom:28px}
footer a{color:#6b7280}
@media (max-width:760px){.cards{grid-template-columns:repeat(2,1fr)}dl{grid-template-columns:1fr}}
"#;

/// The CSP source for the inline stylesheet.
fn style_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let digest = Sha256::digest(CSS.as_bytes());
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tab {
    Overview,
    Events,
    Dead,
    Parked,
    Mappings,
    None,
}

fn page(title: &str, tab: Tab, who: Option<&Who>, content: &str) -> String {
    let nav_item = |t: Tab, href: &str, label: &str| {
        format!(
            "<a href=\"{href}\"{}>{label}</a>",
            if t == tab { " class=\"active\"" } else { "" }
        )
    };
    let header = match who {
        Some(w) => {
            let account = match w {
                Who::Bearer => "<span>signed in with a bearer token</span>".to_string(),
                Who::Session { .. } => format!(
                    "<form method=\"post\" action=\"/ui/logout\">{}<button class=\"ghost\" id=\"logout\" type=\"submit\">Log out</button></form>",
                    csrf_field(w)
                ),
            };
            format!(
                "<nav>{}{}{}{}{}</nav><div class=\"who\">{account}</div>",
                nav_item(Tab::Overview, "/ui", "Overview"),
                nav_item(Tab::Events, "/ui/events", "Events"),
                nav_item(Tab::Dead, "/ui/events?state=dead", "Dead"),
                nav_item(Tab::Parked, "/ui/events?state=parked", "Parked"),
                nav_item(Tab::Mappings, "/ui/mappings", "Mappings"),
            )
        }
        None => String::new(),
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · sprintlink</title><link rel=\"icon\" href=\"data:,\"><style>{CSS}</style></head>\
         <body><header class=\"top\"><div class=\"wrap\"><a class=\"brand\" href=\"/ui\">sprint<span>link</span></a>{header}</div></header>\
         <main class=\"wrap\">{content}</main>\
         <footer class=\"wrap\">sprintlink {} · <a href=\"/openapi.json\">OpenAPI</a> · <a href=\"/metrics\">metrics</a></footer>\
         </body></html>\n",
        esc(title),
        env!("CARGO_PKG_VERSION"),
    )
}

fn csrf_field(who: &Who) -> String {
    match who.csrf() {
        Some(t) => format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(t)),
        None => String::new(),
    }
}

/// The events as a table; with `select`, a checkbox per row (inside the bulk form).
fn events_table(events: &[EventSummary], now: Millis, select: bool) -> String {
    if events.is_empty() {
        return "<div class=\"card muted\">No events.</div>".into();
    }
    let mut t = format!(
        "<table id=\"events\"><thead><tr>{}<th>Received</th><th>Event</th><th>Source</th>\
         <th>Type</th><th>Object</th><th>State</th><th>Reason</th></tr></thead><tbody>",
        if select { "<th></th>" } else { "" }
    );
    for e in events {
        let check = if select {
            format!(
                "<td><input type=\"checkbox\" name=\"pk\" value=\"{}\" class=\"select\" \
                 aria-label=\"select {}\"></td>",
                e.pk,
                esc(&e.event_id)
            )
        } else {
            String::new()
        };
        let _ = write!(
            t,
            "<tr>{check}<td>{}</td><td><a class=\"mono\" href=\"{}\">{}</a></td><td>{}</td>\
             <td class=\"mono\">{}</td><td class=\"mono\">{}</td><td>{}</td><td class=\"reason\">{}</td></tr>",
            time_tag(e.received_at, now),
            esc(&event_href(e)),
            esc(&e.event_id),
            esc(&e.source),
            esc(e.event_type.as_deref().unwrap_or("")),
            esc(e.object_id.as_ref().map_or("–", |o| o.as_str())),
            event_badge(e.state),
            esc(e.reason.as_deref().unwrap_or("")),
        );
    }
    t.push_str("</tbody></table>");
    t
}

// ------------------------------------------------------------------ pages

/// Dashboard overview: counts by state and the latest events.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "dashboard",
    responses(
        (status = 200, description = "The overview page", content_type = "text/html", body = String),
        (status = 303, description = "Not signed in: to `/ui/login`", headers(("Location" = String))),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: the dashboard is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn overview(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let who = match gate(&state, &headers, &uri, peer) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let stats = match state.store.stats().await {
        Ok(s) => s,
        Err(e) => return AppError::from(e).into_response(),
    };
    let recent = match state
        .store
        .list_events(&EventFilter {
            limit: 10,
            ..Default::default()
        })
        .await
    {
        Ok(r) => r,
        Err(e) => return AppError::from(e).into_response(),
    };
    fn count<S: PartialEq>(list: &[(S, i64)], s: S) -> i64 {
        list.iter()
            .find(|(k, _)| *k == s)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }
    let mut c = String::from("<h1>Overview</h1><div class=\"cards\">");
    for s in EventState::ALL {
        let _ = write!(
            c,
            "<a class=\"card stat\" id=\"count-{s}\" href=\"/ui/events?state={s}\">{}<div class=\"n\">{}</div></a>",
            event_badge(s),
            count(&stats.events_by_state, s)
        );
    }
    let _ = write!(
        c,
        "</div><div class=\"facts card\"><span class=\"muted\">Links</span>\
         <span><b>{}</b> pending</span><span><b>{}</b> linked</span><span><b>{}</b> dead</span>\
         <span class=\"muted\">Queue depth</span><span><b>{}</b></span>\
         <span class=\"muted\">Sources</span><span class=\"mono\">{}</span></div>",
        count(&stats.links_by_state, LinkState::Pending),
        count(&stats.links_by_state, LinkState::Linked),
        count(&stats.links_by_state, LinkState::Dead),
        stats.queue_depth,
        esc(&source_names(&state).join(", ")),
    );
    match admin::delivery(&state).await {
        Ok(d) => c.push_str(&delivery_card(&d, &who)),
        Err(e) => return e.into_response(),
    }
    c.push_str("<h2>Latest events</h2>");
    c.push_str(&events_table(&recent, now_ms(), false));
    c.push_str(
        "<div class=\"pager\"><span></span><a class=\"btn-light\" href=\"/ui/events\">All events →</a></div>",
    );
    html(
        StatusCode::OK,
        page("Overview", Tab::Overview, Some(&who), &c),
    )
}

fn source_names(state: &AppState) -> Vec<&str> {
    let mut names: Vec<&str> = state.sources.keys().map(String::as_str).collect();
    names.sort_unstable();
    names
}

/// Dashboard event list, filtered like `GET /admin/events`, newest first, with bulk replay and
/// discard of the selected events.
#[utoipa::path(
    get,
    path = "/ui/events",
    tag = "dashboard",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of events", content_type = "text/html", body = String),
        (status = 303, description = "Not signed in: to `/ui/login`", headers(("Location" = String))),
        (status = 400, description = "`bad_request`: a bad state, limit, cursor or RFC 3339 time", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: the dashboard is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn events_page(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let who = match gate(&state, &headers, &uri, peer) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return AppError::BadRequest(e.body_text()).into_response(),
    };
    let filter = match admin::filter_from(&q) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let events = match state.store.list_events(&filter).await {
        Ok(e) => e,
        Err(e) => return AppError::from(e).into_response(),
    };
    let next_cursor = (events.len() as i64 == filter.limit)
        .then(|| events.last().map(|e| e.pk.to_string()))
        .flatten();
    let source_sel = filter.source.as_deref().unwrap_or("");
    let tab = match filter.state {
        Some(EventState::Dead) => Tab::Dead,
        Some(EventState::Parked) => Tab::Parked,
        _ => Tab::Events,
    };
    let title = match filter.state {
        None => "Events".to_string(),
        Some(s) => format!("Events: {s}"),
    };
    let mut c = format!("<h1>{}</h1>", esc(&title));
    c.push_str("<form class=\"filters\" method=\"get\" action=\"/ui/events\"><div><label for=\"state\">State</label><select id=\"state\" name=\"state\"><option value=\"\">any</option>");
    for s in EventState::ALL {
        let _ = write!(
            c,
            "<option value=\"{s}\"{}>{s}</option>",
            if Some(s) == filter.state {
                " selected"
            } else {
                ""
            }
        );
    }
    c.push_str("</select></div><div><label for=\"source\">Source</label><select id=\"source\" name=\"source\"><option value=\"\">any</option>");
    let mut names = source_names(&state);
    if !source_sel.is_empty() && !names.contains(&source_sel) {
        names.push(source_sel);
    }
    for s in names {
        let _ = write!(
            c,
            "<option value=\"{0}\"{1}>{0}</option>",
            esc(s),
            if s == source_sel { " selected" } else { "" }
        );
    }
    c.push_str("</select></div>");
    let text_fields = [
        ("object_id", "Object id", &filter.object_id, ""),
        ("lead_id", "Lead id", &filter.lead_id, ""),
        ("q", "Event id prefix or lead key", &filter.q, ""),
    ];
    for (name, label, value, hint) in text_fields {
        let _ = write!(
            c,
            "<div><label for=\"{name}\">{label}</label><input type=\"text\" id=\"{name}\" name=\"{name}\" value=\"{}\" placeholder=\"{hint}\"></div>",
            esc(value.as_deref().unwrap_or(""))
        );
    }
    // The times as typed (they were valid RFC 3339, or the page would be a 400).
    for (name, label, value) in [
        ("since", "Received since", &q.since),
        ("until", "Received before", &q.until),
    ] {
        let _ = write!(
            c,
            "<div><label for=\"{name}\">{label}</label><input type=\"text\" id=\"{name}\" name=\"{name}\" value=\"{}\" placeholder=\"2026-01-02T03:04:05Z\"></div>",
            esc(value.as_deref().unwrap_or("").trim())
        );
    }
    c.push_str("<div><button type=\"submit\" id=\"filter\">Filter</button></div></form>");
    if let Some(n) = notice(&uri) {
        let _ = write!(
            c,
            "<div class=\"notice\" id=\"bulk-notice\">{}</div>",
            esc(&n)
        );
    }
    let back = uri
        .path_and_query()
        .map_or("/ui/events".to_string(), |p| without_notice(p.as_str()));
    if !events.is_empty() {
        let _ = write!(
            c,
            "<form method=\"post\" action=\"/ui/events/bulk\" id=\"bulk\">{}\
             <input type=\"hidden\" name=\"back\" value=\"{}\">\
             <div class=\"filters\"><div><label for=\"reason\">Reason (discard)</label>\
             <input type=\"text\" id=\"reason\" name=\"reason\" placeholder=\"discarded from the dashboard\"></div>\
             <div><button type=\"submit\" name=\"action\" value=\"replay\" id=\"bulk-replay\">Replay selected</button></div>\
             <div><button type=\"submit\" name=\"action\" value=\"discard\" id=\"bulk-discard\">Discard selected</button></div></div>",
            csrf_field(&who),
            esc(&back)
        );
    }
    c.push_str(&events_table(&events, now_ms(), true));
    if !events.is_empty() {
        c.push_str("</form>");
    }
    let mut keep = format!(
        "state={}&source={}",
        pct(filter.state.map_or("", EventState::as_str)),
        pct(source_sel)
    );
    for (name, value) in [
        ("object_id", &filter.object_id),
        ("lead_id", &filter.lead_id),
        ("q", &filter.q),
        ("since", &q.since),
        ("until", &q.until),
    ] {
        if let Some(v) = value.as_deref().filter(|v| !v.trim().is_empty()) {
            let _ = write!(keep, "&{name}={}", pct(v.trim()));
        }
    }
    if let Some(l) = q.limit {
        let _ = write!(keep, "&limit={l}");
    }
    let first = if filter.before.is_some() {
        format!(
            "<a class=\"btn-light\" href=\"{}\">← Newest</a>",
            esc(&format!("/ui/events?{keep}"))
        )
    } else {
        "<span></span>".into()
    };
    let older = match next_cursor {
        Some(cur) => format!(
            "<a class=\"btn-light\" id=\"older\" href=\"{}\">Older →</a>",
            esc(&format!("/ui/events?{keep}&cursor={}", pct(&cur)))
        ),
        None => "<span></span>".into(),
    };
    let _ = write!(c, "<div class=\"pager\">{first}{older}</div>");
    html(StatusCode::OK, page(&title, tab, Some(&who), &c))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventPageQuery {
    /// The event's source, when two sources have an event with this id.
    source: Option<String>,
    /// Show the "replayed" notice.
    replayed: Option<bool>,
}

/// Dashboard view of one event: its fields, links and every attempt, and a replay button.
#[utoipa::path(
    get,
    path = "/ui/events/{event_id}",
    tag = "dashboard",
    params(
        ("event_id" = String, Path, description = "The event id (unique per source)"),
        EventPageQuery,
    ),
    responses(
        (status = 200, description = "The event page", content_type = "text/html", body = String),
        (status = 303, description = "Not signed in: to `/ui/login`", headers(("Location" = String))),
        (status = 400, description = "`bad_request`: a malformed query", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: no such event, or the dashboard is off", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "`conflict`: several sources have an event with this id; add `?source=`", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn event_page(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    event_id: Result<Path<String>, PathRejection>,
    q: Result<Query<EventPageQuery>, QueryRejection>,
) -> Response {
    let who = match gate(&state, &headers, &uri, peer) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let (event_id, q) = match (event_id, q) {
        (Ok(Path(id)), Ok(Query(q))) => (id, q),
        (Err(e), _) => return AppError::BadRequest(e.body_text()).into_response(),
        (_, Err(e)) => return AppError::BadRequest(e.body_text()).into_response(),
    };
    let source = q.source.as_deref().filter(|s| !s.is_empty());
    let e = match admin::find_one(&state, &event_id, source).await {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let detail = match state.store.event_detail(e.pk, LinkPage::default()).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            return AppError::NotFound(format!("no event with id {event_id:?}")).into_response();
        }
        Err(e) => return AppError::from(e).into_response(),
    };
    let now = now_ms();
    let s = &detail.summary;
    let mut c = String::new();
    let _ = write!(
        c,
        "<div class=\"head\"><h1>Event <span class=\"mono\" id=\"event-id\">{}</span>\
         <span id=\"event-state\">{}</span></h1>\
         <div class=\"actions\"><form method=\"post\" action=\"{}\">{}<button id=\"replay\" type=\"submit\">Replay</button></form>{}</div></div>",
        esc(&s.event_id),
        event_badge(s.state),
        esc(&format!(
            "/ui/events/{}/replay?source={}",
            pct(&s.event_id),
            pct(&s.source)
        )),
        csrf_field(&who),
        if s.state.discardable() && s.state != EventState::Discarded {
            // The bulk action with this one event, back to this page.
            format!(
                "<form method=\"post\" action=\"/ui/events/bulk\">{}\
                 <input type=\"hidden\" name=\"pk\" value=\"{}\">\
                 <input type=\"hidden\" name=\"back\" value=\"{}\">\
                 <button id=\"discard\" class=\"danger\" type=\"submit\" name=\"action\" value=\"discard\">Discard</button></form>",
                csrf_field(&who),
                s.pk,
                esc(&format!(
                    "/ui/events/{}?source={}",
                    pct(&s.event_id),
                    pct(&s.source)
                )),
            )
        } else {
            String::new()
        },
    );
    if q.replayed == Some(true) {
        c.push_str(
            "<div class=\"notice\" id=\"notice\">Replayed: the event was mapped again with today's \
             configuration, and every link not yet linked is queued.</div>",
        );
    }
    let _ = write!(
        c,
        "<div class=\"card\"><dl><dt>Source</dt><dd>{}</dd><dt>Type</dt><dd class=\"mono\">{}</dd>\
         <dt>Object id</dt><dd class=\"mono\">{}</dd><dt>Received</dt><dd>{}</dd>",
        esc(&s.source),
        esc(s.event_type.as_deref().unwrap_or("–")),
        esc(s.object_id.as_ref().map_or("–", |o| o.as_str())),
        time_tag(s.received_at, now),
    );
    if let Some(r) = &s.reason {
        let _ = write!(c, "<dt>Reason</dt><dd id=\"reason\">{}</dd>", esc(r));
    }
    c.push_str("</dl></div>");
    if let Some(o) = &detail.object {
        c.push_str(&object_card(o, now));
    }
    let _ = write!(c, "<h2>Links ({})</h2>", detail.links.len());
    if detail.links.is_empty() {
        c.push_str("<div class=\"card muted\">No links: the event is parked or its leads are not resolved yet.</div>");
    }
    for l in &detail.links {
        c.push_str(&link_card(l, now));
    }
    if detail.more_links_after.is_some() {
        let _ = write!(
            c,
            "<div class=\"card muted\" id=\"more-links\">Only the first {} links are shown; \
             <code>GET /admin/events/{{event_id}}?links_cursor=</code> pages through the rest.</div>",
            detail.links.len()
        );
    }
    // The body exactly as received (bytes that are not UTF-8 as U+FFFD), with its type; or
    // that retention removed it.
    if let Some(at) = detail.body_removed_at {
        let _ = write!(
            c,
            "<h2>Body</h2><div class=\"card muted\" id=\"body-removed\">Body removed by retention \
             (<code>retention.bodies</code>) {}.</div>",
            time_tag(at, now)
        );
    } else {
        let _ = write!(
            c,
            "<h2>Body</h2><p class=\"muted\">Content-Type: <code id=\"content-type\">{}</code></p><pre id=\"body\">{}</pre>",
            esc(detail
                .request
                .content_type
                .as_deref()
                .unwrap_or("none (read as JSON)")),
            esc(&detail.request.body_text())
        );
    }
    html(
        StatusCode::OK,
        page(&format!("Event {}", s.event_id), Tab::None, Some(&who), &c),
    )
}

/// The object sprintlink creates for the event: its id once created, and each attempt with
/// its outcome (`unknown`: sent, answer lost).
fn object_card(o: &crate::store::ObjectDetail, now: Millis) -> String {
    use crate::store::{CreationOutcome, ObjectState};
    let class = match o.state {
        ObjectState::Pending => "b-blue",
        ObjectState::Created => "b-green",
        ObjectState::Dead => "b-red",
    };
    let mut c = format!(
        "<h2>Object</h2><div class=\"card link\" id=\"object\"><div class=\"link-head\"><span>definition <b class=\"mono\">{}</b> → object <b class=\"mono\" id=\"object-id\">{}</b></span>{}",
        esc(&o.definition_id),
        esc(o
            .object_id
            .as_ref()
            .map_or("not created yet", |o| o.as_str())),
        badge(o.state.as_str(), class),
    );
    if let (Some(at), ObjectState::Pending) = (o.next_attempt_at, o.state) {
        let next = if at <= now + 5_000 {
            "due now".to_string()
        } else {
            relative(at, now)
        };
        let _ = write!(c, "<span class=\"muted\">next attempt {next}</span>");
    }
    c.push_str("</div>");
    if o.attempts.is_empty() {
        c.push_str("<div class=\"muted\">No creation attempts yet.</div>");
    } else {
        c.push_str("<ol class=\"timeline\">");
        for a in &o.attempts {
            let item = attempt_item(&a.attempt, now);
            let class = match a.outcome {
                CreationOutcome::Created => "b-green",
                CreationOutcome::Failed => "b-red",
                CreationOutcome::Unknown => "b-amber",
            };
            let outcome = badge(a.outcome.as_str(), class);
            c.push_str(&item.replacen(
                "<div class=\"t-head\">",
                &format!("<div class=\"t-head\">{outcome}"),
                1,
            ));
        }
        c.push_str("</ol>");
    }
    c.push_str("</div>");
    c
}

fn link_card(l: &LinkDetail, now: Millis) -> String {
    let mut c = format!(
        "<div class=\"card link\"><div class=\"link-head\"><span>object <b class=\"mono\">{}</b> → lead <b class=\"mono\">{}</b></span>{}",
        esc(l.object_id.as_str()),
        esc(l.lead_id.as_str()),
        link_badge(l.state),
    );
    if let (Some(at), LinkState::Pending) = (l.next_attempt_at, l.state) {
        let next = if at <= now + 5_000 {
            "due now".to_string()
        } else {
            relative(at, now)
        };
        let _ = write!(
            c,
            "<span class=\"muted\" title=\"{}\">next attempt {next}</span>",
            admin::rfc3339(at)
        );
    }
    let _ = write!(
        c,
        "<span class=\"muted\">{} attempt{}</span></div>",
        l.attempts.len(),
        if l.attempts.len() == 1 { "" } else { "s" }
    );
    if l.attempts.is_empty() {
        c.push_str("<div class=\"muted\">No attempts yet.</div>");
    } else {
        c.push_str("<ol class=\"timeline\">");
        for a in &l.attempts {
            c.push_str(&attempt_item(a, now));
        }
        c.push_str("</ol>");
    }
    c.push_str("</div>");
    c
}

fn attempt_item(a: &Attempt, now: Millis) -> String {
    let class = match a.status_code {
        Some(200..=299) => "ok",
        Some(400..=499) if !matches!(a.status_code, Some(401 | 403 | 408 | 425 | 429)) => "fail",
        _ => "retry",
    };
    let mut c = format!(
        "<li class=\"{class}\"><div class=\"t-head\">{}{}<span class=\"muted\">{} ms</span></div>",
        status_badge(a.status_code),
        time_tag(a.at, now),
        a.duration_ms
    );
    if let Some(e) = &a.error {
        let _ = write!(c, "<div class=\"t-error\">{}</div>", esc(e));
    }
    if let Some(x) = a.response_excerpt.as_deref().filter(|x| !x.is_empty()) {
        let _ = write!(c, "<pre class=\"excerpt\">{}</pre>", esc(x));
    }
    c.push_str("</li>");
    c
}

/// The deployment's delivery: running or paused (why, until when), its limits, and the button
/// that changes it.
fn delivery_card(d: &crate::http::bodies::DeliveryStatus, who: &Who) -> String {
    let state = if d.paused {
        let why = d.reason.map_or("", |r| r.as_str());
        let until = d
            .paused_until
            .as_deref()
            .map_or("until resumed".to_string(), |u| format!("until {}", esc(u)));
        format!(
            "{} <span id=\"delivery-reason\">{}</span> <span class=\"muted\">{}</span>",
            badge("paused", "b-amber"),
            esc(why),
            until
        )
    } else {
        badge("running", "b-green")
    };
    let rate = if d.rate_limit_per_second > 0.0 {
        format!("{}/s", d.rate_limit_per_second)
    } else {
        "unlimited".into()
    };
    let action = if d.paused {
        format!(
            "<form method=\"post\" action=\"/ui/delivery/resume\">{}<button id=\"resume\" type=\"submit\">Resume delivery</button></form>",
            csrf_field(who)
        )
    } else {
        format!(
            "<form method=\"post\" action=\"/ui/delivery/pause\">{}\
             <label>Minutes <input name=\"minutes\" id=\"pause-minutes\" inputmode=\"decimal\" placeholder=\"until resumed\" size=\"8\"></label> \
             <button id=\"pause\" type=\"submit\">Pause delivery</button></form>",
            csrf_field(who)
        )
    };
    format!(
        "<h2>Delivery</h2><div class=\"facts card\" id=\"delivery\"><span class=\"muted\">State</span><span id=\"delivery-state\">{state}</span>\
         <span class=\"muted\">Rate limit</span><span>{rate} for the deployment</span>\
         <span class=\"muted\">Concurrency</span><span>{} (<b>{}</b> in flight)</span>\
         <span class=\"muted\">Replicas</span><span>{}</span></div>{action}",
        d.concurrency, d.in_flight, d.replicas
    )
}

/// A dashboard form posting to a delivery action: the session and CSRF checks of the replay
/// button, then the form's fields.
async fn delivery_form(
    state: &AppState,
    peer: Peer,
    headers: &HeaderMap,
    uri: &Uri,
    body: Body,
) -> Result<Vec<(String, String)>, Response> {
    let who = gate(state, headers, uri, peer).map_err(IntoResponse::into_response)?;
    if cross_site(&who, headers) {
        return Err(AppError::Csrf.into_response());
    }
    let fields = read_form(headers, body)
        .await
        .map_err(IntoResponse::into_response)?;
    if !csrf_ok(&who, field(&fields, "csrf")) {
        return Err(AppError::Csrf.into_response());
    }
    Ok(fields)
}

/// Dashboard pause of delivery (the admin API's pause), then back to the overview.
#[utoipa::path(
    post,
    path = "/ui/delivery/pause",
    tag = "dashboard",
    request_body(content = crate::http::openapi::PauseForm, content_type = "application/x-www-form-urlencoded",
        description = "`csrf` is required when signed in with the session cookie; `minutes` is optional"),
    responses(
        (status = 303, description = "Paused: to the overview (or, not signed in, to `/ui/login`)", headers(("Location" = String))),
        (status = 400, description = "`bad_request`: `minutes` is not a number more than 0 and at most 1000000", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 403, description = "`csrf`: the form's CSRF token is missing or wrong, or the browser marks the POST as cross-site", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        (status = 404, description = "`not_found`: the dashboard is off", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn pause_action(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let fields = match delivery_form(&state, peer, &headers, &uri, body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let minutes = field(&fields, "minutes")
        .map(str::trim)
        .filter(|m| !m.is_empty());
    let until = match minutes {
        None => None,
        Some(m) => {
            let json = match m.parse::<f64>() {
                Ok(n) if n.is_finite() => format!("{{\"minutes\": {n}}}"),
                _ => {
                    return AppError::BadRequest("minutes must be a number".into()).into_response();
                }
            };
            match admin::pause_until(json.as_bytes(), now_ms()) {
                Ok(u) => u,
                Err(e) => return e.into_response(),
            }
        }
    };
    if let Err(e) = state.fleet.pause(until).await {
        return AppError::from(e).into_response();
    }
    tracing::warn!("delivery paused from the dashboard");
    see_other("/ui")
}

/// Dashboard resume of delivery (the admin API's resume), then back to the overview.
#[utoipa::path(
    post,
    path = "/ui/delivery/resume",
    tag = "dashboard",
    request_body(content = crate::http::openapi::CsrfForm, content_type = "application/x-www-form-urlencoded",
        description = "`csrf` is required when signed in with the session cookie"),
    responses(
        (status = 303, description = "Resumed: to the overview (or, not signed in, to `/ui/login`)", headers(("Location" = String))),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 403, description = "`csrf`: the form's CSRF token is missing or wrong, or the browser marks the POST as cross-site", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        (status = 404, description = "`not_found`: the dashboard is off", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn resume_action(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    if let Err(r) = delivery_form(&state, peer, &headers, &uri, body).await {
        return r;
    }
    if let Err(e) = state.fleet.resume().await {
        return AppError::from(e).into_response();
    }
    state.wake.notify_one();
    tracing::info!("delivery resumed from the dashboard");
    see_other("/ui")
}

/// Dashboard replay of one event (the admin API's replay), then back to the event page.
#[utoipa::path(
    post,
    path = "/ui/events/{event_id}/replay",
    tag = "dashboard",
    params(
        ("event_id" = String, Path, description = "The event id (unique per source)"),
        SourceQuery,
    ),
    request_body(content = crate::http::openapi::CsrfForm, content_type = "application/x-www-form-urlencoded",
        description = "`csrf` is required when signed in with the session cookie"),
    responses(
        (status = 303, description = "Replayed: to the event page (or, not signed in, to `/ui/login`)", headers(("Location" = String))),
        (status = 400, description = "`bad_request`: a malformed path or query", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 403, description = "`csrf`: the form's CSRF token is missing or wrong, or the browser marks the POST as cross-site", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        (status = 404, description = "`not_found`: no such event, or the dashboard is off", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "`conflict`: several sources have an event with this id; add `?source=`", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn replay_action(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    event_id: Result<Path<String>, PathRejection>,
    q: Result<Query<SourceQuery>, QueryRejection>,
    body: Body,
) -> Response {
    let who = match gate(&state, &headers, &uri, peer) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    if cross_site(&who, &headers) {
        return AppError::Csrf.into_response();
    }
    let fields = match read_form(&headers, body).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    if !csrf_ok(&who, field(&fields, "csrf")) {
        return AppError::Csrf.into_response();
    }
    let (event_id, q) = match (event_id, q) {
        (Ok(Path(id)), Ok(Query(q))) => (id, q),
        (Err(e), _) => return AppError::BadRequest(e.body_text()).into_response(),
        (_, Err(e)) => return AppError::BadRequest(e.body_text()).into_response(),
    };
    let source = q.source.as_deref().filter(|s| !s.is_empty());
    let e = match admin::find_one(&state, &event_id, source).await {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    if let Err(err) = admin::replay(&state, &e).await {
        return err.into_response();
    }
    see_other(&format!(
        "/ui/events/{}?source={}&replayed=true",
        pct(&e.event_id),
        pct(&e.source)
    ))
}

/// The query parameters a bulk action adds to the page it returns to.
const NOTICE_PARAMS: [&str; 3] = ["done", "n", "skipped"];

/// What the last bulk action did, from the parameters it added to the page's URL.
fn notice(uri: &Uri) -> Option<String> {
    let mut done = None;
    let (mut n, mut skipped) = (0u64, 0u64);
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match &*k {
            "done" => done = Some(v.into_owned()),
            "n" => n = v.parse().unwrap_or(0),
            "skipped" => skipped = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    let verb = match done.as_deref()? {
        "replayed" => "Replayed",
        "discarded" => "Discarded",
        _ => return None,
    };
    let plural = |n: u64| if n == 1 { "event" } else { "events" };
    let mut text = format!("{verb} {n} {}.", plural(n));
    if skipped > 0 {
        let _ = write!(
            text,
            " {skipped} {} skipped (delivered, or no longer there).",
            plural(skipped)
        );
    }
    Some(text)
}

/// A dashboard URL without the parameters of a previous bulk action's notice.
fn without_notice(path_and_query: &str) -> String {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if !NOTICE_PARAMS.contains(&&*k) {
            out.append_pair(&k, &v);
        }
    }
    let query = out.finish();
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    }
}

/// The most events one bulk action handles (a form of 8 KiB holds fewer anyway).
const BULK_MAX: usize = 500;

/// Dashboard bulk replay or discard of the selected events, then back to the list.
#[utoipa::path(
    post,
    path = "/ui/events/bulk",
    tag = "dashboard",
    request_body(content = crate::http::openapi::BulkForm, content_type = "application/x-www-form-urlencoded",
        description = "`csrf` is required when signed in with the session cookie"),
    responses(
        (status = 303, description = "Done: back to the list with a notice (or, not signed in, to `/ui/login`)", headers(("Location" = String))),
        (status = 400, description = "`bad_request`: no `action` of replay or discard, or a selection that is not the page's", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 403, description = "`csrf`: the form's CSRF token is missing or wrong, or the browser marks the POST as cross-site", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        (status = 404, description = "`not_found`: the dashboard is off", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn bulk_action(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let fields = match form_post(&state, &headers, &uri, peer, body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let discard = match field(&fields, "action") {
        Some("replay") => false,
        Some("discard") => true,
        _ => {
            return AppError::BadRequest("action must be replay or discard".into()).into_response();
        }
    };
    let pks: Option<Vec<i64>> = fields
        .iter()
        .filter(|(k, _)| k == "pk")
        .map(|(_, v)| v.parse().ok())
        .collect();
    let Some(pks) = pks.filter(|p| p.len() <= BULK_MAX) else {
        return AppError::BadRequest(format!(
            "pk must be up to {BULK_MAX} event positions from the page"
        ))
        .into_response();
    };
    let reason = field(&fields, "reason")
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .unwrap_or("discarded from the dashboard");
    let (mut done, mut skipped) = (0, 0);
    for pk in pks {
        let one = LinkPage {
            after: None,
            limit: 1,
        };
        let e = match state.store.event_detail(EventPk(pk), one).await {
            Ok(Some(d)) => d.summary,
            Ok(None) => {
                skipped += 1;
                continue;
            }
            Err(e) => return AppError::from(e).into_response(),
        };
        let r = if discard {
            if !e.state.discardable() {
                skipped += 1;
                continue;
            }
            admin::discard(&state, &e, reason).await
        } else {
            admin::replay(&state, &e).await
        };
        if let Err(err) = r {
            return err.into_response();
        }
        done += 1;
    }
    let back = without_notice(safe_next(field(&fields, "back")));
    let sep = if back.contains('?') { '&' } else { '?' };
    see_other(&format!(
        "{back}{sep}done={}&n={done}&skipped={skipped}",
        if discard { "discarded" } else { "replayed" }
    ))
}

/// A mapping form (`form_post`) and the configured source its `source` field names.
async fn mapping_form<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    uri: &Uri,
    peer: Peer,
    body: Body,
) -> Result<(Vec<(String, String)>, &'a crate::config::SourceConfig), Response> {
    let fields = form_post(state, headers, uri, peer, body).await?;
    let src = admin::known_source(state, field(&fields, "source").unwrap_or(""))
        .map_err(IntoResponse::into_response)?;
    Ok((fields, src))
}

/// A form POST of a signed-in operator: checked same-origin, read (8 KiB at most) and its CSRF
/// token verified, in that order; or the answer that refuses it.
async fn form_post(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    peer: Peer,
    body: Body,
) -> Result<Vec<(String, String)>, Response> {
    let who = gate(state, headers, uri, peer).map_err(IntoResponse::into_response)?;
    if cross_site(&who, headers) {
        return Err(AppError::Csrf.into_response());
    }
    let fields = read_form(headers, body)
        .await
        .map_err(IntoResponse::into_response)?;
    if !csrf_ok(&who, field(&fields, "csrf")) {
        return Err(AppError::Csrf.into_response());
    }
    Ok(fields)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct MappingsQuery {
    /// The source whose table is shown (default: the first by name).
    source: Option<String>,
    /// The last key of the previous page.
    after_key: Option<String>,
    /// The last lead id of the previous page.
    after_lead: Option<String>,
    /// Show the notice of the last change.
    done: Option<String>,
}

/// Rows of the mapping table per page.
const MAPPING_PAGE: i64 = 50;

/// The mapping table page: one source's rows, the set/delete forms and the CSV upload; `error`
/// is a rejected upload's or form's message.
async fn render_mappings(
    state: &AppState,
    who: &Who,
    q: &MappingsQuery,
    error: Option<&str>,
) -> Result<String, AppError> {
    let names = source_names(state);
    let source = match q.source.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => admin::known_source(state, s)?.name.clone(),
        None => names.first().map(|s| s.to_string()).unwrap_or_default(),
    };
    let after = match (&q.after_key, &q.after_lead) {
        (Some(k), Some(l)) => Some((k.clone(), l.clone())),
        _ => None,
    };
    let rows = if source.is_empty() {
        Vec::new()
    } else {
        state
            .store
            .mapping_list(&source, after.clone(), MAPPING_PAGE)
            .await?
    };
    let mut c = String::from("<h1>Lead mappings</h1>");
    if let Some(e) = error {
        let _ = write!(
            c,
            "<div class=\"error\" id=\"mapping-error\">{}</div>",
            esc(e)
        );
    }
    match q.done.as_deref() {
        Some("imported") | Some("set") | Some("deleted") => {
            let _ = write!(
                c,
                "<div class=\"notice\" id=\"mapping-notice\">Mapping {}.</div>",
                esc(q.done.as_deref().unwrap_or(""))
            );
        }
        _ => {}
    }
    c.push_str("<form class=\"filters\" method=\"get\" action=\"/ui/mappings\"><div><label for=\"msource\">Source</label><select id=\"msource\" name=\"source\">");
    for s in &names {
        let _ = write!(
            c,
            "<option value=\"{0}\"{1}>{0}</option>",
            esc(s),
            if *s == source { " selected" } else { "" }
        );
    }
    c.push_str("</select></div><div><button type=\"submit\">Show</button></div></form>");
    let src = pct(&source);
    let _ = write!(
        c,
        "<form class=\"filters card\" method=\"post\" action=\"/ui/mappings/set\">{csrf}\
         <input type=\"hidden\" name=\"source\" value=\"{s}\">\
         <div><label for=\"mkey\">Key</label><input type=\"text\" id=\"mkey\" name=\"key\"></div>\
         <div><label for=\"mleads\">Lead ids</label><input type=\"text\" id=\"mleads\" name=\"lead_ids\" placeholder=\"17, 18\"></div>\
         <div><button type=\"submit\" id=\"mapping-add\">Set</button></div></form>\
         <form class=\"filters card\" method=\"post\" action=\"/ui/mappings/upload?source={src}\" enctype=\"multipart/form-data\">{csrf}\
         <div><label for=\"csv\">CSV of key,lead_id lines</label><input type=\"file\" id=\"csv\" name=\"csv\" accept=\".csv,text/csv,text/plain\"></div>\
         <div><button type=\"submit\" id=\"mapping-upload\">Upload</button></div></form>",
        csrf = csrf_field(who),
        s = esc(&source),
    );
    if rows.is_empty() {
        c.push_str("<div class=\"card muted\">No mappings.</div>");
    } else {
        c.push_str("<table id=\"mappings\"><thead><tr><th>Key</th><th>Lead id</th><th></th></tr></thead><tbody>");
        for (key, lead) in &rows {
            let _ = write!(
                c,
                "<tr><td class=\"mono\">{k}</td><td class=\"mono\">{l}</td><td>\
                 <form method=\"post\" action=\"/ui/mappings/delete\">{csrf}\
                 <input type=\"hidden\" name=\"source\" value=\"{s}\"><input type=\"hidden\" name=\"key\" value=\"{k}\">\
                 <button type=\"submit\" class=\"danger\">Delete key</button></form></td></tr>",
                k = esc(key),
                l = esc(lead),
                csrf = csrf_field(who),
                s = esc(&source),
            );
        }
        c.push_str("</tbody></table>");
    }
    let first = if after.is_some() {
        format!(
            "<a class=\"btn-light\" href=\"{}\">← First</a>",
            esc(&format!("/ui/mappings?source={src}"))
        )
    } else {
        "<span></span>".into()
    };
    let next = match rows.last() {
        Some((k, l)) if rows.len() as i64 == MAPPING_PAGE => format!(
            "<a class=\"btn-light\" id=\"mappings-next\" href=\"{}\">Next →</a>",
            esc(&format!(
                "/ui/mappings?source={src}&after_key={}&after_lead={}",
                pct(k),
                pct(l)
            ))
        ),
        _ => "<span></span>".into(),
    };
    let _ = write!(c, "<div class=\"pager\">{first}{next}</div>");
    Ok(page("Lead mappings", Tab::Mappings, Some(who), &c))
}

/// Dashboard mapping table of a source, with add, delete and CSV upload.
#[utoipa::path(
    get,
    path = "/ui/mappings",
    tag = "dashboard",
    params(MappingsQuery),
    responses(
        (status = 200, description = "The mapping table page", content_type = "text/html", body = String),
        (status = 303, description = "Not signed in: to `/ui/login`", headers(("Location" = String))),
        (status = 400, description = "`bad_request`: a malformed query", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`unknown_source`, or `not_found`: the dashboard is off", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn mappings_page(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    q: Result<Query<MappingsQuery>, QueryRejection>,
) -> Response {
    let who = match gate(&state, &headers, &uri, peer) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return AppError::BadRequest(e.body_text()).into_response(),
    };
    match render_mappings(&state, &who, &q, None).await {
        Ok(body) => html(StatusCode::OK, body),
        Err(e) => e.into_response(),
    }
}

fn mappings_url(source: &str, done: &str) -> String {
    format!("/ui/mappings?source={}&done={done}", pct(source))
}

/// Dashboard: set the lead ids a key maps to (the admin API's `PUT /admin/mappings`).
#[utoipa::path(
    post,
    path = "/ui/mappings/set",
    tag = "dashboard",
    request_body(content = crate::http::openapi::MappingForm, content_type = "application/x-www-form-urlencoded",
        description = "`csrf` is required when signed in with the session cookie"),
    responses(
        (status = 303, description = "Set: back to the table (or, not signed in, to `/ui/login`)", headers(("Location" = String))),
        (status = 400, description = "`bad_request`: no key, or no valid lead id", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 403, description = "`csrf`: the form's CSRF token is missing or wrong, or the browser marks the POST as cross-site", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        (status = 404, description = "`unknown_source`, or `not_found`: the dashboard is off", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn mapping_set(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let (fields, src) = match mapping_form(&state, &headers, &uri, peer, body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let key = field(&fields, "key").map(str::trim).unwrap_or("");
    let ids: Option<Vec<String>> = field(&fields, "lead_ids")
        .unwrap_or("")
        .split([',', ' '])
        .filter(|t| !t.is_empty())
        .map(|t| crate::mapping::id_text(&serde_json::Value::String(t.to_string())))
        .collect();
    let ids = match ids.filter(|i| !i.is_empty()) {
        Some(ids) if !key.is_empty() => ids,
        _ => {
            return AppError::BadRequest("a key and at least one valid lead id are needed".into())
                .into_response();
        }
    };
    let key = admin::mapping_key(src, key);
    if let Err(e) = state.store.mapping_put(&src.name, &key, &ids).await {
        return AppError::from(e).into_response();
    }
    see_other(&mappings_url(&src.name, "set"))
}

/// Dashboard: remove a key's mapping (the admin API's `DELETE /admin/mappings`).
#[utoipa::path(
    post,
    path = "/ui/mappings/delete",
    tag = "dashboard",
    request_body(content = crate::http::openapi::MappingForm, content_type = "application/x-www-form-urlencoded",
        description = "`csrf` is required when signed in with the session cookie"),
    responses(
        (status = 303, description = "Deleted (or already gone): back to the table (or, not signed in, to `/ui/login`)", headers(("Location" = String))),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 403, description = "`csrf`: the form's CSRF token is missing or wrong, or the browser marks the POST as cross-site", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        (status = 404, description = "`unknown_source`, or `not_found`: the dashboard is off", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn mapping_delete(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let (fields, src) = match mapping_form(&state, &headers, &uri, peer, body).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let key = admin::mapping_key(src, field(&fields, "key").unwrap_or("").trim());
    if let Err(e) = state.store.mapping_delete(&src.name, &key).await {
        return AppError::from(e).into_response();
    }
    see_other(&mappings_url(&src.name, "deleted"))
}

/// The parts of a multipart/form-data body as `(name, bytes)`; `None` when it is not one.
fn multipart_parts(raw: &[u8], boundary: &str) -> Option<Vec<(String, Vec<u8>)>> {
    fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + from)
    }
    let delim = format!("--{boundary}");
    let next = format!("\r\n--{boundary}");
    let mut at = find(raw, delim.as_bytes(), 0)? + delim.len();
    let mut parts = Vec::new();
    while !raw.get(at..)?.starts_with(b"--") {
        let head_end = find(raw, b"\r\n\r\n", at)?;
        let head = std::str::from_utf8(&raw[at..head_end]).ok()?;
        let end = find(raw, next.as_bytes(), head_end + 4)?;
        let name = head
            .split(';')
            .map(str::trim)
            .find_map(|p| p.strip_prefix("name="))
            .map(|n| {
                n.split(['\r', '\n'])
                    .next()
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string()
            })
            .unwrap_or_default();
        parts.push((name, raw[head_end + 4..end].to_vec()));
        at = end + next.len();
    }
    Some(parts)
}

/// Dashboard CSV upload into a source's mapping table (the admin API's import): a malformed
/// line is shown on the page with its line number, and nothing is imported.
#[utoipa::path(
    post,
    path = "/ui/mappings/upload",
    tag = "dashboard",
    params(("source" = String, Query, description = "A configured source name")),
    request_body(content = crate::http::openapi::CsvUpload, content_type = "multipart/form-data",
        description = "`csrf` is required when signed in with the session cookie"),
    responses(
        (status = 303, description = "Imported: back to the table (or, not signed in, to `/ui/login`)", headers(("Location" = String))),
        (status = 400, description = "The page with the error (a malformed line, named), or `bad_request` (JSON): not multipart", content(
            (String = "text/html"),
            (crate::http::openapi::ErrorBody = "application/json"),
        )),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 403, description = "`csrf`: the form's CSRF token is missing or wrong, or the browser marks the POST as cross-site", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        (status = 404, description = "`unknown_source`, or `not_found`: the dashboard is off", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::StorageUnavailable,
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn mapping_upload(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    q: Result<Query<SourceQuery>, QueryRejection>,
    body: Body,
) -> Response {
    let who = match gate(&state, &headers, &uri, peer) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    if cross_site(&who, &headers) {
        return AppError::Csrf.into_response();
    }
    let limit = state.config.server.max_body_bytes;
    let raw = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => return AppError::PayloadTooLarge(limit).into_response(),
    };
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|ct| ct.starts_with("multipart/form-data"))
        .and_then(|ct| {
            ct.split(';')
                .map(str::trim)
                .find_map(|p| p.strip_prefix("boundary="))
        })
        .map(|b| b.trim_matches('"').to_string());
    let Some(parts) = boundary.and_then(|b| multipart_parts(&raw, &b)) else {
        return AppError::BadRequest("send the file as multipart/form-data".into()).into_response();
    };
    let text_of = |name: &str| {
        parts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    };
    let csrf = text_of("csrf").and_then(|v| std::str::from_utf8(v).ok());
    if !csrf_ok(&who, csrf) {
        return AppError::Csrf.into_response();
    }
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return AppError::BadRequest(e.body_text()).into_response(),
    };
    let src = match admin::known_source(&state, q.source.as_deref().unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match admin::import_csv(&state, src, text_of("csv").unwrap_or_default()).await {
        Ok(_) => see_other(&mappings_url(&src.name, "imported")),
        Err(AppError::BadRequest(msg)) => {
            let q = MappingsQuery {
                source: Some(src.name.clone()),
                after_key: None,
                after_lead: None,
                done: None,
            };
            match render_mappings(&state, &who, &q, Some(&format!("Nothing imported: {msg}"))).await
            {
                Ok(body) => html(StatusCode::BAD_REQUEST, body),
                Err(e) => e.into_response(),
            }
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LoginQuery {
    /// Where to go after logging in (a `/ui` path).
    next: Option<String>,
}

fn login_html(next: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<div class=\"error\" id=\"login-error\">{}</div>", esc(e)))
        .unwrap_or_default();
    let content = format!(
        "<div class=\"login card\"><h1>Sign in</h1>{error}\
         <form method=\"post\" action=\"/ui/login\">\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <label for=\"token\">Admin token</label>\
         <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\" autofocus required>\
         <button type=\"submit\" id=\"login\">Sign in</button></form>\
         <p class=\"muted\">The token is the service's <span class=\"mono\">admin.token</span>.</p></div>",
        esc(next)
    );
    page("Sign in", Tab::None, None, &content)
}

/// The dashboard's login form.
#[utoipa::path(
    get,
    path = "/ui/login",
    tag = "dashboard",
    params(LoginQuery),
    responses(
        (status = 200, description = "The login page", content_type = "text/html", body = String),
        (status = 303, description = "Already signed in: to `next` or `/ui`", headers(("Location" = String))),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: the dashboard is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
    ),
    security(())
)]
async fn login_page(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    q: Result<Query<LoginQuery>, QueryRejection>,
) -> Response {
    let next = match &q {
        Ok(Query(q)) => safe_next(q.next.as_deref()),
        Err(_) => "/ui",
    };
    match who(&state, &headers, peer) {
        Ok(Some(_)) => see_other(next),
        Ok(None) => html(StatusCode::OK, login_html(next, None)),
        Err(e) => e.into_response(),
    }
}

/// Sign in to the dashboard with the admin token; sets the session cookie.
#[utoipa::path(
    post,
    path = "/ui/login",
    tag = "dashboard",
    request_body(content = crate::http::openapi::LoginForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Signed in: the session cookie is set; to `next` or `/ui`",
            headers(("Location" = String), ("Set-Cookie" = String, description = "`sprintlink_ui=...; Path=/ui; HttpOnly; SameSite=Strict; Secure` (no `Secure` with `admin.secure_cookies = false`, unless behind https)"))),
        (status = 401, description = "The token is wrong: the login page again, with the error", content_type = "text/html", body = String),
        crate::http::openapi::PayloadTooLarge,
        crate::http::openapi::TooManyRequests,
        (status = 404, description = "`not_found`: the dashboard is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
    ),
    security(())
)]
async fn login_submit(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A blocked address is refused before its form is even read.
    if let Some(secs) = state
        .auth
        .throttle
        .blocked(peer.0, std::time::Instant::now())
    {
        return AppError::TooManyRequests(secs).into_response();
    }
    let fields = match read_form(&headers, body).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let next = safe_next(field(&fields, "next"));
    let token = field(&fields, "token").unwrap_or("");
    match check_token(&state, peer, token) {
        Ok(()) => {}
        Err(AppError::Unauthorized) => {
            tracing::warn!("dashboard login with a wrong token");
            return html(
                StatusCode::UNAUTHORIZED,
                login_html(next, Some("That is not the admin token.")),
            );
        }
        Err(e) => return e.into_response(),
    }
    let value = state.auth.sessions.create(now_ms() / 1000);
    let mut resp = see_other(next);
    if let Ok(v) = HeaderValue::from_str(&session_cookie(
        &value,
        SESSION_SECONDS,
        secure_cookie(&state, &headers),
    )) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// Sign out of the dashboard: clears the session cookie.
#[utoipa::path(
    post,
    path = "/ui/logout",
    tag = "dashboard",
    request_body(content = crate::http::openapi::CsrfForm, content_type = "application/x-www-form-urlencoded",
        description = "`csrf` is required when signed in with the session cookie"),
    responses(
        (status = 303, description = "Signed out (or not signed in): to `/ui/login`",
            headers(("Location" = String), ("Set-Cookie" = String, description = "Clears the session cookie"))),
        crate::http::openapi::Unauthorized,
        crate::http::openapi::TooManyRequests,
        (status = 403, description = "`csrf`: the form's CSRF token is missing or wrong, or the browser marks the POST as cross-site", body = crate::http::openapi::ErrorBody),
        crate::http::openapi::PayloadTooLarge,
        (status = 404, description = "`not_found`: the dashboard is off (no `admin.token`)", body = crate::http::openapi::ErrorBody),
    ),
    security(("admin_token" = []), ("ui_session" = []))
)]
async fn logout(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let who = match gate(&state, &headers, &uri, peer) {
        Ok(w) => w,
        Err(d) => return d.into_response(),
    };
    if cross_site(&who, &headers) {
        return AppError::Csrf.into_response();
    }
    let fields = match read_form(&headers, body).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    if !csrf_ok(&who, field(&fields, "csrf")) {
        return AppError::Csrf.into_response();
    }
    if let Who::Session { value, .. } = &who {
        state.auth.sessions.revoke(value);
    }
    let mut resp = see_other("/ui/login");
    if let Ok(v) = HeaderValue::from_str(&session_cookie("", 0, secure_cookie(&state, &headers))) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html_and_urls() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(pct("evt 1/ä?&=#"), "evt%201%2F%C3%A4%3F%26%3D%23");
        assert_eq!(pct("AZaz09-._~"), "AZaz09-._~");
    }

    #[test]
    fn decodes_forms() {
        let f = form_fields(b"token=a%2Bb+c&next=%2Fui%2Fevents&bad=%zz%4&empty");
        assert_eq!(field(&f, "token"), Some("a+b c"));
        assert_eq!(field(&f, "next"), Some("/ui/events"));
        assert_eq!(field(&f, "bad"), Some("%zz%4"));
        assert_eq!(field(&f, "empty"), Some(""));
        assert_eq!(field(&f, "missing"), None);
    }

    #[test]
    fn next_stays_on_the_dashboard() {
        assert_eq!(
            safe_next(Some("/ui/events?state=dead")),
            "/ui/events?state=dead"
        );
        assert_eq!(safe_next(Some("/ui")), "/ui");
        for bad in [
            "//evil.example/ui",
            "https://evil.example",
            "/uix",
            "/ui//evil",
            "/ui/\\evil",
            "/ui/a b",
            "/admin/events",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui", "{bad}");
        }
        assert_eq!(safe_next(None), "/ui");
    }

    #[test]
    fn csrf_is_required_of_sessions_only() {
        let session = Who::Session {
            value: "v".into(),
            csrf: "c".repeat(64),
        };
        assert!(csrf_ok(&session, Some(&"c".repeat(64))));
        assert!(!csrf_ok(&session, Some("c")));
        assert!(!csrf_ok(&session, None));
        assert!(csrf_ok(&Who::Bearer, None));
        let mut h = HeaderMap::new();
        assert!(
            !cross_site(&session, &h),
            "no Sec-Fetch-Site: the token decides"
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!cross_site(&session, &h));
        for other in ["cross-site", "same-site", "none"] {
            h.insert("sec-fetch-site", HeaderValue::from_static(other));
            assert!(cross_site(&session, &h), "{other}");
            assert!(
                !cross_site(&Who::Bearer, &h),
                "{other}: bearer needs no CSRF check"
            );
        }
    }

    #[test]
    fn cookie_attributes() {
        let mut h = HeaderMap::new();
        assert!(!behind_https(&h));
        h.insert("x-forwarded-proto", HeaderValue::from_static("HTTPS, http"));
        assert!(behind_https(&h));
        assert_eq!(
            session_cookie("v", 60, false),
            "sprintlink_ui=v; Path=/ui; Max-Age=60; HttpOnly; SameSite=Strict"
        );
        assert!(session_cookie("", 0, true).ends_with("; Secure"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; sprintlink_ui=x.y ;b=2"),
        );
        let found: Vec<_> = cookies(&h).collect();
        assert_eq!(found, [("a", "1"), ("sprintlink_ui", "x.y"), ("b", "2")]);
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(1_000_000, 1_000_000), "just now");
        assert_eq!(relative(1_000_000, 1_030_000), "30 s ago");
        assert_eq!(relative(1_000_000, 1_000_000 + 7_200_000), "2 h ago");
        assert_eq!(relative(1_000_000 + 120_000, 1_000_000), "in 2 min");
    }
}
