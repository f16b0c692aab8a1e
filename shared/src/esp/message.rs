//! Message-based providers: the seam beside [`EspProvider`](super::EspProvider) for providers
//! that take rendered messages (SMTP, Amazon SES, and later SendGrid, Mailgun, LINE) rather
//! than a list and a template.
//!
//! Haishin renders each recipient's message itself ([`MessageRenderer`](super::MessageRenderer))
//! and hands a batch of them to a [`MessageProvider`], which answers with one
//! [`MessageOutcome`] per message, in order. A refused recipient never fails the rest of its
//! batch.
//!
//! # What a call can come to
//! - `Ok(outcomes)`: at least one message was handed over (or refused on its own merits);
//!   each message has its outcome. Messages the provider did not get to (it stopped after a
//!   rate limit, a lost connection or its time budget) are [`MessageOutcome::Deferred`]: they
//!   were never handed over, so sending them again is safe.
//! - `Err(error)`: nothing was handed over, and `error` (an [`EspError`]) says what the whole
//!   batch may do: retry later (`RateLimited`, `Transient`) or never (`Permanent`: bad
//!   credentials, a suspended account). SMTP and SES never answer `Indeterminate` for a whole
//!   call: what can be unknown is one message, [`MessageOutcome::Unknown`].

use std::sync::Arc;
use std::time::Duration;
use std::{fmt, mem};

use async_trait::async_trait;
use tokio::time::Instant;

use super::EspError;
use super::ses::{SesConfig, SesProvider};
use super::smtp::{SmtpConfig, SmtpProvider};
use crate::store::Reservation;

/// A provider that delivers rendered messages, one outcome per message.
#[async_trait]
pub trait MessageProvider: Send + Sync + 'static {
    /// A short name for logs and reports (`smtp`, `ses`).
    fn name(&self) -> &'static str;
    /// What the provider allows: Haishin's schedule must keep within it across all instances.
    fn limits(&self) -> ProviderLimits;
    /// Hands a batch of at most `limits().max_batch` messages over, message `i` not before
    /// `pace.at(i)` (the rate schedule's reservation; [`Reservation::now`] when no rate is
    /// declared). See the module doc for what the answer means.
    async fn send_batch(
        &self,
        messages: &[OutgoingMessage],
        pace: &Reservation,
    ) -> Result<Vec<MessageOutcome>, EspError>;
}

/// What a message-based provider allows. One call of [`MessageProvider::send_batch`] holds one
/// unit of `concurrency` while it runs (for SMTP, one connection).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProviderLimits {
    /// Calls that may run at once, across every instance.
    pub concurrency: u32,
    /// Messages per second the provider accepts, when it limits them (SES's sending rate).
    pub messages_per_second: Option<f64>,
    /// API calls per second, when the provider limits calls rather than messages.
    pub calls_per_second: Option<f64>,
    /// Most messages in one call.
    pub max_batch: usize,
}

impl ProviderLimits {
    /// Refuses a batch larger than the provider takes in one call.
    pub fn check_batch(&self, provider: &str, messages: usize) -> Result<(), EspError> {
        if messages > self.max_batch {
            return Err(EspError::Permanent(format!(
                "a batch of {messages} messages is more than the {provider} provider's {}",
                self.max_batch
            )));
        }
        Ok(())
    }

    /// Limits with a concurrency and a batch size, and no rate limit.
    pub fn new(concurrency: u32, max_batch: usize) -> Self {
        Self { concurrency, messages_per_second: None, calls_per_second: None, max_batch }
    }
}

/// One recipient's rendered message, ready to hand over.
#[derive(Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Stable for this recipient of this delivery: the `Message-ID` is derived from it, and
    /// providers that de-duplicate by a key use it.
    pub idempotency_key: String,
    /// The delivery request it belongs to (its `X-Haishin-Request` header).
    pub request: Option<String>,
    /// The envelope sender (SMTP `MAIL FROM`, where bounces go).
    pub envelope_from: String,
    /// The one envelope recipient.
    pub to: String,
    /// The `Message-ID` header, with its angle brackets.
    pub message_id: String,
    /// The whole RFC 5322 message, headers and MIME body, 7-bit clean.
    pub mime: Vec<u8>,
}

/// Leaves the addresses and the content out, so that a message can be logged.
impl fmt::Debug for OutgoingMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingMessage")
            .field("idempotency_key", &self.idempotency_key)
            .field("message_id", &self.message_id)
            .field("mime_bytes", &self.mime.len())
            .finish_non_exhaustive()
    }
}

/// What became of one message of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageOutcome {
    /// The provider took the message; `provider_id` is its id there (an SMTP queue id, an SES
    /// `MessageId`).
    Accepted { provider_id: String },
    /// The provider refused the message for good (an SMTP 5xx, SES `MessageRejected`):
    /// counted `failed` with the reason.
    Refused { reason: String },
    /// The provider did not take the message but may later (an SMTP 4xx, a rate limit, or a
    /// message the call never got to): it was not handed over, so it may be sent again.
    Deferred { reason: String, retry_after: Option<Duration> },
    /// The message was handed over but no answer came (a timeout or a dropped connection
    /// after `DATA`, after the SES request was sent): it may have been accepted, so it must
    /// never be sent again blindly.
    Unknown { reason: String },
}

impl MessageOutcome {
    /// True for outcomes no later attempt changes: accepted, refused, unknown.
    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Deferred { .. })
    }
}

/// How many messages of a batch ended each way, for logs and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    pub accepted: u64,
    pub refused: u64,
    pub deferred: u64,
    pub unknown: u64,
}

impl OutcomeCounts {
    /// Counts each kind of outcome.
    pub fn of(outcomes: &[MessageOutcome]) -> Self {
        let mut counts = Self::default();
        for outcome in outcomes {
            match outcome {
                MessageOutcome::Accepted { .. } => counts.accepted += 1,
                MessageOutcome::Refused { .. } => counts.refused += 1,
                MessageOutcome::Deferred { .. } => counts.deferred += 1,
                MessageOutcome::Unknown { .. } => counts.unknown += 1,
            }
        }
        counts
    }
}

/// The settings of a message-based provider, as a deployment chooses them.
#[derive(Clone, Debug)]
pub enum MessageProviderConfig {
    Smtp(SmtpConfig),
    Ses(SesConfig),
}

impl MessageProviderConfig {
    /// Builds the provider once at start; its handlers share it (SMTP connections and the SES
    /// client's HTTP connections are pooled inside).
    pub async fn build(&self) -> Result<Arc<dyn MessageProvider>, ProviderSetupError> {
        Ok(match self {
            Self::Smtp(config) => Arc::new(SmtpProvider::new(config)?),
            Self::Ses(config) => Arc::new(SesProvider::new(config).await?),
        })
    }
}

/// A provider's settings that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct ProviderSetupError {
    /// The setting at fault, as the configuration names it.
    pub setting: &'static str,
    pub reason: String,
}

impl ProviderSetupError {
    pub(crate) fn new(setting: &'static str, reason: impl Into<String>) -> Self {
        Self { setting, reason: reason.into() }
    }
}

/// What one message's attempt came to, for providers that hand messages over one at a time.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// The message has its outcome and the batch goes on.
    Done(MessageOutcome),
    /// The message has its outcome, and the provider as a whole cannot take more now
    /// (`error` says why): the rest of the batch is not tried.
    Halt { outcome: MessageOutcome, error: EspError },
}

/// The outcomes of a batch handed over one message at a time.
#[derive(Debug)]
pub(crate) struct BatchRun {
    outcomes: Vec<MessageOutcome>,
    total: usize,
    halted: Option<EspError>,
    /// True once a message got an outcome that a whole-call error could not stand for.
    handed_over: bool,
}

impl BatchRun {
    pub(crate) fn new(total: usize) -> Self {
        Self { outcomes: Vec::with_capacity(total), total, halted: None, handed_over: false }
    }

    /// Records one message's attempt; false when the rest of the batch must not be tried.
    pub(crate) fn record(&mut self, attempt: Attempt) -> bool {
        let (outcome, halt) = match attempt {
            Attempt::Done(outcome) => (outcome, None),
            Attempt::Halt { outcome, error } => (outcome, Some(error)),
        };
        let whole_call_failure = halt.is_some()
            && matches!(outcome, MessageOutcome::Deferred { .. } | MessageOutcome::Refused { .. });
        if !whole_call_failure {
            self.handed_over = true;
        }
        self.outcomes.push(outcome);
        self.halted = halt;
        self.halted.is_none()
    }

    /// True, and the batch stopped before its next message, once the call's time budget is spent.
    pub(crate) fn out_of_time(&mut self, deadline: Instant, budget: Duration) -> bool {
        if Instant::now() < deadline {
            return false;
        }
        self.halted = Some(EspError::Transient(format!("the call's {}s budget is spent", budget.as_secs())));
        true
    }

    /// Like [`BatchRun::finish`], logging what the batch came to.
    pub(crate) fn finish_logged(self, provider: &'static str) -> Result<Vec<MessageOutcome>, EspError> {
        let result = self.finish();
        match &result {
            Ok(outcomes) => {
                let OutcomeCounts { accepted, refused, deferred, unknown } = OutcomeCounts::of(outcomes);
                tracing::info!(provider, accepted, refused, deferred, unknown, "Batch handed over.");
            }
            Err(error) => tracing::warn!(provider, %error, "Batch not handed over."),
        }
        result
    }

    /// One outcome per message, or the whole call's error when nothing was handed over.
    pub(crate) fn finish(mut self) -> Result<Vec<MessageOutcome>, EspError> {
        if let Some(error) = self.halted.take() {
            if !self.handed_over {
                return Err(error);
            }
            let reason = format!("not sent: {error}");
            let retry_after = error.retry_after();
            while self.outcomes.len() < self.total {
                self.outcomes.push(MessageOutcome::Deferred { reason: reason.clone(), retry_after });
            }
        }
        assert_eq!(self.outcomes.len(), self.total, "every message of a batch has an outcome");
        Ok(mem::take(&mut self.outcomes))
    }
}

/// Replaces the local part of anything that looks like an address with `*`, so that a
/// provider's answer can be kept as a reason or logged without a recipient's address.
pub(crate) fn redact_addresses(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('@') {
        let start = rest[..at]
            .rfind(|c: char| c.is_whitespace() || matches!(c, '<' | '(' | '"' | '\'' | ':' | ',' | '['))
            .map_or(0, |i| i + 1);
        out.push_str(&rest[..start]);
        if start < at {
            out.push('*');
        }
        out.push('@');
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(id: &str) -> Attempt {
        Attempt::Done(MessageOutcome::Accepted { provider_id: id.into() })
    }

    #[test]
    fn a_refused_message_does_not_stop_the_batch() {
        let mut run = BatchRun::new(3);
        assert!(run.record(accepted("a")));
        assert!(run.record(Attempt::Done(MessageOutcome::Refused { reason: "550".into() })));
        assert!(run.record(accepted("c")));
        let counts = OutcomeCounts::of(&run.finish().unwrap());
        assert_eq!(counts, OutcomeCounts { accepted: 2, refused: 1, deferred: 0, unknown: 0 });
    }

    #[test]
    fn a_halt_defers_the_messages_not_tried() {
        let mut run = BatchRun::new(4);
        assert!(run.record(accepted("a")));
        let outcome = MessageOutcome::Deferred { reason: "throttled".into(), retry_after: None };
        let error = EspError::RateLimited { retry_after: Some(Duration::from_secs(2)) };
        assert!(!run.record(Attempt::Halt { outcome, error }));
        let outcomes = run.finish().unwrap();
        assert_eq!(outcomes.len(), 4);
        assert_eq!(
            outcomes[3],
            MessageOutcome::Deferred {
                reason: "not sent: rate limited by the esp".into(),
                retry_after: Some(Duration::from_secs(2))
            }
        );
    }

    #[test]
    fn a_halt_before_anything_was_handed_over_fails_the_whole_call() {
        let mut run = BatchRun::new(2);
        let outcome = MessageOutcome::Deferred { reason: "connection refused".into(), retry_after: None };
        run.record(Attempt::Halt { outcome, error: EspError::Transient("connection refused".into()) });
        assert_eq!(run.finish(), Err(EspError::Transient("connection refused".into())));
    }

    #[test]
    fn an_unknown_first_message_is_kept_rather_than_turned_into_a_call_error() {
        let mut run = BatchRun::new(2);
        let outcome = MessageOutcome::Unknown { reason: "timed out after DATA".into() };
        run.record(Attempt::Halt { outcome, error: EspError::Transient("connection lost".into()) });
        let counts = OutcomeCounts::of(&run.finish().unwrap());
        assert_eq!(counts, OutcomeCounts { accepted: 0, refused: 0, deferred: 1, unknown: 1 });
    }

    #[test]
    fn a_spent_budget_before_the_first_message_is_a_call_error() {
        let mut run = BatchRun::new(1);
        assert!(run.out_of_time(Instant::now(), Duration::from_secs(1)));
        assert!(run.finish().is_err());
    }

    #[test]
    fn addresses_in_a_provider_answer_lose_their_local_part() {
        assert_eq!(
            redact_addresses("5.1.1 <bob.smith@example.com>: Recipient address rejected"),
            "5.1.1 <*@example.com>: Recipient address rejected"
        );
        assert_eq!(
            redact_addresses("identities failed: a@x.io, b@y.io"),
            "identities failed: *@x.io, *@y.io"
        );
        assert_eq!(redact_addresses("no address here"), "no address here");
    }

    #[test]
    fn a_message_logs_without_its_addresses() {
        let message = OutgoingMessage {
            idempotency_key: "r-1~000001:0".into(),
            request: None,
            envelope_from: "news@shop.example".into(),
            to: "bob@example.com".into(),
            message_id: "<abc@shop.example>".into(),
            mime: b"Subject: hi\r\n\r\nhello".to_vec(),
        };
        let debug = format!("{message:?}");
        assert!(!debug.contains("bob@") && !debug.contains("news@"), "{debug}");
        assert!(debug.contains("r-1~000001:0"), "{debug}");
    }
}
