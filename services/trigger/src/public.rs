//! The public entry: the trigger's image run as `trigger unsubscribe`, serving
//! `/unsubscribe/{token}`, the provider webhooks `/webhooks/ses` and `/webhooks/sendgrid`, and
//! `/healthz`, and nothing else.
//!
//! Cloud Run's IAM is per service, and recipients reach their unsubscribe link (and providers
//! their webhook) with no Google token, so these routes are deployed as a service of their own
//! that anyone may invoke, while the trigger (its API, its push and task routes) stays behind the
//! invoker check (docs/deploy.md). Each route checks its own signature: the unsubscribe token's,
//! the SNS message's, SendGrid's. It needs the database, `UNSUBSCRIBE_SECRET` and the webhook
//! settings, nothing else: no Google API, no queue, no topic.

use haishin_shared::server::PushService;
use haishin_shared::store::Store;
use haishin_shared::unsubscribe::TokenKey;
use secrecy::{ExposeSecret, SecretString};

use crate::feedback::{FeedbackArgs, FeedbackState};
use crate::unsubscribe::UnsubscribeState;

/// The public entry's configuration, from its environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trigger unsubscribe",
    about = "Serves the one-click unsubscribe links and the provider webhooks, and nothing else."
)]
pub struct PublicConfig {
    /// Port to listen on (Cloud Run sets it).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on.
    #[arg(long, env = "LISTEN_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: SecretString,
    /// Largest number of database connections this instance opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 2)]
    pub database_max_connections: u32,
    /// The key the sender signs unsubscribe tokens with (from Secret Manager).
    #[arg(long, env = "UNSUBSCRIBE_SECRET", hide_env_values = true)]
    pub unsubscribe_secret: SecretString,
    #[command(flatten)]
    pub feedback: FeedbackArgs,
}

/// The public entry, bound to its port and ready to serve.
pub struct PublicEntry {
    service: PushService,
    state: PublicState,
}

/// The public routes' state.
#[derive(Clone)]
struct PublicState {
    unsubscribe: UnsubscribeState,
    feedback: FeedbackState,
}

impl axum::extract::FromRef<PublicState> for UnsubscribeState {
    fn from_ref(state: &PublicState) -> Self {
        state.unsubscribe.clone()
    }
}

impl axum::extract::FromRef<PublicState> for FeedbackState {
    fn from_ref(state: &PublicState) -> Self {
        state.feedback.clone()
    }
}

impl PublicEntry {
    /// Checks the key, connects to the database (lazily) and binds the port (0 picks a free one).
    pub async fn build(config: PublicConfig) -> anyhow::Result<Self> {
        let key = TokenKey::new(config.unsubscribe_secret.expose_secret())
            .map_err(|e| anyhow::anyhow!("UNSUBSCRIBE_SECRET: {e}"))?;
        let store =
            Store::connect_lazy(config.database_url.expose_secret(), config.database_max_connections.max(1))?;
        if let Err(err) = store.migrate().await {
            tracing::warn!(error = %err, "Database migration did not run; it will be retried at the next start.");
        }
        let feedback = FeedbackState::new(store.clone(), &config.feedback)?;
        let service = PushService::bind_public("unsubscribe", &config.host, config.port).await?;
        let unsubscribe = UnsubscribeState { store, key: Some(key) };
        Ok(Self { service, state: PublicState { unsubscribe, feedback } })
    }

    pub fn port(&self) -> u16 {
        self.service.port()
    }

    /// Serves until `shutdown` completes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let public = crate::routes::unsubscribe::router().merge(crate::routes::feedback::router());
        let router = self.service.router(self.state, axum::Router::new(), public);
        self.service.run(router, shutdown, &[]).await
    }
}
