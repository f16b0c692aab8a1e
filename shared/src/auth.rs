//! Verification of the Google-signed OIDC tokens that Pub/Sub push and Cloud Tasks attach.
//!
//! Keys come from a JWKS URL (Google's by default; the local stand-ins serve their own), cached
//! read-mostly and refetched when a token names a key the cache does not hold. A request without
//! a valid token is answered 401 and changes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

/// Google's key set for the ID tokens it signs.
pub(crate) const GOOGLE_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";
const ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];
/// Shortest time between two key-set fetches triggered by unknown key ids.
const REFETCH_INTERVAL: Duration = Duration::from_secs(10);

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
}

#[derive(Debug, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kid: String,
    kty: String,
    n: Option<String>,
    e: Option<String>,
}

/// Checks ID tokens for one audience and a set of allowed callers.
#[derive(Debug)]
pub(crate) struct OidcVerifier {
    jwks_url: String,
    audience: String,
    invokers: HashSet<String>,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: Mutex<Option<Instant>>,
}

impl OidcVerifier {
    /// A verifier for tokens whose audience is `audience` and whose `email` is one of `invokers`.
    pub(crate) fn new(
        jwks_url: impl Into<String>,
        audience: impl Into<String>,
        invokers: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            jwks_url: jwks_url.into(),
            audience: audience.into(),
            invokers: invokers.into_iter().filter(|s| !s.is_empty()).collect(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a TLS backend is available"),
            keys: RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
        }
    }

    /// Verifies a token's signature, issuer, audience, expiry and caller.
    pub(crate) async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::Malformed(format!("unexpected algorithm {:?}", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| AuthError::Malformed("no key id".into()))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&ISSUERS);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims =
            decode::<Claims>(token, &key, &validation).map_err(|e| AuthError::Invalid(e.to_string()))?.claims;
        if !claims.email_verified || !self.invokers.contains(&claims.email) {
            return Err(AuthError::Forbidden(claims.email));
        }
        Ok(claims)
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, AuthError> {
        if let Some(key) = self.keys.read().await.get(kid) {
            return Ok(key.clone());
        }
        // One fetch at a time; callers that waited find the keys the first one fetched.
        let mut last = self.last_fetch.lock().await;
        if let Some(key) = self.keys.read().await.get(kid) {
            return Ok(key.clone());
        }
        if last.is_some_and(|at| at.elapsed() < REFETCH_INTERVAL) {
            return Err(AuthError::UnknownKey);
        }
        let fetched = self.fetch_keys().await;
        *last = Some(Instant::now());
        let keys = fetched?;
        let found = keys.get(kid).cloned();
        *self.keys.write().await = keys;
        found.ok_or(AuthError::UnknownKey)
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, DecodingKey>, AuthError> {
        let jwks: Jwks = self
            .http
            .get(&self.jwks_url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| AuthError::KeySet(e.to_string()))?
            .json()
            .await
            .map_err(|e| AuthError::KeySet(e.to_string()))?;
        Ok(jwks
            .keys
            .into_iter()
            .filter(|k| k.kty == "RSA")
            .filter_map(|k| {
                let key = DecodingKey::from_rsa_components(k.n.as_deref()?, k.e.as_deref()?).ok()?;
                Some((k.kid, key))
            })
            .collect())
    }
}

/// Middleware for push and task routes: 401 unless the request carries a valid token.
pub(crate) async fn require_token(
    State(verifier): State<Arc<OidcVerifier>>,
    request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let result = match token {
        Some(token) => verifier.verify(token).await,
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
