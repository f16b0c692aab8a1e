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
    let mut settled = Vec::new();
    for (chunk, status) in statuses {
        match status {
            Ok(DeliveryStatus::Done { delivered, bounced, failed }) => {
                let counts = DeliveryCounts {
                    delivered: delivered as i64,
                    bounced: bounced as i64,
                    failed: failed as i64,
                };
                settled.push((chunk.id, counts));
            }
            Ok(DeliveryStatus::Processing) => report.still_processing += 1,
            Err(err) => {
                tracing::warn!(chunk = %chunk.id, error = %err, "Delivery status unavailable; next pass.")
            }
        }
    }
    report.completed_chunks += complete_chunks(store, &settled).await?;
    Ok(())
}

/// Records the ESP's final counts for sent chunks, with one statement; returns how many were
/// still `sent` (a chunk completed by another run meanwhile is left as it is).
async fn complete_chunks(store: &Store, settled: &[(ChunkId, DeliveryCounts)]) -> Result<u64> {
    if settled.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "UPDATE chunks c SET state = 'completed', delivered = s.delivered, bounced = s.bounced,
             failed = s.failed, finished_at = now()
         FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS s (id, delivered, bounced, failed)
         WHERE c.id = s.id AND c.state = 'sent'",
    )
    .bind(settled.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
    .bind(settled.iter().map(|(_, c)| c.delivered).collect::<Vec<_>>())
    .bind(settled.iter().map(|(_, c)| c.bounced).collect::<Vec<_>>())
    .bind(settled.iter().map(|(_, c)| c.failed).collect::<Vec<_>>())
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected())
}
