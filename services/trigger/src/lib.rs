//! The trigger: the front door and the scheduler of Haishin.
//!
//! It takes delivery requests (Pub/Sub push and a direct API), prepares their audiences into
//! chunks (directly for small inline audiences, through the `prepare` queue otherwise), and is the
//! only place that decides which chunk goes to the ESP next (see [`dispatch`]). It never calls the
//! ESP itself, so its capacity is not tied to the ESP's limits.
//!
//! # Layout
//! - [`config`]: environment variables.
//! - [`dispatch`]: the scheduling rule's driver: one round per event, coalesced.
//! - [`intake`]: validating and storing requests, and preparing their audiences.
//! - [`routes`]: HTTP routes (`/push/*` and `/tasks/*` require an OIDC token; `/v1/*` is the API).

pub mod config;
pub mod dispatch;
pub mod error;
pub mod intake;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use haishin_shared::auth::OidcVerifier;
use haishin_shared::gcp::{Blobs, QueueTarget, TaskQueue};
use haishin_shared::store::{SlotLimits, Store};
use tokio::net::TcpListener;

pub use config::Config;

/// Everything a handler needs, built once at start.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub blobs: Blobs,
    pub prepare_queue: TaskQueue,
    pub dispatcher: Arc<dispatch::Dispatcher>,
    pub verifier: Arc<OidcVerifier>,
    pub bucket: String,
    pub chunk_size: usize,
    pub inline_prepare_max: usize,
    pub prepare_lease: Duration,
}

/// The tail of the batch work is cut into pieces of no less than a chunk divided by this: smaller
/// pieces balance the last slots better, but each costs the ESP a call.
const TAIL_PIECES_PER_CHUNK: u32 = 4;

/// The trigger, bound to its port and ready to serve.
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    /// Connects the clients and binds the port (0 picks a free one).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = haishin_shared::server::bind(&config.common.host, config.common.port)
            .await
            .with_context(|| format!("binding port {}", config.common.port))?;
        let store = config.common.store().await?;
        let gcp = &config.common.gcp;
        let queue_path = |queue: &str| {
            format!("projects/{}/locations/{}/queues/{queue}", gcp.project, config.tasks_location)
        };
        let own_url = config.trigger_url.clone().unwrap_or_else(|| config.common.auth.audience.clone());
        let prepare_queue = TaskQueue::connect(
            gcp,
            QueueTarget {
                queue: queue_path(&config.prepare_queue),
                url: format!("{}/tasks/prepare", own_url.trim_end_matches('/')),
                service_account: config.tasks_invoker.clone(),
                audience: config.common.auth.audience.clone(),
            },
        )
        .await
        .context("connecting to Cloud Tasks")?;
        let upload_queue = TaskQueue::connect(
            gcp,
            QueueTarget {
                queue: queue_path(&config.upload_queue),
                url: format!("{}/tasks/upload", config.list_uploader_url.trim_end_matches('/')),
                service_account: config.tasks_invoker.clone(),
                audience: config.list_uploader_url.clone(),
            },
        )
        .await
        .context("connecting to Cloud Tasks")?;
        let limits = SlotLimits {
            limit: config.esp_upload_limit,
            realtime_reserved: config.realtime_reserved_slots.min(config.esp_upload_limit.saturating_sub(1)),
            prefetch: config.dispatch_prefetch,
            // Tail pieces stay large enough that the ESP's per-call cost remains a small share.
            min_part: (config.chunk_size / TAIL_PIECES_PER_CHUNK).max(1),
        };
        let state = AppState {
            dispatcher: Arc::new(dispatch::Dispatcher::new(store.clone(), upload_queue, limits)),
            blobs: Blobs::connect(gcp).await.context("connecting to Cloud Storage")?,
            store,
            prepare_queue,
            verifier: config.common.verifier(),
            bucket: config.bucket,
            chunk_size: config.chunk_size.max(1) as usize,
            inline_prepare_max: config.inline_prepare_max,
            prepare_lease: Duration::from_secs(config.prepare_lease_secs),
        };
        Ok(Self { listener, state })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    /// Serves until `shutdown` completes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(port = self.port(), "Trigger listening.");
        let router = routes::router(self.state);
        haishin_shared::server::serve(self.listener, router, shutdown).await?;
        Ok(())
    }
}
