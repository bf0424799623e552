//! One notification: its body in each format, its signature, and its delivery to one target
//! (a few tries with a timeout each). Shared by the alerter and `sprintlink alert-test`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::config::{AlertFormat, AlertKind, AlertTarget, whsec_key};

use super::Example;

/// How long one try may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Tries per notification before it is dropped (and counted as failed).
pub const TRIES: u32 = 3;
/// The wait before the second try; doubled before each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// What a notification says.
#[derive(Debug, Clone)]
pub struct Notification {
    pub kind: AlertKind,
    pub count: u64,
    pub examples: Vec<Example>,
    /// Unix milliseconds.
    pub at: i64,
    /// The SprintHub instance, so that one channel can serve several deployments.
    pub instance: String,
    /// `sprintlink alert-test`: says it is a test.
    pub test: bool,
}

impl Notification {
    /// The one-line headline: what happened and what to do.
    pub fn headline(&self) -> String {
        let n = self.count;
        let what = match self.kind {
            AlertKind::Dead => format!(
                "{n} link(s), object creation(s) or lead resolution(s) gave up and are dead; fix the cause and replay them"
            ),
            AlertKind::Parked => format!(
                "{n} event(s) parked: they need a mapping or a configuration fix, then a replay"
            ),
            AlertKind::Credentials => format!(
                "SprintHub refused the API token {n} time(s); check sprinthub.api_token and sprinthub.instance"
            ),
            AlertKind::Throttled => format!(
                "SprintHub throttled {n} call(s) (too many requests); lower sprinthub.rate_limit_per_second"
            ),
            AlertKind::Backlog => {
                "the backlog is aging: the oldest pending link or resolution is older than backlog_age".to_string()
            }
            AlertKind::Storage => format!(
                "storage failed {n} time(s); webhooks may be refused with 503 until it is back"
            ),
        };
        if self.test {
            format!(
                "sprintlink ({}): test notification from `sprintlink alert-test`",
                self.instance
            )
        } else {
            format!("sprintlink ({}) [{}]: {what}", self.instance, self.kind)
        }
    }

    /// `{"text": "..."}`: the headline, then one line per example.
    pub fn slack_body(&self) -> Value {
        let mut text = self.headline();
        for e in &self.examples {
            text.push_str("\n• ");
            text.push_str(&e.line());
        }
        json!({ "text": text })
    }

    /// SPEC 10: `{"type": "sprintlink.alert", "kind", "count", "examples", "at"}`.
    pub fn json_body(&self) -> Value {
        let examples: Vec<Value> = self
            .examples
            .iter()
            .map(|e| {
                json!({
                    "source": e.source,
                    "event_id": e.event_id,
                    "object_id": e.object_id,
                    "lead_id": e.lead_id,
                    "error": e.error,
                })
            })
            .collect();
        let mut body = json!({
            "type": "sprintlink.alert",
            "kind": self.kind.as_str(),
            "count": self.count,
            "examples": examples,
            "at": crate::domain::rfc3339(self.at),
            "summary": self.headline(),
        });
        if self.test {
            body["test"] = Value::Bool(true);
        }
        body
    }

    /// The body and headers for `target`'s format (json: Standard Webhooks signed).
    pub fn request(&self, target: &AlertTarget) -> (Vec<u8>, Vec<(String, String)>) {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        match target.format {
            AlertFormat::Slack => (self.slack_body().to_string().into_bytes(), headers),
            AlertFormat::Json => {
                let body = self.json_body().to_string().into_bytes();
                // Validated at load: a json target has a whsec_ secret.
                if let Some(key) = target.secret.as_ref().and_then(|s| whsec_key(s.expose())) {
                    let id = format!("alert_{:016x}", fastrand::u64(..));
                    headers.extend(crate::signature::standard_webhooks::sign(
                        &key,
                        &id,
                        self.at.div_euclid(1000),
                        &body,
                    ));
                }
                (body, headers)
            }
        }
    }
}

/// A client for alert targets: no redirects (a Slack URL's path is its secret; it goes to the
/// host that was configured, nowhere else), a timeout per try.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TIMEOUT)
        .build()
        .unwrap_or_default()
}

/// One try: the status, or why there is none. The error never names the URL.
pub async fn post_once(
    client: &reqwest::Client,
    target: &AlertTarget,
    body: &[u8],
    headers: &[(String, String)],
) -> Result<u16, String> {
    let mut req = client.post(target.url.expose()).body(body.to_vec());
    for (k, v) in headers {
        req = req.header(k, v);
    }
    match req.send().await {
        Ok(resp) => Ok(resp.status().as_u16()),
        Err(e) => Err(describe(&e)),
    }
}

/// A reqwest error without its URL (which would carry a Slack webhook's secret path).
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_request() {
        "the request failed"
    } else {
        "no answer"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    let target = crate::config::url_origin(e.url().map(|u| u.as_str()).unwrap_or(""));
    let cause = if cause.is_empty() || cause.contains("://") {
        String::new()
    } else {
        format!(": {cause}")
    };
    format!("{what} ({target}){cause}")
}

/// Up to `TRIES` tries with a growing pause between them: the last status or error. A 2xx is
/// success; anything else is tried again.
pub async fn deliver(
    client: &reqwest::Client,
    target: &AlertTarget,
    n: &Notification,
) -> Result<u16, String> {
    let (body, headers) = n.request(target);
    let mut pause = FIRST_BACKOFF;
    let mut last = Err("not tried".to_string());
    for i in 0..TRIES {
        if i > 0 {
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        last = match post_once(client, target, &body, &headers).await {
            Ok(status) if (200..300).contains(&status) => return Ok(status),
            Ok(status) => Err(format!("HTTP {status}")),
            Err(e) => Err(e),
        };
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(kind: AlertKind) -> Notification {
        Notification {
            kind,
            count: 3,
            examples: vec![Example {
                source: Some("erp".into()),
                event_id: Some("evt_1".into()),
                object_id: Some("42".into()),
                lead_id: Some("7".into()),
                error: Some("rejected: HTTP 400".into()),
            }],
            at: 1_700_000_000_123,
            instance: "acme".into(),
            test: false,
        }
    }

    #[test]
    fn slack_is_one_text_with_the_count_and_examples() {
        let body = note(AlertKind::Dead).slack_body();
        let obj = body.as_object().unwrap();
        assert_eq!(obj.len(), 1);
        let text = body["text"].as_str().unwrap();
        assert!(
            text.contains("[dead]") && text.contains("3 link(s)"),
            "{text}"
        );
        assert!(
            text.contains("erp/evt_1") && text.contains("rejected: HTTP 400"),
            "{text}"
        );
    }

    #[test]
    fn json_has_the_spec_fields_and_a_verifiable_signature() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let target = AlertTarget::new("https://x.example/in", AlertFormat::Json, Some(secret));
        let n = note(AlertKind::Parked);
        let (body, headers) = n.request(&target);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "sprintlink.alert");
        assert_eq!(v["kind"], "parked");
        assert_eq!(v["count"], 3);
        assert_eq!(v["at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["examples"][0]["lead_id"], "7");
        let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        for h in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            assert!(names.contains(&h), "{names:?}");
        }
        let key = crate::signature::standard_webhooks::decode_secret(secret).unwrap();
        let map: http::HeaderMap = headers
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect();
        crate::signature::standard_webhooks::verify(&[key], &[], &map, &body, n.at / 1000, 300)
            .expect("the signature verifies");
    }
}
