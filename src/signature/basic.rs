//! `basic`: HTTP Basic authentication (RFC 7617); each secret is `user:password`. The decoded
//! credentials are compared in constant time against every configured pair.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::{HeaderLookup, SignatureError, Verified, any_secret};

/// The decoded `user:password` of the `Authorization` header.
pub(crate) fn parse(headers: &(impl HeaderLookup + ?Sized)) -> Result<Vec<u8>, SignatureError> {
    let value = headers
        .header("authorization")
        .filter(|v| !v.trim().is_empty())
        .ok_or(SignatureError::Missing("Authorization"))?;
    let (scheme, b64) = value
        .trim()
        .split_once(' ')
        .ok_or(SignatureError::Invalid)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(SignatureError::Invalid);
    }
    STANDARD
        .decode(b64.trim())
        .map_err(|_| SignatureError::Invalid)
}

pub fn verify(
    secrets: &[Vec<u8>],
    headers: &(impl HeaderLookup + ?Sized),
) -> Result<Verified, SignatureError> {
    let given = parse(headers)?;
    if any_secret(secrets, &given) {
        Ok(Verified::default())
    } else {
        Err(SignatureError::Invalid)
    }
}

pub fn sign(secret: &[u8]) -> Vec<(String, String)> {
    vec![(
        "Authorization".into(),
        format!("Basic {}", STANDARD.encode(secret)),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(value: Option<&str>) -> Result<Verified, SignatureError> {
        let keys = vec![b"erp:old-password".to_vec(), b"erp:s3cret-pass".to_vec()];
        let h: Vec<(&str, &str)> = value
            .map(|v| vec![("Authorization", v)])
            .unwrap_or_default();
        verify(&keys, h.as_slice())
    }

    #[test]
    fn rfc7617_example_and_rotation() {
        // RFC 7617 section 2: Aladdin / open sesame.
        let keys = vec![b"Aladdin:open sesame".to_vec()];
        let h: Vec<(&str, &str)> = vec![("authorization", "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")];
        assert!(verify(&keys, h.as_slice()).is_ok());
        assert_eq!(
            sign(b"Aladdin:open sesame")[0].1,
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert!(run(Some(&sign(b"erp:old-password")[0].1)).is_ok());
        assert!(run(Some(&sign(b"erp:s3cret-pass")[0].1)).is_ok());
        assert!(
            run(Some(
                &sign(b"erp:s3cret-pass")[0].1.replace("Basic", "basic")
            ))
            .is_ok()
        );
    }

    #[test]
    fn wrong_malformed_and_missing_fail_closed() {
        assert_eq!(
            run(Some(&sign(b"erp:wrong")[0].1)),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            run(Some(&sign(b"other:s3cret-pass")[0].1)),
            Err(SignatureError::Invalid)
        );
        for bad in [
            "Basic",
            "Basic !!!",
            "Bearer ZXJwOnMzY3JldC1wYXNz",
            "ZXJwOnMzY3JldC1wYXNz",
        ] {
            assert_eq!(run(Some(bad)), Err(SignatureError::Invalid), "{bad}");
        }
        assert_eq!(run(None), Err(SignatureError::Missing("Authorization")));
        assert_eq!(
            run(Some(" ")),
            Err(SignatureError::Missing("Authorization"))
        );
    }
}
