//! Google-style OIDC ID tokens, signed with an RSA key made for the run, and the key set that
//! verifies them.
//!
//! Pub/Sub push and Cloud Tasks attach such a token (`Authorization: Bearer …`) when a push
//! subscription or a task names a service account. A verifier pointed at
//! [`KeySetServer::jwks_url`] instead of `https://www.googleapis.com/oauth2/v3/certs` accepts the
//! tokens of [`TokenSigner::new`] and refuses those of [`TokenSigner::impostor`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::server::Served;

/// The issuer Google puts in the ID tokens it signs.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";
/// The path of Google's key set (`https://www.googleapis.com/oauth2/v3/certs`), served alike.
pub const JWKS_PATH: &str = "/oauth2/v3/certs";
/// How long a token is valid, as Google's.
const TOKEN_LIFETIME_SECS: i64 = 3600;
/// A cached token is replaced when it has less than this left.
const REFRESH_MARGIN_SECS: i64 = 300;

/// One RSA-2048 key pair and what its key-set entry needs.
struct SigningKey {
    pair: KeyPair,
    /// Base64url modulus and exponent, for the key set.
    n: String,
    e: String,
}

impl SigningKey {
    fn generate() -> Self {
        let pair = KeyPair::generate(KeySize::Rsa2048).expect("RSA-2048 key generation succeeds");
        let public = pair.public_key();
        let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
        let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
        Self { pair, n, e }
    }
}

/// The run's key, made once per process: key generation is slow enough to matter in tests.
fn genuine_key() -> Arc<SigningKey> {
    static KEY: OnceLock<Arc<SigningKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(SigningKey::generate())).clone()
}

/// A second key that no key set publishes.
fn impostor_key() -> Arc<SigningKey> {
    static KEY: OnceLock<Arc<SigningKey>> = OnceLock::new();
    KEY.get_or_init(|| Arc::new(SigningKey::generate())).clone()
}

/// The key id of the run's key: stable within a process, different across runs.
fn genuine_kid() -> &'static str {
    static KID: OnceLock<String> = OnceLock::new();
    KID.get_or_init(|| format!("haishin-local-{}", uuid::Uuid::new_v4().simple()))
}

/// The claims of a Google-signed ID token for a service account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdClaims {
    pub iss: String,
    pub aud: String,
    pub email: String,
    pub email_verified: bool,
    /// The service account's unique id (numeric, as Google's).
    pub sub: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
}

impl IdClaims {
    /// Claims for `service_account_email` calling `audience`, issued now and valid for an hour.
    pub fn new(audience: &str, service_account_email: &str) -> Self {
        let now = chrono::Utc::now().timestamp();
        Self {
            iss: GOOGLE_ISSUER.to_owned(),
            aud: audience.to_owned(),
            email: service_account_email.to_owned(),
            email_verified: true,
            sub: numeric_id(service_account_email),
            iat: now,
            exp: now + TOKEN_LIFETIME_SECS,
        }
    }
}

/// Signs ID tokens (RS256) as Google does for Pub/Sub push and Cloud Tasks.
///
/// Clones share the key and the token cache.
#[derive(Clone)]
pub struct TokenSigner {
    key: Arc<SigningKey>,
    kid: &'static str,
    /// Tokens by (audience, email), reused until shortly before they expire, as Google's are.
    cache: Arc<Mutex<TokenCache>>,
}

/// Tokens and their expiry, by (audience, service account).
type TokenCache = HashMap<(String, String), (String, i64)>;

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl Default for TokenSigner {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenSigner {
    /// A signer with the run's key (generated once per process and published by [`KeySetServer`]).
    pub fn new() -> Self {
        Self::with_key(genuine_key())
    }

    /// A signer with another key that claims the run's key id: a forger, whose tokens a correct
    /// verifier refuses on their signature.
    pub fn impostor() -> Self {
        Self::with_key(impostor_key())
    }

    fn with_key(key: Arc<SigningKey>) -> Self {
        Self { key, kid: genuine_kid(), cache: Arc::default() }
    }

    /// The key id (`kid`) in the header of every token.
    pub fn key_id(&self) -> &str {
        self.kid
    }

    /// A token for `service_account_email` with audience `audience`.
    ///
    /// The same token is returned again until five minutes before it expires.
    pub fn sign(&self, audience: &str, service_account_email: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let key = (audience.to_owned(), service_account_email.to_owned());
        let mut cache = self.cache.lock().expect("token cache lock");
        if let Some((token, exp)) = cache.get(&key)
            && exp - now > REFRESH_MARGIN_SECS
        {
            return token.clone();
        }
        let claims = IdClaims::new(audience, service_account_email);
        let token = self.sign_claims(&claims);
        cache.insert(key, (token.clone(), claims.exp));
        token
    }

    /// A fresh token with exactly these claims (for example an expired one).
    pub fn sign_claims(&self, claims: &IdClaims) -> String {
        let header = serde_json::json!({ "alg": "RS256", "kid": self.kid, "typ": "JWT" });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"))
        );
        let mut signature = vec![0; self.key.pair.public_modulus_len()];
        self.key
            .pair
            .sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), signing_input.as_bytes(), &mut signature)
            .expect("RSA signing succeeds");
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// The key set (JWKS) holding this signer's public key, in the shape of Google's.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "RSA",
                "alg": "RS256",
                "use": "sig",
                "kid": self.kid,
                "n": self.key.n,
                "e": self.key.e,
            }]
        })
    }
}

/// Serves a signer's key set at `http://127.0.0.1:PORT/oauth2/v3/certs`.
#[derive(Debug)]
pub struct KeySetServer {
    served: Served,
}

impl KeySetServer {
    /// Starts serving `signer`'s key set on `port` (0: any free port).
    pub async fn start(signer: &TokenSigner, port: u16) -> Result<Self, crate::Error> {
        let jwks = signer.jwks();
        let router = Router::new().route(JWKS_PATH, get(move || async move { Json(jwks) }));
        let served = Served::start(port, router, CancellationToken::new()).await?;
        Ok(Self { served })
    }

    /// The URL to give a verifier in place of Google's key-set URL.
    pub fn jwks_url(&self) -> String {
        format!("{}{JWKS_PATH}", self.served.url())
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        self.served.shutdown().await;
    }
}

/// A 21-digit id derived from `email`, in the form of a service account's unique id.
fn numeric_id(email: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, email.as_bytes());
    let mut head = [0; 8];
    head.copy_from_slice(&digest.as_ref()[..8]);
    format!("1{:020}", u64::from_be_bytes(head))
}
