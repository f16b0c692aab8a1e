//! The list-uploader: one Cloud Tasks task, one chunk uploaded to the ESP as a list.
//!
//! It calls the ESP's upload API and does nothing else, so that its Cloud Run capacity (max
//! instances × per-instance concurrency) is its number of upload slots. When the upload is done,
//! it hands the chunk to the sender (topic `deliveries`) and tells the trigger a slot is free
//! (topic `pipeline-events`).
//!
//! Just before the upload, the chunk's recipients are checked against the suppressions once more,
//! those written since the chunk was built (looked up while the chunk is read): an address
//! suppressed since the chunk was prepared is left out of the list and counted on the chunk as
//! `suppressed`. A chunk whose recipients are all suppressed is completed without calling the ESP.
//!
//! `POST /tasks/upload` answers 2xx when the chunk is uploaded, was already past this step, or can
//! never be uploaded (recorded as failed with the reason), and 503 when a retry can help; the
//! chunk then stays `queued`, so it keeps its slot while Cloud Tasks backs off. An upload the ESP
//! refused for its limit (429) is the exception ([`refused`]): the chunk goes back in line and
//! gives its slot up, and the trigger lowers the slots it grants when the ESP's real limit is
//! lower than the configured one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::post;
use haishin_shared::config::CommonArgs;
use haishin_shared::domain::{ChunkId, ChunkState};
use haishin_shared::esp::{EspArgs, EspError, EspProvider, ListId, ListUpload};
use haishin_shared::gcp::{Blobs, GcpError, Topic, lines_in};
use haishin_shared::messages::{DeliveryMessage, EventKind, PipelineEvent, UploadTask};
use haishin_shared::push::{Delivered, Outcome, RetryReason};
use haishin_shared::server::PushService;
use haishin_shared::store::{ChunkRow, Claim, RateSchedule, Step, Store};
use haishin_shared::suppression::SinceBuilt;
use haishin_shared::telemetry::metrics::{Api, metrics, outcome};

pub mod refused;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "list-uploader", about = "Uploads chunks to the ESP, one per task.")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub esp: EspArgs,
    /// Bucket holding the chunk objects.
    #[arg(long, env = "BUCKET")]
    pub bucket: String,
    /// Topic of chunks ready to send.
    #[arg(long, env = "DELIVERIES_TOPIC", default_value = "deliveries")]
    pub deliveries_topic: String,
    /// Topic of pipeline events (slots freed).
    #[arg(long, env = "EVENTS_TOPIC", default_value = "pipeline-events")]
    pub events_topic: String,
    /// How long an upload may run before another attempt may take the chunk over, in seconds.
    #[arg(long, env = "UPLOAD_LEASE_SECS", default_value_t = 300)]
    pub upload_lease_secs: u64,
}

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub blobs: Blobs,
    /// The list-based ESP; `None` for a message-based provider, which has no lists.
    pub esp: Option<Arc<dyn EspProvider>>,
    /// The provider's calls per second, held across all instances, when it declares one.
    pub calls: Option<RateSchedule>,
    pub deliveries: Topic,
    pub events: Topic,
    pub bucket: String,
    pub lease: Duration,
}

pub struct Application {
    service: PushService,
    state: AppState,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let service = PushService::bind("list-uploader", &config.common).await?;
        let gcp = &config.common.gcp;
        let store = config.common.store().await?;
        let state = AppState {
            blobs: Blobs::connect(gcp).await.context("connecting to Cloud Storage")?,
            esp: config.esp.list_provider()?,
            calls: config.esp.calls_schedule(&store)?,
            store,
            deliveries: Topic::connect_unbatched(gcp, &config.deliveries_topic)
                .await
                .context("connecting to Pub/Sub")?,
            events: Topic::connect_unbatched(gcp, &config.events_topic)
                .await
                .context("connecting to Pub/Sub")?,
            bucket: config.bucket,
            lease: Duration::from_secs(config.upload_lease_secs),
        };
        Ok(Self { service, state })
    }

    pub fn port(&self) -> u16 {
        self.service.port()
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (deliveries, events) = (self.state.deliveries.clone(), self.state.events.clone());
        let router = self.service.router(
            self.state,
            Router::new().route("/tasks/upload", post(upload)),
            Router::new(),
        );
        self.service.run(router, shutdown, &[&deliveries, &events]).await
    }
}

/// The ESP's idempotency key for a chunk's list.
pub fn list_key(chunk_id: &ChunkId) -> String {
    format!("list:{chunk_id}")
}

async fn upload(State(state): State<AppState>, Delivered(task): Delivered<UploadTask>) -> Outcome {
    let task = match task {
        Ok(task) => task,
        Err(unreadable) => {
            tracing::warn!(reason = %unreadable.reason, "Unreadable upload task dropped.");
            return Outcome::done(unreadable.reason);
        }
    };
    upload_chunk(&state, &task).await
}

#[tracing::instrument(skip_all, fields(request_id = %task.request_id, chunk = %task.chunk_id, class = tracing::field::Empty))]
async fn upload_chunk(state: &AppState, task: &UploadTask) -> Outcome {
    let claimed = match state.store.claim(&task.chunk_id, Step::Upload, state.lease).await {
        Ok(Claim::Claimed(claimed)) => claimed,
        Ok(Claim::Busy) => {
            return Outcome::Retry(RetryReason::Busy(format!("chunk {} is being uploaded", task.chunk_id)));
        }
        Ok(Claim::Done(current)) => {
            return Outcome::done(format!(
                "chunk {} is {}",
                task.chunk_id,
                current.map_or("gone", |s| s.as_str())
            ));
        }
        Err(err) => return err.into(),
    };
    let chunk = claimed.chunk;
    tracing::Span::current().record("class", chunk.class.as_str());
    let Some(esp) = &state.esp else {
        // A message-based provider has no list: the chunk object is the list, and the sender
        // reads it. (Its chunks normally go straight to the sender; this covers tasks created
        // before the deployment changed provider.)
        return uploaded(state, &chunk, ListId(chunk.object.clone()), None, "no list to upload").await;
    };
    let read_start = Instant::now();
    // The suppressions written since the chunk was built are looked up while it is read.
    let (read, since_built) = tokio::join!(
        state.blobs.chunk_bytes(&state.bucket, &chunk),
        SinceBuilt::of_request(&state.store, &chunk.request_id)
    );
    let data = match read {
        Ok(data) => data,
        Err(err @ GcpError::Permanent { .. }) => return fail(state, &chunk, &err.to_string()).await,
        Err(err) => return release(state, &chunk.id, Outcome::unavailable(err)).await,
    };
    // Borrowed from the chunk as read: the list's body is written from them without a copy.
    let recipients = match lines_in(&data, &chunk) {
        Ok(recipients) => recipients,
        Err(err) => return fail(state, &chunk, &err.to_string()).await,
    };
    let read_ms = read_start.elapsed().as_millis() as u64;
    let checked = async { since_built?.leave_out(&state.store, &chunk.request_id, recipients).await };
    let (recipients, suppressed) = match checked.await {
        Ok(kept) => kept,
        Err(err) => return release(state, &chunk.id, err.into()).await,
    };
    if recipients.is_empty() {
        return all_suppressed(state, &chunk, suppressed).await;
    }
    let list =
        ListUpload { idempotency_key: list_key(&chunk.id), request_id: chunk.request_id.clone(), recipients };
    if let Some(calls) = &state.calls
        && let Err(err) = calls.wait(1).await
    {
        return release(state, &chunk.id, err.into()).await;
    }
    let upload_start = Instant::now();
    let call = metrics().esp_call(Api::Upload, chunk.class);
    let result = esp.upload_list(&list).await;
    call.finish(outcome(result.as_ref().map(drop)));
    match result {
        Ok(list_id) => {
            let upload_ms = upload_start.elapsed().as_millis() as u64;
            tracing::info!(
                recipients = list.recipients.len(),
                suppressed,
                read_ms,
                upload_ms,
                "Chunk uploaded."
            );
            uploaded(state, &chunk, list_id, Some(suppressed), "uploaded").await
        }
        Err(EspError::RateLimited { .. }) => refused_for_the_limit(state, &chunk).await,
        Err(err) if err.is_retryable() => release(state, &chunk.id, Outcome::unavailable(&err)).await,
        Err(err) => {
            tracing::warn!(error = %err, "Chunk cannot be uploaded.");
            fail(state, &chunk, &format!("upload refused by the ESP: {err}")).await
        }
    }
}

/// Ends an upload the ESP refused (429): the chunk back in line, the refusal reported to the
/// trigger's slot accounting.
async fn refused_for_the_limit(state: &AppState, chunk: &ChunkRow) -> Outcome {
    match refused::back_in_line(&state.store, chunk).await {
        Ok(Some(others)) => {
            tracing::warn!(api = "upload", in_progress = others, "ESP refused the call; chunk back in line.");
            if let Err(err) = state.events.publish(&refused::slot_freed(chunk), &[]).await {
                tracing::warn!(error = %err, "Pipeline event not published; the scheduler tick will cover it.");
            }
            Outcome::done("refused by the esp; back in line")
        }
        Ok(None) => Outcome::done("chunk was taken over while uploading"),
        Err(err) => err.into(),
    }
}

/// Ends a chunk whose recipients are all suppressed: `completed`, with nothing sent.
async fn all_suppressed(state: &AppState, chunk: &ChunkRow, suppressed: i64) -> Outcome {
    let reason = "every recipient was suppressed before the upload";
    let done = state.store.finish_all_suppressed(&chunk.id, ChunkState::Uploading, suppressed, reason).await;
    match done {
        Ok(true) => {
            tracing::info!(suppressed, "Every recipient of the chunk is suppressed: nothing to upload.");
            let event = PipelineEvent::chunk(EventKind::ChunkFinished, chunk);
            let _ = state.events.publish(&event, &[]).await;
            Outcome::done("every recipient suppressed")
        }
        Ok(false) => Outcome::done("chunk was taken over while uploading"),
        Err(err) => err.into(),
    }
}

/// Records the chunk's list (and the recipients it left out) and hands the chunk to the sender.
async fn uploaded(
    state: &AppState,
    chunk: &ChunkRow,
    list_id: ListId,
    suppressed: Option<i64>,
    how: &'static str,
) -> Outcome {
    let done = sqlx::query(
        "UPDATE chunks SET state = 'uploaded', list_id = $2, uploaded_at = now(), lease_until = NULL,
             suppressed = coalesce($3, suppressed)
         WHERE id = $1 AND state = 'uploading'",
    )
    .bind(&chunk.id)
    .bind(list_id.to_string())
    .bind(suppressed)
    .execute(state.store.pool())
    .await;
    match done {
        Ok(done) if done.rows_affected() == 1 => {}
        Ok(_) => return Outcome::done("chunk was taken over while uploading"),
        Err(err) => return haishin_shared::store::StoreError::from(err).into(),
    }
    let message = DeliveryMessage::for_chunk(chunk);
    let attributes = message.attributes();
    let event = PipelineEvent::chunk(EventKind::ChunkUploaded, chunk);
    let (sent, evented) = tokio::join!(
        state.deliveries.publish(&message, &attributes),
        state.events.publish(&event, &attributes)
    );
    if let Err(err) = evented {
        tracing::warn!(error = %err, "Pipeline event not published; the scheduler tick will cover it.");
    }
    match sent {
        Ok(_) => Outcome::done(how),
        // The chunk is uploaded; the completion job re-publishes chunks that linger there.
        Err(err) => {
            tracing::warn!(error = %err, "Delivery message not published; reconcile will re-publish it.");
            Outcome::done("uploaded; delivery message pending")
        }
    }
}

/// Ends the chunk `failed`: no attempt can upload it.
async fn fail(state: &AppState, chunk: &ChunkRow, reason: &str) -> Outcome {
    match state.store.finish_chunk(&chunk.id, ChunkState::Uploading, ChunkState::Failed, reason).await {
        Ok(_) => {
            let event = PipelineEvent::chunk(EventKind::ChunkFinished, chunk);
            let _ = state.events.publish(&event, &[]).await;
            Outcome::done(reason.to_owned())
        }
        Err(err) => err.into(),
    }
}

/// Puts the chunk back to `queued` for the task's next attempt, keeping its slot.
async fn release(state: &AppState, chunk_id: &ChunkId, outcome: Outcome) -> Outcome {
    if let Err(err) = state.store.transition(chunk_id, ChunkState::Uploading, ChunkState::Queued).await {
        tracing::warn!(error = %err, "Chunk not released; its lease will run out.");
    }
    outcome
}
