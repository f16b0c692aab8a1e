//! The provider a deployment chooses, and how to reach it, from the environment.
//!
//! [`EspArgs`] is read by every service that calls the provider (the list-uploader, the sender,
//! the completion job); [`MessageArgs`] only by the sender, which renders and hands over the
//! messages of message-based providers.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::{
    EspProvider, ListSendConfig, ListSendEsp, MessageProvider, MessageProviderConfig, ProviderLimits,
    RenderSettings, SesConfig, SesCredentials, SmtpConfig,
};
use crate::store::{RateSchedule, Store};
use crate::unsubscribe::{TokenIssuer, TokenKey};

/// The providers Haishin can deliver through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// A list-based ESP speaking the list-send protocol: upload a list, then send a template to it.
    ListSend,
    /// An SMTP server or relay: one rendered message per recipient.
    Smtp,
    /// Amazon SES v2: one rendered message per `SendEmail`.
    Ses,
}

/// How a provider takes mail, which decides which API is the bottleneck and so which service
/// holds the provider's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A list is uploaded, then a template is sent to it: the upload is the bottleneck, and the
    /// list-uploader's calls hold the slots.
    Lists,
    /// Rendered messages are handed over in batches: the send is the bottleneck, and the sender's
    /// calls hold the slots.
    Messages,
}

impl ProviderKind {
    pub fn shape(self) -> Shape {
        match self {
            ProviderKind::ListSend => Shape::Lists,
            ProviderKind::Smtp | ProviderKind::Ses => Shape::Messages,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::ListSend => "list-send",
            ProviderKind::Smtp => "smtp",
            ProviderKind::Ses => "ses",
        }
    }
}

/// The name of the schedule that holds the provider's calls per second.
pub const CALLS_SCHEDULE: &str = "esp-calls";
/// The name of the schedule that holds the provider's messages per second.
pub const MESSAGES_SCHEDULE: &str = "esp-messages";

/// Which provider, and how to reach a list-based one.
#[derive(Debug, Clone, clap::Args)]
pub struct EspArgs {
    /// Which provider delivers the mail.
    #[arg(long, env = "ESP_PROVIDER", value_enum, default_value = "list-send")]
    pub esp_provider: ProviderKind,
    /// Base URL of a list-based ESP's API (list-send only).
    #[arg(long, env = "ESP_URL")]
    pub esp_url: Option<String>,
    /// API key for a list-based ESP.
    #[arg(long, env = "ESP_API_KEY", hide_env_values = true)]
    pub esp_api_key: Option<SecretString>,
    /// Longest wait for one call to the provider, in seconds.
    #[arg(long, env = "ESP_TIMEOUT_SECS", default_value_t = 30)]
    pub esp_timeout_secs: u64,
    /// The provider's limit of calls per second that change something (uploads and sends; for
    /// SES each message is a call), held across all instances. Unset: no limit.
    #[arg(long, env = "ESP_CALLS_PER_SECOND")]
    pub esp_calls_per_second: Option<f64>,
}

impl EspArgs {
    pub fn shape(&self) -> Shape {
        self.esp_provider.shape()
    }

    /// The list-based provider, built once and shared by the service's handlers; `None` for a
    /// message-based provider, which only the sender builds (from [`MessageArgs`]).
    pub fn list_provider(&self) -> anyhow::Result<Option<Arc<dyn EspProvider>>> {
        if self.shape() != Shape::Lists {
            return Ok(None);
        }
        let url = self
            .esp_url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("ESP_URL: required when ESP_PROVIDER is list-send"))?;
        let mut config = ListSendConfig::new(url).with_timeout(self.timeout());
        config.api_key = self.esp_api_key.clone();
        let esp = ListSendEsp::new(config).map_err(|e| anyhow::anyhow!("ESP_URL: {e}"))?;
        Ok(Some(Arc::new(esp)))
    }

    /// The schedule of the provider's calls per second, when it declares one.
    pub fn calls_schedule(&self, store: &Store) -> anyhow::Result<Option<RateSchedule>> {
        schedule(store, CALLS_SCHEDULE, "ESP_CALLS_PER_SECOND", self.esp_calls_per_second)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.esp_timeout_secs.max(1))
    }
}

fn schedule(
    store: &Store,
    name: &'static str,
    setting: &str,
    rate: Option<f64>,
) -> anyhow::Result<Option<RateSchedule>> {
    match rate {
        None => Ok(None),
        Some(rate) => RateSchedule::new(store.clone(), name, rate)
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("{setting}: must be a positive number, not {rate}")),
    }
}

/// How the sender renders messages and reaches a message-based provider.
#[derive(Debug, Clone, clap::Args)]
pub struct MessageArgs {
    /// The `From` of every message: `news@shop.example` or `Shop <news@shop.example>`.
    #[arg(long, env = "MAIL_FROM")]
    pub mail_from: Option<String>,
    /// The envelope sender, where bounces go (the `From` address when unset).
    #[arg(long, env = "MAIL_ENVELOPE_FROM")]
    pub mail_envelope_from: Option<String>,
    /// The one-click unsubscribe endpoint (`https://…`); each message's `List-Unsubscribe` is
    /// this URL with the recipient's token appended.
    #[arg(long, env = "UNSUBSCRIBE_URL")]
    pub unsubscribe_url: Option<String>,
    /// The key unsubscribe tokens are signed with (from Secret Manager; the trigger checks them
    /// with the same key): at least 32 bytes.
    #[arg(long, env = "UNSUBSCRIBE_SECRET", hide_env_values = true)]
    pub unsubscribe_secret: Option<SecretString>,
    /// The request label whose value an unsubscribe applies to (`category`: unsubscribing from a
    /// request labelled `category: promotions` suppresses `category:promotions`); a request
    /// without it is unsubscribed from globally.
    #[arg(long, env = "UNSUBSCRIBE_SCOPE_LABEL", default_value = "category")]
    pub unsubscribe_scope_label: String,
    /// How long an unsubscribe link works, in days.
    #[arg(long, env = "UNSUBSCRIBE_TOKEN_DAYS", default_value_t = 60)]
    pub unsubscribe_token_days: u32,
    /// The provider's limit of messages per second, held across all instances. Unset: no limit.
    #[arg(long, env = "ESP_MESSAGES_PER_SECOND")]
    pub esp_messages_per_second: Option<f64>,
    /// Messages handed over per provider call: a crash during a call leaves at most this many
    /// messages `unknown`.
    #[arg(long, env = "ESP_BATCH_SIZE", default_value_t = 50)]
    pub esp_batch_size: usize,
    /// The SMTP server: `smtp://host:port`, `smtp://host:587?tls=starttls` or `smtps://host:465`.
    #[arg(long, env = "SMTP_URL")]
    pub smtp_url: Option<String>,
    /// The SMTP AUTH user, when the URL does not name one.
    #[arg(long, env = "SMTP_USERNAME")]
    pub smtp_username: Option<String>,
    /// The SMTP AUTH password (from Secret Manager).
    #[arg(long, env = "SMTP_PASSWORD", hide_env_values = true)]
    pub smtp_password: Option<SecretString>,
    /// The AWS region of SES (`eu-west-1`).
    #[arg(long, env = "SES_REGION")]
    pub ses_region: Option<String>,
    /// Another SES endpoint than AWS's.
    #[arg(long, env = "SES_ENDPOINT")]
    pub ses_endpoint: Option<String>,
    /// The SES configuration set messages are sent with.
    #[arg(long, env = "SES_CONFIGURATION_SET")]
    pub ses_configuration_set: Option<String>,
    /// An AWS access key for SES (from Secret Manager); the SDK's default chain when unset.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub aws_access_key_id: Option<String>,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub aws_secret_access_key: Option<SecretString>,
}

/// A message-based provider, ready to send: the provider, how to render for it, and its rate.
pub struct MessageSetup {
    pub provider: Arc<dyn MessageProvider>,
    pub render: RenderSettings,
    /// Signs each recipient's unsubscribe token.
    pub tokens: TokenIssuer,
    /// Messages per second across all instances: the least of the messages and calls rates
    /// declared (each message is one call: one SMTP envelope, one SES `SendEmail`).
    pub schedule: Option<RateSchedule>,
}

impl MessageArgs {
    /// Builds the provider `esp` names, `concurrency` calls at once on this instance, each call
    /// ending within `call_budget` (messages not begun by then are deferred); `None` for a
    /// list-based provider.
    pub async fn setup(
        &self,
        esp: &EspArgs,
        concurrency: u32,
        call_budget: Duration,
        store: &Store,
    ) -> anyhow::Result<Option<MessageSetup>> {
        let limits = ProviderLimits {
            concurrency: concurrency.max(1),
            messages_per_second: self.esp_messages_per_second,
            calls_per_second: esp.esp_calls_per_second,
            max_batch: self.esp_batch_size,
        };
        if limits.max_batch == 0 {
            anyhow::bail!("ESP_BATCH_SIZE: must be at least 1");
        }
        let config = match esp.esp_provider {
            ProviderKind::ListSend => return Ok(None),
            ProviderKind::Smtp => {
                let url = required(&self.smtp_url, "SMTP_URL", "smtp")?;
                let mut config = SmtpConfig::new(url);
                config.username = self.smtp_username.clone();
                config.password = self.smtp_password.clone();
                config.command_timeout = esp.timeout();
                config.call_timeout = call_budget;
                config.limits = limits;
                MessageProviderConfig::Smtp(config)
            }
            ProviderKind::Ses => {
                let mut config = SesConfig::new(required(&self.ses_region, "SES_REGION", "ses")?);
                config.endpoint_url = self.ses_endpoint.clone();
                config.configuration_set = self.ses_configuration_set.clone();
                config.request_timeout = esp.timeout();
                config.call_timeout = call_budget;
                config.limits = limits;
                config.credentials = match (&self.aws_access_key_id, &self.aws_secret_access_key) {
                    (Some(id), Some(secret)) => Some(SesCredentials {
                        access_key_id: id.clone(),
                        secret_access_key: secret.clone(),
                        session_token: None,
                    }),
                    (None, None) => None,
                    _ => anyhow::bail!("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: set both or neither"),
                };
                MessageProviderConfig::Ses(config)
            }
        };
        let provider = config.build().await?;
        let kind = esp.esp_provider.as_str();
        let render = RenderSettings {
            from: required(&self.mail_from, "MAIL_FROM", kind)?,
            envelope_from: self.mail_envelope_from.clone(),
            unsubscribe_base_url: required(&self.unsubscribe_url, "UNSUBSCRIBE_URL", kind)?,
        };
        let secret =
            self.unsubscribe_secret.as_ref().map(|s| s.expose_secret().to_owned()).filter(|s| !s.is_empty());
        let Some(secret) = secret else {
            anyhow::bail!("UNSUBSCRIBE_SECRET: required when ESP_PROVIDER is {kind}");
        };
        let key = TokenKey::new(&secret).map_err(|e| anyhow::anyhow!("UNSUBSCRIBE_SECRET: {e}"))?;
        if self.unsubscribe_token_days == 0 || self.unsubscribe_scope_label.trim().is_empty() {
            anyhow::bail!("UNSUBSCRIBE_TOKEN_DAYS must be at least 1 and UNSUBSCRIBE_SCOPE_LABEL not empty");
        }
        let lifetime = chrono::Duration::days(i64::from(self.unsubscribe_token_days));
        let tokens = TokenIssuer::new(key, self.unsubscribe_scope_label.trim(), lifetime);
        let rate = match (self.esp_messages_per_second, esp.esp_calls_per_second) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let schedule = schedule(store, MESSAGES_SCHEDULE, "ESP_MESSAGES_PER_SECOND", rate)?;
        Ok(Some(MessageSetup { provider, render, tokens, schedule }))
    }
}

fn required(value: &Option<String>, setting: &str, provider: &str) -> anyhow::Result<String> {
    match value.as_deref().map(str::trim) {
        Some(value) if !value.is_empty() => Ok(value.to_owned()),
        _ => anyhow::bail!("{setting}: required when ESP_PROVIDER is {provider}"),
    }
}
