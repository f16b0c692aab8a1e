//! Ending requests: those whose deadline passed before they were prepared, and those all of whose
//! chunks are final; and what a cancel stopped.

use haishin_shared::domain::ChunkState;
use haishin_shared::store::{CANCELLED_REASON, CancelScope, Result, Store, cancel_waiting_chunks};

/// Expires requests whose deadline passed before they were prepared. Returns how many.
pub(crate) async fn expire_unprepared(store: &Store) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE requests SET state = 'expired', reason = 'deadline passed before the audience was prepared',
             finished_at = now(), lease_until = NULL
         WHERE state IN ('received', 'preparing') AND deadline < now()",
    )
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected())
}

/// Ends `cancelled` what the cancel of a request could not reach when it was asked for: chunks
/// that came back to a waiting state since (an upload handed back, a send given back) or that
/// were dispatched in the same moment. Returns how many.
pub(crate) async fn cancel_stragglers(store: &Store) -> Result<u64> {
    cancel_waiting_chunks(store.pool(), CancelScope::All).await
}

/// Closes dispatching requests all of whose chunks are final. Returns how many.
///
/// A request whose cancel was asked for is `cancelled`; otherwise it is `completed` when at least
/// one chunk was sent (or it had nothing to send), `expired` when its chunks expired and none was
/// sent, and `failed` otherwise.
pub(crate) async fn close_finished_requests(store: &Store) -> Result<u64> {
    let done = sqlx::query(
        "WITH done AS (
             SELECT r.id,
                    count(c.id) FILTER (WHERE c.state = 'completed') AS completed,
                    count(c.id) FILTER (WHERE c.state = 'expired') AS expired,
                    count(c.id) AS total
             FROM requests r LEFT JOIN chunks c ON c.request_id = r.id
             WHERE r.state = 'dispatching'
             GROUP BY r.id
             HAVING count(c.id) FILTER (WHERE c.state <> ALL($1)) = 0
         )
         UPDATE requests r SET
             state = CASE WHEN r.cancel_requested_at IS NOT NULL THEN 'cancelled'
                          WHEN done.total = 0 OR done.completed > 0 THEN 'completed'
                          WHEN done.expired > 0 THEN 'expired'
                          ELSE 'failed' END,
             reason = CASE WHEN r.cancel_requested_at IS NOT NULL THEN coalesce(r.reason, $2) ELSE r.reason END,
             finished_at = now()
         FROM done WHERE r.id = done.id AND r.state = 'dispatching'",
    )
    .bind(ChunkState::FINAL)
    .bind(CANCELLED_REASON)
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected())
}
