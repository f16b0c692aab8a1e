//! The completion job: one pass, then exit (a Cloud Run job started by Cloud Scheduler).
//!
//! Each pass:
//! 1. expires what passed its deadline before it could be dispatched;
//! 2. polls the ESP for sent chunks and completes those whose delivery settled;
//! 3. reconciles stuck work: uploads whose lease ran out go back to `queued`, chunks that sat in
//!    `queued` too long go back to `pending` (re-dispatched under a new task name), and chunks
//!    that sat in `uploaded`, or in `sending` with a dead lease, are published to the sender again
//!    (which checks the ESP's history before sending anything twice);
//! 4. closes requests whose chunks are all final;
//! 5. writes one delivery-log row per finished chunk and one summary row per finished request, and
//!    publishes `request-completed`;
//! 6. publishes a tick on `pipeline-events`, the scheduler's safety net.
//!
//! Every step is a guarded state change, so two passes at once, or a pass killed half-way, leave
//! nothing inconsistent.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use haishin_shared::config::EspArgs;
use haishin_shared::domain::ChunkState;
use haishin_shared::esp::{DeliveryId, DeliveryStatus, EspProvider};
use haishin_shared::gcp::{GcpArgs, Topic};
use haishin_shared::logs::{BigQuerySink, DeliveryLog, FileSink, LogSink, RequestLog};
use haishin_shared::messages::{DeliveryMessage, EventKind, PipelineEvent, RequestCompleted};
use haishin_shared::store::{DeliveryCounts, Store};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// Most rows one pass handles per step; the next pass takes the rest.
const BATCH: i64 = 1_000;
/// ESP status calls in flight at once.
const STATUS_CONCURRENCY: usize = 16;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "completion", about = "One completion pass: poll the ESP, write logs, close requests.")]
pub struct Config {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: SecretString,
    /// Largest number of database connections the job opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 4)]
    pub database_max_connections: u32,
    #[command(flatten)]
    pub gcp: GcpArgs,
    #[command(flatten)]
    pub esp: EspArgs,
    /// Topic of pipeline events.
    #[arg(long, env = "EVENTS_TOPIC", default_value = "pipeline-events")]
    pub events_topic: String,
    /// Topic of chunks ready to send (for re-publishing stuck chunks).
    #[arg(long, env = "DELIVERIES_TOPIC", default_value = "deliveries")]
    pub deliveries_topic: String,
    /// Topic told about each finished request.
    #[arg(long, env = "COMPLETED_TOPIC", default_value = "request-completed")]
    pub completed_topic: String,
    /// Where logs go: `bigquery`, or `file:DIR` for NDJSON files.
    #[arg(long, env = "LOG_SINK", default_value = "bigquery")]
    pub log_sink: String,
    /// BigQuery dataset of the logs.
    #[arg(long, env = "BIGQUERY_DATASET", default_value = "haishin")]
    pub bigquery_dataset: String,
    /// A chunk in `queued` longer than this (seconds) is dispatched again.
    #[arg(long, env = "QUEUED_TIMEOUT_SECS", default_value_t = 900)]
    pub queued_timeout_secs: u64,
    /// A chunk in `uploaded` longer than this (seconds) is published to the sender again.
    #[arg(long, env = "UPLOADED_TIMEOUT_SECS", default_value_t = 120)]
    pub uploaded_timeout_secs: u64,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PassReport {
    pub expired_requests: u64,
    pub expired_chunks: u64,
    pub completed_chunks: u64,
    pub still_processing: u64,
    pub requeued_uploads: u64,
    pub redispatched: u64,
    pub republished: u64,
    pub closed_requests: u64,
    pub delivery_rows: u64,
    pub request_rows: u64,
}

pub struct Job {
    store: Store,
    esp: Arc<dyn EspProvider>,
    sink: Arc<dyn LogSink>,
    events: Topic,
    deliveries: Topic,
    completed: Topic,
    queued_timeout: Duration,
    uploaded_timeout: Duration,
}

impl Job {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let store = Store::connect(config.database_url.expose_secret(), config.database_max_connections)
            .await
            .context("connecting to the database")?;
        store.migrate().await?;
        let sink: Arc<dyn LogSink> = match (config.log_sink.as_str(), config.log_sink.strip_prefix("file:")) {
            ("bigquery", _) => Arc::new(BigQuerySink::new(&config.gcp, &config.bigquery_dataset)?),
            (_, Some(dir)) if !dir.is_empty() => Arc::new(FileSink::new(dir)),
            (other, _) => anyhow::bail!("LOG_SINK `{other}` is not a log sink: use `bigquery` or `file:DIR`"),
        };
        Ok(Self {
            store,
            esp: config.esp.provider()?,
            sink,
            events: Topic::connect(&config.gcp, &config.events_topic).await?,
            deliveries: Topic::connect(&config.gcp, &config.deliveries_topic).await?,
            completed: Topic::connect(&config.gcp, &config.completed_topic).await?,
            queued_timeout: Duration::from_secs(config.queued_timeout_secs),
            uploaded_timeout: Duration::from_secs(config.uploaded_timeout_secs),
        })
    }

    /// One pass over everything; see the crate doc for the steps.
    pub async fn run_once(&self) -> anyhow::Result<PassReport> {
        let mut report = PassReport {
            expired_requests: self.store.expire_unprepared().await?,
            expired_chunks: self.store.expire_pending_chunks().await?,
            ..PassReport::default()
        };
        self.poll_sent(&mut report).await?;
        self.reconcile(&mut report).await?;
        report.closed_requests = self.store.close_finished_requests().await?.len() as u64;
        self.write_logs(&mut report).await?;
        let tick = PipelineEvent { kind: EventKind::Tick, request_id: None, chunk_id: None };
        if let Err(err) = self.events.publish(&tick, &[]).await {
            tracing::warn!(error = %err, "Tick not published.");
        }
        for topic in [&self.events, &self.deliveries, &self.completed] {
            topic.flush().await;
        }
        Ok(report)
    }

    async fn poll_sent(&self, report: &mut PassReport) -> anyhow::Result<()> {
        let sent = self.store.chunks_in(ChunkState::Sent, BATCH).await?;
        let statuses: Vec<_> = futures::stream::iter(sent)
            .map(|chunk| async move {
                let id = DeliveryId(chunk.delivery_id.clone().unwrap_or_default());
                (chunk, self.esp.delivery_status(&id).await)
            })
            .buffer_unordered(STATUS_CONCURRENCY)
            .collect()
            .await;
        for (chunk, status) in statuses {
            match status {
                Ok(DeliveryStatus::Done { delivered, bounced, failed }) => {
                    let counts = DeliveryCounts {
                        delivered: delivered as i64,
                        bounced: bounced as i64,
                        failed: failed as i64,
                    };
                    if self.store.complete_chunk(&chunk.id, counts).await? {
                        report.completed_chunks += 1;
                    }
                }
                Ok(DeliveryStatus::Processing) => report.still_processing += 1,
                Err(err) => {
                    tracing::warn!(chunk = %chunk.id, error = %err, "Delivery status unavailable; next pass.")
                }
            }
        }
        Ok(())
    }

    async fn reconcile(&self, report: &mut PassReport) -> anyhow::Result<()> {
        for chunk in self.store.stale_chunks(ChunkState::Uploading, BATCH).await? {
            if self.store.transition(&chunk.id, ChunkState::Uploading, ChunkState::Queued).await? {
                tracing::info!(request_id = %chunk.request_id, chunk = %chunk.id, "Upload lease ran out; chunk back to queued.");
                report.requeued_uploads += 1;
            }
        }
        for chunk in self.store.lingering_chunks(ChunkState::Queued, self.queued_timeout, BATCH).await? {
            if self.store.transition(&chunk.id, ChunkState::Queued, ChunkState::Pending).await? {
                tracing::info!(request_id = %chunk.request_id, chunk = %chunk.id, "Chunk sat in the queue too long; dispatching again.");
                report.redispatched += 1;
            }
        }
        let mut stuck =
            self.store.lingering_chunks(ChunkState::Uploaded, self.uploaded_timeout, BATCH).await?;
        stuck.extend(self.store.stale_chunks(ChunkState::Sending, BATCH).await?);
        for chunk in stuck {
            let message = DeliveryMessage {
                chunk_id: chunk.id.clone(),
                request_id: chunk.request_id.clone(),
                class: chunk.class(),
            };
            let attributes = [("class", chunk.class.as_str()), ("request_id", chunk.request_id.as_str())];
            match self.deliveries.publish(&message, &attributes).await {
                Ok(_) => report.republished += 1,
                Err(err) => {
                    tracing::warn!(chunk = %chunk.id, error = %err, "Chunk not re-published; next pass.")
                }
            }
        }
        Ok(())
    }

    async fn write_logs(&self, report: &mut PassReport) -> anyhow::Result<()> {
        let chunks = self.store.unlogged_chunks(BATCH).await?;
        if !chunks.is_empty() {
            let mut rows = Vec::with_capacity(chunks.len());
            let mut labels = std::collections::HashMap::new();
            for chunk in &chunks {
                if !labels.contains_key(&chunk.request_id) {
                    let request_labels =
                        self.store.request(&chunk.request_id).await?.map(|r| r.labels).unwrap_or_default();
                    labels.insert(chunk.request_id.clone(), request_labels);
                }
                rows.push(DeliveryLog::from_chunk(chunk, &labels[&chunk.request_id]));
            }
            self.sink.write_deliveries(&rows).await?;
            let ids: Vec<String> = chunks.into_iter().map(|c| c.id).collect();
            self.store.mark_chunks_logged(&ids).await?;
            report.delivery_rows = ids.len() as u64;
        }
        // Requests are summarised once all their chunks are logged, so that both tables agree.
        let requests = self.store.unlogged_requests(BATCH).await?;
        let mut rows = Vec::new();
        for request in &requests {
            let totals = self.store.chunk_totals(&request.id).await?;
            rows.push(RequestLog::new(request, &totals));
        }
        if !rows.is_empty() {
            self.sink.write_requests(&rows).await?;
            for row in &rows {
                let message = RequestCompleted {
                    request_id: row.request_id.clone(),
                    state: row.state.clone(),
                    summary: row.clone(),
                };
                if let Err(err) = self.completed.publish(&message, &[("state", row.state.as_str())]).await {
                    tracing::warn!(request_id = %row.request_id, error = %err, "Completion not announced.");
                }
                tracing::info!(request_id = %row.request_id, state = %row.state, sent = row.sent, skipped = row.skipped.values().sum::<i64>(), "Request finished.");
            }
            let ids: Vec<String> = rows.iter().map(|r| r.request_id.clone()).collect();
            self.store.mark_requests_logged(&ids).await?;
            report.request_rows = ids.len() as u64;
        }
        Ok(())
    }
}
