//! Reconciling stuck work: uploads whose lease ran out go back to `queued`, chunks that sat in
//! `queued` too long go back to `pending` (re-dispatched under a new task name), and chunks that
//! sat in `uploaded`, or in `sending` with a dead lease, are published to the sender again (which
//! checks the ESP's history before sending anything twice).

use std::time::Duration;

use haishin_shared::domain::ChunkState;
use haishin_shared::gcp::Topic;
use haishin_shared::messages::DeliveryMessage;
use haishin_shared::store::{ChunkRow, Result, Store, chunk_columns};

use crate::{BATCH, PassReport};

/// How long a chunk may wait in a state before it counts as stuck.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) queued: Duration,
    pub(crate) uploaded: Duration,
}

pub(crate) async fn reconcile(
    store: &Store,
    deliveries: &Topic,
    timeouts: Timeouts,
    report: &mut PassReport,
) -> Result<()> {
    for chunk in stale_chunks(store, ChunkState::Uploading).await? {
        if store.transition(&chunk.id, ChunkState::Uploading, ChunkState::Queued).await? {
            tracing::info!(request_id = %chunk.request_id, chunk = %chunk.id, "Upload lease ran out; chunk back to queued.");
            report.requeued_uploads += 1;
        }
    }
    for chunk in lingering_chunks(store, ChunkState::Queued, timeouts.queued).await? {
        if store.transition(&chunk.id, ChunkState::Queued, ChunkState::Pending).await? {
            tracing::info!(request_id = %chunk.request_id, chunk = %chunk.id, "Chunk sat in the queue too long; dispatching again.");
            report.redispatched += 1;
        }
    }
    let mut stuck = lingering_chunks(store, ChunkState::Uploaded, timeouts.uploaded).await?;
    stuck.extend(stale_chunks(store, ChunkState::Sending).await?);
    for chunk in stuck {
        let message = DeliveryMessage::for_chunk(&chunk);
        match deliveries.publish(&message, &message.attributes()).await {
            Ok(_) => report.republished += 1,
            Err(err) => tracing::warn!(chunk = %chunk.id, error = %err, "Chunk not re-published; next pass."),
        }
    }
    Ok(())
}

/// Chunks whose lease on `state` ran out: their worker died or gave up.
async fn stale_chunks(store: &Store, state: ChunkState) -> Result<Vec<ChunkRow>> {
    let sql = format!(
        "SELECT {} FROM chunks WHERE state = $1 AND lease_until < now() ORDER BY created_at LIMIT $2",
        chunk_columns(None)
    );
    Ok(sqlx::query_as(&sql).bind(state).bind(BATCH).fetch_all(store.pool()).await?)
}

/// Chunks that sat in `state` longer than `age` since they entered it.
async fn lingering_chunks(store: &Store, state: ChunkState, age: Duration) -> Result<Vec<ChunkRow>> {
    let since = match state {
        ChunkState::Queued => "queued_at",
        ChunkState::Uploaded => "uploaded_at",
        ChunkState::Sent => "sent_at",
        _ => "created_at",
    };
    let sql = format!(
        "SELECT {} FROM chunks WHERE state = $1 AND {since} < now() - $2 ORDER BY {since} LIMIT $3",
        chunk_columns(None)
    );
    Ok(sqlx::query_as(&sql).bind(state).bind(age).bind(BATCH).fetch_all(store.pool()).await?)
}
