//! `token`: a shared secret sent as is, in a header (after an optional prefix such as
//! `Bearer `) or in a query parameter of the webhook URL. Hotmart is this scheme with
//! `X-HOTMART-HOTTOK`. Compared in constant time against every configured secret.

use std::borrow::Cow;

use super::hmac::credential;
use super::{HeaderLookup, SignatureError, SignedRequest, Verified, any_secret};
use crate::config::{CredentialAt, TokenSpec};

/// The token the request carries, its prefix taken off.
pub(crate) fn parse<'a>(
    spec: &TokenSpec,
    headers: &'a (impl HeaderLookup + ?Sized),
) -> Result<Cow<'a, str>, SignatureError> {
    let value = credential(&spec.at, headers).ok_or(SignatureError::Missing("token"))?;
    if spec.prefix.is_empty() {
        return Ok(value);
    }
    // The prefix is compared case-insensitively (`bearer ` and `Bearer ` both occur).
    let v = value.trim_start();
    match v.get(..spec.prefix.len()) {
        Some(p) if p.eq_ignore_ascii_case(&spec.prefix) => {
            Ok(Cow::Owned(v[spec.prefix.len()..].to_string()))
        }
        _ => Err(SignatureError::Invalid),
    }
}

pub fn verify(
    secrets: &[Vec<u8>],
    spec: &TokenSpec,
    headers: &(impl HeaderLookup + ?Sized),
) -> Result<Verified, SignatureError> {
    let token = parse(spec, headers)?;
    if any_secret(secrets, token.trim().as_bytes()) {
        Ok(Verified::default())
    } else {
        Err(SignatureError::Invalid)
    }
}

pub fn sign(secret: &[u8], spec: &TokenSpec) -> SignedRequest {
    let token = String::from_utf8_lossy(secret).into_owned();
    let mut out = SignedRequest::default();
    match &spec.at {
        CredentialAt::Header(h) => out
            .headers
            .push((h.clone(), format!("{}{token}", spec.prefix))),
        CredentialAt::Query(q) => out.query.push((q.clone(), token)),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::WithQuery;

    const SECRET: &str = "hottok-Zk3n9Q-distinct";

    fn header_spec(prefix: &str) -> TokenSpec {
        TokenSpec {
            at: CredentialAt::Header("X-HOTMART-HOTTOK".into()),
            prefix: prefix.into(),
        }
    }

    fn run(
        spec: &TokenSpec,
        h: &[(&str, &str)],
        q: Option<&str>,
    ) -> Result<Verified, SignatureError> {
        let keys = vec![
            b"old-token-before-rotation".to_vec(),
            SECRET.as_bytes().to_vec(),
        ];
        verify(&keys, spec, &WithQuery::new(h, q))
    }

    #[test]
    fn header_token_rotation_wrong_and_missing() {
        let spec = header_spec("");
        assert!(run(&spec, &[("x-hotmart-hottok", SECRET)], None).is_ok());
        assert!(
            run(
                &spec,
                &[("X-HOTMART-HOTTOK", "old-token-before-rotation")],
                None
            )
            .is_ok()
        );
        assert_eq!(
            run(
                &spec,
                &[("X-HOTMART-HOTTOK", "hottok-Zk3n9Q-distinc")],
                None
            ),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            run(&spec, &[("X-HOTMART-HOTTOK", &format!("{SECRET}x"))], None),
            Err(SignatureError::Invalid)
        );
        assert_eq!(run(&spec, &[], None), Err(SignatureError::Missing("token")));
        assert_eq!(
            run(&spec, &[("X-HOTMART-HOTTOK", "  ")], None),
            Err(SignatureError::Missing("token"))
        );
    }

    #[test]
    fn prefix_is_required_when_configured() {
        let spec = header_spec("Bearer ");
        let with = format!("Bearer {SECRET}");
        assert!(run(&spec, &[("x-hotmart-hottok", &with)], None).is_ok());
        let lower = format!("bearer {SECRET}");
        assert!(run(&spec, &[("x-hotmart-hottok", &lower)], None).is_ok());
        assert_eq!(
            run(&spec, &[("x-hotmart-hottok", SECRET)], None),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            run(&spec, &[("x-hotmart-hottok", "B")], None),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn query_token_is_percent_decoded_and_signed_back() {
        let spec = TokenSpec {
            at: CredentialAt::Query("token".into()),
            prefix: String::new(),
        };
        let encoded = "a=1&token=hottok-Zk3n9Q-distinct&b=2";
        assert!(run(&spec, &[], Some(encoded)).is_ok());
        assert!(run(&spec, &[], Some("token=hottok%2DZk3n9Q%2Ddistinct")).is_ok());
        assert_eq!(
            run(&spec, &[], Some("token=nope")),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            run(&spec, &[], Some("tok=x")),
            Err(SignatureError::Missing("token"))
        );
        assert_eq!(run(&spec, &[], None), Err(SignatureError::Missing("token")));
        let signed = sign(SECRET.as_bytes(), &spec);
        assert_eq!(
            signed.query,
            vec![("token".to_string(), SECRET.to_string())]
        );
        assert!(signed.headers.is_empty());
    }
}
