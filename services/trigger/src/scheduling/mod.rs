//! The scheduling rule: which pending chunk goes to the provider next, and how many may be in
//! flight toward its bottleneck API (uploads for a list-based ESP, sends for SMTP and SES).
//!
//! The order is written once, in [`rank`] and [`NEXT_PENDING`]: realtime before batch, then higher
//! priority, then earliest deadline (none last), then the request given the fewest recipients
//! since it joined its equals ([`FAIR_START`]: a fair share by recipients, so two equal campaigns
//! progress at the same rate whenever each started, whatever their chunks' sizes). The forecast ([`forecast`]) counts the work ahead of a request by the
//! same rank.
//!
//! - this module: one dispatch round, in one transaction;
//! - [`adaptive`]: the slots granted, lowered when the provider's real limit is lower than the
//!   configured one and probed back up slowly;
//! - [`inline`]: small realtime chunks sent without a list, in send calls, no more messages out
//!   than the ESP has send slots;
//! - [`tail`]: cutting the last batch chunks smaller so that the slots finish together;
//! - [`forecast`]: when a request's uploads should end at the current pace.

pub mod adaptive;
pub mod forecast;
mod inline;
mod tail;

use haishin_shared::domain::{ChunkId, ChunkState, Class, RequestId};
use haishin_shared::esp::Shape;
use haishin_shared::store::{Result, Store, expire_overdue_chunks};
use sqlx::{Postgres, Transaction};

pub use adaptive::AdaptiveLimit;
pub use forecast::Forecast;

/// A chunk's (or a request's) rank as a row that sorts most urgent first: realtime before batch,
/// higher priority first, earliest deadline first, no deadline last. `t` is the alias of a
/// `chunks` or `requests` row (both carry `class`, `priority` and `deadline`).
pub(crate) fn rank(t: &str) -> String {
    format!("ROW({t}.class <> 'realtime', -{t}.priority, coalesce({t}.deadline, 'infinity'::timestamptz))")
}

/// Chunks of class `$1` that may be dispatched now: pending, of a request being prepared or
/// dispatched, neither paused nor cancelled, whose start time has come. `c` is the chunk, `r` its
/// request.
const ELIGIBLE: &str = "c.state = 'pending' AND c.class = $1 AND r.state IN ('preparing', 'dispatching')
       AND r.paused_at IS NULL AND r.cancel_requested_at IS NULL
       AND (r.not_before IS NULL OR r.not_before <= now())";

/// The next eligible chunk of class `$1` by the scheduling rule, locked: rank, then the fair
/// share among requests of equal rank ([`FAIR_START`]), then audience order.
static NEXT_PENDING: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| next_pending(""));

/// [`NEXT_PENDING`], of the chunks that also match `filter` (`AND ...` over `c` and `r`).
fn next_pending(filter: &str) -> String {
    format!(
        "SELECT c.id, c.request_id, c.first_line, c.recipients, c.generation
         FROM chunks c JOIN requests r ON r.id = c.request_id
         WHERE {ELIGIBLE}{filter}
         ORDER BY {}, r.fair_tag ASC NULLS FIRST, r.received_at ASC, c.seq ASC
         LIMIT 1 FOR UPDATE OF c SKIP LOCKED",
        rank("c")
    )
}

/// Where a dispatched chunk (`moved`, of request `q`) starts on its rank's shared count of
/// recipients: start-time fair queuing. Chunks go out in the order of their start, so the latest
/// start among the requests of the rank is where the count stands now. A request that kept up
/// starts where its last chunk ended (`fair_tag`); one that had nothing to send meanwhile (new,
/// paused, waiting for its preparation) starts where the count stands, so it neither takes over
/// to make up for lost time nor falls behind. Its chunk then ends at the start plus its
/// recipients, and the next chunk goes to the request whose last one ended first: requests of
/// equal rank are given recipients at the same rate whatever the sizes of their chunks.
const FAIR_START: &str = "greatest(coalesce(q.fair_tag, 0), coalesce((
         SELECT max(o.fair_start) FROM requests o
         WHERE o.state IN ('preparing', 'dispatching') AND o.class = q.class
           AND o.priority = q.priority AND o.deadline IS NOT DISTINCT FROM q.deadline
     ), 0))";

/// The slot limits of one dispatch round.
#[derive(Debug, Clone, Copy)]
pub struct SlotLimits {
    /// Which API the slots are of: uploads for a list-based ESP, sends for a message-based one.
    pub shape: Shape,
    /// Chunks that may be in flight toward that API (see [`holding_a_slot`]): the configured
    /// limit, which the slots granted never exceed ([`adaptive`]).
    pub limit: u32,
    /// Of those, slots that only realtime chunks may take.
    pub realtime_reserved: u32,
    /// Chunks that may wait in the upload queue beyond the limit.
    pub prefetch: u32,
    /// Smallest piece, in recipients, that the tail of the batch work is cut into (0: never cut).
    /// Once every batch request is prepared, each batch chunk dispatched is cut to the pending
    /// batch recipients divided by the batch slots, so that the last pieces are small and the slots
    /// finish together.
    pub min_part: u32,
    /// Realtime chunks of at most this many recipients go to a list-based ESP's send with their
    /// recipients in the call ([`Dispatched::inline`]): they skip the upload, so they hold no
    /// upload slot and wait for none. 0: none do (and a message-based provider has no upload).
    pub inline_max: u32,
    /// Send calls the ESP runs at once: such chunks are handed over in at most this many
    /// messages at a time (one send call each); chunks that come due while every one is out
    /// wait, and go together in the next, as many as one call carries.
    pub send_slots: u32,
}

/// Most chunks one round sends without a list: a flood of realtime events is taken in rounds of
/// this many.
const INLINE_PER_ROUND: i64 = 500;

/// The chunk states that hold one of the provider's slots. A list-based ESP's chunk holds one
/// from dispatch until its list is uploaded; a message-based provider's chunk from dispatch until
/// its last message is handed over (there is no upload, and the send is the bottleneck).
pub fn holding_a_slot(shape: Shape) -> &'static [ChunkState] {
    match shape {
        Shape::Lists => ChunkState::HOLDING_UPLOAD_SLOT,
        Shape::Messages => ChunkState::HOLDING_SEND_SLOT,
    }
}

/// The states that hold a slot, written out as an SQL list (`'queued', 'uploading'`): bound
/// instead, they would keep the planner from reading the partial index of chunks in flight, and
/// it would scan every chunk ever made (a realtime flood makes one per event).
pub(super) fn holding_states(shape: Shape) -> &'static str {
    static LISTS: std::sync::LazyLock<[String; 2]> = std::sync::LazyLock::new(|| {
        [Shape::Lists, Shape::Messages].map(|shape| {
            let states: Vec<String> =
                holding_a_slot(shape).iter().map(|s| format!("'{}'", s.as_str())).collect();
            states.join(", ")
        })
    });
    match shape {
        Shape::Lists => &LISTS[0],
        Shape::Messages => &LISTS[1],
    }
}

/// Counts the chunks holding a slot, realtime and batch.
fn holding_count(shape: Shape) -> &'static str {
    static SQL: std::sync::LazyLock<[String; 2]> = std::sync::LazyLock::new(|| {
        [Shape::Lists, Shape::Messages].map(|shape| {
            format!(
                "SELECT count(*) FILTER (WHERE class = 'realtime'), count(*) FILTER (WHERE class = 'batch')
                 FROM chunks WHERE state IN ({})",
                holding_states(shape)
            )
        })
    });
    match shape {
        Shape::Lists => &SQL[0],
        Shape::Messages => &SQL[1],
    }
}

/// The state a dispatched chunk waits in for its next step: `queued` for the upload task,
/// `uploaded` for the sender when there is nothing to upload.
fn dispatched_state(shape: Shape) -> ChunkState {
    match shape {
        Shape::Lists => ChunkState::Queued,
        Shape::Messages => ChunkState::Uploaded,
    }
}

/// A chunk dispatched: handed to the upload queue, or to the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub chunk_id: ChunkId,
    pub request_id: RequestId,
    pub generation: i32,
    pub class: Class,
    /// The trace of the chunk's request, which its hand-off joins.
    pub traceparent: Option<String>,
    /// Sent to a list-based ESP with its recipients in the call: the chunk went straight to
    /// `uploaded` without a list, and is published to the sender.
    pub inline: bool,
    /// For a chunk sent without a list: which of the round's send calls it goes in. Chunks of
    /// requests that share a template share a call, up to the most recipients one send carries.
    pub send_call: Option<u32>,
}

/// The outcome of one dispatch round.
#[derive(Debug, Clone)]
pub struct DispatchRound {
    pub dispatched: Vec<Dispatched>,
    pub expired: u64,
    pub in_flight: u32,
    /// The slots the round granted against: the configured limit, or lower ([`adaptive`]).
    pub slots: AdaptiveLimit,
    /// The round took as many chunks as one round may take without a list: run another.
    pub more: bool,
}

/// One round of the scheduling rule: settle the slots granted ([`adaptive`]), expire what is
/// overdue, send the small realtime chunks on without a list (when the ESP takes recipients in a
/// send), count chunks in flight toward the bottleneck API, and move the best pending chunks on
/// (to `queued`, or to `uploaded` when there is nothing to upload) to fill the free slots.
/// Below the configured limit nothing is prefetched: the upload queue's own cap is the configured
/// limit, so a prefetched chunk could start an upload the ESP refuses.
///
/// Batch chunks never take the slots reserved for realtime. The slot row is locked for the round,
/// so concurrent rounds (several trigger instances) see each other's work and never over-commit.
/// At the tail of the batch work, chunks are cut smaller as they are dispatched (see [`tail`]).
pub async fn dispatch_round(store: &Store, limits: SlotLimits) -> Result<DispatchRound> {
    let mut tx = store.pool().begin().await?;
    // A round reads the few chunks in flight or next in line, among the many index entries their
    // earlier states left behind until a vacuum. A plain index scan marks those it finds dead as
    // it passes, so the next round skips them; a bitmap scan, which the planner picks on a young
    // table's statistics, never does, and each round then reads them all again.
    sqlx::query("SET LOCAL enable_bitmapscan = off").execute(&mut *tx).await?;
    let slots = adaptive::hold_slots(&mut tx, limits.limit).await?;
    let expired = expire_overdue_chunks(&mut *tx).await?;
    let mut dispatched = inline::take(&mut tx, limits.inline_max, limits.send_slots).await?;
    let more = dispatched.len() as i64 == INLINE_PER_ROUND;
    let (realtime, batch): (i64, i64) =
        sqlx::query_as(holding_count(limits.shape)).fetch_one(&mut *tx).await?;
    let in_flight = (realtime + batch) as u32;
    let prefetch = if slots.effective < slots.configured { 0 } else { limits.prefetch };
    let capacity = slots.effective + prefetch;
    let free = capacity.saturating_sub(in_flight);
    let batch_capacity = capacity.saturating_sub(limits.realtime_reserved);
    let free_batch = batch_capacity.saturating_sub(batch as u32).min(free);

    let inline = dispatched.len();
    if free > 0 {
        // Those small enough to go without a list are left to the next round's `inline::take`
        // (one prepared since this round's took them must not take an upload slot instead).
        let uploaded = (limits.inline_max > 0).then(|| format!(" AND c.recipients > {}", limits.inline_max));
        let pending = uploaded.as_deref().map_or_else(|| NEXT_PENDING.clone(), next_pending);
        dispatched.extend(take_pending(&mut tx, &pending, limits.shape, Class::Realtime, free, None).await?);
    }
    let free_batch = free_batch.min(free - (dispatched.len() - inline) as u32);
    if free_batch > 0 {
        let split = tail::TailSplit {
            slots: slots.effective.saturating_sub(limits.realtime_reserved),
            min_part: limits.min_part,
            shape: limits.shape,
            send_slots: limits.send_slots,
        };
        dispatched.extend(
            take_pending(&mut tx, &NEXT_PENDING, limits.shape, Class::Batch, free_batch, Some(split)).await?,
        );
    }
    tx.commit().await?;
    let in_flight = in_flight + (dispatched.len() - inline) as u32;
    Ok(DispatchRound { in_flight, dispatched, expired, slots, more })
}

/// Takes the lock every dispatch round holds, until `tx` ends: no round runs meanwhile, and every
/// round after it sees what `tx` changed. A pause or a cancel holds it, so that once either has
/// answered, no round still under way can dispatch the request's chunks.
pub(crate) async fn hold_dispatch(tx: &mut Transaction<'_, Postgres>) -> Result<()> {
    sqlx::query("SELECT api FROM dispatch_slots WHERE api = 'upload' FOR UPDATE").execute(&mut **tx).await?;
    Ok(())
}

/// Takes up to `count` chunks of `class` in order (each the one `next_pending` picks), one at a
/// time, so that round-robin sees the counts the previous pick changed.
async fn take_pending(
    tx: &mut Transaction<'_, Postgres>,
    next_pending: &str,
    shape: Shape,
    class: Class,
    count: u32,
    split: Option<tail::TailSplit>,
) -> Result<Vec<Dispatched>> {
    let sql = format!(
        "WITH next AS ({next_pending}), moved AS (
             UPDATE chunks SET state = $2, queued_at = now(), generation = chunks.generation + 1,
                 uploaded_at = CASE WHEN $2 = 'uploaded' THEN now() END
             FROM next WHERE chunks.id = next.id
             RETURNING chunks.id, chunks.request_id, chunks.generation, chunks.recipients
         ), started AS (
             SELECT moved.request_id, moved.recipients, {FAIR_START} AS start
             FROM moved JOIN requests q ON q.id = moved.request_id
         ), counted AS (
             UPDATE requests SET dispatched_chunks = dispatched_chunks + 1,
                 last_dispatched_at = clock_timestamp(),
                 fair_start = started.start, fair_tag = started.start + started.recipients
             FROM started WHERE requests.id = started.request_id
         )
         SELECT moved.id, moved.request_id, moved.generation, requests.traceparent
         FROM moved JOIN requests ON requests.id = moved.request_id"
    );
    let mut taken = Vec::new();
    for _ in 0..count {
        if let Some(split) = split {
            tail::cut_next(tx, class, split).await?;
        }
        let row: Option<(ChunkId, RequestId, i32, Option<String>)> =
            sqlx::query_as(&sql).bind(class).bind(dispatched_state(shape)).fetch_optional(&mut **tx).await?;
        match row {
            Some((chunk_id, request_id, generation, traceparent)) => taken.push(Dispatched {
                chunk_id,
                request_id,
                generation,
                class,
                traceparent,
                inline: false,
                send_call: None,
            }),
            None => break,
        }
    }
    Ok(taken)
}

/// Puts a chunk back in line when it could not be handed on (its upload task not created, its
/// delivery message not published).
pub async fn undo_dispatch(store: &Store, chunk: &Dispatched, shape: Shape) -> Result<bool> {
    let state = if chunk.inline { ChunkState::Uploaded } else { dispatched_state(shape) };
    let done = sqlx::query(
        "UPDATE chunks SET state = 'pending', queued_at = NULL, uploaded_at = NULL
         WHERE id = $1 AND state = $3 AND generation = $2",
    )
    .bind(&chunk.chunk_id)
    .bind(chunk.generation)
    .bind(state)
    .execute(store.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}
