//! Verifying a token's signature against a key set, cached read-mostly and fetched again when a
//! token names a key the cache does not hold.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

use super::{AuthError, Claims};

/// Google's key set for the ID tokens it signs.
pub(crate) const GOOGLE_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";
/// Shortest time between two key-set fetches triggered by unknown key ids.
const REFETCH_INTERVAL: Duration = Duration::from_secs(10);

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

/// The keys of one key set (a JWKS URL), fetched on demand.
#[derive(Debug)]
pub(super) struct KeySet {
    jwks_url: String,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: Mutex<Option<Instant>>,
}

impl KeySet {
    pub(super) fn new(jwks_url: String) -> Self {
        Self {
            jwks_url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a TLS backend is available"),
            keys: RwLock::new(HashMap::new()),
            last_fetch: Mutex::new(None),
        }
    }

    /// Verifies a token's signature (RS256, by a key of the set) and returns its claims, which
    /// the caller still checks.
    pub(super) async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::Malformed(format!("unexpected algorithm {:?}", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| AuthError::Malformed("no key id".into()))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims =
            decode::<Claims>(token, &key, &validation).map_err(|e| AuthError::Invalid(e.to_string()))?.claims;
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
