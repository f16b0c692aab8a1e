//! Guided self-scheduling at the tail of the batch work.
//!
//! Once every batch request is prepared, the chunk about to be dispatched is cut to
//! `ceil(pending recipients / slots)` recipients (at least `min_part`), and the rest of its lines
//! stay pending as a chunk of their own (own id, task name and ESP keys, same object). Pieces
//! shrink as the work runs out, so the slots run dry together instead of some idling while a few
//! full chunks finish. A chunk that was ever dispatched keeps its range: the ESP may hold a list
//! under its key.

use haishin_shared::domain::{ChunkId, Class, RequestId};
use haishin_shared::store::Result;
use sqlx::{Postgres, Transaction};

use super::{ELIGIBLE, NEXT_PENDING};

/// How the tail of the batch work is cut: over `slots`, into pieces of at least `min_part`.
#[derive(Debug, Clone, Copy)]
pub(super) struct TailSplit {
    pub(super) slots: u32,
    pub(super) min_part: u32,
}

/// Cuts the next chunk of `class` in two when the tail has been reached.
pub(super) async fn cut_next(
    tx: &mut Transaction<'_, Postgres>,
    class: Class,
    split: TailSplit,
) -> Result<()> {
    if split.min_part == 0 || split.slots < 2 {
        return Ok(());
    }
    // The next chunk first: most rounds (a realtime flood's) have no batch chunk pending at all.
    let next: Option<(ChunkId, RequestId, i32, i32, i32)> =
        sqlx::query_as(&NEXT_PENDING).bind(class).fetch_optional(&mut **tx).await?;
    let Some((id, request_id, first_line, recipients, generation)) = next else { return Ok(()) };
    let (preparing, pending): (bool, i64) = sqlx::query_as(&format!(
        "SELECT EXISTS (SELECT 1 FROM requests
                        WHERE class = $1 AND state IN ('received', 'preparing')
                          AND paused_at IS NULL AND cancel_requested_at IS NULL
                          AND (not_before IS NULL OR not_before <= now())),
                (SELECT coalesce(sum(c.recipients), 0) FROM chunks c JOIN requests r ON r.id = c.request_id
                 WHERE {ELIGIBLE})"
    ))
    .bind(class)
    .fetch_one(&mut **tx)
    .await?;
    if preparing || pending == 0 {
        return Ok(());
    }
    let head = (pending as u64).div_ceil(u64::from(split.slots)).max(u64::from(split.min_part));
    if generation > 0 || (recipients as u64) < head + u64::from(split.min_part) {
        return Ok(());
    }
    let head = head as i32;
    sqlx::query("UPDATE chunks SET recipients = $2 WHERE id = $1")
        .bind(&id)
        .bind(head)
        .execute(&mut **tx)
        .await?;
    let seq: i32 = sqlx::query_scalar(
        "UPDATE requests SET chunk_count = chunk_count + 1 WHERE id = $1
         RETURNING (SELECT max(seq) + 1 FROM chunks WHERE request_id = $1)",
    )
    .bind(&request_id)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO chunks (id, request_id, seq, class, priority, deadline, state, object, first_line, recipients)
         SELECT $2, request_id, $3, class, priority, deadline, 'pending', object, $4, $5
         FROM chunks WHERE id = $1",
    )
    .bind(&id)
    .bind(ChunkId::new(&request_id, seq as u32))
    .bind(seq)
    .bind(first_line + head)
    .bind(recipients - head)
    .execute(&mut **tx)
    .await?;
    tracing::debug!(request_id = %request_id, chunk = %id, recipients = head, rest = recipients - head, "Tail chunk cut.");
    Ok(())
}
