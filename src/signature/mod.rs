//! Webhook signature verification: pure computation over the raw body bytes and a few headers.
//! One file per scheme; `Verifier` picks the scheme a source is configured with. Every check
//! fails closed and compares MACs in constant time (`Mac::verify_slice`).

pub mod github;
pub mod hmac_sha256;
pub mod standard_webhooks;
pub mod stripe;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{Encoding, Scheme, SourceConfig};

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// Read access to request headers, so verification does not depend on an HTTP framework.
pub trait HeaderLookup {
    /// The header's value, case-insensitively by name; `None` when absent or not text.
    fn header(&self, name: &str) -> Option<&str>;
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

/// A source's verifier: its scheme, its keys (several during a rotation) and its settings.
#[derive(Clone)]
pub struct Verifier {
    scheme: Scheme,
    keys: Vec<Vec<u8>>,
    tolerance_seconds: u64,
    header: String,
    encoding: Encoding,
    prefix: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("scheme", &self.scheme)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Verifier {
    pub fn from_source(source: &SourceConfig) -> Verifier {
        let keys = source
            .secrets
            .iter()
            .filter_map(|s| match source.scheme {
                // A secret that does not decode was reported by config validation; a verifier
                // without keys rejects everything, which is the closed way to fail.
                Scheme::StandardWebhooks => standard_webhooks::decode_secret(s.expose()),
                _ => Some(s.expose().as_bytes().to_vec()),
            })
            // An empty key is no key (anyone can compute `HMAC("", body)`); config validation
            // refuses it too, this is the second line.
            .filter(|k: &Vec<u8>| !k.is_empty())
            .collect();
        Verifier {
            scheme: source.scheme,
            keys,
            tolerance_seconds: source.tolerance_seconds,
            header: source
                .signature_header
                .clone()
                .unwrap_or_else(|| "x-signature".into())
                .to_ascii_lowercase(),
            encoding: source.encoding.unwrap_or_default(),
            prefix: source.prefix.clone().unwrap_or_default(),
        }
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Checks `body` against the request's signature headers at time `now` (unix seconds).
    pub fn verify(
        &self,
        headers: &(impl HeaderLookup + ?Sized),
        body: &[u8],
        now: i64,
    ) -> Result<Verified, SignatureError> {
        match self.scheme {
            Scheme::StandardWebhooks => {
                standard_webhooks::verify(&self.keys, headers, body, now, self.tolerance_seconds)
            }
            Scheme::Github => github::verify(&self.keys, headers, body),
            Scheme::Stripe => {
                stripe::verify(&self.keys, headers, body, now, self.tolerance_seconds)
            }
            Scheme::HmacSha256 => hmac_sha256::verify(
                &self.keys,
                headers,
                body,
                &self.header,
                self.encoding,
                &self.prefix,
            ),
        }
    }

    /// The cheap part of `verify`, run before the body is read: the scheme's headers are present
    /// and well formed and the timestamp (where the scheme has one) is within tolerance. It uses
    /// the same parsing as `verify`, so a request that passes here fails `verify` only on the MAC.
    pub fn precheck(
        &self,
        headers: &(impl HeaderLookup + ?Sized),
        now: i64,
    ) -> Result<(), SignatureError> {
        match self.scheme {
            Scheme::StandardWebhooks => {
                standard_webhooks::parse(headers, now, self.tolerance_seconds).map(|_| ())
            }
            Scheme::Github => github::parse(headers).map(|_| ()),
            Scheme::Stripe => stripe::parse(headers, now, self.tolerance_seconds).map(|_| ()),
            Scheme::HmacSha256 => {
                hmac_sha256::parse(headers, &self.header, self.encoding, &self.prefix).map(|_| ())
            }
        }
    }

    /// The headers a sender must add so that `verify` accepts `body`; signed with the first
    /// secret. Used by `sprintlink sign`, the demo and tests.
    pub fn sign(&self, body: &[u8], now: i64, id: &str) -> Vec<(String, String)> {
        let key = self.keys.first().map(Vec::as_slice).unwrap_or_default();
        match self.scheme {
            Scheme::StandardWebhooks => standard_webhooks::sign(key, id, now, body),
            Scheme::Github => github::sign(key, id, body),
            Scheme::Stripe => stripe::sign(key, now, body),
            Scheme::HmacSha256 => {
                hmac_sha256::sign(key, body, &self.header, self.encoding, &self.prefix)
            }
        }
    }
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
    //! tests/vectors/generate.py for the libraries and versions), not by our signer.
    use super::*;
    use crate::config::{LeadConfig, Secret};

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
            tolerance_seconds: 300,
            signature_header: header.map(str::to_string),
            encoding: enc,
            prefix: None,
            event_id: None,
            event_type: None,
            accept_types: vec![],
            object_id: "/o".into(),
            lead: LeadConfig::default(),
            allow_ips: vec![],
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
}

#[cfg(test)]
mod empty_keys {
    //! An empty key is no key: `HMAC("", body)` is computable by anyone, so a verifier must
    //! never accept it, whatever the configuration let through.
    use super::*;

    #[test]
    fn a_signature_made_with_an_empty_key_never_verifies() {
        for scheme in [
            Scheme::Github,
            Scheme::Stripe,
            Scheme::HmacSha256,
            Scheme::StandardWebhooks,
        ] {
            let mut source = SourceConfig::example("t", "");
            source.scheme = scheme;
            if scheme == Scheme::HmacSha256 {
                source.signature_header = Some("x-sig".into());
            }
            let forged_with = Verifier {
                scheme,
                keys: vec![Vec::new()],
                tolerance_seconds: 300,
                header: "x-sig".into(),
                encoding: Encoding::Hex,
                prefix: String::new(),
            };
            let body = br#"{"id":"evt_forged"}"#;
            let signed = forged_with.sign(body, 1_700_000_000, "msg_forged");
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
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests: whatever a client sends, verification answers an error or a match,
    //! never panics, and never accepts a signature it did not compute.
    use super::*;
    use proptest::prelude::*;

    fn verifiers() -> Vec<Verifier> {
        let keys = vec![b"k1".to_vec(), b"another key".to_vec()];
        [
            Scheme::StandardWebhooks,
            Scheme::Github,
            Scheme::Stripe,
            Scheme::HmacSha256,
        ]
        .into_iter()
        .flat_map(|scheme| {
            [Encoding::Hex, Encoding::Base64]
                .into_iter()
                .map(move |encoding| (scheme, encoding))
        })
        .map(|(scheme, encoding)| Verifier {
            scheme,
            keys: keys.clone(),
            tolerance_seconds: 300,
            header: "x-sig".into(),
            encoding,
            prefix: "sha256=".into(),
        })
        .collect()
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
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

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
            sig in proptest::collection::vec(any::<u8>(), 32),
            ts in 1_699_999_800i64..1_700_000_200,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&sig);
            let hx = hex::encode(&sig);
            let tss = ts.to_string();
            let sw = format!("v1,{b64}");
            let st = format!("t={ts},v1={hx}");
            let gh = format!("sha256={hx}");
            let h: Vec<(&str, &str)> = vec![
                ("webhook-id", "msg"), ("webhook-timestamp", &tss), ("webhook-signature", &sw),
                ("stripe-signature", &st), ("x-hub-signature-256", &gh), ("x-sig", &gh),
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
                prop_assert!(v.precheck(h.as_slice(), 1_700_000_000 + 301).is_err() || v.scheme() == Scheme::Github || v.scheme() == Scheme::HmacSha256);
            }
        }
    }
}
