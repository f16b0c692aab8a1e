//! Configuration that every push service reads from its environment (Cloud Run's way), parsed once
//! at start with clap so that a missing or bad variable stops the service with a message naming it.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

pub use crate::auth::PushAuthMode;
use crate::auth::{GOOGLE_JWKS_URL, PushAuth};
use crate::gcp::GcpArgs;
use crate::store::Store;

/// What each push service needs: its port, the database, Google APIs and push authentication.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
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
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
    #[command(flatten)]
    pub gcp: GcpArgs,
    #[command(flatten)]
    pub auth: PushAuthArgs,
}

impl CommonArgs {
    /// Connects to the database lazily (the service starts even while it is unreachable) and
    /// brings its schema up to date when it is reachable.
    pub async fn store(&self) -> anyhow::Result<Store> {
        let store = Store::connect_lazy(self.database_url.expose_secret(), self.database_max_connections)?;
        if let Err(err) = store.migrate().await {
            tracing::warn!(error = %err, "Database migration did not run; it will be retried at the next start.");
        } else if let Err(err) = store.open_ready_connections().await {
            tracing::warn!(error = %err, "Database connections not opened ahead; they open as work needs them.");
        }
        Ok(store)
    }

    pub(crate) fn push_auth(&self) -> Arc<PushAuth> {
        Arc::new(PushAuth::new(
            self.auth.mode,
            self.auth.jwks_url.clone(),
            self.auth.audience.clone(),
            self.auth.invokers.clone(),
        ))
    }
}

/// Who may push work to this service, and how that is checked (see the `auth` module).
#[derive(Debug, Clone, clap::Args)]
pub struct PushAuthArgs {
    /// `cloud-run-iam`: Cloud Run's invoker check verified the token, the service checks the
    /// claims it forwards; `verify`: the service verifies the token's signature too.
    #[arg(long = "push-auth", env = "PUSH_AUTH", value_enum, default_value = "verify")]
    pub mode: PushAuthMode,
    /// Key set of the OIDC tokens that Pub/Sub and Cloud Tasks attach.
    #[arg(long, env = "OIDC_JWKS_URL", default_value = GOOGLE_JWKS_URL)]
    pub jwks_url: String,
    /// The audience the tokens must carry: this service's URL.
    #[arg(long, env = "PUSH_AUDIENCE")]
    pub audience: String,
    /// Service accounts allowed to push to this service, comma-separated.
    #[arg(long, env = "PUSH_INVOKERS", value_delimiter = ',', required = true)]
    pub invokers: Vec<String>,
}
