//! A local SprintHub stand-in that speaks the contract of SPEC section 1: `POST
//! /customobjects/link`, `/leadsadvanced` (free-text, deliberately fuzzy) and `/leads`. The demo
//! runs against it, and so do the tests, which script its answers and read what it received.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

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

#[derive(Default)]
struct Inner {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Canned>>,
    leads: Mutex<Vec<Value>>,
    next_id: AtomicI64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    delay_ms: AtomicI64,
    down: AtomicBool,
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
            .route("/{*path}", post(handle))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(StandIn { addr, inner })
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
    let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let delay = inner.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let authed = query.iter().any(|(k, v)| k == "apitoken" && !v.is_empty())
        && query.iter().any(|(k, v)| k == "i" && !v.is_empty());
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
