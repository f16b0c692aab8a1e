//! Authentication of push and task routes: the Google-signed OIDC tokens that Pub/Sub push and
//! Cloud Tasks attach.
//!
//! Two modes, chosen by `PUSH_AUTH`:
//! - [`PushAuthMode::CloudRunIam`] (production): Cloud Run's IAM invoker check is the gate. Cloud
//!   Run verifies the token's signature and the caller's `roles/run.invoker` binding before the
//!   request reaches the container, and forwards the token with its signature replaced by
//!   `SIGNATURE_REMOVED_BY_GOOGLE`, so the service cannot verify it again. It checks what it can
//!   and must: the forwarded claims (issuer, audience, expiry, and that the caller is one of
//!   `PUSH_INVOKERS`, a narrower set than the invoker bindings when the API's callers may also
//!   invoke the service).
//! - [`PushAuthMode::Verify`]: the service verifies the whole token itself, signature included,
//!   against the key set at `OIDC_JWKS_URL` (Google's by default). For a service deployed with the
//!   invoker check disabled (`invoker_iam_disabled`) and its ingress kept internal.
//!
//! Either way a request without an acceptable token is answered 401 and changes nothing.
//!
//! - this module: the mode, the claims, the checks, the middleware;
//! - `jwks`: signature verification with a read-mostly key cache.

mod jwks;

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;

pub(crate) use jwks::GOOGLE_JWKS_URL;

/// The issuers of Google-signed ID tokens.
const ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];
/// Clock skew allowed when checking a token's expiry, in seconds.
const LEEWAY_SECS: i64 = 60;

/// How push and task routes are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PushAuthMode {
    /// Cloud Run's IAM invoker check verified the token; the service checks its forwarded claims.
    CloudRunIam,
    /// The service verifies the token's signature itself, then its claims.
    Verify,
}

/// Why a token was refused. Shown to the caller in the 401 body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token was issued to {0}, which may not call this service")]
    Forbidden(String),
    #[error("key set unavailable: {0}")]
    KeySet(String),
}

/// The claims this service relies on.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Claims {
    pub(crate) email: String,
    #[serde(default)]
    pub(crate) email_verified: bool,
    aud: String,
    iss: String,
    exp: i64,
}

/// Checks the tokens of one service: its audience and the accounts allowed to call it.
#[derive(Debug)]
pub(crate) struct PushAuth {
    mode: PushAuthMode,
    audience: String,
    invokers: HashSet<String>,
    keys: jwks::KeySet,
}

impl PushAuth {
    pub(crate) fn new(
        mode: PushAuthMode,
        jwks_url: impl Into<String>,
        audience: impl Into<String>,
        invokers: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            mode,
            audience: audience.into(),
            invokers: invokers.into_iter().filter(|s| !s.is_empty()).collect(),
            keys: jwks::KeySet::new(jwks_url.into()),
        }
    }

    /// The caller's claims when the token is acceptable in this service's mode.
    pub(crate) async fn check(&self, token: &str) -> Result<Claims, AuthError> {
        let claims = match self.mode {
            PushAuthMode::Verify => self.keys.verify(token).await?,
            PushAuthMode::CloudRunIam => forwarded_claims(token)?,
        };
        self.check_claims(claims, chrono::Utc::now().timestamp())
    }

    fn check_claims(&self, claims: Claims, now: i64) -> Result<Claims, AuthError> {
        if !ISSUERS.contains(&claims.iss.as_str()) {
            return Err(AuthError::Invalid(format!("issuer `{}` is not Google", claims.iss)));
        }
        if claims.aud != self.audience {
            return Err(AuthError::Invalid(format!("audience `{}` is not this service", claims.aud)));
        }
        if claims.exp + LEEWAY_SECS < now {
            return Err(AuthError::Invalid("token expired".into()));
        }
        if !claims.email_verified || !self.invokers.contains(&claims.email) {
            return Err(AuthError::Forbidden(claims.email));
        }
        Ok(claims)
    }
}

/// The claims of a token that Cloud Run forwarded: its payload, read without the signature that
/// Cloud Run removed after checking it.
fn forwarded_claims(token: &str) -> Result<Claims, AuthError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("not a JWT (header.payload.signature)".into()));
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| AuthError::Malformed(format!("payload is not base64url: {e}")))?;
    serde_json::from_slice(&json).map_err(|e| AuthError::Malformed(format!("payload: {e}")))
}

/// Middleware for push and task routes: 401 unless the request carries an acceptable token.
pub(crate) async fn require_token(
    State(auth): State<Arc<PushAuth>>,
    request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let result = match token {
        Some(token) => auth.check(token).await,
        None => Err(AuthError::Missing),
    };
    match result {
        Ok(_) => next.run(request).await,
        Err(AuthError::KeySet(reason)) => {
            tracing::error!(%reason, "Key set unavailable; refusing push.");
            (StatusCode::SERVICE_UNAVAILABLE, "key set unavailable").into_response()
        }
        Err(err) => {
            tracing::warn!(error = %err, path = %request.uri().path(), "Unauthenticated push refused.");
            (StatusCode::UNAUTHORIZED, err.to_string()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> PushAuth {
        PushAuth::new(
            PushAuthMode::CloudRunIam,
            "http://127.0.0.1:9/keys",
            "https://trigger.example",
            ["push@p.iam.gserviceaccount.com".to_owned()],
        )
    }

    /// A token as Cloud Run forwards it: `header.payload.SIGNATURE_REMOVED_BY_GOOGLE`.
    fn forwarded(claims: &serde_json::Value) -> String {
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
        };
        format!("{}.{}.SIGNATURE_REMOVED_BY_GOOGLE", b64(&serde_json::json!({"alg": "RS256"})), b64(claims))
    }

    fn claims(aud: &str, email: &str, exp: i64) -> serde_json::Value {
        serde_json::json!({"iss": "https://accounts.google.com", "aud": aud, "exp": exp,
                           "email": email, "email_verified": true})
    }

    fn check(token: &str) -> Result<Claims, AuthError> {
        let auth = auth();
        auth.check_claims(forwarded_claims(token)?, 1_000)
    }

    #[test]
    fn a_forwarded_token_of_an_allowed_caller_is_accepted_without_its_signature() {
        let token = forwarded(&claims("https://trigger.example", "push@p.iam.gserviceaccount.com", 2_000));
        assert_eq!(check(&token).unwrap().email, "push@p.iam.gserviceaccount.com");
    }

    #[test]
    fn forwarded_claims_are_still_checked() {
        let wrong_audience =
            forwarded(&claims("https://elsewhere.example", "push@p.iam.gserviceaccount.com", 2_000));
        assert!(matches!(check(&wrong_audience), Err(AuthError::Invalid(_))));
        let expired = forwarded(&claims("https://trigger.example", "push@p.iam.gserviceaccount.com", 100));
        assert!(matches!(check(&expired), Err(AuthError::Invalid(_))));
        let stranger =
            forwarded(&claims("https://trigger.example", "api-caller@p.iam.gserviceaccount.com", 2_000));
        assert!(matches!(check(&stranger), Err(AuthError::Forbidden(_))));
        let mut other_issuer = claims("https://trigger.example", "push@p.iam.gserviceaccount.com", 2_000);
        other_issuer["iss"] = "https://evil.example".into();
        assert!(matches!(check(&forwarded(&other_issuer)), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn what_is_not_a_token_is_malformed() {
        for token in ["", "abc", "a.b", "a.b.c.d", "a.!!!.c"] {
            assert!(matches!(check(token), Err(AuthError::Malformed(_))), "{token}");
        }
    }
}
