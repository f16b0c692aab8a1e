//! The envelopes in which Pub/Sub push and Cloud Tasks deliver work, and the outcome a handler
//! reports back to them.
//!
//! Both services treat any 2xx as done and anything else as "try again later". So a handler says
//! either [`Outcome::Done`] (the work is done, or can never succeed and was recorded as such) or
//! [`Outcome::Retry`] (a later attempt can succeed).
//!
//! A body that cannot be read can never succeed either: [`Delivered`] hands it to the handler
//! as [`Unreadable`] instead of refusing it, so that the handler acknowledges it and records why,
//! rather than Pub/Sub or Cloud Tasks retrying it until they give up.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::domain::MAX_REQUEST_BYTES;

/// Largest push or task body accepted, in bytes: a Pub/Sub message of the largest request
/// ([`MAX_REQUEST_BYTES`]) is base64 in its envelope, a third larger, plus the envelope itself.
pub const MAX_PUSH_BYTES: usize = MAX_REQUEST_BYTES / 3 * 4 + 64 * 1024;

/// A push or task body: the payload, or why it could not be read.
#[derive(Debug)]
pub struct Delivered<T>(pub Result<T, Unreadable>);

/// A body that could not be read: too large, not JSON, or not the expected JSON.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub reason: String,
    /// The start of the body (at most 512 bytes), to keep beside the reason.
    pub excerpt: Vec<u8>,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Delivered<T> {
    type Rejection = std::convert::Infallible;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = match Bytes::from_request(request, state).await {
            Ok(body) => body,
            Err(rejection) => {
                let reason = match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => {
                        format!("body is larger than the limit of {MAX_PUSH_BYTES} bytes")
                    }
                    _ => format!("body could not be read: {}", rejection.body_text()),
                };
                return Ok(Self(Err(Unreadable { reason, excerpt: Vec::new() })));
            }
        };
        Ok(Self(serde_json::from_slice(&body).map_err(|e| Unreadable {
            reason: format!("body is not the expected JSON: {e}"),
            excerpt: body[..body.len().min(512)].to_vec(),
        })))
    }
}

/// A Pub/Sub push request body.
#[derive(Debug, Clone, Deserialize)]
pub struct PushEnvelope {
    pub message: PushMessage,
    #[serde(default)]
    pub subscription: String,
    #[serde(default, rename = "deliveryAttempt")]
    pub delivery_attempt: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PushMessage {
    #[serde(default)]
    pub data: String,
    #[serde(default)]
    pub attributes: HashMap<String, String>,
    #[serde(default, rename = "messageId")]
    pub message_id: String,
}

impl PushMessage {
    /// The message's payload, decoded from base64.
    pub fn data(&self) -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| format!("message data is not base64: {e}"))
    }

    /// The payload parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        let data = self.data()?;
        serde_json::from_slice(&data).map_err(|e| format!("message data is not the expected JSON: {e}"))
    }
}

/// What a Pub/Sub push body says of its message's trace, read without decoding the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageTrace {
    /// The message's `traceparent` attribute, set by its publisher.
    pub traceparent: Option<String>,
    /// Pub/Sub's id of the message, the same on every delivery of it.
    pub message_id: Option<String>,
    /// Which delivery of the message this is (1 first), when the subscription counts them.
    pub delivery_attempt: Option<u32>,
}

/// The trace facts of a Pub/Sub push body; `None` for any other body (a task's, say).
pub fn message_trace(body: &[u8]) -> Option<MessageTrace> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Envelope {
        message: Message,
        delivery_attempt: Option<u32>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Message {
        #[serde(default)]
        attributes: Attributes,
        message_id: Option<String>,
    }
    #[derive(Deserialize, Default)]
    struct Attributes {
        traceparent: Option<String>,
    }
    let envelope = serde_json::from_slice::<Envelope>(body).ok()?;
    Some(MessageTrace {
        traceparent: envelope.message.attributes.traceparent,
        message_id: envelope.message.message_id,
        delivery_attempt: envelope.delivery_attempt,
    })
}

/// What a push or task handler tells Pub/Sub or Cloud Tasks.
#[derive(Debug)]
pub enum Outcome {
    /// Done, or never possible (and recorded as such): acknowledge.
    Done(String),
    /// A later attempt can succeed: answer so that the sender retries with back-off.
    Retry(RetryReason),
}

/// Why work should be retried; each maps to the status that makes the sender back off.
#[derive(Debug)]
pub enum RetryReason {
    /// The ESP asked us to slow down (429).
    Throttled(String),
    /// Something a retry can fix: the database, the ESP or a Google API was unavailable (503).
    Unavailable(String),
    /// Another worker holds the work; try again after its lease (409).
    Busy(String),
}

impl std::fmt::Display for RetryReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetryReason::Throttled(why) => write!(f, "throttled: {why}"),
            RetryReason::Unavailable(why) => write!(f, "unavailable: {why}"),
            RetryReason::Busy(why) => write!(f, "busy: {why}"),
        }
    }
}

impl Outcome {
    pub fn done(what: impl Into<String>) -> Self {
        Outcome::Done(what.into())
    }

    pub fn unavailable(what: impl std::fmt::Display) -> Self {
        Outcome::Retry(RetryReason::Unavailable(what.to_string()))
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        match self {
            Outcome::Done(what) => (StatusCode::OK, what).into_response(),
            Outcome::Retry(RetryReason::Throttled(why)) => {
                (StatusCode::TOO_MANY_REQUESTS, why).into_response()
            }
            Outcome::Retry(RetryReason::Unavailable(why)) => {
                tracing::warn!(reason = %why, "Work will be retried.");
                (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
            }
            Outcome::Retry(RetryReason::Busy(why)) => (StatusCode::CONFLICT, why).into_response(),
        }
    }
}

impl From<crate::store::StoreError> for Outcome {
    fn from(err: crate::store::StoreError) -> Self {
        Outcome::unavailable(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_s_trace_is_read_from_its_body() {
        let body = serde_json::json!({
            "message": {"data": "e30=", "messageId": "m-1",
                        "attributes": {"class": "batch", "traceparent": "00-a-b-01"}},
            "subscription": "s",
            "deliveryAttempt": 3,
        });
        let body = serde_json::to_vec(&body).unwrap();

        let trace = message_trace(&body).expect("a push body");
        assert_eq!(trace.traceparent.as_deref(), Some("00-a-b-01"));
        assert_eq!(trace.message_id.as_deref(), Some("m-1"));
        assert_eq!(trace.delivery_attempt, Some(3));
        let envelope: PushEnvelope = serde_json::from_slice(&body).unwrap();
        assert_eq!(envelope.message.attributes["class"], "batch");
    }

    #[test]
    fn bodies_without_a_traceparent_attribute_have_none() {
        for body in [
            r#"{"message": {"data": "e30=", "attributes": {"class": "batch"}}}"#,
            r#"{"message": {"data": "e30="}}"#,
        ] {
            assert_eq!(message_trace(body.as_bytes()).and_then(|t| t.traceparent), None, "{body}");
        }
        for body in
            [r#"{"message": {"attributes": {"traceparent": 7}}}"#, r#"{"request_id": "r-1"}"#, "not json"]
        {
            assert_eq!(message_trace(body.as_bytes()), None, "{body}");
        }
    }
}
