//! What the prepare step writes: its claim on the request, the chunk rows, and its end.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use haishin_shared::domain::{ChunkId, ChunkState, DeliveryRequest, RequestId, RequestState};
use haishin_shared::store::{
    CANCELLED_REASON, Claim, RequestRow, Result, Store, StoreError, request_columns,
};
use sqlx::{Postgres, QueryBuilder};

use super::chunker::AudienceSummary;

/// A chunk written by the prepare step.
#[derive(Debug, Clone)]
pub struct NewChunk {
    pub id: ChunkId,
    pub seq: u32,
    pub object: String,
    pub recipients: u32,
    /// The recipients' lines, for a chunk that holds them in its row (`object` is not written).
    pub lines: Option<String>,
}

/// Takes a request for the prepare step: from `received`, or from `preparing` whose lease ran out
/// before its plan recorded every shard.
pub async fn claim_prepare(
    store: &Store,
    id: &RequestId,
    lease: Duration,
) -> Result<Claim<RequestRow, RequestState>> {
    let claimed = sqlx::query_as::<_, RequestRow>(&format!(
        "UPDATE requests SET state = 'preparing', lease_until = now() + $2
         WHERE id = $1 AND (state = 'received'
                          OR (state = 'preparing' AND (partitions IS NULL OR plan_open)
                              AND lease_until < now()))
         RETURNING {}",
        request_columns(None)
    ))
    .bind(id)
    .bind(lease)
    .fetch_optional(store.pool())
    .await?;
    if let Some(row) = claimed {
        return Ok(Claim::Claimed(row));
    }
    let state: Option<RequestState> = sqlx::query_scalar("SELECT state FROM requests WHERE id = $1")
        .bind(id)
        .fetch_optional(store.pool())
        .await?;
    Ok(match state {
        Some(RequestState::Preparing) => Claim::Busy,
        other => Claim::Done(other),
    })
}

/// Drops what an earlier, interrupted prepare of this request (or of the partition whose chunk
/// numbers are `seqs`) wrote and nothing has taken up since (pending chunks none of whose messages
/// were tried), and returns the chunks it handed on, by `seq`, with their recipients: those stay
/// as they are.
pub async fn clear_chunks(
    store: &Store,
    request: &RequestId,
    seqs: Range<u32>,
) -> Result<BTreeMap<u32, i32>> {
    let (first, end) = (i64::from(seqs.start), i64::from(seqs.end));
    sqlx::query(
        "DELETE FROM chunks WHERE request_id = $1 AND state = 'pending' AND progress = 0
             AND seq >= $2 AND seq < $3",
    )
    .bind(request)
    .bind(first)
    .bind(end)
    .execute(store.pool())
    .await?;
    let kept: Vec<(i32, i32)> =
        sqlx::query_as("SELECT seq, recipients FROM chunks WHERE request_id = $1 AND seq >= $2 AND seq < $3")
            .bind(request)
            .bind(first)
            .bind(end)
            .fetch_all(store.pool())
            .await?;
    Ok(kept.into_iter().map(|(seq, recipients)| (seq.max(0) as u32, recipients)).collect())
}

/// Adds chunk rows for a request being prepared: `pending`, or `cancelled` when the request's
/// cancel was asked for. Returns the state they were stored in. The request row is locked (shared)
/// meanwhile, so a cancel either sees these chunks or is seen by this insert.
pub async fn insert_chunks(
    store: &Store,
    request: &DeliveryRequest,
    chunks: &[NewChunk],
) -> Result<ChunkState> {
    let mut tx = store.pool().begin().await?;
    let cancelled: Option<bool> =
        sqlx::query_scalar("SELECT cancel_requested_at IS NOT NULL FROM requests WHERE id = $1 FOR SHARE")
            .bind(&request.id)
            .fetch_optional(&mut *tx)
            .await?;
    let (state, reason) = match cancelled {
        Some(true) => (ChunkState::Cancelled, Some(CANCELLED_REASON)),
        _ => (ChunkState::Pending, None),
    };
    if !chunks.is_empty() {
        let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO chunks (id, request_id, seq, class, priority, deadline, state, object, recipients, lines, reason, finished_at) ",
        );
        query.push_values(chunks, |mut row, chunk| {
            row.push_bind(&chunk.id)
                .push_bind(&request.id)
                .push_bind(chunk.seq as i32)
                .push_bind(request.class)
                .push_bind(request.priority)
                .push_bind(request.deadline)
                .push_bind(state)
                .push_bind(&chunk.object)
                .push_bind(chunk.recipients as i32)
                .push_bind(&chunk.lines)
                .push_bind(reason)
                .push(if reason.is_some() { "now()" } else { "NULL" });
        });
        query.push(" ON CONFLICT (id) DO NOTHING");
        query.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(state)
}

/// Ends the prepare step: the request's chunks become eligible for dispatch.
pub async fn finish_prepare(store: &Store, id: &RequestId, summary: &AudienceSummary) -> Result<bool> {
    let skipped = serde_json::to_value(&summary.skipped).unwrap_or_default();
    let skipped_at = serde_json::to_value(&summary.skipped_at).unwrap_or_default();
    let done = sqlx::query(
        "UPDATE requests SET state = 'dispatching', lease_until = NULL, prepared_at = now(),
             audience_rows = $2, recipients = $3, skipped = $4, chunk_count = $5, skipped_at = $6
         WHERE id = $1 AND state = 'preparing'",
    )
    .bind(id)
    .bind(summary.rows as i64)
    .bind(summary.recipients as i64)
    .bind(skipped)
    .bind(summary.chunks as i32)
    .bind(skipped_at)
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A request prepared before it was stored: what [`insert_prepared`] writes of it.
pub struct Prepared<'a> {
    pub request: &'a DeliveryRequest,
    /// The trace it was taken in.
    pub traceparent: Option<&'a str>,
    pub summary: &'a AudienceSummary,
    pub chunks: &'a [NewChunk],
}

/// Stores requests prepared before they were stored, already `dispatching`, with their chunks
/// (`pending`), in one statement. Returns the ids stored; a request whose id was already taken is
/// not, and nothing of it is written: the same id is the same request, whatever its body. The
/// ids must differ from one another.
pub async fn insert_prepared(store: &Store, prepared: &[Prepared<'_>]) -> Result<HashSet<RequestId>> {
    let (mut bodies, mut labels, mut skipped, mut skipped_at) = (vec![], vec![], vec![], vec![]);
    for p in prepared {
        bodies.push(json_text(p.request)?);
        labels.push(json_text(&p.request.labels)?);
        skipped.push(json_text(&p.summary.skipped)?);
        skipped_at.push(json_text(&p.summary.skipped_at)?);
    }
    let chunks = || prepared.iter().flat_map(|p| p.chunks.iter().map(move |c| (p.request, c)));
    let stored: Vec<RequestId> = sqlx::query_scalar(
        "WITH request AS (
             INSERT INTO requests (id, class, priority, state, body, labels, not_before, deadline, traceparent,
                                   prepared_at, audience_rows, recipients, skipped, chunk_count, skipped_at)
             SELECT r.id, r.class, r.priority, 'dispatching', r.body::jsonb, r.labels::jsonb, r.not_before,
                    r.deadline, r.traceparent, now(), r.audience_rows, r.recipients, r.skipped::jsonb,
                    r.chunk_count, r.skipped_at::jsonb
             FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::timestamptz[],
                         $7::timestamptz[], $8::text[], $9::bigint[], $10::bigint[], $11::text[], $12::int[],
                         $13::text[])
                 AS r (id, class, priority, body, labels, not_before, deadline, traceparent, audience_rows,
                       recipients, skipped, chunk_count, skipped_at)
             ON CONFLICT (id) DO NOTHING
             RETURNING id, class, priority, deadline),
         chunk AS (
             INSERT INTO chunks (id, request_id, seq, class, priority, deadline, state, object, recipients, lines)
             SELECT c.id, r.id, c.seq, r.class, r.priority, r.deadline, 'pending', c.object, c.recipients, c.lines
             FROM unnest($14::text[], $15::text[], $16::int[], $17::text[], $18::int[], $19::text[])
                      AS c (request_id, id, seq, object, recipients, lines)
             JOIN request r ON r.id = c.request_id)
         SELECT id FROM request",
    )
    .bind(prepared.iter().map(|p| p.request.id.as_str()).collect::<Vec<_>>())
    .bind(prepared.iter().map(|p| p.request.class.as_str()).collect::<Vec<_>>())
    .bind(prepared.iter().map(|p| p.request.priority).collect::<Vec<_>>())
    .bind(bodies)
    .bind(labels)
    .bind(prepared.iter().map(|p| p.request.not_before).collect::<Vec<_>>())
    .bind(prepared.iter().map(|p| p.request.deadline).collect::<Vec<_>>())
    .bind(prepared.iter().map(|p| p.traceparent).collect::<Vec<_>>())
    .bind(prepared.iter().map(|p| p.summary.rows as i64).collect::<Vec<_>>())
    .bind(prepared.iter().map(|p| p.summary.recipients as i64).collect::<Vec<_>>())
    .bind(skipped)
    .bind(prepared.iter().map(|p| p.summary.chunks as i32).collect::<Vec<_>>())
    .bind(skipped_at)
    .bind(chunks().map(|(r, _)| r.id.as_str()).collect::<Vec<_>>())
    .bind(chunks().map(|(_, c)| c.id.as_str()).collect::<Vec<_>>())
    .bind(chunks().map(|(_, c)| c.seq as i32).collect::<Vec<_>>())
    .bind(chunks().map(|(_, c)| c.object.as_str()).collect::<Vec<_>>())
    .bind(chunks().map(|(_, c)| c.recipients as i32).collect::<Vec<_>>())
    .bind(chunks().map(|(_, c)| c.lines.as_deref()).collect::<Vec<_>>())
    .fetch_all(store.pool())
    .await?;
    Ok(stored.into_iter().collect())
}

fn json_text<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Ends a request that can never be delivered (its audience cannot be read, say); its pending
/// chunks are cancelled with the same reason.
pub async fn fail_request(store: &Store, id: &RequestId, from: RequestState, reason: &str) -> Result<bool> {
    let mut tx = store.pool().begin().await?;
    let done = sqlx::query(
        "UPDATE requests SET state = 'failed', reason = $3, lease_until = NULL, finished_at = now()
         WHERE id = $1 AND state = $2",
    )
    .bind(id)
    .bind(from)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 1 {
        sqlx::query(
            "UPDATE chunks SET state = 'cancelled', reason = $2, finished_at = now()
             WHERE request_id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(done.rows_affected() == 1)
}

/// Lets the next attempt at preparing a request start at once.
pub async fn drop_request_lease(store: &Store, id: &RequestId) -> Result<()> {
    sqlx::query(
        "UPDATE requests SET lease_until = now() - interval '1 second' WHERE id = $1 AND state = 'preparing'",
    )
    .bind(id)
    .execute(store.pool())
    .await?;
    Ok(())
}
