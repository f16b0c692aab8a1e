//! SendGrid's Event Webhook, posted to `POST /webhooks/sendgrid`.
//!
//! SendGrid signs each post with ECDSA (P-256, SHA-256) over the timestamp header followed by the
//! raw body, and sends the base64 DER signature in `X-Twilio-Email-Event-Webhook-Signature`. The
//! verification key is the one SendGrid shows once signing is enabled
//! (`SENDGRID_WEBHOOK_PUBLIC_KEY`, base64 DER or PEM). A post whose timestamp is more than
//! [`MAX_SKEW`] away from now is refused, so a captured post cannot be replayed later.
//!
//! Of the events, `bounce` is a hard bounce (a `blocked` bounce is soft), `spamreport` a
//! complaint; the others are not feedback. An event carries its request's id when the message
//! was sent with the custom argument `haishin_request`.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ParsedPublicKey};
use axum::http::HeaderMap;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{Feedback, Kind, Refused};

pub const SIGNATURE_HEADER: &str = "X-Twilio-Email-Event-Webhook-Signature";
pub const TIMESTAMP_HEADER: &str = "X-Twilio-Email-Event-Webhook-Timestamp";
/// How far a post's timestamp may be from now.
pub const MAX_SKEW: chrono::Duration = chrono::Duration::minutes(10);

/// SendGrid's verification key: a P-256 `SubjectPublicKeyInfo`.
#[derive(Clone)]
pub struct SendGridKey(ParsedPublicKey);

impl std::fmt::Debug for SendGridKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SendGridKey(P-256)")
    }
}

impl SendGridKey {
    /// Reads the key as SendGrid shows it (base64 DER), or as PEM.
    pub fn parse(text: &str) -> Result<Self, String> {
        let body: String = text
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .flat_map(|line| line.trim().chars())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| "SENDGRID_WEBHOOK_PUBLIC_KEY is not base64 DER or PEM".to_owned())?;
        ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, der)
            .map(Self)
            .map_err(|_| "SENDGRID_WEBHOOK_PUBLIC_KEY is not a P-256 public key".to_owned())
    }

    /// Checks the post's signature and age.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: DateTime<Utc>) -> Result<(), Refused> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| Refused::Unauthorized(format!("{name} is missing")))
        };
        let signature = header(SIGNATURE_HEADER)?;
        let timestamp = header(TIMESTAMP_HEADER)?;
        let sent_at = timestamp
            .parse::<i64>()
            .ok()
            .and_then(|secs| DateTime::from_timestamp(secs, 0))
            .ok_or_else(|| Refused::Unauthorized(format!("{TIMESTAMP_HEADER} is not a Unix time")))?;
        if (now - sent_at).abs() > MAX_SKEW {
            return Err(Refused::Unauthorized(format!("{TIMESTAMP_HEADER} is too far from now")));
        }
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|_| Refused::Unauthorized(format!("{SIGNATURE_HEADER} is not base64")))?;
        let mut signed = Vec::with_capacity(timestamp.len() + body.len());
        signed.extend_from_slice(timestamp.as_bytes());
        signed.extend_from_slice(body);
        self.0
            .verify_sig(&signed, &signature)
            .map_err(|_| Refused::Unauthorized("the signature does not verify".into()))
    }
}

/// One event of the webhook's JSON array (the fields this reads).
#[derive(Debug, Deserialize)]
struct Event {
    email: String,
    event: String,
    timestamp: Option<i64>,
    sg_event_id: Option<String>,
    #[serde(rename = "type")]
    bounce_type: Option<String>,
    reason: Option<String>,
    haishin_request: Option<String>,
}

/// The bounces and complaints of a verified post.
pub fn feedback(body: &[u8]) -> Result<Vec<Feedback>, Refused> {
    let events: Vec<Event> = serde_json::from_slice(body)
        .map_err(|e| Refused::Malformed(format!("the body is not an array of SendGrid events: {e}")))?;
    Ok(events
        .into_iter()
        .filter_map(|event| {
            let kind = match (event.event.as_str(), event.bounce_type.as_deref()) {
                ("bounce", Some("blocked")) => Kind::SoftBounce,
                ("bounce", _) => Kind::Bounce,
                ("spamreport", _) => Kind::Complaint,
                _ => return None,
            };
            let occurred_at =
                event.timestamp.and_then(|secs| DateTime::from_timestamp(secs, 0)).unwrap_or_else(Utc::now);
            // SendGrid gives every event an id; without one, the event's own fields identify it.
            let event_id = event.sg_event_id.unwrap_or_else(|| {
                let key = haishin_shared::suppression::address_key(&event.email);
                format!("{}:{}:{key}", event.event, occurred_at.timestamp())
            });
            Some(Feedback {
                event_id,
                kind,
                detail: event.reason.map(|r| r.chars().take(200).collect()),
                request_id: event.haishin_request,
                email: event.email,
                occurred_at,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_is_not_p256_is_refused_at_start() {
        assert!(SendGridKey::parse("not base64!").is_err());
        assert!(SendGridKey::parse("AAAA").is_err());
    }

    #[test]
    fn events_other_than_bounces_and_spam_reports_are_not_feedback() {
        let body = br#"[{"email": "a@example.com", "event": "open", "timestamp": 1},
                        {"email": "b@example.com", "event": "bounce", "type": "blocked", "timestamp": 1},
                        {"email": "c@example.com", "event": "spamreport", "timestamp": 1}]"#;
        let kinds: Vec<Kind> = feedback(body).unwrap().iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [Kind::SoftBounce, Kind::Complaint]);
        assert!(matches!(feedback(b"{}"), Err(Refused::Malformed(_))));
    }
}
