//! An upload the ESP refused for its limit (429).
//!
//! The chunk goes back in line (`pending`), giving its slot up, rather than keeping it while
//! Cloud Tasks backs off: when the ESP's real limit is lower than the slots the trigger grants,
//! a chunk that kept its slot would only be refused again. The refusal is reported on the slot
//! row with the number of other uploads in progress, which the trigger's next dispatch round
//! takes into account (its adaptive limit lowers the slots granted), and the trigger is told a
//! slot is free.

use haishin_shared::domain::ChunkState;
use haishin_shared::messages::{EventKind, PipelineEvent};
use haishin_shared::store::{ChunkRow, Result, Store};

/// Puts an uploading chunk back in line and reports the refusal; returns the other uploads that
/// were in progress, or `None` when the chunk was no longer this attempt's (taken over).
pub async fn back_in_line(store: &Store, chunk: &ChunkRow) -> Result<Option<i32>> {
    let others: Option<i32> = sqlx::query_scalar(
        "WITH back AS (
             UPDATE chunks SET state = 'pending', queued_at = NULL, lease_until = NULL
             WHERE id = $1 AND state = $2 RETURNING id
         ), others AS (
             SELECT count(*)::int AS n FROM chunks WHERE state = $2 AND id <> $1
         )
         UPDATE dispatch_slots SET refused_in_flight = least(coalesce(refused_in_flight, others.n), others.n)
         FROM others WHERE api = 'upload' AND EXISTS (SELECT 1 FROM back)
         RETURNING others.n",
    )
    .bind(&chunk.id)
    .bind(ChunkState::Uploading)
    .fetch_optional(store.pool())
    .await?;
    Ok(others)
}

/// The event that has the trigger run a dispatch round: the chunk's slot is free and the chunk
/// is pending again. Every event kind means the same to the scheduler.
pub fn slot_freed(chunk: &ChunkRow) -> PipelineEvent {
    PipelineEvent::chunk(EventKind::ChunkFinished, chunk)
}
