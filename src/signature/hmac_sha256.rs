//! Generic HMAC-SHA256 over the body, in a configured header, hex or base64, with an optional
//! prefix such as `sha256=`. Shopify is this scheme with `X-Shopify-Hmac-Sha256`, base64, no prefix.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::{HeaderLookup, SignatureError, Verified, any_matches, mac};
use crate::config::Encoding;

/// The configured header parsed: the candidate MAC.
pub(crate) fn parse(
    headers: &(impl HeaderLookup + ?Sized),
    header: &str,
    encoding: Encoding,
    prefix: &str,
) -> Result<Vec<u8>, SignatureError> {
    let value = headers
        .header(header)
        .ok_or(SignatureError::Missing("signature"))?;
    let encoded = value
        .trim()
        .strip_prefix(prefix)
        .ok_or(SignatureError::Invalid)?;
    match encoding {
        Encoding::Hex => hex::decode(encoded).ok(),
        Encoding::Base64 => STANDARD.decode(encoded).ok(),
    }
    .ok_or(SignatureError::Invalid)
}

pub fn verify(
    keys: &[Vec<u8>],
    headers: &(impl HeaderLookup + ?Sized),
    body: &[u8],
    header: &str,
    encoding: Encoding,
    prefix: &str,
) -> Result<Verified, SignatureError> {
    let candidate = parse(headers, header, encoding, prefix)?;
    if any_matches(keys, &[body], &[candidate]) {
        Ok(Verified::default())
    } else {
        Err(SignatureError::Invalid)
    }
}

pub fn sign(
    key: &[u8],
    body: &[u8],
    header: &str,
    encoding: Encoding,
    prefix: &str,
) -> Vec<(String, String)> {
    let sig = mac(key, &[body]);
    let encoded = match encoding {
        Encoding::Hex => hex::encode(sig),
        Encoding::Base64 => STANDARD.encode(sig),
    };
    vec![(header.to_string(), format!("{prefix}{encoded}"))]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed by Python's hmac module (tests/vectors/generate.py), Shopify style.
    const REF: &str = "sA+jAdh45g0SWUj9ecl/q3pQqdUqJ0cxo8ei9OICOkI=";
    const BODY: &[u8] =
        br#"{"id":"evt_1","type":"object.created","data":{"object_id":123,"lead_id":8473}}"#;
    const KEY: &[u8] = b"shpss_sprintlink_test_secret";

    fn run(
        value: &str,
        body: &[u8],
        enc: Encoding,
        prefix: &str,
    ) -> Result<Verified, SignatureError> {
        let h: Vec<(&str, &str)> = vec![("X-Sig", value)];
        verify(&[KEY.to_vec()], h.as_slice(), body, "x-sig", enc, prefix)
    }

    #[test]
    fn base64_reference_and_signer_agree() {
        assert!(run(REF, BODY, Encoding::Base64, "").is_ok());
        assert_eq!(sign(KEY, BODY, "x-sig", Encoding::Base64, "")[0].1, REF);
    }

    #[test]
    fn hex_with_prefix_round_trips_and_prefix_is_required() {
        let v = sign(KEY, BODY, "x-sig", Encoding::Hex, "sha256=")[0]
            .1
            .clone();
        assert!(run(&v, BODY, Encoding::Hex, "sha256=").is_ok());
        assert_eq!(
            run(&v[7..], BODY, Encoding::Hex, "sha256="),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            run(&v, b"x", Encoding::Hex, "sha256="),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn malformed_and_missing_fail_closed() {
        assert_eq!(
            run("%%%", BODY, Encoding::Base64, ""),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            run("abc", BODY, Encoding::Hex, ""),
            Err(SignatureError::Invalid)
        );
        let none: Vec<(&str, &str)> = vec![];
        assert_eq!(
            verify(
                &[KEY.to_vec()],
                none.as_slice(),
                BODY,
                "x-sig",
                Encoding::Hex,
                ""
            ),
            Err(SignatureError::Missing("signature"))
        );
    }
}
