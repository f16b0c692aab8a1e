//! The provider a deployment chooses, and how to reach it, from the environment.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use super::{EspProvider, ListSendConfig, ListSendEsp};

/// The ESP providers Haishin can deliver through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// A list-based ESP speaking the list-send protocol: upload a list, then send a template to it.
    ListSend,
}

/// How to reach the ESP.
#[derive(Debug, Clone, clap::Args)]
pub struct EspArgs {
    /// Which provider delivers the mail.
    #[arg(long, env = "ESP_PROVIDER", value_enum, default_value = "list-send")]
    pub esp_provider: ProviderKind,
    /// Base URL of the ESP's API.
    #[arg(long, env = "ESP_URL")]
    pub esp_url: String,
    /// API key for the ESP.
    #[arg(long, env = "ESP_API_KEY", hide_env_values = true)]
    pub esp_api_key: Option<SecretString>,
    /// Longest wait for one ESP call, in seconds.
    #[arg(long, env = "ESP_TIMEOUT_SECS", default_value_t = 30)]
    pub esp_timeout_secs: u64,
}

impl EspArgs {
    /// The provider these settings describe, built once and shared by the service's handlers.
    pub fn provider(&self) -> anyhow::Result<Arc<dyn EspProvider>> {
        match self.esp_provider {
            ProviderKind::ListSend => {
                let mut config = ListSendConfig::new(self.esp_url.clone())
                    .with_timeout(Duration::from_secs(self.esp_timeout_secs));
                config.api_key = self.esp_api_key.clone();
                let esp = ListSendEsp::new(config).map_err(|e| anyhow::anyhow!("ESP_URL: {e}"))?;
                Ok(Arc::new(esp))
            }
        }
    }
}
