//! The Amazon SES provider: each rendered message is one SES v2 `SendEmail` with raw content,
//! through the official SDK (`aws-sdk-sesv2`).
//!
//! SES has no idempotency key and `SendBulkEmail` takes templates, not rendered messages, so
//! the unit whose outcome can be unknown is one message. The SDK's own retries are off: a
//! retried `SendEmail` whose first attempt timed out could deliver twice. Haishin decides.
//!
//! # What an answer means
//! - a `MessageId`: accepted;
//! - throttling (`TooManyRequestsException`, `LimitExceededException`, 429): deferred, and the
//!   batch stops (rate limited);
//! - `MessageRejected`, `MailFromDomainNotVerifiedException`, `BadRequestException`,
//!   `NotFoundException` and other 4xx: that message is refused for good;
//! - `AccountSuspendedException`, `SendingPausedException`: refused, and the batch stops; the
//!   credentials refused (`AccessDeniedException`, a bad key or signature): the batch stops
//!   and, when it happens on the first message, the whole call fails for good;
//! - a 5xx: deferred, the batch stops (a 504 is unknown: SES may have gone on to send);
//! - a timeout, a connection lost after the request went out, an unreadable answer: unknown;
//! - no connection at all, a request that could not be built: deferred, nothing was sent.

mod classify;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sesv2::Client;
use aws_sdk_sesv2::config::Credentials;
use aws_sdk_sesv2::primitives::Blob;
use aws_sdk_sesv2::types::{Destination, EmailContent, MessageTag, RawMessage};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use self::classify::{classify, failure_of};
use super::message::{Attempt, BatchRun, ProviderSetupError};
use super::{EspError, MessageOutcome, MessageProvider, OutgoingMessage, ProviderLimits};
use crate::store::Reservation;

/// How to reach SES, and what the account allows.
#[derive(Clone, Debug)]
pub struct SesConfig {
    /// The AWS region (`eu-west-1`).
    pub region: String,
    /// Another endpoint than AWS's (moto in tests).
    pub endpoint_url: Option<String>,
    /// Explicit credentials; the SDK's default chain (environment, profile, web identity)
    /// when absent.
    pub credentials: Option<SesCredentials>,
    /// The SES configuration set each message is sent with (event destinations, IP pool).
    pub configuration_set: Option<String>,
    /// Longest wait for one `SendEmail`.
    pub request_timeout: Duration,
    /// Longest a call may run: messages not started by then are deferred.
    pub call_timeout: Duration,
    /// `messages_per_second` should be the account's maximum send rate.
    pub limits: ProviderLimits,
}

impl SesConfig {
    /// SES in `region` with the default credentials, 8 calls at once, batches of 50, 10 s per
    /// request and 5 minutes per call, no rate declared.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            endpoint_url: None,
            credentials: None,
            configuration_set: None,
            request_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(300),
            limits: ProviderLimits::new(8, 50),
        }
    }
}

/// An access key, for deployments that do not use the default chain.
#[derive(Clone)]
pub struct SesCredentials {
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub session_token: Option<SecretString>,
}

impl fmt::Debug for SesCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SesCredentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

/// Delivers rendered messages through Amazon SES v2.
#[derive(Clone, Debug)]
pub struct SesProvider {
    client: Client,
    configuration_set: Option<String>,
    limits: ProviderLimits,
    call_timeout: Duration,
}

impl SesProvider {
    /// Builds the SDK client once (it pools its connections); resolves credentials on first use.
    pub async fn new(config: &SesConfig) -> Result<Self, ProviderSetupError> {
        if config.region.trim().is_empty() {
            return Err(ProviderSetupError::new("ses region", "is empty"));
        }
        if config.limits.max_batch == 0 {
            return Err(ProviderSetupError::new("ses max batch", "must be at least 1"));
        }
        let timeouts = TimeoutConfig::builder()
            .operation_attempt_timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(5)))
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(endpoint) = &config.endpoint_url {
            let url =
                Url::parse(endpoint).map_err(|e| ProviderSetupError::new("ses endpoint", e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ProviderSetupError::new("ses endpoint", "must be an http(s) url"));
            }
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(keys) = &config.credentials {
            loader = loader.credentials_provider(Credentials::new(
                keys.access_key_id.clone(),
                keys.secret_access_key.expose_secret().to_owned(),
                keys.session_token.as_ref().map(|t| t.expose_secret().to_owned()),
                None,
                "haishin-config",
            ));
        }
        let sdk = loader.load().await;
        Ok(Self {
            client: Client::new(&sdk),
            configuration_set: config.configuration_set.clone(),
            limits: config.limits,
            call_timeout: config.call_timeout,
        })
    }

    /// The SDK client, for the SES calls Haishin makes outside sending (verifying an identity,
    /// reading the account's quota).
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn send_one(&self, message: &OutgoingMessage) -> Attempt {
        let raw = match RawMessage::builder().data(Blob::new(message.mime.clone())).build() {
            Ok(raw) => raw,
            Err(e) => return Attempt::Done(MessageOutcome::Refused { reason: e.to_string() }),
        };
        let sent = self
            .client
            .send_email()
            .from_email_address(&message.envelope_from)
            .destination(Destination::builder().to_addresses(&message.to).build())
            .content(EmailContent::builder().raw(raw).build())
            .set_configuration_set_name(self.configuration_set.clone())
            .set_email_tags(message.request.as_deref().and_then(request_tag))
            .send()
            .await;
        match sent {
            Ok(output) => Attempt::Done(MessageOutcome::Accepted {
                provider_id: output.message_id().unwrap_or_default().to_owned(),
            }),
            Err(error) => classify(failure_of(&error)),
        }
    }
}

/// The SES message tag naming a message's request.
pub const REQUEST_TAG: &str = "haishin-request";

/// The message tag [`REQUEST_TAG`] naming the message's request, so that SES event publishing
/// passes it back with each bounce and complaint. SES takes only ASCII letters, digits, `_` and
/// `-` in a tag: a request id with other characters goes untagged (the `X-Haishin-Request`
/// header still names it).
fn request_tag(request: &str) -> Option<Vec<MessageTag>> {
    if request.len() > 256 || !request.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return None;
    }
    let tag = MessageTag::builder().name(REQUEST_TAG).value(request).build().ok()?;
    Some(vec![tag])
}

#[async_trait]
impl MessageProvider for SesProvider {
    fn name(&self) -> &'static str {
        "ses"
    }

    fn limits(&self) -> ProviderLimits {
        self.limits
    }

    #[tracing::instrument(name = "ses_send_batch", skip_all, fields(messages = messages.len()))]
    async fn send_batch(
        &self,
        messages: &[OutgoingMessage],
        pace: &Reservation,
    ) -> Result<Vec<MessageOutcome>, EspError> {
        self.limits.check_batch(self.name(), messages.len())?;
        let deadline = Instant::now() + self.call_timeout;
        let mut run = BatchRun::new(messages.len());
        for (index, message) in messages.iter().enumerate() {
            pace.ready(index).await;
            if run.out_of_time(deadline, self.call_timeout) {
                break;
            }
            if !run.record(self.send_one(message).await) {
                break;
            }
        }
        run.finish_logged(self.name())
    }
}
