//! One-click unsubscribe tokens: what each message's `List-Unsubscribe` URL carries, signed by
//! the sender and checked by the trigger's `/unsubscribe/{token}`.
//!
//! A token is `PAYLOAD.MAC`, both base64url without padding: the payload is the JSON array
//! `[address, scope, expires]` (the recipient's [`address_key`](crate::suppression::address_key),
//! the scope an unsubscribe suppresses, the expiry in Unix seconds), and the MAC is HMAC-SHA256
//! over a context string and the encoded payload, keyed with `UNSUBSCRIBE_SECRET`. The endpoint
//! suppresses the address in the token without looking the recipient up: the address is the
//! recipient's own, in their own mail. The MAC is checked before anything in the payload is read,
//! and a token is never logged.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::suppression::GLOBAL;

/// The shortest secret accepted, in bytes: as long as the MAC.
pub const MIN_SECRET_BYTES: usize = 32;
/// The longest token read; anything longer is malformed.
pub const MAX_TOKEN_LEN: usize = 2048;
/// What the MAC covers before the payload, so that this key signs nothing else by mistake.
const CONTEXT: &[u8] = b"haishin-unsubscribe-v1.";

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// The recipient's address, normalised.
    pub address: String,
    /// `global`, or the label `key:value` the unsubscribe applies to.
    pub scope: String,
    pub expires_at: DateTime<Utc>,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("this unsubscribe link is malformed")]
    Malformed,
    #[error("this unsubscribe link was not issued by this sender, or was altered")]
    Forged,
    #[error("this unsubscribe link has expired")]
    Expired,
}

/// The key tokens are signed and checked with.
#[derive(Clone)]
pub struct TokenKey {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from `UNSUBSCRIBE_SECRET`; refused when shorter than [`MIN_SECRET_BYTES`].
    pub fn new(secret: &str) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!("must be at least {MIN_SECRET_BYTES} bytes long, not {}", secret.len()));
        }
        let mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|e| e.to_string())?;
        Ok(Self { mac })
    }

    fn mac_of(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(CONTEXT);
        mac.update(payload.as_bytes());
        mac
    }

    /// The token for these claims.
    pub fn sign(&self, claims: &TokenClaims) -> String {
        let payload = serde_json::to_vec(&(&claims.address, &claims.scope, claims.expires_at.timestamp()))
            .expect("strings and a number serialise");
        let payload = URL_SAFE_NO_PAD.encode(payload);
        let mac = self.mac_of(&payload).finalize().into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(mac))
    }

    /// The claims of a token this key signed and that has not expired at `now`.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<TokenClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (payload, mac) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| TokenError::Malformed)?;
        self.mac_of(payload).verify_slice(&mac).map_err(|_| TokenError::Forged)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed)?;
        let (address, scope, expires): (String, String, i64) =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        let expires_at = DateTime::from_timestamp(expires, 0).ok_or(TokenError::Malformed)?;
        if expires_at <= now {
            return Err(TokenError::Expired);
        }
        Ok(TokenClaims { address, scope, expires_at })
    }
}

/// What the sender needs to give each message its token: the key, the label whose value scopes
/// an unsubscribe, and how long a token lasts.
#[derive(Debug, Clone)]
pub struct TokenIssuer {
    key: TokenKey,
    scope_label: String,
    lifetime: Duration,
}

impl TokenIssuer {
    pub fn new(key: TokenKey, scope_label: impl Into<String>, lifetime: Duration) -> Self {
        Self { key, scope_label: scope_label.into(), lifetime }
    }

    /// The scope an unsubscribe from a request with these labels suppresses: `label:value` when
    /// the request has the scope label, `global` otherwise.
    pub fn scope(&self, labels: &BTreeMap<String, String>) -> String {
        match labels.get(&self.scope_label) {
            Some(value) => format!("{}:{value}", self.scope_label),
            None => GLOBAL.to_owned(),
        }
    }

    /// The token of one recipient (`address` normalised), expiring a lifetime after `now`.
    pub fn token(&self, address: &str, scope: &str, now: DateTime<Utc>) -> String {
        let claims = TokenClaims {
            address: address.to_owned(),
            scope: scope.to_owned(),
            expires_at: now + self.lifetime,
        };
        self.key.sign(&claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn claims(expires_at: DateTime<Utc>) -> TokenClaims {
        TokenClaims { address: "a@example.com".into(), scope: "category:news".into(), expires_at }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn a_token_reads_back_until_it_expires() {
        let key = TokenKey::new(SECRET).unwrap();
        let token = key.sign(&claims(at(2_000)));
        assert!(token.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)), "{token}");
        assert_eq!(key.verify(&token, at(1_999)), Ok(claims(at(2_000))));
        assert_eq!(key.verify(&token, at(2_000)), Err(TokenError::Expired));
    }

    #[test]
    fn a_forged_or_altered_token_is_refused() {
        let key = TokenKey::new(SECRET).unwrap();
        let other = TokenKey::new("another secret, just as long as the first").unwrap();
        let token = key.sign(&claims(at(2_000)));
        assert_eq!(other.verify(&token, at(0)), Err(TokenError::Forged));
        let (payload, mac) = token.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"["b@example.com","global",2000]"#);
        assert_eq!(key.verify(&format!("{forged_payload}.{mac}"), at(0)), Err(TokenError::Forged));
        let mut flipped = mac.to_owned().into_bytes();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = format!("{payload}.{}", String::from_utf8(flipped).unwrap());
        assert_eq!(key.verify(&flipped, at(0)), Err(TokenError::Forged));
        for malformed in ["", "no-dot", "a.b!", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert_eq!(key.verify(malformed, at(0)), Err(TokenError::Malformed), "{malformed}");
        }
        assert!(TokenKey::new("short").is_err());
    }

    #[test]
    fn the_scope_is_the_request_s_label_or_global() {
        let issuer = TokenIssuer::new(TokenKey::new(SECRET).unwrap(), "category", Duration::days(60));
        let labels = BTreeMap::from([("category".to_owned(), "news".to_owned())]);
        assert_eq!(issuer.scope(&labels), "category:news");
        assert_eq!(issuer.scope(&BTreeMap::new()), "global");
        let token = issuer.token("a@example.com", "category:news", at(0));
        let read = TokenKey::new(SECRET).unwrap().verify(&token, at(1)).unwrap();
        assert_eq!(read.expires_at, at(60 * 86_400));
    }
}
