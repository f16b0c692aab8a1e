//! Writing the logs of what finished: one row per final chunk, then one summary row per finished
//! request (once all its chunks are logged, so that both tables agree), each written once.

use std::collections::HashMap;

use haishin_shared::domain::{ChunkState, RequestId, RequestState};
use haishin_shared::gcp::Topic;
use haishin_shared::store::{ChunkRow, RequestRow, Result, Store, chunk_columns, request_columns};
use serde_json::Value;

use super::{DeliveryLog, LogSink, RequestCompleted, RequestLog};
use crate::{BATCH, PassReport};

/// Writes the rows of what finished since the last pass and announces finished requests.
pub(crate) async fn write_logs(
    store: &Store,
    sink: &dyn LogSink,
    completed: &Topic,
    report: &mut PassReport,
) -> anyhow::Result<()> {
    let chunks = unlogged_chunks(store, BATCH).await?;
    if !chunks.is_empty() {
        let mut rows = Vec::with_capacity(chunks.len());
        let mut labels: HashMap<RequestId, Value> = HashMap::new();
        for chunk in &chunks {
            if !labels.contains_key(&chunk.request_id) {
                let request_labels =
                    store.request(&chunk.request_id).await?.map(|r| r.labels).unwrap_or_default();
                labels.insert(chunk.request_id.clone(), request_labels);
            }
            rows.push(DeliveryLog::from_chunk(chunk, &labels[&chunk.request_id]));
        }
        sink.write_deliveries(&rows).await?;
        let ids: Vec<&str> = chunks.iter().map(|c| c.id.as_str()).collect();
        sqlx::query("UPDATE chunks SET logged_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(store.pool())
            .await?;
        report.delivery_rows = ids.len() as u64;
    }
    let requests = unlogged_requests(store, BATCH).await?;
    let mut rows = Vec::new();
    for request in &requests {
        let totals = store.chunk_totals(&request.id).await?;
        rows.push(RequestLog::new(request, &totals, store.feedback_counts(&request.id).await?));
    }
    if !rows.is_empty() {
        sink.write_requests(&rows).await?;
        for row in &rows {
            let message = RequestCompleted {
                request_id: row.request_id.clone(),
                state: row.state,
                summary: row.clone(),
            };
            if let Err(err) = completed.publish(&message, &[("state", row.state.as_str())]).await {
                tracing::warn!(request_id = %row.request_id, error = %err, "Completion not announced.");
            }
            let skipped = row.skipped.values().sum::<i64>();
            tracing::info!(request_id = %row.request_id, state = %row.state, sent = row.sent, skipped, "Request finished.");
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
        sqlx::query("UPDATE requests SET logged_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(store.pool())
            .await?;
        report.request_rows = ids.len() as u64;
    }
    Ok(())
}

/// Final chunks whose delivery-log row is not written yet.
async fn unlogged_chunks(store: &Store, limit: i64) -> Result<Vec<ChunkRow>> {
    let sql = format!(
        "SELECT {} FROM chunks WHERE logged_at IS NULL AND state = ANY($1) ORDER BY finished_at LIMIT $2",
        chunk_columns(None)
    );
    Ok(sqlx::query_as(&sql).bind(ChunkState::FINAL).bind(limit).fetch_all(store.pool()).await?)
}

/// Finished requests whose summary row is not written yet.
pub async fn unlogged_requests(store: &Store, limit: i64) -> Result<Vec<RequestRow>> {
    let sql = format!(
        "SELECT {} FROM requests WHERE logged_at IS NULL AND state = ANY($1) ORDER BY finished_at LIMIT $2",
        request_columns(None)
    );
    Ok(sqlx::query_as(&sql).bind(RequestState::FINAL).bind(limit).fetch_all(store.pool()).await?)
}
