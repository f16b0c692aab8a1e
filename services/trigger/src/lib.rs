//! The trigger: the front door and the scheduler of Haishin.
//!
//! It takes delivery requests (Pub/Sub push and a direct API), prepares their audiences into
//! chunks (directly for small inline audiences, through the `prepare` queue otherwise), and is the
//! only place that decides which chunk goes to the provider next (see [`scheduling`]). It never
//! calls the provider itself, so its capacity is not tied to the provider's limits.
//!
//! # Layout
//! - [`config`]: environment variables.
//! - [`intake`]: validating and storing requests, and starting their preparation.
//! - [`prepare`]: streaming an audience into validated, de-duplicated chunks.
//! - [`scheduling`]: the scheduling rule (order, slot limits, the tail cut, the forecast).
//! - [`dispatch`]: the rule's driver: one round per event, coalesced, and the hand-off of each
//!   chunk dispatched (an upload task, or a delivery message for a message-based provider).
//! - [`status`]: a request's status as the API shows it.
//! - [`listing`]: requests newest first, filtered, a page at a time.
//! - [`control`]: pausing, resuming and cancelling a request.
//! - [`rejections`]: what was refused, newest first.
//! - [`suppressions`]: the suppression list as the API changes it, and its import from files.
//! - [`unsubscribe`]: one-click unsubscribe (RFC 8058): the token check and the pages.
//! - [`feedback`]: the provider's signed bounce and complaint webhooks (SES through SNS, SendGrid).
//! - [`public`]: the public entry, serving the unsubscribe and webhook routes alone
//!   (`trigger unsubscribe`).
//! - [`routes`]: HTTP routes (`/push/*` and `/tasks/*` require an OIDC token; `/v1/*` is the API;
//!   `/unsubscribe/*` and `/webhooks/*` need no token).
//! - [`error`]: work that cannot be done now, and the API's error answers.

pub mod config;
pub mod control;
pub mod dispatch;
pub mod error;
pub mod feedback;
pub mod intake;
pub mod listing;
pub mod prepare;
pub mod public;
pub mod rejections;
pub mod routes;
pub mod scheduling;
pub mod status;
pub mod suppressions;
pub mod unsubscribe;

use haishin_shared::telemetry::metrics::{Api, metrics};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use haishin_shared::esp::Shape;
use haishin_shared::gcp::{BigQuery, Blobs, QueueTarget, TaskQueue, Topic};
use haishin_shared::server::PushService;
use haishin_shared::store::Store;
use haishin_shared::unsubscribe::TokenKey;
use secrecy::ExposeSecret;

use crate::dispatch::Handoff;
use crate::scheduling::SlotLimits;

pub use config::Config;

/// Everything a handler needs, built once at start.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub blobs: Blobs,
    /// Runs the export jobs of BigQuery audiences.
    pub bigquery: BigQuery,
    pub prepare_queue: TaskQueue,
    pub dispatcher: Arc<dispatch::Dispatcher>,
    pub bucket: String,
    pub chunk_size: usize,
    pub inline_prepare_max: usize,
    pub prepare_lease: Duration,
    /// How large audiences are prepared in parts.
    pub parts: prepare::Parts,
    /// Inline requests prepared as they are taken in, and stored a group at a time.
    pub together: Arc<prepare::together::Together>,
    /// Checks unsubscribe tokens; `None` when `UNSUBSCRIBE_SECRET` is not set.
    pub unsubscribe: Option<TokenKey>,
    /// Checks and keeps the provider's bounce and complaint reports.
    pub feedback: feedback::FeedbackState,
}

/// The tail of the batch work is cut into pieces of no less than a chunk divided by this. The
/// pieces are sized by the provider's pace so that the slots end together, and the pace already
/// gives a slot a piece only when it would otherwise idle longer than a call's fixed cost; this
/// floor only keeps a crumb from a misjudged pace. A higher floor (a sixteenth) left the last
/// rests whole, and a slot or two idle while they ended.
const TAIL_PIECES_PER_CHUNK: u32 = 64;

/// The trigger, bound to its port and ready to serve.
pub struct Application {
    service: PushService,
    state: AppState,
}

impl Application {
    /// Connects the clients and binds the port (0 picks a free one).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let service = PushService::bind("trigger", &config.common).await?;
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
                dispatch_deadline: Duration::from_secs(config.prepare_lease_secs),
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
                dispatch_deadline: Duration::from_secs(config.upload_timeout_secs),
            },
        )
        .await
        .context("connecting to Cloud Tasks")?;
        let slot_api = match config.esp_provider.shape() {
            Shape::Lists => Api::Upload,
            Shape::Messages => Api::Send,
        };
        metrics().esp_limit(slot_api, config.esp_slots);
        let limits = SlotLimits {
            shape: config.esp_provider.shape(),
            limit: config.esp_slots,
            realtime_reserved: config.realtime_reserved_slots.min(config.esp_slots.saturating_sub(1)),
            prefetch: config.dispatch_prefetch,
            min_part: (config.chunk_size / TAIL_PIECES_PER_CHUNK).max(1),
            inline_max: match config.esp_provider.shape() {
                Shape::Lists => config.esp_inline_recipients_max,
                Shape::Messages => 0,
            },
            send_slots: config.esp_send_slots.max(1),
        };
        // A list-based ESP's chunks are uploaded first (but for small realtime ones, sent with
        // their recipients); a message-based provider's go straight to the sender, whose sends
        // are then the bottleneck the slots count.
        let deliveries =
            Topic::connect(gcp, &config.deliveries_topic).await.context("connecting to Pub/Sub")?;
        let handoff = match limits.shape {
            Shape::Lists => Handoff::Upload { queue: upload_queue, deliveries },
            Shape::Messages => Handoff::Deliveries(deliveries),
        };
        let unsubscribe = match &config.unsubscribe_secret {
            Some(secret) => Some(
                TokenKey::new(secret.expose_secret())
                    .map_err(|e| anyhow::anyhow!("UNSUBSCRIBE_SECRET: {e}"))?,
            ),
            None => None,
        };
        let feedback = feedback::FeedbackState::new(store.clone(), &config.feedback)?;
        let blobs = Blobs::connect(gcp).await.context("connecting to Cloud Storage")?;
        let chunk_size = config.chunk_size.max(1) as usize;
        let together = prepare::together::Together::start(
            store.clone(),
            blobs.clone(),
            config.bucket.clone(),
            chunk_size,
        );
        let state = AppState {
            unsubscribe,
            feedback,
            dispatcher: Arc::new(dispatch::Dispatcher::new(store.clone(), handoff, limits)),
            together: Arc::new(together),
            blobs,
            bigquery: BigQuery::new(gcp, config.bigquery_location.as_deref())
                .context("connecting to BigQuery")?,
            store,
            prepare_queue,
            bucket: config.bucket,
            chunk_size,
            inline_prepare_max: config.inline_prepare_max,
            prepare_lease: Duration::from_secs(config.prepare_lease_secs),
            parts: prepare::Parts::new(
                config.prepare_partition_bytes,
                config.prepare_parts_at_once,
                config.prepare_kept_bytes,
            ),
        };
        Ok(Self { service, state })
    }

    pub fn port(&self) -> u16 {
        self.service.port()
    }

    /// Serves until `shutdown` completes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let deliveries = self.state.dispatcher.deliveries().clone();
        let router = routes::router(&self.service, self.state);
        self.service.run(router, shutdown, &[&deliveries]).await
    }
}
