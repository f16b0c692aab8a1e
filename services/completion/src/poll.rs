//! Polling the ESP for sent chunks: a chunk whose delivery settled is completed with the ESP's counts.

use futures::StreamExt;
use haishin_shared::domain::{ChunkId, ChunkState};
use haishin_shared::esp::{DeliveryId, DeliveryStatus, EspProvider};
use haishin_shared::store::{ChunkRow, Result, Store, chunk_columns};

use crate::{BATCH, PassReport};

/// ESP status calls in flight at once.
const STATUS_CONCURRENCY: usize = 16;

/// Per-chunk counts the ESP reported once a delivery settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DeliveryCounts {
    delivered: i64,
    bounced: i64,
    failed: i64,
}

pub(crate) async fn poll_sent(store: &Store, esp: &dyn EspProvider, report: &mut PassReport) -> Result<()> {
    let sql = format!(
        "SELECT {} FROM chunks WHERE state = $1 ORDER BY created_at, seq LIMIT $2",
        chunk_columns(None)
    );
    let sent: Vec<ChunkRow> =
        sqlx::query_as(&sql).bind(ChunkState::Sent).bind(BATCH).fetch_all(store.pool()).await?;
    report.polled_chunks = sent.len() as u64;
    let statuses: Vec<_> = futures::stream::iter(sent)
        .map(|chunk| async move {
            let id = DeliveryId(chunk.delivery_id.clone().unwrap_or_default());
            (chunk, esp.delivery_status(&id).await)
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
                if complete_chunk(store, &chunk.id, counts).await? {
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

/// Records the ESP's final counts for a sent chunk.
async fn complete_chunk(store: &Store, id: &ChunkId, counts: DeliveryCounts) -> Result<bool> {
    let done = sqlx::query(
        "UPDATE chunks SET state = 'completed', delivered = $2, bounced = $3, failed = $4, finished_at = now()
         WHERE id = $1 AND state = 'sent'",
    )
    .bind(id)
    .bind(counts.delivered)
    .bind(counts.bounced)
    .bind(counts.failed)
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}
