//! What intake writes: requests, rejections, dead letters.

use std::time::Duration;

use haishin_shared::domain::{ChunkId, DeliveryRequest, RequestId};
use haishin_shared::store::{Result, Store, StoreError};

/// The start of a message, as kept beside a rejection or a dead letter: valid UTF-8 with no NUL,
/// which PostgreSQL's text cannot hold.
fn excerpt(body: &[u8]) -> String {
    storable(&String::from_utf8_lossy(&body[..body.len().min(512)]))
}

/// The `id` a JSON body names, whatever it is, cut to 200 characters.
fn claimed_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Claimed {
        id: Option<serde_json::Value>,
    }
    let id = serde_json::from_slice::<Claimed>(body).ok()?.id?;
    let text = match id {
        serde_json::Value::String(text) => text,
        other => other.to_string(),
    };
    Some(storable(&text.chars().take(200).collect::<String>()))
}

/// Text as PostgreSQL can store it: a NUL becomes U+FFFD.
pub fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// Stores a new request in `received`, in the trace of the span around the caller. Returns false
/// when the id was already taken: the same id is the same request, whatever its body.
pub async fn insert_request(store: &Store, request: &DeliveryRequest) -> Result<bool> {
    let body = serde_json::to_value(request).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let labels = serde_json::to_value(&request.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let done = sqlx::query(
        "INSERT INTO requests (id, class, priority, state, body, labels, not_before, deadline, traceparent)
         VALUES ($1, $2, $3, 'received', $4, $5, $6, $7, $8)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&request.id)
    .bind(request.class)
    .bind(request.priority)
    .bind(body)
    .bind(labels)
    .bind(request.not_before)
    .bind(request.deadline)
    .bind(haishin_shared::telemetry::current_traceparent())
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a request that can never be delivered, with the reason its sender will read.
/// Returns false when the id was already taken.
pub async fn insert_rejected(store: &Store, id: &RequestId, reason: &str) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO requests (id, class, state, reason, finished_at)
         VALUES ($1, 'batch', 'rejected', $2, now())
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(storable(reason))
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Keeps a message that could not become a request at all (it had no usable id), with the id it
/// claimed when it named one.
pub async fn insert_rejected_message(
    store: &Store,
    message_id: Option<&str>,
    reason: &str,
    body: &[u8],
) -> Result<()> {
    sqlx::query(
        "INSERT INTO rejected_messages (message_id, reason, excerpt, claimed_id) VALUES ($1, $2, $3, $4)",
    )
    .bind(message_id.map(storable))
    .bind(storable(reason))
    .bind(excerpt(body))
    .bind(claimed_id(body))
    .execute(store.pool())
    .await?;
    Ok(())
}

/// A message Pub/Sub gave up delivering, and what it belongs to.
#[derive(Debug, Clone)]
pub struct DeadLettered<'a> {
    pub message_id: &'a str,
    /// The subscription that gave up on it.
    pub source: &'a str,
    pub request_id: Option<RequestId>,
    pub chunk_id: Option<ChunkId>,
    pub body: &'a [u8],
}

/// Keeps a dead-lettered message against its request; the same message twice is kept once.
pub async fn insert_dead_letter(store: &Store, letter: &DeadLettered<'_>) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO dead_letters (message_id, source, request_id, chunk_id, excerpt) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (message_id) DO NOTHING",
    )
    .bind(storable(letter.message_id))
    .bind(storable(letter.source))
    .bind(&letter.request_id)
    .bind(&letter.chunk_id)
    .bind(excerpt(letter.body))
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Requests still in `received` after `age`: their start may have been lost.
pub async fn lingering_received(store: &Store, age: Duration, limit: i64) -> Result<Vec<RequestId>> {
    let ids = sqlx::query_scalar(
        "SELECT id FROM requests WHERE state = 'received' AND received_at < now() - $1 ORDER BY received_at LIMIT $2",
    )
    .bind(age)
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    Ok(ids)
}
