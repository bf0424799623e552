//! Stripe: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=...]` over `{t}.{body}`, keyed by the whole
//! secret string (not base64-decoded). Other schemes in the header (`v0`) are ignored.

use super::{HeaderLookup, SignatureError, Verified, any_matches, check_tolerance, mac};

/// The header parsed and its timestamp checked: the signed timestamp text and the candidates.
pub(crate) fn parse(
    headers: &(impl HeaderLookup + ?Sized),
    now: i64,
    tolerance: u64,
) -> Result<(&str, Vec<Vec<u8>>), SignatureError> {
    let header = headers
        .header("stripe-signature")
        .ok_or(SignatureError::Missing("Stripe-Signature"))?;
    let mut ts_text = None;
    let mut candidates = Vec::new();
    for item in header.split(',') {
        match item.trim().split_once('=') {
            Some(("t", v)) => ts_text = Some(v),
            Some(("v1", v)) => {
                if let Ok(sig) = hex::decode(v) {
                    candidates.push(sig);
                }
            }
            _ => {}
        }
    }
    let ts_text = ts_text.ok_or(SignatureError::Invalid)?;
    let ts: i64 = ts_text.parse().map_err(|_| SignatureError::Invalid)?;
    if candidates.is_empty() {
        return Err(SignatureError::Invalid);
    }
    check_tolerance(ts, now, tolerance)?;
    Ok((ts_text, candidates))
}

pub fn verify(
    keys: &[Vec<u8>],
    headers: &(impl HeaderLookup + ?Sized),
    body: &[u8],
    now: i64,
    tolerance: u64,
) -> Result<Verified, SignatureError> {
    let (ts_text, candidates) = parse(headers, now, tolerance)?;
    if any_matches(keys, &[ts_text.as_bytes(), b".", body], &candidates) {
        Ok(Verified::default())
    } else {
        Err(SignatureError::Invalid)
    }
}

pub fn sign(key: &[u8], now: i64, body: &[u8]) -> Vec<(String, String)> {
    let ts = now.to_string();
    let sig = mac(key, &[ts.as_bytes(), b".", body]);
    vec![(
        "Stripe-Signature".into(),
        format!("t={ts},v1={}", hex::encode(sig)),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"whsec_test_secret";
    const BODY: &[u8] =
        br#"{"id":"evt_1","type":"object.created","data":{"object_id":123,"lead_id":8473}}"#;
    /// Produced by stripe-python 16.1.0 (`WebhookSignature.generate_signature_header`).
    const REF: &str =
        "t=1700000000,v1=5c21cec3ceeca12f10b670d5b440b10af8e599d2792c6adba879393d87034c01";

    fn run(h: &str, body: &[u8], now: i64, keys: &[Vec<u8>]) -> Result<Verified, SignatureError> {
        let h: Vec<(&str, &str)> = vec![("Stripe-Signature", h)];
        verify(keys, h.as_slice(), body, now, 300)
    }

    #[test]
    fn reference_vector_verifies_and_our_signer_agrees() {
        assert!(run(REF, BODY, 1_700_000_000, &[KEY.to_vec()]).is_ok());
        assert_eq!(sign(KEY, 1_700_000_000, BODY)[0].1, REF);
    }

    #[test]
    fn key_is_the_whole_secret_not_decoded() {
        assert_eq!(
            run(REF, BODY, 1_700_000_000, &[b"test_secret".to_vec()]),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn tampered_stale_future_and_malformed_fail() {
        assert_eq!(
            run(REF, b"{}", 1_700_000_000, &[KEY.to_vec()]),
            Err(SignatureError::Invalid)
        );
        let e = Err(SignatureError::TimestampOutOfTolerance(300));
        assert_eq!(run(REF, BODY, 1_700_000_301, &[KEY.to_vec()]), e);
        assert_eq!(run(REF, BODY, 1_699_999_699, &[KEY.to_vec()]), e);
        for bad in [
            "",
            "t=1700000000",
            "v1=5c21",
            "t=abc,v1=5c21cec3",
            "t=1700000000,v0=5c21cec3ceeca12f10b670d5b440b10af8e599d2792c6adba879393d87034c01",
        ] {
            assert_eq!(
                run(bad, BODY, 1_700_000_000, &[KEY.to_vec()]),
                Err(SignatureError::Invalid),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn several_v1_entries_and_secrets_rotate() {
        let h = format!(
            "t=1700000000,v1={},v0=ignored,{}",
            "00".repeat(32),
            &REF[13..]
        );
        assert!(run(&h, BODY, 1_700_000_000, &[KEY.to_vec()]).is_ok());
        assert!(run(REF, BODY, 1_700_000_000, &[b"old".to_vec(), KEY.to_vec()]).is_ok());
    }
}
