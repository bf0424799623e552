//! Standard Webhooks (and Svix, which sends the same scheme under `svix-*` header names):
//! `v1,<base64 HMAC>` entries over `{id}.{timestamp}.{body}`, keyed by the base64 part of
//! `whsec_...`, and `v1a,<base64 Ed25519 signature>` entries over the same content, checked
//! against `whpk_...` public keys. An entry verifies when any key of its kind matches.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::{HeaderLookup, SignatureError, Verified, any_matches, check_tolerance, mac};

/// The key bytes of a `whsec_<base64>` secret; the format belongs to the configuration, which
/// checks it once at start-up.
pub use crate::config::whsec_key as decode_secret;

fn first<'a>(
    headers: &'a (impl HeaderLookup + ?Sized),
    names: [&'static str; 2],
) -> Option<&'a str> {
    names.iter().find_map(|n| headers.header(n))
}

/// The scheme's headers, parsed and with the timestamp checked: everything but the MAC.
pub(crate) struct Parsed<'a> {
    id: &'a str,
    ts_text: &'a str,
    candidates: Vec<Vec<u8>>,
    /// `v1a` entries: Ed25519 signatures.
    ed25519: Vec<ed25519_dalek::ed25519::Signature>,
}

pub(crate) fn parse<'a>(
    headers: &'a (impl HeaderLookup + ?Sized),
    now: i64,
    tolerance: u64,
) -> Result<Parsed<'a>, SignatureError> {
    let id =
        first(headers, ["webhook-id", "svix-id"]).ok_or(SignatureError::Missing("webhook-id"))?;
    let ts_text = first(headers, ["webhook-timestamp", "svix-timestamp"])
        .ok_or(SignatureError::Missing("webhook-timestamp"))?;
    let sig = first(headers, ["webhook-signature", "svix-signature"])
        .ok_or(SignatureError::Missing("webhook-signature"))?;
    let ts: i64 = ts_text
        .trim()
        .parse()
        .map_err(|_| SignatureError::Invalid)?;
    check_tolerance(ts, now, tolerance)?;
    let candidates: Vec<Vec<u8>> = sig
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .collect();
    let ed25519: Vec<_> = sig
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1a,"))
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .filter_map(|bytes| ed25519_dalek::ed25519::Signature::from_slice(&bytes).ok())
        .collect();
    if candidates.is_empty() && ed25519.is_empty() {
        return Err(SignatureError::Invalid);
    }
    Ok(Parsed {
        id,
        ts_text,
        candidates,
        ed25519,
    })
}

pub fn verify(
    keys: &[Vec<u8>],
    public_keys: &[ed25519_dalek::VerifyingKey],
    headers: &(impl HeaderLookup + ?Sized),
    body: &[u8],
    now: i64,
    tolerance: u64,
) -> Result<Verified, SignatureError> {
    let Parsed {
        id,
        ts_text,
        candidates,
        ed25519,
    } = parse(headers, now, tolerance)?;
    let parts: [&[u8]; 5] = [id.as_bytes(), b".", ts_text.as_bytes(), b".", body];
    let mut ok = !candidates.is_empty() && any_matches(keys, &parts, &candidates);
    if !ok && !ed25519.is_empty() && !public_keys.is_empty() {
        // Ed25519 hashes the whole message itself: it needs the content in one piece.
        let message = parts.concat();
        ok = public_keys.iter().any(|key| {
            ed25519
                .iter()
                .any(|sig| key.verify_strict(&message, sig).is_ok())
        });
    }
    if ok {
        Ok(Verified {
            delivery_id: Some(id.to_string()),
        })
    } else {
        Err(SignatureError::Invalid)
    }
}

pub fn sign(key: &[u8], id: &str, now: i64, body: &[u8]) -> Vec<(String, String)> {
    let ts = now.to_string();
    let sig = mac(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts),
        (
            "webhook-signature".into(),
            format!("v1,{}", STANDARD.encode(sig)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const TS: i64 = 1614265330;

    fn key() -> Vec<Vec<u8>> {
        vec![decode_secret(SECRET).unwrap()]
    }

    fn headers(sig: &str) -> Vec<(&'static str, String)> {
        vec![
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".into()),
            ("webhook-timestamp", TS.to_string()),
            ("webhook-signature", sig.into()),
        ]
    }

    fn run(
        h: &[(&'static str, String)],
        body: &[u8],
        now: i64,
        keys: &[Vec<u8>],
    ) -> Result<Verified, SignatureError> {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        verify(keys, &[], h.as_slice(), body, now, 300)
    }

    /// The example published with the Standard Webhooks specification.
    const PUBLISHED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn published_example_verifies_and_our_signer_agrees() {
        let v = run(&headers(PUBLISHED), BODY, TS, &key()).unwrap();
        assert_eq!(
            v.delivery_id.as_deref(),
            Some("msg_p5jXN8AQM9LWM0D4loKWxJek")
        );
        let ours = sign(&key()[0], "msg_p5jXN8AQM9LWM0D4loKWxJek", TS, BODY);
        assert_eq!(ours[2].1, PUBLISHED);
    }

    #[test]
    fn svix_header_names_are_accepted() {
        let h: Vec<(&str, &str)> = vec![
            ("svix-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("svix-timestamp", "1614265330"),
            ("svix-signature", PUBLISHED),
        ];
        assert!(verify(&key(), &[], h.as_slice(), BODY, TS, 300).is_ok());
    }

    #[test]
    fn tampered_body_and_wrong_secret_fail() {
        assert_eq!(
            run(&headers(PUBLISHED), b"{\"test\": 1}", TS, &key()),
            Err(SignatureError::Invalid)
        );
        let other = vec![decode_secret("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap()];
        assert_eq!(
            run(&headers(PUBLISHED), BODY, TS, &other),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn stale_and_future_timestamps_fail() {
        let e = Err(SignatureError::TimestampOutOfTolerance(300));
        assert_eq!(run(&headers(PUBLISHED), BODY, TS + 301, &key()), e);
        assert_eq!(run(&headers(PUBLISHED), BODY, TS - 301, &key()), e);
        assert!(run(&headers(PUBLISHED), BODY, TS + 300, &key()).is_ok());
    }

    #[test]
    fn rotation_any_entry_and_any_key_match() {
        let sig = format!("v1,AAAA v2,xyz {PUBLISHED}");
        assert!(run(&headers(&sig), BODY, TS, &key()).is_ok());
        let keys = vec![
            decode_secret("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap(),
            key()[0].clone(),
        ];
        assert!(run(&headers(PUBLISHED), BODY, TS, &keys).is_ok());
    }

    #[test]
    fn malformed_headers_fail_closed() {
        for sig in [
            "",
            "v1",
            "v1,",
            "v1,!!!",
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ] {
            assert_eq!(
                run(&headers(sig), BODY, TS, &key()),
                Err(SignatureError::Invalid),
                "{sig:?}"
            );
        }
        let mut h = headers(PUBLISHED);
        h[1].1 = "yesterday".into();
        assert_eq!(run(&h, BODY, TS, &key()), Err(SignatureError::Invalid));
        let h: Vec<(&str, &str)> = vec![("webhook-id", "x")];
        assert_eq!(
            verify(&key(), &[], h.as_slice(), BODY, TS, 300),
            Err(SignatureError::Missing("webhook-timestamp"))
        );
        assert_eq!(
            run(&headers(PUBLISHED), BODY, TS, &[]),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn secrets_decode_only_when_base64() {
        assert!(decode_secret(SECRET).is_some());
        assert!(decode_secret("whsec_not base64!").is_none());
        assert!(decode_secret("whsec_").is_none());
    }
}
