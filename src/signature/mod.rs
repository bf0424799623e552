//! Webhook signature verification: pure computation over the raw body bytes, a few headers and
//! the query string. One file per scheme; `Verifier` picks the scheme a source is configured
//! with (presets are schemes with keys filled in by the configuration). Every check fails
//! closed and compares secrets in constant time.

pub mod basic;
pub mod github;
pub mod hmac;
pub mod standard_webhooks;
pub mod stripe;
pub mod token;

use std::borrow::Cow;

use ::hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Scheme, SchemeSpec, SourceConfig};

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Read access to a request's headers (and query string), so verification does not depend on
/// an HTTP framework.
pub trait HeaderLookup {
    /// The header's value, case-insensitively by name; `None` when absent or not text.
    fn header(&self, name: &str) -> Option<&str>;

    /// The first value of a query parameter of the request URL, percent-decoded; `None` when
    /// absent. Only requests that carry their URL's query answer it.
    fn query(&self, _name: &str) -> Option<Cow<'_, str>> {
        None
    }
}

impl HeaderLookup for http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
}

impl HeaderLookup for [(&str, &str)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// Headers together with the query string of the request URL (for `signature_query` and
/// `token_query`).
pub struct WithQuery<'a, H: ?Sized> {
    pub headers: &'a H,
    pub query: Option<&'a str>,
}

impl<'a, H: HeaderLookup + ?Sized> WithQuery<'a, H> {
    pub fn new(headers: &'a H, query: Option<&'a str>) -> Self {
        WithQuery { headers, query }
    }
}

impl<H: HeaderLookup + ?Sized> HeaderLookup for WithQuery<'_, H> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.header(name)
    }

    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        form_urlencoded::parse(self.query?.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature header {0}")]
    Missing(&'static str),
    #[error("signature does not match")]
    Invalid,
    #[error("signature timestamp is outside the tolerance of {0} seconds")]
    TimestampOutOfTolerance(u64),
}

impl SignatureError {
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing(_) => "missing_signature",
            SignatureError::Invalid => "invalid_signature",
            SignatureError::TimestampOutOfTolerance(_) => "timestamp_out_of_tolerance",
        }
    }
}

/// What a verified request tells us beyond "it is authentic".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// The scheme's own delivery id when the signature covers it (Standard Webhooks'
    /// `webhook-id`), the default event id. Unsigned ids (`X-GitHub-Delivery`) are not given:
    /// a replay could change them at will.
    pub delivery_id: Option<String>,
}

/// What a sender adds to a request so that `verify` accepts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignedRequest {
    pub headers: Vec<(String, String)>,
    /// Query parameters of the webhook URL (`signature_query`, `token_query`).
    pub query: Vec<(String, String)>,
}

/// Why `sign` cannot make a request for a source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CannotSign {
    #[error(
        "this source has only whpk_ (Ed25519 public) keys, and sprintlink cannot sign with a public key; the sender signs with its private key (or add a whsec_ secret to the source)"
    )]
    PublicKeysOnly,
    #[error("this source has no usable secret")]
    NoKey,
    #[error("this source's scheme keys are invalid (run check-config)")]
    Misconfigured,
}

/// A source's verifier: its parsed scheme, its keys (several during a rotation) and its
/// tolerance.
#[derive(Clone)]
pub struct Verifier {
    scheme: Scheme,
    /// `None` when the keys did not parse (reported by check-config): everything is rejected.
    spec: Option<SchemeSpec>,
    /// HMAC keys, tokens or `user:password` pairs, as bytes.
    keys: Vec<Vec<u8>>,
    /// Standard Webhooks `whpk_` keys.
    public_keys: Vec<ed25519_dalek::VerifyingKey>,
    tolerance_seconds: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("scheme", &self.scheme)
            .field("keys", &self.keys.len())
            .field("public_keys", &self.public_keys.len())
            .finish()
    }
}

impl Verifier {
    pub fn from_source(source: &SourceConfig) -> Verifier {
        let spec = source.scheme_spec().ok();
        let ed25519 = |s: &str| source.scheme == Scheme::StandardWebhooks && s.starts_with("whpk_");
        let keys = source
            .secrets
            .iter()
            .map(|s| s.expose())
            .filter(|s| !ed25519(s))
            .filter_map(|s| match source.scheme {
                // A secret that does not decode was reported by config validation; a verifier
                // without keys rejects everything, which is the closed way to fail.
                Scheme::StandardWebhooks => standard_webhooks::decode_secret(s),
                _ => Some(s.as_bytes().to_vec()),
            })
            // An empty key is no key (anyone can compute `HMAC("", body)`); config validation
            // refuses it too, this is the second line.
            .filter(|k: &Vec<u8>| !k.is_empty())
            .collect();
        let public_keys = source
            .secrets
            .iter()
            .map(|s| s.expose())
            .filter(|s| ed25519(s))
            .filter_map(crate::config::whpk_key)
            .filter_map(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
            .collect();
        Verifier {
            scheme: source.scheme,
            spec,
            keys,
            public_keys,
            tolerance_seconds: source.tolerance_seconds,
        }
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Checks `body` against the request's credentials at time `now` (unix seconds).
    pub fn verify(
        &self,
        headers: &(impl HeaderLookup + ?Sized),
        body: &[u8],
        now: i64,
    ) -> Result<Verified, SignatureError> {
        let tolerance = self.tolerance_seconds;
        match self.spec.as_ref().ok_or(SignatureError::Invalid)? {
            SchemeSpec::StandardWebhooks => standard_webhooks::verify(
                &self.keys,
                &self.public_keys,
                headers,
                body,
                now,
                tolerance,
            ),
            SchemeSpec::Github => github::verify(&self.keys, headers, body),
            SchemeSpec::Stripe => stripe::verify(&self.keys, headers, body, now, tolerance),
            SchemeSpec::Hmac(spec) => hmac::verify(&self.keys, spec, headers, body, now, tolerance),
            SchemeSpec::Token(spec) => token::verify(&self.keys, spec, headers),
            SchemeSpec::Basic => basic::verify(&self.keys, headers),
        }
    }

    /// The cheap part of `verify`, run before the body is read: the scheme's credentials are
    /// present and well formed and the timestamp (where the scheme has one) is within tolerance.
    /// It uses the same parsing as `verify`, so a request that passes here fails `verify` only
    /// on the MAC (or the token itself).
    pub fn precheck(
        &self,
        headers: &(impl HeaderLookup + ?Sized),
        now: i64,
    ) -> Result<(), SignatureError> {
        let tolerance = self.tolerance_seconds;
        match self.spec.as_ref().ok_or(SignatureError::Invalid)? {
            SchemeSpec::StandardWebhooks => {
                standard_webhooks::parse(headers, now, tolerance).map(|_| ())
            }
            SchemeSpec::Github => github::parse(headers).map(|_| ()),
            SchemeSpec::Stripe => stripe::parse(headers, now, tolerance).map(|_| ()),
            SchemeSpec::Hmac(spec) => hmac::parse(spec, headers, now, tolerance).map(|_| ()),
            SchemeSpec::Token(spec) => token::parse(spec, headers).map(|_| ()),
            SchemeSpec::Basic => basic::parse(headers).map(|_| ()),
        }
    }

    /// The headers and query parameters a sender must add so that `verify` accepts `body`;
    /// signed with the first secret. Used by `sprintlink sign`, the demo and tests.
    pub fn sign_request(
        &self,
        body: &[u8],
        now: i64,
        id: &str,
    ) -> Result<SignedRequest, CannotSign> {
        let spec = self.spec.as_ref().ok_or(CannotSign::Misconfigured)?;
        let Some(key) = self.keys.first().map(Vec::as_slice) else {
            return Err(if self.public_keys.is_empty() {
                CannotSign::NoKey
            } else {
                CannotSign::PublicKeysOnly
            });
        };
        let headers = |h: Vec<(String, String)>| SignedRequest {
            headers: h,
            query: Vec::new(),
        };
        Ok(match spec {
            SchemeSpec::StandardWebhooks => headers(standard_webhooks::sign(key, id, now, body)),
            SchemeSpec::Github => headers(github::sign(key, id, body)),
            SchemeSpec::Stripe => headers(stripe::sign(key, now, body)),
            SchemeSpec::Hmac(spec) => hmac::sign(key, spec, body, now, id),
            SchemeSpec::Token(spec) => token::sign(key, spec),
            SchemeSpec::Basic => headers(basic::sign(key)),
        })
    }

    /// The headers of `sign_request` (empty when it cannot sign); for the schemes that sign in
    /// headers only.
    pub fn sign(&self, body: &[u8], now: i64, id: &str) -> Vec<(String, String)> {
        self.sign_request(body, now, id)
            .map(|s| s.headers)
            .unwrap_or_default()
    }
}

/// Constant-time equality of two secrets of any length: their SHA-256 digests are compared,
/// so neither the content nor the length of the configured secret leaks through timing.
pub(crate) fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

/// True when `candidate` equals any of `secrets`; every secret is compared.
pub(crate) fn any_secret(secrets: &[Vec<u8>], candidate: &[u8]) -> bool {
    let mut ok = false;
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        ok |= secret_eq(s, candidate);
    }
    ok
}

/// HMAC-SHA256 of the concatenated parts.
pub(crate) fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// True when any key's MAC over `parts` equals any candidate, each comparison in constant time.
pub(crate) fn any_matches(keys: &[Vec<u8>], parts: &[&[u8]], candidates: &[Vec<u8>]) -> bool {
    let mut ok = false;
    // Empty keys are skipped here as well, whoever built the key list.
    for key in keys.iter().filter(|k| !k.is_empty()) {
        let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        for p in parts {
            m.update(p);
        }
        for c in candidates {
            // verify_slice consumes the MAC, so each candidate gets a clone of the state.
            ok |= m.clone().verify_slice(c).is_ok();
        }
    }
    ok
}

/// Rejects timestamps too far in the past or the future.
pub(crate) fn check_tolerance(ts: i64, now: i64, tolerance: u64) -> Result<(), SignatureError> {
    if now.abs_diff(ts) > tolerance {
        Err(SignatureError::TimestampOutOfTolerance(tolerance))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod reference_vectors {
    //! Vectors produced by the schemes' own reference implementations (see
    //! tests/vectors/generate.py and generate_schemes.py for the libraries and versions), not by
    //! our signer.
    use super::*;
    use crate::config::{Encoding, LeadConfig, Secret};

    fn source(
        scheme: Scheme,
        secret: &str,
        header: Option<&str>,
        enc: Option<Encoding>,
    ) -> SourceConfig {
        SourceConfig {
            name: "t".into(),
            scheme,
            secrets: vec![
                Secret::new("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
                Secret::new(secret),
            ],
            signature_header: header.map(str::to_string),
            encoding: enc,
            event_id: None,
            event_type: None,
            accept_types: vec![],
            object_id: Some("/o".into()),
            object: None,
            lead: LeadConfig::default(),
            ..SourceConfig::example("t", "")
        }
    }

    #[test]
    fn all_reference_vectors_verify_and_tampering_fails() {
        let text = include_str!("../../tests/vectors/signatures.json");
        let vectors: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
        assert!(vectors.len() >= 8);
        for v in vectors {
            let scheme = match v["scheme"].as_str().unwrap() {
                "standard-webhooks" => Scheme::StandardWebhooks,
                "stripe" => Scheme::Stripe,
                "github" => Scheme::Github,
                _ => Scheme::HmacSha256,
            };
            let (header, enc) = if scheme == Scheme::HmacSha256 {
                (Some("X-Shopify-Hmac-Sha256"), Some(Encoding::Base64))
            } else {
                (None, None)
            };
            let verifier =
                Verifier::from_source(&source(scheme, v["secret"].as_str().unwrap(), header, enc));
            let headers: Vec<(&str, &str)> = v["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
                .collect();
            let body = v["body"].as_str().unwrap().as_bytes();
            let now = v["timestamp"].as_i64().unwrap_or(1_700_000_000);
            let r = verifier.verify(headers.as_slice(), body, now);
            assert!(r.is_ok(), "{} failed: {r:?}", v["produced_by"]);
            let mut tampered = body.to_vec();
            tampered[0] ^= 1;
            assert_eq!(
                verifier.verify(headers.as_slice(), &tampered, now),
                Err(SignatureError::Invalid),
                "{}",
                v["produced_by"]
            );
        }
    }

    /// A vector of tests/vectors/schemes.json: the source's keys, the request, the time.
    struct Vector {
        name: String,
        source: SourceConfig,
        headers: Vec<(String, String)>,
        query: Option<String>,
        body: Vec<u8>,
        now: i64,
    }

    fn scheme_vectors() -> Vec<Vector> {
        let text = include_str!("../../tests/vectors/schemes.json");
        let vectors: Vec<serde_json::Value> = serde_json::from_str(text).unwrap();
        vectors
            .into_iter()
            .map(|v| {
                let mut keys = v["source"].clone();
                keys["name"] = "t".into();
                keys["object_id"] = "/o".into();
                keys["lead"] = serde_json::json!({"id": "/l"});
                let mut source: SourceConfig = serde_json::from_value(keys).unwrap();
                source.apply_preset();
                Vector {
                    name: v["name"].as_str().unwrap().to_string(),
                    source,
                    headers: v["headers"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect(),
                    query: v["query"].as_str().map(str::to_string),
                    body: v["body"].as_str().unwrap().as_bytes().to_vec(),
                    now: v["timestamp"].as_i64().unwrap(),
                }
            })
            .collect()
    }

    fn check(
        v: &Vector,
        verifier: &Verifier,
        headers: &[(String, String)],
        body: &[u8],
        now: i64,
    ) -> Result<Verified, SignatureError> {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let req = WithQuery::new(h.as_slice(), v.query.as_deref());
        let pre = verifier.precheck(&req, now);
        let verdict = verifier.verify(&req, body, now);
        if let Err(e) = pre {
            assert_eq!(
                verdict,
                Err(e.clone()),
                "{}: precheck and verify agree",
                v.name
            );
        }
        verdict
    }

    #[test]
    fn scheme_and_preset_vectors_verify_and_every_tampering_fails() {
        let vectors = scheme_vectors();
        assert!(vectors.len() >= 14);
        for v in &vectors {
            let verifier = Verifier::from_source(&v.source);
            assert!(
                check(v, &verifier, &v.headers, &v.body, v.now).is_ok(),
                "{}",
                v.name
            );
            // Tampered body.
            let mut tampered = v.body.clone();
            tampered[1] ^= 1;
            let expect = if v.source.scheme.is_token() || v.source.scheme == Scheme::Basic {
                Ok(Verified::default())
            } else {
                Err(SignatureError::Invalid)
            };
            assert_eq!(
                check(v, &verifier, &v.headers, &tampered, v.now),
                expect,
                "{}: tampered",
                v.name
            );
            // Wrong secret (a token or key of the same shape).
            let mut wrong = v.source.clone();
            wrong.secrets = v
                .source
                .secrets
                .iter()
                .map(|s| {
                    let mut t = s.expose().to_string();
                    if let Some(pk) = t.strip_prefix("whpk_") {
                        let other =
                            ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
                        let _ = pk;
                        use base64::Engine;
                        t = format!(
                            "whpk_{}",
                            base64::engine::general_purpose::STANDARD.encode(other.as_bytes())
                        );
                    } else if let Some(b) = t.strip_prefix("whsec_") {
                        t = format!("whsec_{}", b.chars().rev().collect::<String>());
                    } else {
                        t.push('x');
                    }
                    Secret::new(t)
                })
                .collect();
            let w = Verifier::from_source(&wrong);
            assert_eq!(
                check(v, &w, &v.headers, &v.body, v.now),
                Err(SignatureError::Invalid),
                "{}: wrong secret",
                v.name
            );
            // Every credential header missing (the query too), then each value malformed.
            let cred: Vec<(String, String)> = v
                .headers
                .iter()
                .filter(|(k, _)| {
                    let k = k.to_ascii_lowercase();
                    k.contains("sig")
                        || k.contains("hottok")
                        || k == "authorization"
                        || k.contains("hmac")
                })
                .cloned()
                .collect();
            let rest: Vec<(String, String)> = v
                .headers
                .iter()
                .filter(|h| !cred.contains(h))
                .cloned()
                .collect();
            let no_query = Vector {
                query: None,
                name: v.name.clone(),
                source: v.source.clone(),
                headers: vec![],
                body: vec![],
                now: 0,
            };
            let missing = check(&no_query, &verifier, &rest, &v.body, v.now);
            assert!(
                matches!(missing, Err(SignatureError::Missing(_))),
                "{}: missing gives {missing:?}",
                v.name
            );
            for (k, _) in &cred {
                for bad in ["", "!!!", "v0=zz", "sha256=", "Basic", "v1a,AAAA"] {
                    let mut h = rest.clone();
                    h.push((k.clone(), bad.to_string()));
                    let r = check(v, &verifier, &h, &v.body, v.now);
                    assert!(r.is_err(), "{}: {k}={bad:?} accepted", v.name);
                }
            }
        }
    }

    #[test]
    fn timestamped_vectors_are_refused_outside_the_tolerance() {
        for v in scheme_vectors().iter().filter(|v| {
            v.source.scheme == Scheme::StandardWebhooks || v.source.timestamp_header.is_some()
        }) {
            let verifier = Verifier::from_source(&v.source);
            let stale = Err(SignatureError::TimestampOutOfTolerance(300));
            assert_eq!(
                check(v, &verifier, &v.headers, &v.body, v.now + 301),
                stale,
                "{}",
                v.name
            );
            assert_eq!(
                check(v, &verifier, &v.headers, &v.body, v.now - 301),
                stale,
                "{}",
                v.name
            );
            assert!(
                check(v, &verifier, &v.headers, &v.body, v.now + 299).is_ok(),
                "{}",
                v.name
            );
            // A missing timestamp header is a missing credential.
            let h: Vec<(String, String)> = v
                .headers
                .iter()
                .filter(|(k, _)| !k.to_ascii_lowercase().contains("timestamp"))
                .cloned()
                .collect();
            assert!(
                matches!(
                    check(v, &verifier, &h, &v.body, v.now),
                    Err(SignatureError::Missing(_))
                ),
                "{}",
                v.name
            );
        }
    }

    #[test]
    fn our_signer_reproduces_the_hmac_vectors() {
        for v in scheme_vectors().iter().filter(|v| {
            v.source.scheme.is_hmac()
                && v.source
                    .signed_content
                    .as_deref()
                    .is_none_or(|c| !c.contains("header:"))
        }) {
            let verifier = Verifier::from_source(&v.source);
            let signed = verifier.sign_request(&v.body, v.now, "id").unwrap();
            let header = v.source.signature_header.as_deref().unwrap();
            let ours = signed
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(header))
                .unwrap();
            let theirs = v
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(header))
                .unwrap();
            if v.source.timestamp_unit.is_none() {
                assert_eq!(ours.1, theirs.1, "{}", v.name);
            }
        }
    }

    #[test]
    fn a_source_with_only_public_keys_cannot_sign() {
        let v = scheme_vectors()
            .into_iter()
            .find(|v| v.name == "v1a")
            .unwrap();
        let verifier = Verifier::from_source(&v.source);
        assert_eq!(
            verifier.sign_request(b"{}", 1, "m"),
            Err(CannotSign::PublicKeysOnly)
        );
        let mixed = scheme_vectors()
            .into_iter()
            .find(|v| v.name.starts_with("v1 + v1a"))
            .unwrap();
        let verifier = Verifier::from_source(&mixed.source);
        let signed = verifier.sign_request(b"{}", 1_700_000_000, "m").unwrap();
        let h: Vec<(&str, &str)> = signed
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert!(verifier.verify(h.as_slice(), b"{}", 1_700_000_000).is_ok());
    }

    #[test]
    fn v1a_signatures_from_our_ed25519_round_trip_and_a_v1a_entry_never_matches_an_hmac_key() {
        use base64::Engine;
        use ed25519_dalek::ed25519::signature::Signer;
        let b64 = base64::engine::general_purpose::STANDARD;
        let sk = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let pk = format!("whpk_{}", b64.encode(sk.verifying_key().as_bytes()));
        let mut source = SourceConfig::example("t", &pk);
        let body = br#"{"id":"e"}"#;
        let sig = sk.sign(b"msg_1.1700000000.{\"id\":\"e\"}");
        let entry = format!("v1a,{}", b64.encode(sig.to_bytes()));
        let h: Vec<(&str, &str)> = vec![
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", "1700000000"),
            ("webhook-signature", &entry),
        ];
        assert!(
            Verifier::from_source(&source)
                .verify(h.as_slice(), body, 1_700_000_000)
                .is_ok()
        );
        // The same entry, but the source holds only an HMAC secret: kinds do not cross.
        source.secrets = vec![Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")];
        assert_eq!(
            Verifier::from_source(&source).verify(h.as_slice(), body, 1_700_000_000),
            Err(SignatureError::Invalid)
        );
    }
}

#[cfg(test)]
mod empty_keys {
    //! An empty key is no key: `HMAC("", body)` is computable by anyone, so a verifier must
    //! never accept it, whatever the configuration let through.
    use super::*;
    use crate::config::Secret;

    #[test]
    fn a_signature_made_with_an_empty_key_never_verifies() {
        for (scheme, header) in [
            (Scheme::Github, None),
            (Scheme::Stripe, None),
            (Scheme::HmacSha256, Some("x-sig")),
            (Scheme::StandardWebhooks, None),
            (Scheme::Slack, None),
        ] {
            let mut source = SourceConfig::example("t", "");
            source.scheme = scheme;
            source.signature_header = header.map(str::to_string);
            let mut forged_with = Verifier::from_source(&source);
            forged_with.keys = vec![Vec::new()];
            let body = br#"{"id":"evt_forged"}"#;
            let signed = forged_with.sign(body, 1_700_000_000, "msg_forged");
            assert!(!signed.is_empty(), "{scheme:?}");
            let h: Vec<(&str, &str)> = signed
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            // Built from a configuration with an empty secret...
            let v = Verifier::from_source(&source);
            assert_eq!(
                v.verify(h.as_slice(), body, 1_700_000_000),
                Err(SignatureError::Invalid),
                "{scheme:?}"
            );
            // ...or handed an empty key directly, together with a real one.
            let mut direct = forged_with.clone();
            direct.keys.push(b"a real key".to_vec());
            assert_eq!(
                direct.verify(h.as_slice(), body, 1_700_000_000),
                Err(SignatureError::Invalid),
                "{scheme:?}"
            );
        }
        // An empty token or basic pair is never matched either.
        for scheme in [Scheme::Hotmart, Scheme::Basic] {
            let mut source = SourceConfig::example("t", "");
            source.scheme = scheme;
            source.secrets = vec![Secret::new("")];
            let v = Verifier::from_source(&source);
            let h: Vec<(&str, &str)> = vec![("X-HOTMART-HOTTOK", ""), ("Authorization", "Basic ")];
            assert!(v.verify(h.as_slice(), b"{}", 0).is_err(), "{scheme:?}");
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests: whatever a client sends, verification answers an error or a match,
    //! never panics, and never accepts a signature it did not compute.
    use super::*;
    use crate::config::{Encoding, Secret, SignedContent};
    use proptest::prelude::*;

    fn verifiers() -> Vec<Verifier> {
        let mut out = Vec::new();
        let with = |scheme: Scheme, f: &dyn Fn(&mut SourceConfig)| {
            let mut s = SourceConfig::example("t", "k1");
            s.scheme = scheme;
            s.secrets = vec![Secret::new("k1"), Secret::new("another key")];
            f(&mut s);
            let mut v = Verifier::from_source(&s);
            // Standard Webhooks keys are base64-decoded: give it the raw keys directly.
            v.keys = vec![b"k1".to_vec(), b"another key".to_vec()];
            assert!(v.spec.is_some(), "{scheme:?}");
            v
        };
        for scheme in [
            Scheme::StandardWebhooks,
            Scheme::Github,
            Scheme::Stripe,
            Scheme::Slack,
            Scheme::Hotmart,
            Scheme::Basic,
        ] {
            out.push(with(scheme, &|_| {}));
        }
        for encoding in [Encoding::Hex, Encoding::Base64] {
            out.push(with(Scheme::HmacSha256, &|s| {
                s.signature_header = Some("x-sig".into());
                s.encoding = Some(encoding);
                s.prefix = Some("sha256=".into());
            }));
        }
        out.push(with(Scheme::Hmac, &|s| {
            s.signature_header = Some("x-sig".into());
            s.algorithm = Some(crate::config::Algorithm::Sha512);
            s.signed_content = Some("{timestamp}.{header:webhook-id}.{body}".into());
            s.timestamp_header = Some("webhook-timestamp".into());
        }));
        out
    }

    const NAMES: &[&str] = &[
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "svix-id",
        "svix-timestamp",
        "svix-signature",
        "x-hub-signature-256",
        "stripe-signature",
        "x-sig",
        "x-slack-signature",
        "x-slack-request-timestamp",
        "x-hotmart-hottok",
        "authorization",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_headers_never_panic_or_verify(
            values in proptest::collection::vec(".{0,120}", NAMES.len()),
            ts_like in proptest::option::of(0i64..4_000_000_000),
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut headers: Vec<(&str, String)> = NAMES.iter().copied().zip(values).collect();
            if let Some(ts) = ts_like {
                headers[1].1 = ts.to_string();
                headers[7].1 = format!("t={ts},{}", headers[7].1);
                headers[10].1 = ts.to_string();
            }
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            for v in verifiers() {
                let verdict = v.verify(h.as_slice(), &body, 1_700_000_000);
                prop_assert!(verdict.is_err());
                // The pre-check is the same parsing: what it rejects, verify rejects alike.
                if let Err(e) = v.precheck(h.as_slice(), 1_700_000_000) {
                    prop_assert_eq!(verdict, Err(e));
                }
            }
        }

        #[test]
        fn structured_but_wrong_signatures_are_rejected(
            sig in proptest::collection::vec(any::<u8>(), 64),
            ts in 1_699_999_800i64..1_700_000_200,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD;
            let hx = hex::encode(&sig[..32]);
            let tss = ts.to_string();
            let sw = format!("v1,{} v1a,{}", b64.encode(&sig[..32]), b64.encode(&sig));
            let st = format!("t={ts},v1={hx}");
            let gh = format!("sha256={hx}");
            let slack = format!("v0={hx}");
            let basic = format!("Basic {}", b64.encode(&sig[..8]));
            let h: Vec<(&str, &str)> = vec![
                ("webhook-id", "msg"), ("webhook-timestamp", &tss), ("webhook-signature", &sw),
                ("stripe-signature", &st), ("x-hub-signature-256", &gh), ("x-sig", &gh),
                ("x-slack-signature", &slack), ("x-slack-request-timestamp", &tss),
                ("x-hotmart-hottok", &hx), ("authorization", &basic),
            ];
            for v in verifiers() {
                prop_assert_eq!(v.verify(h.as_slice(), &body, 1_700_000_000), Err(SignatureError::Invalid));
            }
        }

        #[test]
        fn sign_then_verify_round_trips(body in proptest::collection::vec(any::<u8>(), 0..512), id in "[a-z0-9_]{1,20}") {
            for v in verifiers() {
                let signed = v.sign(&body, 1_700_000_000, &id);
                let h: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                prop_assert!(v.verify(h.as_slice(), &body, 1_700_000_000).is_ok(), "{:?}", v.scheme());
                prop_assert!(v.precheck(h.as_slice(), 1_700_000_000).is_ok(), "{:?}", v.scheme());
                let timed = matches!(v.scheme(), Scheme::StandardWebhooks | Scheme::Stripe | Scheme::Slack | Scheme::Hmac);
                prop_assert_eq!(v.precheck(h.as_slice(), 1_700_000_000 + 301).is_err(), timed);
            }
        }

        /// The template renderer: any template parses or is refused (no panic); a parsed one
        /// signs and verifies, and a signature over any other body, timestamp or header value
        /// is refused.
        #[test]
        fn templates_never_panic_and_never_accept_a_forgery(
            template in "([a-z.:{}]|\\{body\\}|\\{timestamp\\}|\\{header:x-a\\}|\\{header:\\}){0,12}",
            body in proptest::collection::vec(any::<u8>(), 0..64),
            other in proptest::collection::vec(any::<u8>(), 0..64),
            a in "[ -~]{0,16}",
            b in "[ -~]{0,16}",
        ) {
            let Ok(content) = SignedContent::parse(&template) else { return Ok(()); };
            let mut s = SourceConfig::example("t", "k1");
            s.scheme = Scheme::Hmac;
            s.secrets = vec![Secret::new("k1")];
            s.signature_header = Some("x-sig".into());
            s.signed_content = Some(template.clone());
            s.timestamp_header = Some("x-ts".into());
            let Ok(_) = s.scheme_spec() else {
                // Refused at load: a template without {body}.
                prop_assert!(!content.uses(&crate::config::ContentPart::Body));
                return Ok(());
            };
            let v = Verifier::from_source(&s);
            let signed = v.sign_request(&body, 1_700_000_000, &a).unwrap();
            let mut h: Vec<(String, String)> = signed.headers.clone();
            if !h.iter().any(|(k, _)| k == "x-a") {
                h.push(("x-a".into(), a.clone()));
            }
            let view = |h: &[(String, String)]| h.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>();
            let check = |h: &[(String, String)], body: &[u8], now: i64| {
                let r: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                v.verify(r.as_slice(), body, now)
            };
            prop_assert!(check(&h, &body, 1_700_000_000).is_ok());
            if other != body {
                prop_assert_eq!(check(&h, &other, 1_700_000_000), Err(SignatureError::Invalid));
            }
            if content.uses(&crate::config::ContentPart::Header("x-a".into())) && a.trim() != b.trim() && b.trim() == b {
                let mut forged = view(&h);
                for (k, val) in forged.iter_mut() { if k == "x-a" { *val = b.clone(); } }
                prop_assert_eq!(check(&forged, &body, 1_700_000_000), Err(SignatureError::Invalid));
            }
            if content.uses(&crate::config::ContentPart::Timestamp) {
                let mut forged = view(&h);
                for (k, val) in forged.iter_mut() { if k == "x-ts" { *val = "1700000001".into(); } }
                prop_assert_eq!(check(&forged, &body, 1_700_000_000), Err(SignatureError::Invalid));
            }
        }
    }

    #[test]
    fn template_parsing() {
        use crate::config::ContentPart as P;
        let c = SignedContent::parse("v0:{timestamp}:{body}").unwrap();
        assert_eq!(
            c.parts(),
            &[
                P::Text("v0:".into()),
                P::Timestamp,
                P::Text(":".into()),
                P::Body
            ]
        );
        let c = SignedContent::parse("{{{header:X-Id}}}{body}").unwrap();
        assert_eq!(
            c.parts(),
            &[
                P::Text("{".into()),
                P::Header("X-Id".into()),
                P::Text("}".into()),
                P::Body
            ]
        );
        for bad in ["{bodyy}", "{body", "}", "{header:}", "{header:a b}", "{}"] {
            assert!(SignedContent::parse(bad).is_err(), "{bad}");
        }
    }
}
