//! Pausing, resuming and cancelling a request (`POST /v1/requests/{id}:pause`, `:resume`,
//! `:cancel`). Each is idempotent and returns a domain outcome; the route decides the answer.
//!
//! - **pause** sets `paused_at`: the scheduling rule dispatches none of the request's chunks
//!   from then on (the pause holds the dispatch lock, so no round under way can either). Chunks
//!   already handed on (queued, uploading, uploaded, sending) finish and are counted; the
//!   audience's preparation goes on; pending chunks still expire at the deadline.
//! - **resume** clears it: the next dispatch round takes the pending chunks where they stopped.
//!   It records `resumed_at`: the completion job's kill switch judges a resumed request only on
//!   the chunks finished since.
//! - **cancel** sets `cancel_requested_at` (never cleared), and ends `cancelled` every chunk not
//!   handed to the provider's send step ([`cancel_waiting_chunks`]). Chunks uploading or sending
//!   finish on their own; a chunk that comes back to a waiting state later is cancelled when it
//!   is next claimed (or by the completion job), and one the prepare step writes later is stored
//!   `cancelled`. The completion job closes the request `cancelled` once every chunk is final. A
//!   request not yet prepared (`received`) is cancelled at once. The cancel holds the dispatch
//!   lock too, which also keeps its lock order (requests, then chunks) from crossing a round's.

use haishin_shared::domain::{RequestId, RequestState};
use haishin_shared::store::{CANCELLED_REASON, CancelScope, Result, Store, cancel_waiting_chunks};

use crate::scheduling::hold_dispatch;

/// The custom methods of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Pause,
    Resume,
    Cancel,
}

impl Verb {
    /// The method named after the `:` of `/v1/requests/{id}:verb`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "pause" => Some(Verb::Pause),
            "resume" => Some(Verb::Resume),
            "cancel" => Some(Verb::Cancel),
            _ => None,
        }
    }

    fn past(self) -> &'static str {
        match self {
            Verb::Pause => "paused",
            Verb::Resume => "resumed",
            Verb::Cancel => "cancelled",
        }
    }
}

/// What became of a pause, resume or cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Done, now or before (the same call twice changes nothing more).
    Done,
    /// No request has this id.
    NotFound,
    /// The request is past the point where this can be done (in the state given); the text says
    /// why.
    Refused { state: RequestState, reason: String },
}

/// Pauses an open request; `reason` is kept beside the time (the first pause's, when paused twice).
pub async fn pause(store: &Store, id: &RequestId, reason: Option<&str>) -> Result<Control> {
    let mut tx = store.pool().begin().await?;
    hold_dispatch(&mut tx).await?;
    let done = sqlx::query(
        "UPDATE requests SET paused_at = coalesce(paused_at, now()),
             pause_reason = CASE WHEN paused_at IS NULL THEN $2 ELSE pause_reason END
         WHERE id = $1 AND state IN ('received', 'preparing', 'dispatching') AND cancel_requested_at IS NULL",
    )
    .bind(id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if done.rows_affected() == 1 { Ok(Control::Done) } else { refusal(store, id, Verb::Pause).await }
}

/// Resumes an open request (one that is not paused is left as it is). The caller asks for a
/// dispatch round, so that the request's pending chunks go out at once.
pub async fn resume(store: &Store, id: &RequestId) -> Result<Control> {
    let done = sqlx::query(
        "UPDATE requests SET paused_at = NULL, pause_reason = NULL,
             resumed_at = CASE WHEN paused_at IS NULL THEN resumed_at ELSE now() END
         WHERE id = $1 AND state IN ('received', 'preparing', 'dispatching') AND cancel_requested_at IS NULL",
    )
    .bind(id)
    .execute(store.pool())
    .await?;
    if done.rows_affected() == 1 { Ok(Control::Done) } else { refusal(store, id, Verb::Resume).await }
}

/// Cancels an open request: what is not handed to the send step ends `cancelled`. `reason`
/// becomes the request's (`cancelled on request` by default). The caller asks for a dispatch
/// round: the cancelled chunks that were queued freed their slots.
pub async fn cancel(store: &Store, id: &RequestId, reason: Option<&str>) -> Result<Control> {
    let mut tx = store.pool().begin().await?;
    hold_dispatch(&mut tx).await?;
    let done = sqlx::query(
        "UPDATE requests SET cancel_requested_at = coalesce(cancel_requested_at, now()),
             reason = coalesce(reason, $2),
             state = CASE WHEN state = 'received' THEN 'cancelled' ELSE state END,
             finished_at = CASE WHEN state = 'received' THEN now() ELSE finished_at END,
             lease_until = CASE WHEN state = 'received' THEN NULL ELSE lease_until END
         WHERE id = $1 AND state IN ('received', 'preparing', 'dispatching')",
    )
    .bind(id)
    .bind(reason.unwrap_or(CANCELLED_REASON))
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        tx.rollback().await?;
        return refusal(store, id, Verb::Cancel).await;
    }
    let chunks = cancel_waiting_chunks(&mut *tx, CancelScope::Request(id)).await?;
    tx.commit().await?;
    tracing::info!(request_id = %id, chunks, "Request cancelled: chunks not handed to the send step cancelled.");
    Ok(Control::Done)
}

/// Why `verb` changed nothing: no such request, or one past the point where it could. A request
/// never comes back from a final state or from a cancel, so what is read here still holds.
async fn refusal(store: &Store, id: &RequestId, verb: Verb) -> Result<Control> {
    let Some(row) = store.request(id).await? else { return Ok(Control::NotFound) };
    Ok(match (verb, row.state) {
        (Verb::Cancel, RequestState::Cancelled) => Control::Done,
        (_, state) if state.is_final() => Control::Refused {
            state,
            reason: format!("request `{id}` is {state}: it can no longer be {}", verb.past()),
        },
        (_, state) if row.cancel_requested_at.is_some() => Control::Refused {
            state,
            reason: format!("request `{id}` is being cancelled: it can no longer be {}", verb.past()),
        },
        // Changed meanwhile from a state where it could have been done: done by now.
        _ => Control::Done,
    })
}
