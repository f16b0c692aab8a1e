//! The ESP provider: the one seam between Haishin and the email service provider (ESP)
//! that actually delivers mail.
//!
//! Services hold an `Arc<dyn EspProvider>` and never speak to an ESP directly. A provider
//! does four things: upload one chunk's recipients as a list, send a template to an
//! uploaded list (or, for a few recipients, to the recipients themselves), look a send up in
//! the ESP's delivery history by its idempotency key, and read a delivery's status.
//!
//! # Errors decide what happens next
//! Every failure is an [`EspError`] classified by what a caller may do about it:
//! - [`EspError::RateLimited`]: the ESP refused the call (429); retry later, after
//!   `retry_after` when the ESP said so. Nothing was done.
//! - [`EspError::Transient`]: a 5xx, a connection that could not be made, or a read
//!   that failed; a later attempt can succeed. Nothing was accepted (or the call only reads).
//! - [`EspError::Indeterminate`]: a call that changes something (upload, send) reached the
//!   ESP but no answer came back (a timeout, a dropped connection, a gateway timeout). The
//!   ESP may have accepted it. A list upload may simply be repeated with the same key; a
//!   send must not be: look it up with [`EspProvider::find_delivery`] first, and if the
//!   history cannot tell, leave the chunk `unknown` rather than risk sending twice.
//! - [`EspError::Permanent`]: any other 4xx (bad request, unknown list, bad credentials);
//!   repeating the same call can never succeed.
//!
//! # Layout
//! - this module: the trait, the values it exchanges and the error type;
//! - [`config`]: [`EspArgs`], the provider a deployment chooses (`ESP_PROVIDER`) and how to reach it;
//! - [`list_send`]: [`ListSendEsp`], the provider for list-based ESPs that speak the list-send
//!   protocol (the ESP simulator in `tools/esp-sim` is its reference server).
//! - `message` (re-exported here): [`MessageProvider`], the seam for message-based providers
//!   (rendered messages in batches, one [`MessageOutcome`] per message), and its limits;
//! - `render`, `mime` (re-exported here): [`MessageRenderer`], an inline template rendered per
//!   recipient into a MIME message with the RFC 8058 unsubscribe headers;
//! - [`smtp`]: [`SmtpProvider`], rendered messages to an SMTP server;
//! - [`ses`]: [`SesProvider`], rendered messages through Amazon SES v2.

mod config;
pub mod list_send;
mod message;
mod mime;
mod render;
pub mod ses;
pub mod smtp;

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use serde_json::value::RawValue;

use crate::domain::{Class, Recipient, RequestId, Template};

pub use config::{
    CALLS_SCHEDULE, EspArgs, MESSAGES_SCHEDULE, MessageArgs, MessageSetup, ProviderKind, Shape,
};
pub use list_send::{ListSendConfig, ListSendEsp};
pub use message::{
    MessageOutcome, MessageProvider, MessageProviderConfig, OutcomeCounts, OutgoingMessage, ProviderLimits,
    ProviderSetupError,
};
pub use mime::{REQUEST_HEADER, message_id};
pub use render::{MessageRenderer, RenderError, RenderSettings, RenderedContent};
pub use ses::{SesConfig, SesCredentials, SesProvider};
pub use smtp::{SmtpConfig, SmtpProvider};

/// An ESP provider: uploads lists, sends templates to them and reports on deliveries.
#[async_trait]
pub trait EspProvider: Send + Sync + 'static {
    /// Uploads one chunk's recipients as a list at the ESP. Idempotent by key where the ESP supports it.
    async fn upload_list(&self, list: &ListUpload<'_>) -> Result<ListId, EspError>;
    /// Sends a template to an uploaded list. The key is recorded by the ESP so that the send can be looked up later.
    async fn send(&self, send: &SendRequest) -> Result<DeliveryId, EspError>;
    /// Whether [`EspProvider::send_batch`] is a call of the ESP's own. Without it, each send goes
    /// alone.
    fn sends_batches(&self) -> bool {
        false
    }
    /// Sends several sends that share a template in one call; each part is a send of its own,
    /// under its own idempotency key (so [`EspProvider::find_delivery`] finds each). Returns
    /// each part's delivery, in the parts' order. An ESP without such a call refuses it.
    async fn send_batch(&self, batch: &SendBatch) -> Result<Vec<DeliveryId>, EspError> {
        let _ = batch;
        Err(EspError::Permanent("this esp takes no send batches".into()))
    }
    /// Looks a send up in the ESP's delivery history by idempotency key: Some if the ESP accepted it.
    async fn find_delivery(&self, idempotency_key: &str) -> Result<Option<DeliveryId>, EspError>;
    /// Reads a delivery's status (processing, or done with counts).
    async fn delivery_status(&self, id: &DeliveryId) -> Result<DeliveryStatus, EspError>;
}

/// One chunk's recipients, to be stored at the ESP as a list.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListUpload<'a> {
    /// Repeating an upload with the same key returns the same list where the ESP supports it.
    pub idempotency_key: String,
    /// The delivery request the chunk belongs to.
    pub request_id: RequestId,
    /// Each a [`Recipient`] as JSON, kept as the audience step wrote it: the uploader forwards
    /// chunks of thousands of recipients and has no reason to take them apart, nor to copy
    /// them out of the chunk it read (see [`crate::gcp::lines_in`]).
    #[serde(borrow)]
    pub recipients: Vec<Cow<'a, RawValue>>,
}

impl ListUpload<'static> {
    pub fn new(
        idempotency_key: impl Into<String>,
        request_id: impl Into<RequestId>,
        recipients: &[Recipient],
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            idempotency_key: idempotency_key.into(),
            request_id: request_id.into(),
            recipients: recipients
                .iter()
                .map(|r| serde_json::value::to_raw_value(r).map(Cow::Owned))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// A send of a template to an uploaded list, or to a few recipients given in the call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendRequest {
    /// Recorded by the ESP with the delivery, so that [`EspProvider::find_delivery`] can find it.
    /// The ESP does not de-duplicate by it: sending twice with one key delivers twice.
    pub idempotency_key: String,
    /// The delivery request the chunk belongs to.
    pub request_id: RequestId,
    /// Who the send goes to: `list_id` or `recipients` on the wire.
    #[serde(flatten)]
    pub to: SendTo,
    pub template: Template,
    pub class: Class,
}

/// Who a send goes to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SendTo {
    /// Every recipient of an uploaded list.
    List { list_id: ListId },
    /// The recipients given in the call, with their parameters, as a transactional API takes
    /// them: a small realtime chunk goes out without waiting for a list upload. The ESP caps
    /// how many one call may carry (`ESP_INLINE_RECIPIENTS_MAX`).
    Recipients { recipients: Vec<Recipient> },
}

impl SendTo {
    /// How the send names its recipients in logs: the list's id, or how many were given.
    pub fn describe(&self) -> String {
        match self {
            SendTo::List { list_id } => list_id.to_string(),
            SendTo::Recipients { recipients } => format!("{} inline", recipients.len()),
        }
    }
}

/// The ESP's id of an uploaded list.
/// Sends that share a template, in one call (the list-send protocol's send batch, as a
/// transactional API's personalizations): each part carries its own recipients, with their own
/// parameters, under its own key and request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendBatch {
    pub template: Template,
    pub class: Class,
    pub parts: Vec<SendPart>,
}

/// One send of a [`SendBatch`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendPart {
    pub idempotency_key: String,
    pub request_id: RequestId,
    pub recipients: Vec<Recipient>,
}

impl SendBatch {
    pub fn recipients(&self) -> usize {
        self.parts.iter().map(|p| p.recipients.len()).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ListId(pub String);

/// The ESP's id of an accepted send.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeliveryId(pub String);

impl fmt::Display for ListId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for ListId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl From<String> for DeliveryId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

/// Where an accepted send stands at the ESP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// The ESP is still delivering.
    Processing,
    /// Every recipient has an outcome.
    Done { delivered: u64, bounced: u64, failed: u64 },
}

/// A failed ESP call, classified by what the caller may do next (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EspError {
    /// 429: the ESP refused the call and did nothing; retry after `retry_after` when given.
    #[error("rate limited by the esp")]
    RateLimited { retry_after: Option<Duration> },
    /// A 5xx, a connection that could not be made, or a failed read: nothing was accepted,
    /// and a later attempt can succeed.
    #[error("transient esp error: {0}")]
    Transient(String),
    /// An upload or a send reached the ESP but its outcome is unknown: the ESP may have
    /// accepted it. Look a send up with `find_delivery` before sending it again.
    #[error("esp outcome unknown: {0}")]
    Indeterminate(String),
    /// A 4xx other than 429 (and other answers no retry can change): never retry.
    #[error("permanent esp error: {0}")]
    Permanent(String),
}

impl EspError {
    /// True when a later attempt can succeed: rate limited, transient and indeterminate
    /// errors. An indeterminate send must still be looked up before it is repeated
    /// (see [`EspError::maybe_accepted`]).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Permanent(_))
    }

    /// True when the ESP may have accepted the call although it failed: the caller must
    /// check the ESP's history (`find_delivery`) before sending again.
    pub fn maybe_accepted(&self) -> bool {
        matches!(self, Self::Indeterminate(_))
    }

    /// How long the ESP asked the caller to wait, when it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// An error and its causes on one line, each cause once (a cause that only repeats the text
/// before it is left out): how an ESP's failure is reported.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_permanent_errors_are_not_retryable() {
        assert!(EspError::RateLimited { retry_after: None }.is_retryable());
        assert!(EspError::Transient("503".into()).is_retryable());
        assert!(EspError::Indeterminate("timeout".into()).is_retryable());
        assert!(!EspError::Permanent("400".into()).is_retryable());
    }

    #[test]
    fn only_indeterminate_errors_may_have_been_accepted() {
        assert!(EspError::Indeterminate("timeout".into()).maybe_accepted());
        assert!(!EspError::Transient("503".into()).maybe_accepted());
        assert!(!EspError::RateLimited { retry_after: None }.maybe_accepted());
        assert!(!EspError::Permanent("404".into()).maybe_accepted());
    }

    #[test]
    fn a_send_request_has_the_wire_shape_of_the_list_send_protocol() {
        let send = SendRequest {
            idempotency_key: "r-1~000001:send".into(),
            request_id: "r-1".into(),
            to: SendTo::List { list_id: ListId("lst-1".into()) },
            template: Template::Stored { id: "welcome".into() },
            class: Class::Batch,
        };
        let json = serde_json::to_value(&send).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "idempotency_key": "r-1~000001:send",
                "request_id": "r-1",
                "list_id": "lst-1",
                "template": {"id": "welcome"},
                "class": "batch",
            })
        );
        assert_eq!(serde_json::from_value::<SendRequest>(json).unwrap(), send);
    }

    #[test]
    fn an_inline_send_carries_its_recipients_in_place_of_a_list() {
        let recipient = Recipient { email: "a@example.com".into(), params: Default::default() };
        let send = SendRequest {
            idempotency_key: "send:r-1~000001".into(),
            request_id: "r-1".into(),
            to: SendTo::Recipients { recipients: vec![recipient] },
            template: Template::Stored { id: "restock".into() },
            class: Class::Realtime,
        };
        let json = serde_json::to_value(&send).unwrap();
        assert_eq!(json["recipients"][0]["email"], "a@example.com");
        assert!(json.get("list_id").is_none());
        assert_eq!(serde_json::from_value::<SendRequest>(json).unwrap(), send);
    }
}
