//! The chunk's row as one attempt to send it may change it.

use std::time::Duration;

use haishin_shared::push::Outcome;
use haishin_shared::store::{ChunkRow, Store, StoreError};

use super::batch::{Place, Tally};

/// A statement ending in the guard of every write: the chunk is still being sent by this attempt
/// (`$1` its id, `$2` the attempt's number).
macro_rules! concat_fenced {
    ($sql:literal) => {
        concat!($sql, "id = $1 AND state = 'sending' AND send_attempts = $2")
    };
}

/// The chunk's row as this attempt may change it: every write names the attempt
/// (`send_attempts`), so an attempt that was taken over changes nothing.
pub(super) struct Fence<'a> {
    pub(super) store: &'a Store,
    pub(super) chunk: &'a ChunkRow,
    pub(super) lease: Duration,
}

impl Fence<'_> {
    fn taken_over() -> Outcome {
        Outcome::done("chunk was taken over while sending")
    }

    fn query(
        &self,
        sql: &'static str,
    ) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(sql).bind(self.chunk.id.clone()).bind(self.chunk.send_attempts)
    }

    async fn run(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<bool, StoreError> {
        Ok(query.execute(self.store.pool()).await?.rows_affected() == 1)
    }

    /// Counts a dead attempt's batch `unknown`.
    pub(super) async fn settle_lost(&self) -> Result<(), Outcome> {
        let query = self.query(concat_fenced!(
            "UPDATE chunks SET unknown = coalesce(unknown, 0) + cardinality(in_flight), in_flight = NULL,
                 reason = coalesce(reason, 'messages handed over without an answer (an attempt ended mid-call)')
             WHERE in_flight IS NOT NULL AND "
        ));
        match self.run(query).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Self::taken_over()),
            Err(err) => Err(err.into()),
        }
    }

    /// Writes the batch about to be handed over, with the place after it and the batch's
    /// recipients left out as suppressed (so that they are counted once, whatever happens to the
    /// call); extends the lease.
    pub(super) async fn take(&self, indexes: &[i32], place: &Place, suppressed: i64) -> Result<(), Outcome> {
        let in_flight = (!indexes.is_empty()).then(|| indexes.to_vec());
        let retry: Vec<i32> = place.retry.iter().copied().collect();
        let query = self
            .query(concat_fenced!(
                "UPDATE chunks SET in_flight = $3, progress = $4, retry = $5, lease_until = now() + $6,
                     suppressed = CASE WHEN $7 > 0 THEN coalesce(suppressed, 0) + $7 ELSE suppressed END
                 WHERE "
            ))
            .bind(in_flight)
            .bind(place.progress)
            .bind(retry)
            .bind(self.lease)
            .bind(suppressed);
        match self.run(query).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Self::taken_over()),
            Err(err) => Err(Outcome::from(err)),
        }
    }

    /// Adds a batch's outcomes and clears `in_flight`. A database error is tried again: the
    /// outcomes are known only here, and lost they would count `unknown`.
    pub(super) async fn record(&self, tally: &Tally) -> Result<(), Outcome> {
        let mut wait = Duration::from_millis(100);
        for attempt in 1.. {
            let query = self
                .query(concat_fenced!(
                    "UPDATE chunks SET in_flight = NULL, retry = retry || $3::int4[],
                         delivered = coalesce(delivered, 0) + $4, failed = coalesce(failed, 0) + $5,
                         unknown = coalesce(unknown, 0) + $6, reason = coalesce(reason, $7),
                         lease_until = now() + $8
                     WHERE "
                ))
                .bind(tally.deferred.clone())
                .bind(tally.delivered)
                .bind(tally.failed)
                .bind(tally.unknown)
                .bind(tally.reason.clone())
                .bind(self.lease);
            match self.run(query).await {
                Ok(true) => return Ok(()),
                Ok(false) => return Err(Self::taken_over()),
                Err(err) if attempt >= 5 => {
                    tracing::error!(error = %err, "Batch outcomes not recorded; the next attempt counts them unknown.");
                    return Err(err.into());
                }
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// Ends the chunk `completed` once every message has its outcome.
    pub(super) async fn complete(&self) -> Result<bool, StoreError> {
        let query = self.query(concat_fenced!(
            "UPDATE chunks SET state = 'completed', sent_at = now(), finished_at = now(), lease_until = NULL
             WHERE in_flight IS NULL AND cardinality(retry) = 0 AND progress >= recipients AND "
        ));
        self.run(query).await
    }

    /// Counts the messages still due `failed` and ends the chunk `completed`.
    pub(super) async fn give_up(&self, remaining: i64, reason: &str) -> Result<bool, StoreError> {
        let query = self
            .query(concat_fenced!(
                "UPDATE chunks SET state = 'completed', failed = coalesce(failed, 0) + $3, reason = $4,
                     retry = '{}', progress = recipients, sent_at = now(), finished_at = now(), lease_until = NULL
                 WHERE in_flight IS NULL AND "
            ))
            .bind(remaining)
            .bind(reason.to_owned());
        self.run(query).await
    }

    /// Gives a batch chunk's slot up to realtime work, between two batches: back to `pending`
    /// with its place kept, to be dispatched again after the realtime chunks, when realtime chunks
    /// have waited for a slot longer than a dispatch round takes. Of the batch chunks being sent,
    /// those ranked lowest give way, one per waiting realtime chunk.
    pub(super) async fn yield_to_realtime(&self) -> Result<bool, StoreError> {
        let query = self
            .query(concat_fenced!(
                "UPDATE chunks SET state = 'pending', yields = yields + 1, lease_until = NULL,
                     queued_at = NULL, uploaded_at = NULL
                 WHERE class = 'batch' AND in_flight IS NULL
                   AND (SELECT count(*) FROM chunks w JOIN requests r ON r.id = w.request_id
                        WHERE w.state = 'pending' AND w.class = 'realtime'
                          AND w.created_at < now() - interval '100 milliseconds'
                          AND r.state IN ('preparing', 'dispatching')
                          AND r.paused_at IS NULL AND r.cancel_requested_at IS NULL
                          AND (r.not_before IS NULL OR r.not_before <= now()))
                     > (SELECT count(*) FROM chunks b
                        WHERE b.state = 'sending' AND b.class = 'batch' AND (b.priority, b.id) < ($3, $1))
                   AND "
            ))
            .bind(self.chunk.priority);
        self.run(query).await
    }

    /// Puts the chunk back in line (`pending`, its place kept) at the end of its turn.
    pub(super) async fn back_in_line(&self) -> Result<bool, StoreError> {
        let query = self.query(concat_fenced!(
            "UPDATE chunks SET state = 'pending', yields = yields + 1, lease_until = NULL,
                 queued_at = NULL, uploaded_at = NULL
             WHERE in_flight IS NULL AND "
        ));
        self.run(query).await
    }

    /// Hands the chunk back (`uploaded`, keeping its slot and its place) for a later delivery.
    pub(super) async fn hand_back(&self) -> Result<bool, StoreError> {
        let query =
            self.query(concat_fenced!("UPDATE chunks SET state = 'uploaded', lease_until = NULL WHERE "));
        self.run(query).await
    }
}
