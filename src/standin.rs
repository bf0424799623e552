//! A local SprintHub stand-in that speaks the contract of SPEC sections 1 and 7: `POST
//! /customobjects/link`, `/leadsadvanced` (free-text, deliberately fuzzy), `/leads`,
//! `/customobjects/objects/{definition_id}` and `GET /customobjects/def`. The demo runs against
//! it, and so do the tests, which script its answers (object creations may also be delayed or
//! have their connection dropped after the request arrived) and read what it received.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Value,
    pub at: Instant,
    /// The status the stand-in answered with.
    pub status: u16,
}

/// A canned answer.
#[derive(Debug, Clone)]
pub struct Canned {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

impl Canned {
    pub fn new(status: u16, body: &str) -> Self {
        Canned {
            status,
            body: body.into(),
            headers: vec![],
        }
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// How the stand-in answers one object creation.
#[derive(Debug, Clone)]
pub enum ObjectAnswer {
    /// This answer (nothing is created unless it is a 2xx).
    Canned(Canned),
    /// The object is created, and the connection is closed without an answer.
    Drop,
}

/// Closes the connection a request came on.
#[derive(Clone)]
struct Hangup(CancellationToken);

#[derive(Default)]
struct Inner {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Canned>>,
    object_script: Mutex<VecDeque<ObjectAnswer>>,
    definitions: Mutex<Vec<Value>>,
    /// When set, only this API token is accepted.
    token: Mutex<Option<String>>,
    /// Object creations received whose answer has not been sent yet.
    creating: AtomicUsize,
    object_delay_ms: AtomicI64,
    /// Answer creations with `{"id": N}` instead of `{"data": {"id": N}}`.
    flat_ids: AtomicBool,
    leads: Mutex<Vec<Value>>,
    next_id: AtomicI64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    delay_ms: AtomicI64,
    down: AtomicBool,
    /// While set, calls wait (unanswered) until `release` is notified.
    held: AtomicBool,
    release: tokio::sync::Notify,
}

/// A running stand-in. Dropping it does not stop it; it lives as long as the runtime.
#[derive(Clone)]
pub struct StandIn {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl StandIn {
    pub async fn start() -> std::io::Result<StandIn> {
        let inner = Arc::new(Inner {
            next_id: AtomicI64::new(1000),
            ..Default::default()
        });
        let app = Router::new()
            .route("/customobjects/objects/{definition}", post(create_object))
            .route("/customobjects/def", get(definitions))
            .route("/{*path}", post(handle))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // A loop of its own rather than `axum::serve`, so that a handler can close the
        // connection its request came on (a dropped answer).
        tokio::spawn(async move {
            use hyper_util::rt::{TokioExecutor, TokioIo};
            while let Ok((stream, _)) = listener.accept().await {
                let app = app.clone();
                tokio::spawn(async move {
                    let hangup = CancellationToken::new();
                    let h = hangup.clone();
                    let service = hyper::service::service_fn(
                        move |mut req: axum::http::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(Hangup(h.clone()));
                            let app = app.clone();
                            async move {
                                tower::ServiceExt::oneshot(
                                    app.into_service(),
                                    req.map(axum::body::Body::new),
                                )
                                .await
                            }
                        },
                    );
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = hangup.cancelled() => {}
                    }
                });
            }
        });
        Ok(StandIn { addr, inner })
    }

    /// Answers the next object creations with these, in order; afterwards creations succeed.
    pub fn script_objects(&self, answers: impl IntoIterator<Item = ObjectAnswer>) {
        self.inner.object_script.lock().unwrap().extend(answers);
    }

    /// Each object creation waits this long before answering (after it was recorded).
    pub fn set_object_delay(&self, d: Duration) {
        self.inner
            .object_delay_ms
            .store(d.as_millis() as i64, Ordering::SeqCst);
    }

    /// Answer creations with the id at the top level (`{"id": N}`), as some instances do.
    pub fn set_flat_ids(&self, flat: bool) {
        self.inner.flat_ids.store(flat, Ordering::SeqCst);
    }

    /// A custom object definition `GET /customobjects/def` lists:
    /// `{"id", "name", "fields": [{"label", "alias", "type", "required"}]}`.
    pub fn add_definition(&self, definition: Value) {
        self.inner.definitions.lock().unwrap().push(definition);
    }

    /// Accept only this API token (every call with another gets 401).
    pub fn require_token(&self, token: &str) {
        *self.inner.token.lock().unwrap() = Some(token.to_string());
    }

    /// Object creations received whose answer has not been sent (yet, or ever).
    pub fn creations_in_flight(&self) -> usize {
        self.inner.creating.load(Ordering::SeqCst)
    }

    /// The object creations received (whatever became of their answers).
    pub fn creations(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path.starts_with("/customobjects/objects/"))
            .collect()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next link calls with these, in order; afterwards links succeed again.
    pub fn script(&self, answers: impl IntoIterator<Item = Canned>) {
        self.inner.script.lock().unwrap().extend(answers);
    }

    /// While down, every call gets 503.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// While held, calls wait unanswered; releasing answers them all and lets the rest through
    /// (a backlog built up in the service, then drained at once).
    pub fn set_held(&self, held: bool) {
        self.inner.held.store(held, Ordering::SeqCst);
        if !held {
            self.inner.release.notify_waiters();
        }
    }

    /// Each call waits this long before answering.
    pub fn set_delay(&self, d: Duration) {
        self.inner
            .delay_ms
            .store(d.as_millis() as i64, Ordering::SeqCst);
    }

    pub fn add_lead(&self, lead: Value) {
        self.inner.leads.lock().unwrap().push(lead);
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }

    pub fn requests_to(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// The `(objectId, targetId)` pairs of link calls that were answered 2xx.
    pub fn linked_pairs(&self) -> Vec<(Value, Value)> {
        self.requests_to("/customobjects/link")
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .map(|r| (r.body["objectId"].clone(), r.body["targetId"].clone()))
            .collect()
    }

    /// The most calls that were in progress at once.
    pub fn max_concurrency(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    Path(path): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    body: axum::body::Bytes,
) -> Response {
    let path = format!("/{path}");
    loop {
        // Created before the check, so a release between the two is not missed.
        let released = inner.release.notified();
        if !inner.held.load(Ordering::SeqCst) {
            break;
        }
        released.await;
    }
    let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let delay = inner.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let authed = authed(&inner, &query);
    let canned = if inner.down.load(Ordering::SeqCst) {
        Canned::new(503, r#"{"msg":"maintenance"}"#)
    } else if !authed {
        Canned::new(401, r#"{"msg":"missing apitoken or i"}"#)
    } else if path == "/customobjects/link" {
        let next = inner.script.lock().unwrap().pop_front();
        next.unwrap_or_else(|| {
            let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
            Canned::new(200, &json!({"id": id, "objectId": body["objectId"], "targetId": body["targetId"], "linkType": "lead"}).to_string())
        })
    } else if path == "/leadsadvanced" {
        let search = body["search"].as_str().unwrap_or("").to_lowercase();
        let digits: String = search.chars().filter(char::is_ascii_digit).collect();
        // Free text, like the real one: anything that contains the words, loosely.
        let leads: Vec<Value> = inner
            .leads
            .lock()
            .unwrap()
            .iter()
            .filter(|l| {
                ["email", "whatsapp", "mobile"].iter().any(|f| {
                    let v = l[*f].as_str().unwrap_or("").to_lowercase();
                    let vd: String = v.chars().filter(char::is_ascii_digit).collect();
                    (!search.is_empty() && v.contains(&search))
                        || (!search.is_empty() && search.contains(v.as_str()) && !v.is_empty())
                        || (digits.len() >= 6 && vd.contains(&digits))
                })
            })
            .cloned()
            .collect();
        Canned::new(200, &json!({"data": {"leads": leads}}).to_string())
    } else if path == "/leads" {
        let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
        let mut lead = body.clone();
        if let Value::Object(m) = &mut lead {
            m.insert("id".into(), json!(id));
        }
        inner.leads.lock().unwrap().push(lead);
        Canned::new(200, &json!({"data": {"id": id}}).to_string())
    } else {
        Canned::new(404, r#"{"msg":"not found"}"#)
    };
    inner.received.lock().unwrap().push(Received {
        path,
        query,
        body,
        at: Instant::now(),
        status: canned.status,
    });
    inner.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut resp = (
        StatusCode::from_u16(canned.status).unwrap_or(StatusCode::OK),
        canned.body,
    )
        .into_response();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    for (k, v) in canned.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::from_str(&v)) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

fn authed(inner: &Inner, query: &[(String, String)]) -> bool {
    let wanted = inner.token.lock().unwrap().clone();
    query
        .iter()
        .any(|(k, v)| k == "apitoken" && !v.is_empty() && wanted.as_ref().is_none_or(|w| w == v))
        && query.iter().any(|(k, v)| k == "i" && !v.is_empty())
}

fn json_response(canned: Canned) -> Response {
    let mut resp = (
        StatusCode::from_u16(canned.status).unwrap_or(StatusCode::OK),
        canned.body,
    )
        .into_response();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    for (k, v) in canned.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::from_str(&v)) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

async fn create_object(
    State(inner): State<Arc<Inner>>,
    Path(definition): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    Extension(hangup): Extension<Hangup>,
    body: axum::body::Bytes,
) -> Response {
    let path = format!("/customobjects/objects/{definition}");
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let known = {
        let defs = inner.definitions.lock().unwrap();
        defs.is_empty() || defs.iter().any(|d| id_text(&d["id"]) == definition)
    };
    let answer = if inner.down.load(Ordering::SeqCst) {
        ObjectAnswer::Canned(Canned::new(503, r#"{"msg":"maintenance"}"#))
    } else if !authed(&inner, &query) {
        ObjectAnswer::Canned(Canned::new(401, r#"{"msg":"invalid token"}"#))
    } else if !known {
        ObjectAnswer::Canned(Canned::new(404, r#"{"msg":"definition not found"}"#))
    } else {
        inner
            .object_script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| ObjectAnswer::Canned(Canned::new(200, "")))
    };
    let created = |inner: &Inner| {
        let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
        if inner.flat_ids.load(Ordering::SeqCst) {
            json!({"id": id, "fields": body.clone()}).to_string()
        } else {
            json!({"data": {"id": id, "fields": body.clone()}}).to_string()
        }
    };
    let (status, canned) = match answer {
        ObjectAnswer::Drop => {
            created(&inner);
            (0, None)
        }
        ObjectAnswer::Canned(c) if c.status == 200 && c.body.is_empty() => {
            let text = created(&inner);
            (200, Some(Canned::new(200, &text)))
        }
        ObjectAnswer::Canned(c) => (c.status, Some(c)),
    };
    inner.creating.fetch_add(1, Ordering::SeqCst);
    inner.received.lock().unwrap().push(Received {
        path,
        query,
        body: body.clone(),
        at: Instant::now(),
        status,
    });
    let Some(canned) = canned else {
        // The request arrived and the object exists; the answer never leaves.
        hangup.0.cancel();
        std::future::pending::<()>().await;
        unreachable!()
    };
    let delay = inner.object_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    inner.creating.fetch_sub(1, Ordering::SeqCst);
    json_response(canned)
}

async fn definitions(
    State(inner): State<Arc<Inner>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let canned = if !authed(&inner, &query) {
        Canned::new(401, r#"{"msg":"invalid token"}"#)
    } else {
        let defs = inner.definitions.lock().unwrap().clone();
        Canned::new(200, &json!({"data": {"definitions": defs}}).to_string())
    };
    inner.received.lock().unwrap().push(Received {
        path: "/customobjects/def".into(),
        query,
        body: Value::Null,
        at: Instant::now(),
        status: canned.status,
    });
    json_response(canned)
}

fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}
