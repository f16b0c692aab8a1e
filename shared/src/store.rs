//! PostgreSQL store: requests, chunks and their state machines.
//!
//! Every state change is one guarded `UPDATE ... WHERE state = <expected>`, so a
//! redelivered message or a second worker finds the row already moved on and
//! does nothing. Work in progress holds a lease; a lease that ran out lets
//! another worker take the work over.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{FromRow, PgPool, Postgres, QueryBuilder};

use crate::domain::{ChunkState, Class, DeliveryRequest, RequestState};

/// Errors from the store. All of them are worth a retry: the database may come back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

/// A request row as the pipeline needs it.
#[derive(Debug, Clone, FromRow)]
pub struct RequestRow {
    pub id: String,
    pub class: String,
    pub priority: i32,
    pub state: String,
    pub body: Option<Value>,
    pub labels: Value,
    pub deadline: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub recipients: Option<i64>,
    pub audience_rows: Option<i64>,
    pub skipped: Value,
    pub chunk_count: Option<i32>,
    pub received_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl RequestRow {
    /// The request as received.
    pub fn request(&self) -> Result<DeliveryRequest> {
        let body = self
            .body
            .clone()
            .ok_or_else(|| StoreError::Corrupt(format!("request {} has no body", self.id)))?;
        serde_json::from_value(body).map_err(|e| StoreError::Corrupt(format!("request {}: {e}", self.id)))
    }

    pub fn state(&self) -> RequestState {
        self.state.parse().unwrap_or(RequestState::Failed)
    }
}

/// A chunk row.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct ChunkRow {
    pub id: String,
    pub request_id: String,
    pub seq: i32,
    pub class: String,
    pub priority: i32,
    pub state: String,
    pub object: String,
    /// The chunk's recipients are lines `[first_line, first_line + recipients)` of its object.
    pub first_line: i32,
    pub recipients: i32,
    pub generation: i32,
    pub upload_attempts: i32,
    pub send_attempts: i32,
    pub list_id: Option<String>,
    pub delivery_id: Option<String>,
    pub delivered: Option<i64>,
    pub bounced: Option<i64>,
    pub failed: Option<i64>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub uploaded_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl ChunkRow {
    pub fn state(&self) -> ChunkState {
        self.state.parse().unwrap_or(ChunkState::Unknown)
    }

    pub fn class(&self) -> Class {
        self.class.parse().unwrap_or(Class::Batch)
    }
}

const CHUNK_COLUMNS: &str = "id, request_id, seq, class, priority, state, object, first_line, recipients, generation, \
     upload_attempts, send_attempts, list_id, delivery_id, delivered, bounced, failed, reason, \
     created_at, queued_at, uploaded_at, sent_at, finished_at";

const REQUEST_COLUMNS: &str = "id, class, priority, state, body, labels, deadline, reason, recipients, \
     audience_rows, skipped, chunk_count, received_at, finished_at";

/// The next pending chunk of class `$1` by the scheduling rule, locked: realtime and batch are
/// asked for separately; then priority, earliest deadline, and the request whose last chunk was
/// dispatched longest ago (round-robin).
const NEXT_PENDING: &str = "SELECT c.id, c.request_id, c.first_line, c.recipients, c.generation
     FROM chunks c JOIN requests r ON r.id = c.request_id
     WHERE c.state = 'pending' AND c.class = $1 AND r.state IN ('preparing', 'dispatching')
       AND (r.not_before IS NULL OR r.not_before <= now())
     ORDER BY c.priority DESC, c.deadline ASC NULLS LAST, r.last_dispatched_at ASC NULLS FIRST,
              r.received_at ASC, c.seq ASC
     LIMIT 1 FOR UPDATE OF c SKIP LOCKED";

/// How the tail of the batch work is cut: over `slots`, into pieces of at least `min_part`.
#[derive(Debug, Clone, Copy)]
struct TailSplit {
    slots: u32,
    min_part: u32,
}

/// A chunk written by the prepare step.
#[derive(Debug, Clone)]
pub struct NewChunk {
    pub id: String,
    pub seq: u32,
    pub object: String,
    pub recipients: u32,
}

/// What the prepare step found in an audience.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AudienceSummary {
    /// Rows read, valid or not.
    pub rows: u64,
    /// Recipients kept (valid and not repeated).
    pub recipients: u64,
    /// Rows skipped, by reason.
    pub skipped: BTreeMap<String, u64>,
    pub chunks: u32,
}

/// The outcome of trying to take a piece of work.
#[derive(Debug)]
pub enum Claim<T> {
    /// The caller holds the work until its lease runs out.
    Claimed(T),
    /// Another worker holds a live lease on it.
    Busy,
    /// Nothing to do: the work is past this step (or was never there).
    Done(Option<String>),
}

/// A chunk taken by the upload or send step.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub chunk: ChunkRow,
    /// The step was already tried and its outcome is not recorded: check the ESP before repeating it.
    pub takeover: bool,
}

/// The slot limits of one dispatch round.
#[derive(Debug, Clone, Copy)]
pub struct SlotLimits {
    /// Chunks that may be in flight toward the ESP's upload API (`queued` + `uploading`).
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
}

/// A chunk handed to the upload queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub chunk_id: String,
    pub request_id: String,
    pub generation: i32,
    pub class: Class,
}

/// The outcome of one dispatch round.
#[derive(Debug, Clone, Default)]
pub struct DispatchRound {
    pub dispatched: Vec<Dispatched>,
    pub expired: u64,
    pub in_flight: u32,
}

/// Status of a request as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestStatus {
    pub id: String,
    pub class: String,
    pub priority: i32,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub labels: Value,
    pub deadline: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub audience: Option<AudienceStatus>,
    /// Number of chunks in each state.
    pub chunks: BTreeMap<String, i64>,
    /// Number of recipients in chunks of each state.
    pub recipients: BTreeMap<String, i64>,
    pub delivered: i64,
    pub bounced: i64,
    pub failed: i64,
    /// Messages of this request that Pub/Sub gave up delivering (newest first, at most 20).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dead_letters: Vec<DeadLetter>,
    /// For a request still being uploaded: when its last chunk should be, at the current pace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forecast: Option<Forecast>,
}

/// A message Pub/Sub dead-lettered.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct DeadLetter {
    /// The subscription that gave up on it.
    pub source: String,
    pub chunk_id: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// When a request's uploads should end, from the pipeline's pace over the last minute and the
/// chunks that go before or alongside this request's (higher rank first, equals taking turns).
#[derive(Debug, Clone, Serialize)]
pub struct Forecast {
    /// This request's chunks not yet uploaded.
    pub chunks_left: i64,
    /// Other requests' chunks that will be uploaded before this request's last one.
    pub chunks_ahead: i64,
    /// Chunks uploaded in the last minute, all requests together.
    pub uploads_last_minute: i64,
    /// `None` while the pace is unknown (nothing uploaded in the last minute).
    pub uploads_done_by: Option<DateTime<Utc>>,
    /// True when `uploads_done_by` is later than the deadline: the request will partly expire
    /// unless throughput rises.
    pub deadline_at_risk: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct AudienceStatus {
    pub rows: i64,
    pub recipients: i64,
    pub skipped: Value,
    pub chunks: i32,
}

/// Per-chunk counts the ESP reported once a delivery settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeliveryCounts {
    pub delivered: i64,
    pub bounced: i64,
    pub failed: i64,
}

impl Store {
    /// Connects to PostgreSQL; the pool reconnects on its own after an outage.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// Connects without touching the database until first use.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        Ok(Self { pool })
    }

    /// Brings the schema up to date. Safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    // ---- requests ---------------------------------------------------------

    /// Stores a new request in `received`. Returns false when the id was already taken:
    /// the same id is the same request, whatever its body.
    pub async fn insert_request(&self, request: &DeliveryRequest) -> Result<bool> {
        let body = serde_json::to_value(request).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let labels = serde_json::to_value(&request.labels).unwrap_or_default();
        let done = sqlx::query(
            "INSERT INTO requests (id, class, priority, state, body, labels, not_before, deadline)
             VALUES ($1, $2, $3, 'received', $4, $5, $6, $7)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&request.id)
        .bind(request.class.as_str())
        .bind(request.priority)
        .bind(body)
        .bind(labels)
        .bind(request.not_before)
        .bind(request.deadline)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a request that can never be delivered, with the reason its sender will read.
    /// Returns false when the id was already taken.
    pub async fn insert_rejected(&self, id: &str, reason: &str) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO requests (id, class, state, reason, finished_at)
             VALUES ($1, 'batch', 'rejected', $2, now())
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Keeps a message that could not become a request at all (it had no usable id).
    pub async fn insert_rejected_message(
        &self,
        message_id: Option<&str>,
        reason: &str,
        body: &[u8],
    ) -> Result<()> {
        let excerpt: String = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        sqlx::query("INSERT INTO rejected_messages (message_id, reason, excerpt) VALUES ($1, $2, $3)")
            .bind(message_id)
            .bind(reason)
            .bind(excerpt)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Keeps a dead-lettered message against its request; the same message twice is kept once.
    pub async fn insert_dead_letter(
        &self,
        message_id: &str,
        source: &str,
        request_id: Option<&str>,
        chunk_id: Option<&str>,
        body: &[u8],
    ) -> Result<()> {
        let excerpt: String = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        sqlx::query(
            "INSERT INTO dead_letters (message_id, source, request_id, chunk_id, excerpt) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(message_id)
        .bind(source)
        .bind(request_id)
        .bind(chunk_id)
        .bind(excerpt)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn request(&self, id: &str) -> Result<Option<RequestRow>> {
        let row =
            sqlx::query_as::<_, RequestRow>(&format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row)
    }

    /// Takes a request for the prepare step: from `received`, or from `preparing` whose lease ran out.
    pub async fn claim_prepare(&self, id: &str, lease: Duration) -> Result<Claim<RequestRow>> {
        let claimed = sqlx::query_as::<_, RequestRow>(&format!(
            "UPDATE requests SET state = 'preparing', lease_until = now() + $2
             WHERE id = $1 AND (state = 'received' OR (state = 'preparing' AND lease_until < now()))
             RETURNING {REQUEST_COLUMNS}"
        ))
        .bind(id)
        .bind(lease)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = claimed {
            return Ok(Claim::Claimed(row));
        }
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM requests WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match state.as_deref() {
            Some("preparing") => Claim::Busy,
            other => Claim::Done(other.map(str::to_owned)),
        })
    }

    /// Drops whatever an earlier, interrupted prepare of this request wrote.
    pub async fn clear_chunks(&self, request_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM chunks WHERE request_id = $1 AND state = 'pending'")
            .bind(request_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Adds chunk rows for a request being prepared.
    pub async fn insert_chunks(&self, request: &DeliveryRequest, chunks: &[NewChunk]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut query: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO chunks (id, request_id, seq, class, priority, deadline, state, object, recipients) ",
        );
        query.push_values(chunks, |mut row, chunk| {
            row.push_bind(&chunk.id)
                .push_bind(&request.id)
                .push_bind(chunk.seq as i32)
                .push_bind(request.class.as_str())
                .push_bind(request.priority)
                .push_bind(request.deadline)
                .push_bind("pending")
                .push_bind(&chunk.object)
                .push_bind(chunk.recipients as i32);
        });
        query.push(" ON CONFLICT (id) DO NOTHING");
        query.build().execute(&self.pool).await?;
        Ok(())
    }

    /// Ends the prepare step: the request's chunks become eligible for dispatch.
    pub async fn finish_prepare(&self, id: &str, summary: &AudienceSummary) -> Result<bool> {
        let skipped = serde_json::to_value(&summary.skipped).unwrap_or_default();
        let done = sqlx::query(
            "UPDATE requests SET state = 'dispatching', lease_until = NULL, prepared_at = now(),
                 audience_rows = $2, recipients = $3, skipped = $4, chunk_count = $5
             WHERE id = $1 AND state = 'preparing'",
        )
        .bind(id)
        .bind(summary.rows as i64)
        .bind(summary.recipients as i64)
        .bind(skipped)
        .bind(summary.chunks as i32)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends a request that can never be delivered (its audience cannot be read, say).
    pub async fn fail_request(&self, id: &str, from: RequestState, reason: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE requests SET state = 'failed', reason = $3, lease_until = NULL, finished_at = now()
             WHERE id = $1 AND state = $2",
        )
        .bind(id)
        .bind(from.as_str())
        .bind(reason)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            sqlx::query(
                "UPDATE chunks SET state = 'cancelled', reason = $2, finished_at = now()
                 WHERE request_id = $1 AND state = 'pending'",
            )
            .bind(id)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        }
        Ok(done.rows_affected() == 1)
    }

    /// Lets the next attempt at preparing a request start at once.
    pub async fn drop_request_lease(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE requests SET lease_until = now() - interval '1 second' WHERE id = $1 AND state = 'preparing'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Requests still in `received` after `age`: their prepare task may have been lost.
    pub async fn lingering_received(&self, age: Duration, limit: i64) -> Result<Vec<String>> {
        let ids = sqlx::query_scalar(
            "SELECT id FROM requests WHERE state = 'received' AND received_at < now() - $1 ORDER BY received_at LIMIT $2",
        )
        .bind(age)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    /// The request and its chunks, summed per state.
    pub async fn request_status(&self, id: &str) -> Result<Option<RequestStatus>> {
        let Some(row) = self.request(id).await? else { return Ok(None) };
        let totals = self.chunk_totals(id).await?;
        let mut status = RequestStatus {
            id: row.id.clone(),
            class: row.class.clone(),
            priority: row.priority,
            state: row.state.clone(),
            reason: row.reason.clone(),
            labels: row.labels.clone(),
            deadline: row.deadline,
            received_at: row.received_at,
            finished_at: row.finished_at,
            audience: row.chunk_count.map(|chunks| AudienceStatus {
                rows: row.audience_rows.unwrap_or(0),
                recipients: row.recipients.unwrap_or(0),
                skipped: row.skipped.clone(),
                chunks,
            }),
            chunks: BTreeMap::new(),
            recipients: BTreeMap::new(),
            delivered: 0,
            bounced: 0,
            failed: 0,
            forecast: None,
            dead_letters: sqlx::query_as(
                "SELECT source, chunk_id, received_at FROM dead_letters WHERE request_id = $1
                 ORDER BY received_at DESC LIMIT 20",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await?,
        };
        if !row.state().is_final() {
            status.forecast = self.forecast(&row).await?;
        }
        for (state, (chunks, recipients, delivered, bounced, failed)) in totals {
            status.chunks.insert(state.clone(), chunks);
            status.recipients.insert(state, recipients);
            status.delivered += delivered;
            status.bounced += bounced;
            status.failed += failed;
        }
        Ok(Some(status))
    }

    async fn forecast(&self, row: &RequestRow) -> Result<Option<Forecast>> {
        let (left, ahead, pace): (i64, i64, i64) = sqlx::query_as(
            "WITH own AS (
                 SELECT count(*) AS n FROM chunks
                 WHERE request_id = $1 AND state IN ('pending', 'queued', 'uploading')
             ), others AS (
                 SELECT c.request_id, count(*) AS n,
                        bool_or((c.class = 'realtime' AND $2 = 'batch')
                             OR (c.class = $2 AND c.priority > $3)
                             OR (c.class = $2 AND c.priority = $3 AND c.deadline IS NOT NULL
                                 AND ($4::timestamptz IS NULL OR c.deadline < $4))) AS higher,
                        bool_or(c.class = $2 AND c.priority = $3 AND c.deadline IS NOT DISTINCT FROM $4) AS equal
                 FROM chunks c WHERE c.state = 'pending' AND c.request_id <> $1 GROUP BY c.request_id
             )
             SELECT own.n,
                    coalesce(sum(CASE WHEN others.higher THEN others.n
                                      WHEN others.equal THEN least(others.n, own.n) ELSE 0 END), 0)::bigint,
                    (SELECT count(*) FROM chunks WHERE uploaded_at > now() - interval '60 seconds')
             FROM own LEFT JOIN others ON true GROUP BY own.n",
        )
        .bind(&row.id)
        .bind(&row.class)
        .bind(row.priority)
        .bind(row.deadline)
        .fetch_one(&self.pool)
        .await?;
        if left == 0 {
            return Ok(None);
        }
        let done_by = (pace > 0).then(|| {
            let seconds = (left + ahead) as f64 * 60.0 / pace as f64;
            Utc::now() + chrono::Duration::milliseconds((seconds * 1000.0) as i64)
        });
        let at_risk = matches!((done_by, row.deadline), (Some(done), Some(deadline)) if done > deadline);
        Ok(Some(Forecast {
            chunks_left: left,
            chunks_ahead: ahead,
            uploads_last_minute: pace,
            uploads_done_by: done_by,
            deadline_at_risk: at_risk,
        }))
    }

    // ---- dispatch ---------------------------------------------------------

    /// One round of the scheduling rule: expire what is overdue, count chunks in flight toward the
    /// upload API, and move the best pending chunks to `queued` to fill the free slots.
    ///
    /// Order: realtime first, then priority, then earliest deadline, then the request whose last
    /// chunk was dispatched longest ago (round-robin among equals, so two equal campaigns progress
    /// at the same rate whenever each started). Batch chunks never take the slots
    /// reserved for realtime. The slot row is locked for the round, so concurrent rounds (several
    /// trigger instances) see each other's work and never over-commit.
    ///
    /// At the tail of the batch work, chunks are cut smaller as they are dispatched, so that the
    /// slots finish together instead of some idling while a few full chunks finish (see
    /// [`SlotLimits::min_part`]).
    pub async fn dispatch_round(&self, limits: SlotLimits) -> Result<DispatchRound> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT api FROM dispatch_slots WHERE api = 'upload' FOR UPDATE")
            .execute(&mut *tx)
            .await?;
        let expired = sqlx::query(
            "UPDATE chunks SET state = 'expired', reason = 'deadline passed before dispatch', finished_at = now()
             WHERE state = 'pending' AND deadline < now()",
        )
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let (realtime, batch): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE class = 'realtime'), count(*) FILTER (WHERE class = 'batch')
             FROM chunks WHERE state IN ('queued', 'uploading')",
        )
        .fetch_one(&mut *tx)
        .await?;
        let in_flight = (realtime + batch) as u32;
        let capacity = limits.limit + limits.prefetch;
        let free = capacity.saturating_sub(in_flight);
        let batch_capacity = capacity.saturating_sub(limits.realtime_reserved);
        let free_batch = batch_capacity.saturating_sub(batch as u32).min(free);

        let mut dispatched = Vec::new();
        if free > 0 {
            dispatched.extend(self.take_pending(&mut tx, Class::Realtime, free, None).await?);
        }
        let free_batch = free_batch.min(free - dispatched.len() as u32);
        if free_batch > 0 {
            let split = TailSplit {
                slots: limits.limit.saturating_sub(limits.realtime_reserved),
                min_part: limits.min_part,
            };
            dispatched.extend(self.take_pending(&mut tx, Class::Batch, free_batch, Some(split)).await?);
        }
        tx.commit().await?;
        Ok(DispatchRound { in_flight: in_flight + dispatched.len() as u32, dispatched, expired })
    }

    async fn take_pending(
        &self,
        tx: &mut sqlx::Transaction<'_, Postgres>,
        class: Class,
        count: u32,
        split: Option<TailSplit>,
    ) -> Result<Vec<Dispatched>> {
        // One at a time, so that round-robin sees the counts the previous pick changed.
        let mut taken = Vec::new();
        for _ in 0..count {
            if let Some(split) = split {
                self.cut_next(tx, class, split).await?;
            }
            let row: Option<(String, String, i32)> = sqlx::query_as(&format!(
                "WITH next AS ({NEXT_PENDING}), moved AS (
                     UPDATE chunks SET state = 'queued', queued_at = now(), generation = chunks.generation + 1
                     FROM next WHERE chunks.id = next.id
                     RETURNING chunks.id, chunks.request_id, chunks.generation
                 ), counted AS (
                     UPDATE requests SET dispatched_chunks = dispatched_chunks + 1, last_dispatched_at = clock_timestamp()
                     FROM moved WHERE requests.id = moved.request_id
                 )
                 SELECT id, request_id, generation FROM moved"
            ))
            .bind(class.as_str())
            .fetch_optional(&mut **tx)
            .await?;
            match row {
                Some((chunk_id, request_id, generation)) => {
                    taken.push(Dispatched { chunk_id, request_id, generation, class })
                }
                None => break,
            }
        }
        Ok(taken)
    }

    /// Guided self-scheduling at the tail of the batch work: once every batch request is
    /// prepared, the chunk about to be dispatched is cut to `ceil(pending recipients / slots)`
    /// recipients (at least `min_part`), and the rest of its lines stay pending as a chunk of their
    /// own (own id, task name and ESP keys, same object). Pieces shrink as the work runs out, so
    /// the slots run dry together. A chunk that was ever dispatched keeps its range: the ESP may
    /// hold a list under its key.
    async fn cut_next(
        &self,
        tx: &mut sqlx::Transaction<'_, Postgres>,
        class: Class,
        split: TailSplit,
    ) -> Result<()> {
        if split.min_part == 0 || split.slots < 2 {
            return Ok(());
        }
        let (preparing, pending): (bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM requests
                            WHERE class = $1 AND state IN ('received', 'preparing')
                              AND (not_before IS NULL OR not_before <= now())),
                    (SELECT coalesce(sum(c.recipients), 0) FROM chunks c JOIN requests r ON r.id = c.request_id
                     WHERE c.state = 'pending' AND c.class = $1 AND r.state IN ('preparing', 'dispatching')
                       AND (r.not_before IS NULL OR r.not_before <= now()))",
        )
        .bind(class.as_str())
        .fetch_one(&mut **tx)
        .await?;
        if preparing || pending == 0 {
            return Ok(());
        }
        let next: Option<(String, String, i32, i32, i32)> =
            sqlx::query_as(NEXT_PENDING).bind(class.as_str()).fetch_optional(&mut **tx).await?;
        let Some((id, request_id, first_line, recipients, generation)) = next else { return Ok(()) };
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
        .bind(crate::domain::chunk_id(&request_id, seq as u32))
        .bind(seq)
        .bind(first_line + head)
        .bind(recipients - head)
        .execute(&mut **tx)
        .await?;
        tracing::debug!(request_id = %request_id, chunk = %id, recipients = head, rest = recipients - head, "Tail chunk cut.");
        Ok(())
    }

    /// Puts a chunk back in line when its upload task could not be created.
    pub async fn undo_dispatch(&self, chunk_id: &str, generation: i32) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'pending', queued_at = NULL WHERE id = $1 AND state = 'queued' AND generation = $2",
        )
        .bind(chunk_id)
        .bind(generation)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    // ---- chunks -----------------------------------------------------------

    pub async fn chunk(&self, id: &str) -> Result<Option<ChunkRow>> {
        let row = sqlx::query_as::<_, ChunkRow>(&format!("SELECT {CHUNK_COLUMNS} FROM chunks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    pub async fn chunks_of(&self, request_id: &str) -> Result<Vec<ChunkRow>> {
        let rows = sqlx::query_as::<_, ChunkRow>(&format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks WHERE request_id = $1 ORDER BY seq"
        ))
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Takes a chunk for a step: from `from`, or from `working` whose lease ran out (a takeover).
    async fn claim(
        &self,
        id: &str,
        from: ChunkState,
        working: ChunkState,
        attempts_column: &str,
        lease: Duration,
    ) -> Result<Claim<Claimed>> {
        let claimed: Option<(String, ChunkRow)> = {
            let sql = format!(
                "WITH before AS (SELECT id, state FROM chunks WHERE id = $1 FOR UPDATE)
                 UPDATE chunks SET state = $3, lease_until = now() + $4, {attempts_column} = {attempts_column} + 1
                 FROM before
                 WHERE chunks.id = before.id
                   AND (before.state = $2 OR (before.state = $3 AND chunks.lease_until < now()))
                 RETURNING before.state, {}",
                CHUNK_COLUMNS
                    .split(", ")
                    .map(|c| format!("chunks.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let row = sqlx::query(&sql)
                .bind(id)
                .bind(from.as_str())
                .bind(working.as_str())
                .bind(lease)
                .fetch_optional(&self.pool)
                .await?;
            match row {
                Some(row) => {
                    use sqlx::Row;
                    let before: String = row.try_get(0)?;
                    Some((before, ChunkRow::from_row(&row)?))
                }
                None => None,
            }
        };
        if let Some((before, chunk)) = claimed {
            let takeover = before == working.as_str();
            return Ok(Claim::Claimed(Claimed { chunk, takeover }));
        }
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM chunks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match state {
            Some(s) if s == working.as_str() => Claim::Busy,
            other => Claim::Done(other),
        })
    }

    /// Takes a chunk for upload: from `queued`, or from `uploading` whose lease ran out.
    pub async fn claim_upload(&self, id: &str, lease: Duration) -> Result<Claim<Claimed>> {
        self.claim(id, ChunkState::Queued, ChunkState::Uploading, "upload_attempts", lease).await
    }

    /// Takes a chunk for sending: from `uploaded`, or from `sending` whose lease ran out.
    pub async fn claim_send(&self, id: &str, lease: Duration) -> Result<Claim<Claimed>> {
        self.claim(id, ChunkState::Uploaded, ChunkState::Sending, "send_attempts", lease).await
    }

    /// Moves a chunk from one state to another, if it is still where the caller left it.
    pub async fn transition(&self, id: &str, from: ChunkState, to: ChunkState) -> Result<bool> {
        let done =
            sqlx::query("UPDATE chunks SET state = $3, lease_until = NULL WHERE id = $1 AND state = $2")
                .bind(id)
                .bind(from.as_str())
                .bind(to.as_str())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends a step early: the lease is dropped so that the next delivery of the message takes over
    /// at once (and checks the ESP before repeating anything).
    pub async fn drop_lease(&self, id: &str, working: ChunkState) -> Result<()> {
        sqlx::query(
            "UPDATE chunks SET lease_until = now() - interval '1 second' WHERE id = $1 AND state = $2",
        )
        .bind(id)
        .bind(working.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn mark_uploaded(&self, id: &str, list_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'uploaded', list_id = $2, uploaded_at = now(), lease_until = NULL
             WHERE id = $1 AND state = 'uploading'",
        )
        .bind(id)
        .bind(list_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn mark_sent(&self, id: &str, delivery_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'sent', delivery_id = $2, sent_at = now(), lease_until = NULL
             WHERE id = $1 AND state = 'sending'",
        )
        .bind(id)
        .bind(delivery_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ends a chunk in a final state with a reason (`failed`, `unknown`, `expired`, `cancelled`).
    pub async fn finish_chunk(
        &self,
        id: &str,
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
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the ESP's final counts for a sent chunk.
    pub async fn complete_chunk(&self, id: &str, counts: DeliveryCounts) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'completed', delivered = $2, bounced = $3, failed = $4, finished_at = now()
             WHERE id = $1 AND state = 'sent'",
        )
        .bind(id)
        .bind(counts.delivered)
        .bind(counts.bounced)
        .bind(counts.failed)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Chunks in a state, oldest first.
    pub async fn chunks_in(&self, state: ChunkState, limit: i64) -> Result<Vec<ChunkRow>> {
        let rows = sqlx::query_as::<_, ChunkRow>(&format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks WHERE state = $1 ORDER BY created_at, seq LIMIT $2"
        ))
        .bind(state.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Chunks whose lease on `state` ran out: their worker died or gave up.
    pub async fn stale_chunks(&self, state: ChunkState, limit: i64) -> Result<Vec<ChunkRow>> {
        let rows = sqlx::query_as::<_, ChunkRow>(&format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks WHERE state = $1 AND lease_until < now() ORDER BY created_at LIMIT $2"
        ))
        .bind(state.as_str())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Chunks that sat in `state` longer than `age` since they entered it.
    pub async fn lingering_chunks(
        &self,
        state: ChunkState,
        age: Duration,
        limit: i64,
    ) -> Result<Vec<ChunkRow>> {
        let since = match state {
            ChunkState::Queued => "queued_at",
            ChunkState::Uploaded => "uploaded_at",
            ChunkState::Sent => "sent_at",
            _ => "created_at",
        };
        let rows = sqlx::query_as::<_, ChunkRow>(&format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks WHERE state = $1 AND {since} < now() - $2 ORDER BY {since} LIMIT $3"
        ))
        .bind(state.as_str())
        .bind(age)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    // ---- completion -------------------------------------------------------

    /// Expires requests whose deadline passed before they were prepared. Returns how many.
    pub async fn expire_unprepared(&self) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE requests SET state = 'expired', reason = 'deadline passed before the audience was prepared',
                 finished_at = now(), lease_until = NULL
             WHERE state IN ('received', 'preparing') AND deadline < now()",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Expires pending chunks whose deadline passed. Returns how many.
    pub async fn expire_pending_chunks(&self) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'expired', reason = 'deadline passed before dispatch', finished_at = now()
             WHERE state = 'pending' AND deadline < now()",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Closes dispatching requests all of whose chunks are final, and returns them.
    ///
    /// A request is `completed` when at least one chunk was sent (or it had nothing to send),
    /// `expired` when its chunks expired and none was sent, and `failed` otherwise.
    pub async fn close_finished_requests(&self) -> Result<Vec<RequestRow>> {
        let rows = sqlx::query_as::<_, RequestRow>(&format!(
            "WITH done AS (
                 SELECT r.id,
                        count(c.id) FILTER (WHERE c.state = 'completed') AS completed,
                        count(c.id) FILTER (WHERE c.state = 'expired') AS expired,
                        count(c.id) AS total
                 FROM requests r LEFT JOIN chunks c ON c.request_id = r.id
                 WHERE r.state = 'dispatching'
                 GROUP BY r.id
                 HAVING count(c.id) FILTER (WHERE c.state NOT IN ('completed', 'failed', 'expired', 'cancelled', 'unknown')) = 0
             )
             UPDATE requests r SET
                 state = CASE WHEN done.total = 0 OR done.completed > 0 THEN 'completed'
                              WHEN done.expired > 0 THEN 'expired'
                              ELSE 'failed' END,
                 finished_at = now()
             FROM done WHERE r.id = done.id AND r.state = 'dispatching'
             RETURNING {}",
            REQUEST_COLUMNS.split(", ").map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ")
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Final chunks whose delivery-log row is not written yet.
    pub async fn unlogged_chunks(&self, limit: i64) -> Result<Vec<ChunkRow>> {
        let rows = sqlx::query_as::<_, ChunkRow>(&format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks
             WHERE logged_at IS NULL AND state IN ('completed', 'failed', 'expired', 'cancelled', 'unknown')
             ORDER BY finished_at LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Finished requests whose summary row is not written yet.
    pub async fn unlogged_requests(&self, limit: i64) -> Result<Vec<RequestRow>> {
        let rows = sqlx::query_as::<_, RequestRow>(&format!(
            "SELECT {REQUEST_COLUMNS} FROM requests
             WHERE logged_at IS NULL AND state IN ('completed', 'failed', 'expired', 'cancelled', 'rejected')
             ORDER BY finished_at LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub async fn mark_chunks_logged(&self, ids: &[String]) -> Result<()> {
        sqlx::query("UPDATE chunks SET logged_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn mark_requests_logged(&self, ids: &[String]) -> Result<()> {
        sqlx::query("UPDATE requests SET logged_at = now() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Totals per chunk state of one request: (chunks, recipients, delivered, bounced, failed).
    pub async fn chunk_totals(
        &self,
        request_id: &str,
    ) -> Result<BTreeMap<String, (i64, i64, i64, i64, i64)>> {
        let rows: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT state, count(*), coalesce(sum(recipients), 0)::bigint, coalesce(sum(delivered), 0)::bigint,
                    coalesce(sum(bounced), 0)::bigint, coalesce(sum(failed), 0)::bigint
             FROM chunks WHERE request_id = $1 GROUP BY state",
        )
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(s, a, b, c, d, e)| (s, (a, b, c, d, e))).collect())
    }
}
