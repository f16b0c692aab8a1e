//! The chunk transitions that more than one service makes: taking a chunk for the upload or the
//! send step under a lease, moving it back or on, ending it, expiring what is overdue, and
//! cancelling what waits.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::{FromRow, PgExecutor, Row};

use super::{ChunkRow, Result, Store, chunk_columns};
use crate::domain::{ChunkId, ChunkState, RequestId};

/// The outcome of trying to take a piece of work that moves through states `S`.
#[derive(Debug)]
pub enum Claim<T, S> {
    /// The caller holds the work until its lease runs out.
    Claimed(T),
    /// Another worker holds a live lease on it.
    Busy,
    /// Nothing to do: the work is past this step (in the state given), or was never there.
    Done(Option<S>),
}

/// A chunk taken by the upload or send step.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub chunk: ChunkRow,
    /// The step was already tried and its outcome is not recorded: check the ESP before repeating it.
    pub takeover: bool,
}

/// A step that works on a chunk under a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `queued → uploading`, by the list-uploader.
    Upload,
    /// `uploaded → sending`, by the sender.
    Send,
}

impl Step {
    /// The state a chunk waits in for this step.
    pub fn ready(self) -> ChunkState {
        match self {
            Step::Upload => ChunkState::Queued,
            Step::Send => ChunkState::Uploaded,
        }
    }

    /// The state a chunk is in while the step works on it.
    pub fn working(self) -> ChunkState {
        match self {
            Step::Upload => ChunkState::Uploading,
            Step::Send => ChunkState::Sending,
        }
    }

    /// The state a chunk reaches when the step succeeds.
    pub fn done(self) -> ChunkState {
        match self {
            Step::Upload => ChunkState::Uploaded,
            Step::Send => ChunkState::Sent,
        }
    }

    fn attempts_column(self) -> &'static str {
        match self {
            Step::Upload => "upload_attempts",
            Step::Send => "send_attempts",
        }
    }

    /// What else a claim sets: an upload attempt's start, which the tail's pace is fitted to.
    fn claim_columns(self) -> &'static str {
        match self {
            Step::Upload => ", upload_started_at = now()",
            Step::Send => "",
        }
    }

    /// The column that keeps the ESP's id for the step's result, and the one that keeps its time.
    fn result_columns(self) -> (&'static str, &'static str) {
        match self {
            Step::Upload => ("list_id", "uploaded_at"),
            Step::Send => ("delivery_id", "sent_at"),
        }
    }
}

/// Expires the pending chunks whose deadline passed, on `conn` (the pool, or the scheduler's
/// transaction). Returns how many. A message-based chunk that gave its slot up to realtime work
/// mid-way has delivered some of its messages: it is dispatched again and finishes, so that its
/// counts stay whole.
pub async fn expire_overdue_chunks(conn: impl PgExecutor<'_>) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE chunks SET state = 'expired', reason = 'deadline passed before dispatch', finished_at = now()
         WHERE state = 'pending' AND deadline < now() AND progress = 0",
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// The reason kept on each chunk a cancel ended.
pub const CANCELLED_REASON: &str = "cancelled on request";

/// Which chunks [`cancel_waiting_chunks`] looks at.
#[derive(Debug, Clone, Copy)]
pub enum CancelScope<'a> {
    /// One chunk (the claim's).
    Chunk(&'a ChunkId),
    /// One request's chunks (the cancel's).
    Request(&'a RequestId),
    /// Every cancelled request's (the completion job's sweep).
    All,
}

/// Whether chunk `c` of request `r`, if it waits for a step, is to end `cancelled` instead: its
/// request was cancelled while open, and nothing of the chunk was delivered yet.
const CANCELLING: &str = "r.cancel_requested_at IS NOT NULL
    AND r.state IN ('received', 'preparing', 'dispatching') AND c.progress = 0";

/// Ends `cancelled` the chunks of cancelled requests (`cancel_requested_at` set) that were not
/// handed to the provider's send step: waiting for dispatch (`pending`), for their upload
/// (`queued`) or for their send (`uploaded`), with none of their messages tried yet (a
/// message-based chunk handed back or given way to realtime mid-way has some delivered already,
/// and finishes instead).
/// Chunks `uploading` or `sending` finish on their own. Returns how many.
pub async fn cancel_waiting_chunks(conn: impl PgExecutor<'_>, scope: CancelScope<'_>) -> Result<u64> {
    // One statement per scope, so that each is planned with its own index.
    let (filter, id) = match scope {
        CancelScope::Chunk(chunk) => ("c.id = $2", Some(chunk.as_str())),
        CancelScope::Request(request) => ("c.request_id = $2", Some(request.as_str())),
        CancelScope::All => ("$2::text IS NULL", None),
    };
    let sql = format!(
        "UPDATE chunks c SET state = 'cancelled', reason = $1, finished_at = now(), lease_until = NULL
         FROM requests r
         WHERE {filter} AND r.id = c.request_id AND {CANCELLING}
           AND c.state IN ('pending', 'queued', 'uploaded')"
    );
    let done = sqlx::query(&sql).bind(CANCELLED_REASON).bind(id).execute(conn).await?;
    Ok(done.rows_affected())
}

impl Store {
    /// Takes a chunk for `step`: from the state it waits in, or from the working state when the
    /// lease there ran out (a takeover, which must check the ESP before repeating anything).
    /// A waiting chunk of a cancelled request ends `cancelled` instead ([`Claim::Done`]): a chunk
    /// that reached its step after the cancel (an upload that ended, a send handed back) never
    /// goes further.
    pub async fn claim(
        &self,
        id: &ChunkId,
        step: Step,
        lease: Duration,
    ) -> Result<Claim<Claimed, ChunkState>> {
        // One statement when the chunk can be taken, as it nearly always can; a waiting chunk of
        // a cancelled request is not taken, but ended below.
        let (attempts, started) = (step.attempts_column(), step.claim_columns());
        let sql = format!(
            "WITH before AS (SELECT c.id, c.state, {CANCELLING} AS cancelling
                             FROM chunks c JOIN requests r ON r.id = c.request_id
                             WHERE c.id = $1 FOR UPDATE OF c)
             UPDATE chunks SET state = $3, lease_until = now() + $4, {attempts} = {attempts} + 1{started}
             FROM before
             WHERE chunks.id = before.id
               AND ((before.state = $2 AND NOT before.cancelling)
                    OR (before.state = $3 AND chunks.lease_until < now()))
             RETURNING before.state AS before_state, {}",
            chunk_columns(Some("chunks"))
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(step.ready())
            .bind(step.working())
            .bind(lease)
            .fetch_optional(self.pool())
            .await?;
        if let Some(row) = row {
            let before: ChunkState = row.try_get("before_state")?;
            let chunk = ChunkRow::from_row(&row)?;
            return Ok(Claim::Claimed(Claimed { chunk, takeover: before == step.working() }));
        }
        cancel_waiting_chunks(self.pool(), CancelScope::Chunk(id)).await?;
        let state: Option<ChunkState> = sqlx::query_scalar("SELECT state FROM chunks WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        Ok(match state {
            Some(s) if s == step.working() => Claim::Busy,
            other => Claim::Done(other),
        })
    }

    /// Records a step's success with the ESP's id for its result (the list, or the delivery), if
    /// this attempt still holds the chunk. False when another attempt took it over meanwhile.
    pub async fn finish_step(&self, id: &ChunkId, step: Step, esp_id: &str) -> Result<bool> {
        let (result, at) = step.result_columns();
        let sql = format!(
            "UPDATE chunks SET state = $3, {result} = $2, {at} = now(), lease_until = NULL
             WHERE id = $1 AND state = $4"
        );
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(esp_id)
            .bind(step.done())
            .bind(step.working())
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// [`Store::finish_step`] for several chunks, each with its own result, in one statement.
    /// Returns the chunks this attempt still held, and so finished.
    pub async fn finish_steps(&self, results: &[(ChunkId, String)], step: Step) -> Result<HashSet<ChunkId>> {
        let (result, at) = step.result_columns();
        let sql = format!(
            "UPDATE chunks c SET state = $3, {result} = r.esp_id, {at} = now(), lease_until = NULL
             FROM unnest($1::text[], $2::text[]) AS r (id, esp_id)
             WHERE c.id = r.id AND c.state = $4
             RETURNING c.id"
        );
        let finished: Vec<ChunkId> = sqlx::query_scalar(&sql)
            .bind(results.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
            .bind(results.iter().map(|(_, esp_id)| esp_id.as_str()).collect::<Vec<_>>())
            .bind(step.done())
            .bind(step.working())
            .fetch_all(self.pool())
            .await?;
        Ok(finished.into_iter().collect())
    }

    /// Moves a chunk from one state to another, if it is still where the caller left it.
    pub async fn transition(&self, id: &ChunkId, from: ChunkState, to: ChunkState) -> Result<bool> {
        let done =
            sqlx::query("UPDATE chunks SET state = $3, lease_until = NULL WHERE id = $1 AND state = $2")
                .bind(id)
                .bind(from)
                .bind(to)
                .execute(self.pool())
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends a chunk whose every recipient was suppressed just before the provider: `completed`,
    /// with nothing sent and `suppressed` recipients left out, if it is still `from`.
    pub async fn finish_all_suppressed(
        &self,
        id: &ChunkId,
        from: ChunkState,
        suppressed: i64,
        reason: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'completed', suppressed = $3, delivered = 0, bounced = 0, failed = 0,
                 reason = $4, lease_until = NULL, finished_at = now()
             WHERE id = $1 AND state = $2",
        )
        .bind(id)
        .bind(from)
        .bind(suppressed)
        .bind(reason)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends a chunk in a final state with a reason (`failed`, `unknown`, `expired`, `cancelled`).
    pub async fn finish_chunk(
        &self,
        id: &ChunkId,
        from: ChunkState,
        to: ChunkState,
        reason: &str,
    ) -> Result<bool> {
        debug_assert!(to.is_final());
        let done = sqlx::query(
            "UPDATE chunks SET state = $3, reason = $4, lease_until = NULL, finished_at = now()
             WHERE id = $1 AND state = $2",
        )
        .bind(id)
        .bind(from)
        .bind(to)
        .bind(reason)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
