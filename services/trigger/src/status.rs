//! A request's status as `GET /v1/requests/{id}` shows it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use haishin_shared::domain::{ChunkId, ChunkState, Class, RequestId, RequestState};
use haishin_shared::store::{Result, Store};
use serde::Serialize;
use serde_json::Value;

use crate::scheduling::forecast::{Forecast, forecast};

/// Status of a request as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestStatus {
    pub id: RequestId,
    pub class: Class,
    pub priority: i32,
    pub state: RequestState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub labels: Value,
    pub deadline: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Since when the request is paused: none of its chunks is dispatched until it is resumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// When its cancel was asked for: what was not handed to the send step is `cancelled`, and the
    /// request ends `cancelled` once the rest has finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub audience: Option<AudienceStatus>,
    /// Number of chunks in each state.
    pub chunks: BTreeMap<ChunkState, i64>,
    /// Number of recipients in chunks of each state.
    pub recipients: BTreeMap<ChunkState, i64>,
    pub delivered: i64,
    /// Hard bounces: the list-based ESP's counts, and those the provider's webhooks reported.
    pub bounced: i64,
    /// Soft bounces the provider's webhooks reported (mailbox full, blocked for now).
    pub soft_bounced: i64,
    /// Recipients who reported the message as spam, through the provider's webhooks.
    pub complained: i64,
    pub failed: i64,
    /// Recipients whose single message was handed over without an answer (message-based
    /// providers); a chunk that ended `unknown` as a whole is counted in `recipients` instead.
    pub unknown: i64,
    /// Recipients left out just before the provider because they were suppressed after the
    /// audience was prepared (those suppressed before are `audience.skipped.suppressed`).
    pub suppressed: i64,
    /// Messages of this request that Pub/Sub gave up delivering (newest first, at most 20).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dead_letters: Vec<DeadLetter>,
    /// For a request still being uploaded: when its last chunk should be, at the current pace (or
    /// that it is paused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Forecast>,
}

/// What the prepare step found in the audience.
#[derive(Debug, Clone, Serialize)]
pub struct AudienceStatus {
    /// Rows read, valid or not: `rows = recipients + Σ skipped` (suppressed addresses among them).
    pub rows: i64,
    pub recipients: i64,
    /// Rows skipped, by reason.
    pub skipped: Value,
    /// Where the first few skipped rows of each reason are (`SOURCE:LINE`).
    pub skipped_at: Value,
    pub chunks: i32,
}

/// A message Pub/Sub dead-lettered.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    /// The subscription that gave up on it.
    pub source: String,
    pub chunk_id: Option<ChunkId>,
    pub received_at: DateTime<Utc>,
}

/// The request and its chunks, summed per state; `None` for an id never seen.
pub async fn request_status(store: &Store, id: &RequestId) -> Result<Option<RequestStatus>> {
    let Some(row) = store.request(id).await? else { return Ok(None) };
    let dead_letters = sqlx::query_as(
        "SELECT source, chunk_id, received_at FROM dead_letters WHERE request_id = $1
         ORDER BY received_at DESC LIMIT 20",
    )
    .bind(id)
    .fetch_all(store.pool())
    .await?;
    let forecast = if row.state.is_final() { None } else { forecast(store, &row).await? };
    let mut status = RequestStatus {
        id: row.id.clone(),
        class: row.class,
        priority: row.priority,
        state: row.state,
        reason: row.reason.clone(),
        labels: row.labels.clone(),
        deadline: row.deadline,
        received_at: row.received_at,
        finished_at: row.finished_at,
        paused_at: row.paused_at,
        pause_reason: row.pause_reason.clone(),
        cancel_requested_at: row.cancel_requested_at,
        audience: row.chunk_count.map(|chunks| AudienceStatus {
            rows: row.audience_rows.unwrap_or(0),
            recipients: row.recipients.unwrap_or(0),
            skipped: row.skipped.clone(),
            skipped_at: row.skipped_at.clone(),
            chunks,
        }),
        chunks: BTreeMap::new(),
        recipients: BTreeMap::new(),
        delivered: 0,
        bounced: 0,
        soft_bounced: 0,
        complained: 0,
        failed: 0,
        unknown: 0,
        suppressed: 0,
        dead_letters,
        forecast,
    };
    for (state, totals) in store.chunk_totals(id).await? {
        status.chunks.insert(state, totals.chunks);
        status.recipients.insert(state, totals.recipients);
        status.delivered += totals.delivered;
        status.bounced += totals.bounced;
        status.failed += totals.failed;
        status.unknown += totals.unknown;
        status.suppressed += totals.suppressed;
    }
    let feedback = store.feedback_counts(id).await?;
    status.bounced += feedback.bounced;
    status.soft_bounced = feedback.soft_bounced;
    status.complained = feedback.complained;
    Ok(Some(status))
}
