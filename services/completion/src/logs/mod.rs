//! Completion and delivery logs: one row per chunk, one summary row per finished request.
//!
//! Written through [`LogSink`]: BigQuery in production (dataset `haishin`, tables `deliveries`
//! and `requests`), NDJSON files locally. For every finished request the summary adds up:
//! `audience_rows = recipients + skipped`, and
//! `recipients = sent + failed + expired + cancelled + unknown + suppressed`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use haishin_shared::domain::{ChunkId, ChunkState, Class, RequestId, RequestState};
use haishin_shared::store::{ChunkRow, ChunkTotals, FeedbackCounts, Outcomes, RequestRow};

mod bigquery;
pub mod write;
pub use bigquery::{BigQuerySink, Column, DELIVERIES_SCHEMA, REQUESTS_SCHEMA, columns};

/// One row per finished chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeliveryLog {
    pub request_id: RequestId,
    pub chunk_id: ChunkId,
    pub class: Class,
    pub labels: Value,
    pub state: ChunkState,
    pub recipients: i64,
    pub delivered: i64,
    pub bounced: i64,
    pub failed: i64,
    /// Recipients whose outcome could not be established.
    pub unknown: i64,
    /// Recipients left out just before the provider: suppressed after the chunk was prepared.
    pub suppressed: i64,
    pub reason: Option<String>,
    pub uploaded_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl DeliveryLog {
    pub fn from_chunk(chunk: &ChunkRow, labels: &Value) -> Self {
        let suppressed = chunk.suppressed.unwrap_or(0);
        // A chunk that ended unknown as a whole: all of it, but those it left out as suppressed.
        let unknown = if chunk.state == ChunkState::Unknown {
            chunk.recipients as i64 - suppressed
        } else {
            chunk.unknown.unwrap_or(0)
        };
        Self {
            request_id: chunk.request_id.clone(),
            chunk_id: chunk.id.clone(),
            class: chunk.class,
            labels: labels.clone(),
            state: chunk.state,
            recipients: chunk.recipients as i64,
            delivered: chunk.delivered.unwrap_or(0),
            bounced: chunk.bounced.unwrap_or(0),
            failed: chunk.failed.unwrap_or(0),
            unknown,
            suppressed,
            reason: chunk.reason.clone(),
            uploaded_at: chunk.uploaded_at,
            sent_at: chunk.sent_at,
            completed_at: chunk.finished_at,
        }
    }
}

/// One summary row per finished request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestLog {
    pub request_id: RequestId,
    pub class: Class,
    pub priority: i32,
    pub labels: Value,
    pub state: RequestState,
    pub reason: Option<String>,
    /// Rows read from the audience, valid or not.
    pub audience_rows: i64,
    /// Recipients kept after validation and de-duplication.
    pub recipients: i64,
    /// Rows skipped, by reason.
    pub skipped: BTreeMap<String, i64>,
    /// Recipients the provider accepted (in chunks sent or completed, less those it reported
    /// failed, those whose outcome is unknown and those suppressed before the send).
    pub sent: i64,
    pub delivered: i64,
    /// Hard bounces: the list-based ESP's counts and the webhooks' reports so far.
    pub bounced: i64,
    /// Spam complaints the webhooks reported so far.
    pub complained: i64,
    /// Recipients in chunks that failed, or that the provider reported failed or refused.
    pub failed: i64,
    pub expired: i64,
    pub cancelled: i64,
    /// Recipients whose outcome could not be established: in chunks that ended `unknown`, or
    /// single messages handed over without an answer.
    pub unknown: i64,
    /// Recipients left out just before the provider because they were suppressed after the
    /// audience was prepared (those suppressed before are in `skipped`, as `suppressed`).
    pub suppressed: i64,
    pub received_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl RequestLog {
    /// Builds the summary from the request and its chunk totals per state.
    pub fn new(
        request: &RequestRow,
        totals: &BTreeMap<ChunkState, ChunkTotals>,
        feedback: FeedbackCounts,
    ) -> Self {
        let outcomes = Outcomes::of(totals);
        let skipped: BTreeMap<String, i64> =
            serde_json::from_value(request.skipped.clone()).unwrap_or_default();
        Self {
            request_id: request.id.clone(),
            class: request.class,
            priority: request.priority,
            labels: request.labels.clone(),
            state: request.state,
            reason: request.reason.clone(),
            audience_rows: request.audience_rows.unwrap_or(0),
            recipients: request.recipients.unwrap_or(0),
            skipped,
            sent: outcomes.sent,
            delivered: totals.values().map(|t| t.delivered).sum(),
            bounced: totals.values().map(|t| t.bounced).sum::<i64>() + feedback.bounced,
            complained: feedback.complained,
            failed: outcomes.failed,
            expired: outcomes.expired,
            cancelled: outcomes.cancelled,
            unknown: outcomes.unknown,
            suppressed: outcomes.suppressed,
            received_at: request.received_at,
            finished_at: request.finished_at,
        }
    }
}

/// Pub/Sub message on `request-completed`, for the marketing platform: a request finished.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestCompleted {
    pub request_id: RequestId,
    pub state: RequestState,
    pub summary: RequestLog,
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("writing logs failed: {0}")]
pub struct LogError(pub String);

/// Where completion and delivery logs go.
#[async_trait]
pub trait LogSink: Send + Sync + 'static {
    async fn write_deliveries(&self, rows: &[DeliveryLog]) -> Result<(), LogError>;
    async fn write_requests(&self, rows: &[RequestLog]) -> Result<(), LogError>;
}

/// Appends rows as NDJSON to `deliveries.ndjson` and `requests.ndjson` in a directory.
#[derive(Debug, Clone)]
pub struct FileSink {
    dir: PathBuf,
}

impl FileSink {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    async fn append<T: Serialize>(&self, file: &str, rows: &[T]) -> Result<(), LogError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut text = Vec::new();
        for row in rows {
            serde_json::to_writer(&mut text, row).map_err(|e| LogError(e.to_string()))?;
            text.push(b'\n');
        }
        tokio::fs::create_dir_all(&self.dir).await.map_err(|e| LogError(e.to_string()))?;
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(file))
            .await
            .map_err(|e| LogError(e.to_string()))?;
        out.write_all(&text).await.map_err(|e| LogError(e.to_string()))?;
        out.flush().await.map_err(|e| LogError(e.to_string()))
    }
}

#[async_trait]
impl LogSink for FileSink {
    async fn write_deliveries(&self, rows: &[DeliveryLog]) -> Result<(), LogError> {
        self.append("deliveries.ndjson", rows).await
    }

    async fn write_requests(&self, rows: &[RequestLog]) -> Result<(), LogError> {
        self.append("requests.ndjson", rows).await
    }
}
