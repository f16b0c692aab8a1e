//! Amazon SES feedback delivered by Amazon SNS to `POST /webhooks/ses`.
//!
//! Every SNS message is checked as AWS documents it before anything is believed: its topic must
//! be one of `SNS_TOPIC_ARNS`; its `SigningCertURL` must be an `https` URL of an SNS endpoint
//! (`sns.<region>.amazonaws.com`, or `SNS_CERTIFICATE_ORIGIN` where one is set), fetched over TLS
//! and cached; and its `Signature` must verify over the message's canonical string with the
//! certificate's key (RSA with SHA-1 for `SignatureVersion` 1, SHA-256 for 2). A subscription
//! confirmation is confirmed by fetching its `SubscribeURL` (held to the same origin rule); a
//! notification carries an SES bounce or complaint notification as its `Message`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::signature::{
    RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
    VerificationAlgorithm,
};
use base64::Engine;
use chrono::{DateTime, Utc};
use haishin_shared::esp::REQUEST_HEADER;
use haishin_shared::esp::ses::REQUEST_TAG;
use reqwest::Url;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

use super::{Feedback, Kind, Refused};

/// Largest signing certificate read.
const MAX_CERTIFICATE: usize = 64 * 1024;
/// Signing keys kept; SNS rotates its certificate rarely.
const CACHED_KEYS: usize = 16;

/// An SNS message as SNS posts it (the JSON body of `POST /webhooks/ses`).
#[derive(Debug, Deserialize)]
pub struct Envelope {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "MessageId")]
    message_id: String,
    #[serde(rename = "TopicArn")]
    topic_arn: String,
    #[serde(rename = "Subject")]
    subject: Option<String>,
    #[serde(rename = "Message")]
    message: String,
    #[serde(rename = "Timestamp")]
    timestamp: String,
    #[serde(rename = "Token")]
    token: Option<String>,
    #[serde(rename = "SubscribeURL")]
    subscribe_url: Option<String>,
    #[serde(rename = "SignatureVersion")]
    signature_version: String,
    #[serde(rename = "Signature")]
    signature: String,
    #[serde(rename = "SigningCertURL")]
    signing_cert_url: String,
}

/// What a verified SNS message asks for.
#[derive(Debug)]
pub enum Verified {
    /// Confirm the subscription by fetching this URL.
    Confirm(Url),
    /// SES feedback, possibly none (a delivery notification, say).
    Feedback(Vec<Feedback>),
    /// The subscription was removed; nothing to do.
    Unsubscribed,
}

/// Where signing certificates and subscription URLs may come from.
#[derive(Debug, Clone)]
enum Origin {
    /// `https://sns.<region>.amazonaws.com[.cn]/…`.
    Aws,
    /// Under this origin only (a local stand-in of SNS).
    Configured(Url),
}

impl Origin {
    fn allows(&self, url: &Url) -> bool {
        match self {
            Origin::Aws => {
                let host = url.host_str().unwrap_or_default();
                let region = host.strip_prefix("sns.").and_then(|h| {
                    h.strip_suffix(".amazonaws.com").or_else(|| h.strip_suffix(".amazonaws.com.cn"))
                });
                url.scheme() == "https"
                    && url.port().is_none()
                    && region.is_some_and(|r| {
                        !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    })
            }
            Origin::Configured(origin) => {
                url.scheme() == origin.scheme()
                    && url.host_str() == origin.host_str()
                    && url.port_or_known_default() == origin.port_or_known_default()
            }
        }
    }
}

/// Checks SNS messages: topic, certificate origin and signature.
#[derive(Debug)]
pub struct SnsVerifier {
    topics: Vec<String>,
    origin: Origin,
    http: reqwest::Client,
    /// Subject public keys of the certificates fetched, by URL.
    keys: Mutex<HashMap<String, Arc<Vec<u8>>>>,
}

impl SnsVerifier {
    /// A verifier accepting `topics`; certificates from AWS's SNS endpoints, or only from
    /// `origin` when one is given.
    pub fn new(topics: Vec<String>, origin: Option<&str>) -> anyhow::Result<Self> {
        let origin = match origin {
            None => Origin::Aws,
            Some(text) => Origin::Configured(
                Url::parse(text).map_err(|e| anyhow::anyhow!("SNS_CERTIFICATE_ORIGIN {text:?}: {e}"))?,
            ),
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        Ok(Self { topics, origin, http, keys: Mutex::new(HashMap::new()) })
    }

    /// Verifies `envelope` and says what it asks for. `Err` with `Refused::Unavailable` when the
    /// certificate could not be fetched (SNS retries).
    pub async fn verify(&self, envelope: &Envelope) -> Result<Verified, Refused> {
        if !self.topics.contains(&envelope.topic_arn) {
            return Err(Refused::Unauthorized(format!("topic {} is not accepted here", envelope.topic_arn)));
        }
        let algorithm: &'static dyn VerificationAlgorithm = match envelope.signature_version.as_str() {
            "1" => &RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            "2" => &RSA_PKCS1_2048_8192_SHA256,
            other => return Err(Refused::Unauthorized(format!("unknown SignatureVersion {other:?}"))),
        };
        let cert_url = self.allowed(&envelope.signing_cert_url, "SigningCertURL")?;
        if !cert_url.path().ends_with(".pem") {
            return Err(Refused::Unauthorized("SigningCertURL is not a .pem certificate".into()));
        }
        let signature = base64::engine::general_purpose::STANDARD
            .decode(envelope.signature.trim())
            .map_err(|_| Refused::Unauthorized("Signature is not base64".into()))?;
        let key = self.key(&cert_url).await?;
        let signed = string_to_sign(envelope)?;
        UnparsedPublicKey::new(algorithm, key.as_slice())
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| Refused::Unauthorized("the signature does not verify".into()))?;
        match envelope.kind.as_str() {
            "SubscriptionConfirmation" => {
                let url = envelope.subscribe_url.as_deref().unwrap_or_default();
                Ok(Verified::Confirm(self.allowed(url, "SubscribeURL")?))
            }
            "UnsubscribeConfirmation" => Ok(Verified::Unsubscribed),
            _ => ses_feedback(&envelope.message_id, &envelope.message).map(Verified::Feedback),
        }
    }

    /// Confirms a subscription: SNS counts it confirmed once its URL is fetched.
    pub async fn confirm(&self, url: Url) -> Result<(), Refused> {
        let answer = self.http.get(url).send().await.map_err(|e| Refused::Unavailable(e.to_string()))?;
        if !answer.status().is_success() {
            return Err(Refused::Unavailable(format!("SubscribeURL answered {}", answer.status())));
        }
        Ok(())
    }

    fn allowed(&self, text: &str, what: &str) -> Result<Url, Refused> {
        let url = Url::parse(text).map_err(|_| Refused::Unauthorized(format!("{what} is not a URL")))?;
        if !self.origin.allows(&url) {
            return Err(Refused::Unauthorized(format!("{what} is not an SNS endpoint")));
        }
        Ok(url)
    }

    /// The public key of the certificate at `url`, fetched once.
    async fn key(&self, url: &Url) -> Result<Arc<Vec<u8>>, Refused> {
        if let Some(key) = self.keys.lock().expect("key cache").get(url.as_str()) {
            return Ok(key.clone());
        }
        let unavailable = |e: String| Refused::Unavailable(format!("fetching the signing certificate: {e}"));
        let answer = self.http.get(url.clone()).send().await.map_err(|e| unavailable(e.to_string()))?;
        if !answer.status().is_success() {
            return Err(unavailable(format!("answered {}", answer.status())));
        }
        let pem = answer.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        if pem.len() > MAX_CERTIFICATE {
            return Err(Refused::Unauthorized("the signing certificate is too large".into()));
        }
        let key = Arc::new(public_key_of(&pem)?);
        let mut keys = self.keys.lock().expect("key cache");
        if keys.len() >= CACHED_KEYS {
            keys.clear();
        }
        keys.insert(url.as_str().to_owned(), key.clone());
        Ok(key)
    }
}

/// The DER `SubjectPublicKeyInfo` of a PEM certificate.
fn public_key_of(pem: &[u8]) -> Result<Vec<u8>, Refused> {
    let unreadable = || Refused::Unauthorized("the signing certificate cannot be read".into());
    let der = CertificateDer::from_pem_slice(pem).map_err(|_| unreadable())?;
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|_| unreadable())?;
    Ok(cert.subject_public_key_info().as_ref().to_vec())
}

/// The string SNS signs: the message's fields in a fixed order, each as `name\nvalue\n`.
pub fn string_to_sign(envelope: &Envelope) -> Result<String, Refused> {
    let missing = |field: &str| Refused::Unauthorized(format!("{field} is missing"));
    let mut fields: Vec<(&str, &str)> =
        vec![("Message", &envelope.message), ("MessageId", &envelope.message_id)];
    match envelope.kind.as_str() {
        "Notification" => {
            if let Some(subject) = &envelope.subject {
                fields.push(("Subject", subject));
            }
        }
        "SubscriptionConfirmation" | "UnsubscribeConfirmation" => {
            fields.push((
                "SubscribeURL",
                envelope.subscribe_url.as_deref().ok_or_else(|| missing("SubscribeURL"))?,
            ));
        }
        other => return Err(Refused::Unauthorized(format!("unknown message Type {other:?}"))),
    }
    fields.push(("Timestamp", &envelope.timestamp));
    if envelope.kind != "Notification" {
        fields.push(("Token", envelope.token.as_deref().ok_or_else(|| missing("Token"))?));
    }
    fields.push(("TopicArn", &envelope.topic_arn));
    fields.push(("Type", &envelope.kind));
    Ok(fields.iter().map(|(name, value)| format!("{name}\n{value}\n")).collect())
}

/// An SES notification (identity notifications and event publishing both fit).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SesNotification {
    notification_type: Option<String>,
    event_type: Option<String>,
    #[serde(default)]
    mail: Mail,
    bounce: Option<Bounce>,
    complaint: Option<Complaint>,
}

#[derive(Debug, Default, Deserialize)]
struct Mail {
    #[serde(default)]
    tags: HashMap<String, Vec<String>>,
    #[serde(default)]
    headers: Vec<Header>,
}

#[derive(Debug, Deserialize)]
struct Header {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bounce {
    bounce_type: String,
    bounce_sub_type: Option<String>,
    bounced_recipients: Vec<Recipient>,
    timestamp: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Complaint {
    complained_recipients: Vec<Recipient>,
    complaint_feedback_type: Option<String>,
    timestamp: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recipient {
    email_address: String,
}

/// The bounces and complaints of one SES notification; other notifications give none.
fn ses_feedback(message_id: &str, message: &str) -> Result<Vec<Feedback>, Refused> {
    let notification: SesNotification = serde_json::from_str(message)
        .map_err(|e| Refused::Malformed(format!("the Message is not an SES notification: {e}")))?;
    let request_id =
        notification.mail.tags.get(REQUEST_TAG).and_then(|values| values.first().cloned()).or_else(|| {
            let header =
                notification.mail.headers.iter().find(|h| h.name.eq_ignore_ascii_case(REQUEST_HEADER));
            header.map(|h| h.value.clone())
        });
    let kind = notification.notification_type.or(notification.event_type).unwrap_or_default();
    let (kind, detail, occurred_at, recipients) =
        match (kind.as_str(), notification.bounce, notification.complaint) {
            ("Bounce", Some(bounce), _) => {
                let kind = if bounce.bounce_type == "Permanent" { Kind::Bounce } else { Kind::SoftBounce };
                let detail = match bounce.bounce_sub_type {
                    Some(sub) => format!("{}/{sub}", bounce.bounce_type),
                    None => bounce.bounce_type,
                };
                (kind, Some(detail), bounce.timestamp, bounce.bounced_recipients)
            }
            ("Complaint", _, Some(complaint)) => (
                Kind::Complaint,
                complaint.complaint_feedback_type,
                complaint.timestamp,
                complaint.complained_recipients,
            ),
            _ => return Ok(Vec::new()),
        };
    Ok(recipients
        .into_iter()
        .enumerate()
        .map(|(i, recipient)| Feedback {
            event_id: format!("{message_id}:{i}"),
            kind,
            detail: detail.clone(),
            request_id: request_id.clone(),
            email: recipient.email_address,
            occurred_at: occurred_at.unwrap_or_else(Utc::now),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(origin: &Origin, url: &str) -> bool {
        origin.allows(&Url::parse(url).unwrap())
    }

    #[test]
    fn certificates_come_only_from_sns_endpoints_over_https() {
        let aws = Origin::Aws;
        assert!(allowed(&aws, "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"));
        assert!(allowed(&aws, "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem"));
        for url in [
            "http://sns.us-east-1.amazonaws.com/cert.pem",
            "https://sns.us-east-1.amazonaws.com.evil.example/cert.pem",
            "https://evil.example/sns.us-east-1.amazonaws.com/cert.pem",
            "https://sns..amazonaws.com/cert.pem",
            "https://sns.us-east-1.amazonaws.com:8443/cert.pem",
            "https://s3.amazonaws.com/cert.pem",
        ] {
            assert!(!allowed(&aws, url), "{url}");
        }
        let local = Origin::Configured(Url::parse("http://127.0.0.1:9000").unwrap());
        assert!(allowed(&local, "http://127.0.0.1:9000/cert.pem"));
        assert!(!allowed(&local, "http://127.0.0.1:9001/cert.pem"));
        assert!(!allowed(&local, "https://sns.us-east-1.amazonaws.com/cert.pem"));
    }

    fn envelope(kind: &str) -> Envelope {
        serde_json::from_value(serde_json::json!({
            "Type": kind, "MessageId": "m", "TopicArn": "t", "Message": "hello", "Timestamp": "ts",
            "Token": "tok", "SubscribeURL": "https://sns.example/confirm", "SignatureVersion": "1",
            "Signature": "", "SigningCertURL": "u"
        }))
        .unwrap()
    }

    #[test]
    fn the_signed_string_lists_the_fields_sns_signs_in_order() {
        assert_eq!(
            string_to_sign(&envelope("Notification")).unwrap(),
            "Message\nhello\nMessageId\nm\nTimestamp\nts\nTopicArn\nt\nType\nNotification\n"
        );
        assert_eq!(
            string_to_sign(&envelope("SubscriptionConfirmation")).unwrap(),
            "Message\nhello\nMessageId\nm\nSubscribeURL\nhttps://sns.example/confirm\nTimestamp\nts\n\
             Token\ntok\nTopicArn\nt\nType\nSubscriptionConfirmation\n"
        );
        assert!(string_to_sign(&envelope("Other")).is_err());
    }

    #[test]
    fn only_bounces_and_complaints_are_feedback() {
        let delivery = r#"{"notificationType": "Delivery", "mail": {}, "delivery": {}}"#;
        assert!(ses_feedback("m", delivery).unwrap().is_empty());
        assert!(matches!(ses_feedback("m", "not json"), Err(Refused::Malformed(_))));
    }
}
