//! Verifying a caller's ID token as Cloud Run's front end does before the invoker check.

use std::collections::HashMap;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use serde_json::Value;

use crate::Error;
use crate::oidc::GOOGLE_ISSUER;

/// The clock skew allowed on `exp`, in seconds.
const CLOCK_SKEW_SECS: u64 = 60;
/// Google's ID tokens name their issuer with or without the scheme.
const ISSUERS: [&str; 2] = [GOOGLE_ISSUER, "accounts.google.com"];

/// Why a token was refused; the front door answers 401 for every one of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token signed with algorithm {0}, not RS256")]
    Algorithm(String),
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is for another audience")]
    WrongAudience,
    #[error("token is not from Google's issuer")]
    WrongIssuer,
    #[error("token refused: {0}")]
    Invalid(String),
}

/// What the front door reads from a verified token.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Caller {
    /// The caller's account; the invoker binding is checked against it.
    pub(crate) email: Option<String>,
}

/// Checks RS256 ID tokens against a key set, Google's issuer, a list of audiences and `exp`.
pub(crate) struct Verifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier trusting the RSA keys of `jwks` (a key set in Google's shape) for tokens
    /// addressed to any of `audiences` (each also accepted with or without a trailing slash).
    pub(crate) fn new(jwks: &Value, audiences: &[String]) -> Result<Self, Error> {
        let mut keys = HashMap::new();
        for key in jwks["keys"].as_array().into_iter().flatten() {
            let (Some(kid), Some(n), Some(e)) = (key["kid"].as_str(), key["n"].as_str(), key["e"].as_str())
            else {
                continue;
            };
            let decoding = DecodingKey::from_rsa_components(n, e)
                .map_err(|err| Error::InvalidArgument(format!("key {kid} of the key set: {err}")))?;
            keys.insert(kid.to_owned(), decoding);
        }
        if keys.is_empty() {
            return Err(Error::InvalidArgument("the key set holds no RSA key".into()));
        }
        let mut accepted: Vec<String> = Vec::new();
        for audience in audiences {
            let bare = audience.trim_end_matches('/');
            accepted.extend([bare.to_owned(), format!("{bare}/")]);
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&accepted);
        validation.set_issuer(&ISSUERS);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = CLOCK_SKEW_SECS;
        Ok(Self { keys, validation })
    }

    /// The caller of a valid token, or why the token is refused.
    pub(crate) fn verify(&self, token: &str) -> Result<Caller, TokenError> {
        let header = decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let key = header.kid.as_deref().and_then(|kid| self.keys.get(kid)).ok_or(TokenError::UnknownKey)?;
        let data = decode::<Caller>(token, key, &self.validation).map_err(|err| match err.kind() {
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::InvalidAudience => TokenError::WrongAudience,
            ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
            ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                TokenError::Malformed(err.to_string())
            }
            _ => TokenError::Invalid(err.to_string()),
        })?;
        Ok(data.claims)
    }
}

/// The token of an `Authorization: Bearer …` value (the scheme in any case).
pub(crate) fn bearer(value: &str) -> Result<&str, TokenError> {
    let (scheme, token) = value.trim().split_once(' ').ok_or(TokenError::Missing)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(TokenError::Missing);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::{IdClaims, TokenSigner};

    const AUDIENCE: &str = "http://127.0.0.1:8080";
    const CALLER: &str = "pusher@haishin.iam.gserviceaccount.com";

    fn verifier() -> Verifier {
        Verifier::new(&TokenSigner::new().jwks(), &[AUDIENCE.to_owned()]).unwrap()
    }

    #[test]
    fn a_token_of_the_signer_verifies_with_or_without_a_trailing_slash() {
        let signer = TokenSigner::new();

        let caller = verifier().verify(&signer.sign(AUDIENCE, CALLER)).unwrap();
        let slashed = verifier().verify(&signer.sign(&format!("{AUDIENCE}/"), CALLER)).unwrap();

        assert_eq!(caller.email.as_deref(), Some(CALLER));
        assert_eq!(slashed.email.as_deref(), Some(CALLER));
    }

    #[test]
    fn forged_expired_misaddressed_and_foreign_tokens_are_refused_for_their_reason() {
        let signer = TokenSigner::new();
        let mut expired = IdClaims::new(AUDIENCE, CALLER);
        expired.exp -= 7200;
        let mut foreign = IdClaims::new(AUDIENCE, CALLER);
        foreign.iss = "https://issuer.example".into();
        let verifier = verifier();

        let verify = |token: &str| verifier.verify(token).unwrap_err();

        assert_eq!(verify(&TokenSigner::impostor().sign(AUDIENCE, CALLER)), TokenError::BadSignature);
        assert_eq!(verify(&signer.sign_claims(&expired)), TokenError::Expired);
        assert_eq!(verify(&signer.sign("http://127.0.0.1:9", CALLER)), TokenError::WrongAudience);
        assert_eq!(verify(&signer.sign_claims(&foreign)), TokenError::WrongIssuer);
        assert!(matches!(verify("not-a-jwt"), TokenError::Malformed(_)));
    }

    #[test]
    fn bearer_values_are_read_in_any_case() {
        assert_eq!(bearer("Bearer a.b.c"), Ok("a.b.c"));
        assert_eq!(bearer("bearer  a.b.c "), Ok("a.b.c"));
        assert_eq!(bearer("Basic dXNlcg=="), Err(TokenError::Missing));
        assert_eq!(bearer("Bearer "), Err(TokenError::Missing));
    }
}
