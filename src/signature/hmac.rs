//! The generic HMAC (`hmac`, `hmac-sha256` and the presets built on it): a MAC with a configured
//! algorithm over a `signed_content` template (default: the body), sent hex or base64 with an
//! optional prefix in a header or a query parameter, optionally with a timestamp header under
//! `tolerance_seconds`. Shopify is this scheme with `X-Shopify-Hmac-Sha256`, base64, no prefix;
//! Slack with `v0:{timestamp}:{body}`.

use std::borrow::Cow;

use ::hmac::{Hmac, Mac};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::Sha1;
use sha2::{Sha256, Sha512};

use super::{HeaderLookup, SignatureError, SignedRequest, Verified, check_tolerance};
use crate::config::{
    Algorithm, ContentPart, CredentialAt, Encoding, HmacSpec, SignedContent, TimestampUnit,
};

/// A MAC of one of the configured algorithms.
enum AnyMac {
    Sha1(Hmac<Sha1>),
    Sha256(Hmac<Sha256>),
    Sha512(Hmac<Sha512>),
}

impl AnyMac {
    fn new(algorithm: Algorithm, key: &[u8]) -> AnyMac {
        const ANY_LENGTH: &str = "HMAC takes keys of any length";
        match algorithm {
            Algorithm::Sha1 => AnyMac::Sha1(Hmac::new_from_slice(key).expect(ANY_LENGTH)),
            Algorithm::Sha256 => AnyMac::Sha256(Hmac::new_from_slice(key).expect(ANY_LENGTH)),
            Algorithm::Sha512 => AnyMac::Sha512(Hmac::new_from_slice(key).expect(ANY_LENGTH)),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            AnyMac::Sha1(m) => m.update(data),
            AnyMac::Sha256(m) => m.update(data),
            AnyMac::Sha512(m) => m.update(data),
        }
    }

    /// Constant time (`Mac::verify_slice`).
    fn matches(self, candidate: &[u8]) -> bool {
        match self {
            AnyMac::Sha1(m) => m.verify_slice(candidate).is_ok(),
            AnyMac::Sha256(m) => m.verify_slice(candidate).is_ok(),
            AnyMac::Sha512(m) => m.verify_slice(candidate).is_ok(),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            AnyMac::Sha1(m) => m.finalize().into_bytes().to_vec(),
            AnyMac::Sha256(m) => m.finalize().into_bytes().to_vec(),
            AnyMac::Sha512(m) => m.finalize().into_bytes().to_vec(),
        }
    }
}

/// The request's credential parsed, its timestamp checked and the headers the template names
/// looked up: everything but the MAC.
pub(crate) struct Parsed<'a> {
    candidate: Vec<u8>,
    /// The value of each part of the template that is not text or the body, in order.
    values: Vec<&'a str>,
}

/// A credential from where the configuration says it travels.
pub(crate) fn credential<'a>(
    at: &CredentialAt,
    headers: &'a (impl HeaderLookup + ?Sized),
) -> Option<Cow<'a, str>> {
    match at {
        CredentialAt::Header(h) => headers.header(h).map(Cow::Borrowed),
        CredentialAt::Query(q) => headers.query(q),
    }
    .filter(|v| !v.trim().is_empty())
}

pub(crate) fn parse<'a>(
    spec: &HmacSpec,
    headers: &'a (impl HeaderLookup + ?Sized),
    now: i64,
    tolerance: u64,
) -> Result<Parsed<'a>, SignatureError> {
    let value = credential(&spec.signature, headers).ok_or(SignatureError::Missing("signature"))?;
    let encoded = value
        .trim()
        .strip_prefix(spec.prefix.as_str())
        .ok_or(SignatureError::Invalid)?;
    let candidate = match spec.encoding {
        Encoding::Hex => hex::decode(encoded).ok(),
        Encoding::Base64 => STANDARD.decode(encoded).ok(),
    }
    .ok_or(SignatureError::Invalid)?;
    let timestamp = match &spec.timestamp {
        None => None,
        Some((header, unit)) => {
            let text = headers
                .header(header)
                .ok_or(SignatureError::Missing("timestamp"))?;
            let ts: i64 = text.trim().parse().map_err(|_| SignatureError::Invalid)?;
            let seconds = match unit {
                TimestampUnit::Seconds => ts,
                TimestampUnit::Milliseconds => ts.div_euclid(1000),
            };
            check_tolerance(seconds, now, tolerance)?;
            Some(text)
        }
    };
    let mut values = Vec::new();
    for part in spec.content.parts() {
        match part {
            ContentPart::Timestamp => values.push(timestamp.ok_or(SignatureError::Invalid)?),
            ContentPart::Header(h) => values.push(
                headers
                    .header(h)
                    .ok_or(SignatureError::Missing("signed header"))?,
            ),
            ContentPart::Text(_) | ContentPart::Body => {}
        }
    }
    Ok(Parsed { candidate, values })
}

/// Feeds the rendered template to the MAC, part by part (nothing is concatenated).
fn render(m: &mut AnyMac, content: &SignedContent, body: &[u8], values: &[&str]) {
    let mut values = values.iter();
    for part in content.parts() {
        match part {
            ContentPart::Text(t) => m.update(t.as_bytes()),
            ContentPart::Body => m.update(body),
            ContentPart::Timestamp | ContentPart::Header(_) => {
                m.update(values.next().map_or(&b""[..], |v| v.as_bytes()))
            }
        }
    }
}

pub fn verify(
    keys: &[Vec<u8>],
    spec: &HmacSpec,
    headers: &(impl HeaderLookup + ?Sized),
    body: &[u8],
    now: i64,
    tolerance: u64,
) -> Result<Verified, SignatureError> {
    let parsed = parse(spec, headers, now, tolerance)?;
    let mut ok = false;
    // Empty keys are skipped, whoever built the key list: anyone can compute `HMAC("", ..)`.
    for key in keys.iter().filter(|k| !k.is_empty()) {
        let mut m = AnyMac::new(spec.algorithm, key);
        render(&mut m, &spec.content, body, &parsed.values);
        ok |= m.matches(&parsed.candidate);
    }
    if ok {
        Ok(Verified::default())
    } else {
        Err(SignatureError::Invalid)
    }
}

/// The signature (and timestamp, and any header the template names, set to `id`) for `body`.
pub fn sign(key: &[u8], spec: &HmacSpec, body: &[u8], now: i64, id: &str) -> SignedRequest {
    let mut out = SignedRequest::default();
    let ts = spec.timestamp.as_ref().map(|(header, unit)| {
        let ts = match unit {
            TimestampUnit::Seconds => now.to_string(),
            TimestampUnit::Milliseconds => now.saturating_mul(1000).to_string(),
        };
        out.headers.push((header.clone(), ts.clone()));
        (header.clone(), ts)
    });
    let mut values: Vec<String> = Vec::new();
    for part in spec.content.parts() {
        match part {
            ContentPart::Timestamp => {
                values.push(ts.as_ref().map(|t| t.1.clone()).unwrap_or_default())
            }
            ContentPart::Header(h) => match &ts {
                Some((th, t)) if th.eq_ignore_ascii_case(h) => values.push(t.clone()),
                _ => {
                    if !out.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(h)) {
                        out.headers.push((h.clone(), id.to_string()));
                    }
                    values.push(id.to_string());
                }
            },
            ContentPart::Text(_) | ContentPart::Body => {}
        }
    }
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let mut m = AnyMac::new(spec.algorithm, key);
    render(&mut m, &spec.content, body, &refs);
    let sig = m.finish();
    let encoded = match spec.encoding {
        Encoding::Hex => hex::encode(sig),
        Encoding::Base64 => STANDARD.encode(sig),
    };
    let value = format!("{}{encoded}", spec.prefix);
    match &spec.signature {
        CredentialAt::Header(h) => out.headers.push((h.clone(), value)),
        CredentialAt::Query(q) => out.query.push((q.clone(), value)),
    }
    out
}
