//! The request and chunk rows, and the reads of them that several services make.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::FromRow;

use super::{Result, Store, StoreError};
use crate::domain::{ChunkId, ChunkState, Class, DeliveryRequest, RequestId, RequestState, Template};

/// A request row as the pipeline needs it.
#[derive(Debug, Clone, FromRow)]
pub struct RequestRow {
    pub id: RequestId,
    pub class: Class,
    pub priority: i32,
    pub state: RequestState,
    pub body: Option<Value>,
    pub labels: Value,
    pub deadline: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub recipients: Option<i64>,
    pub audience_rows: Option<i64>,
    pub skipped: Value,
    /// Where the first few skipped rows of each reason are (`SOURCE:LINE`).
    pub skipped_at: Value,
    pub chunk_count: Option<i32>,
    pub received_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// While set, none of the request's chunks is dispatched.
    pub paused_at: Option<DateTime<Utc>>,
    pub pause_reason: Option<String>,
    /// Set once by a cancel, never cleared: what was not handed to the send step ends `cancelled`.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The trace the request belongs to (the `traceparent` of the span that took it in).
    pub traceparent: Option<String>,
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
}

/// What sending and logging a request's chunks need of it: not its audience, which an inline
/// request's body holds (up to megabytes, read whole only by its prepare step).
#[derive(Debug, Clone, FromRow)]
pub struct RequestHead {
    /// `None`: a request without a body (rejected before it could be read).
    pub template: Option<sqlx::types::Json<Template>>,
    pub labels: Value,
    pub received_at: DateTime<Utc>,
}

impl RequestHead {
    /// The request's template, and its labels as the request gave them.
    pub fn template_and_labels(self, id: &RequestId) -> Result<(Template, BTreeMap<String, String>)> {
        let template =
            self.template.ok_or_else(|| StoreError::Corrupt(format!("request {id} has no body")))?;
        let labels = serde_json::from_value(self.labels)
            .map_err(|e| StoreError::Corrupt(format!("request {id}: {e}")))?;
        Ok((template.0, labels))
    }
}

/// A chunk row.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct ChunkRow {
    pub id: ChunkId,
    pub request_id: RequestId,
    pub seq: i32,
    pub class: Class,
    pub priority: i32,
    pub state: ChunkState,
    pub object: String,
    /// The chunk's recipients are lines `[first_line, first_line + recipients)` of its object.
    pub first_line: i32,
    pub recipients: i32,
    /// The lines themselves, for a chunk of an inline audience, until it has a list; `None`:
    /// they are in `object` (or no longer needed).
    pub lines: Option<String>,
    pub generation: i32,
    pub upload_attempts: i32,
    pub send_attempts: i32,
    pub list_id: Option<String>,
    pub delivery_id: Option<String>,
    pub delivered: Option<i64>,
    pub bounced: Option<i64>,
    pub failed: Option<i64>,
    /// Recipients whose message outcome could not be established (message-based providers).
    pub unknown: Option<i64>,
    /// Recipients dropped just before the provider because they were suppressed after the chunk
    /// was prepared.
    pub suppressed: Option<i64>,
    /// Message-based providers: messages `[0, progress)` have been tried ...
    pub progress: i32,
    /// ... but for these indexes, which were not handed over and are still due ...
    pub retry: Vec<i32>,
    /// ... and these, handed over by a call whose answer never came back (a crash mid-call).
    pub in_flight: Option<Vec<i32>>,
    /// Times the chunk gave its send slot up to realtime work (message-based providers).
    pub yields: i32,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub uploaded_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const CHUNK_COLUMNS: &[&str] = &[
    "id",
    "request_id",
    "seq",
    "class",
    "priority",
    "state",
    "object",
    "first_line",
    "recipients",
    "lines",
    "generation",
    "upload_attempts",
    "send_attempts",
    "list_id",
    "delivery_id",
    "delivered",
    "bounced",
    "failed",
    "unknown",
    "suppressed",
    "progress",
    "retry",
    "in_flight",
    "yields",
    "reason",
    "created_at",
    "queued_at",
    "uploaded_at",
    "sent_at",
    "finished_at",
];

const REQUEST_COLUMNS: &[&str] = &[
    "id",
    "class",
    "priority",
    "state",
    "body",
    "labels",
    "deadline",
    "reason",
    "recipients",
    "audience_rows",
    "skipped",
    "skipped_at",
    "chunk_count",
    "received_at",
    "finished_at",
    "paused_at",
    "pause_reason",
    "cancel_requested_at",
    "traceparent",
];

/// The select list of a [`ChunkRow`], each column prefixed with `table.` when one is given. A
/// chunk's `lines` are read only until it has a list: an uploaded chunk is sent by its list, and
/// a large inline audience's lines are not carried along with every later read of its row.
pub fn chunk_columns(table: Option<&str>) -> String {
    let prefix = table.map(|t| format!("{t}.")).unwrap_or_default();
    CHUNK_COLUMNS
        .iter()
        .map(|c| match *c {
            "lines" => format!("CASE WHEN {prefix}list_id IS NULL THEN {prefix}lines END AS lines"),
            c => format!("{prefix}{c}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The select list of a [`RequestRow`], each column prefixed with `table.` when one is given.
pub fn request_columns(table: Option<&str>) -> String {
    select_list(REQUEST_COLUMNS, table)
}

/// [`request_columns`] with a NULL body: for readers of a request's state and totals, which
/// need not read its audience ([`RequestRow::request`] then fails).
pub fn request_columns_without_body() -> String {
    REQUEST_COLUMNS
        .iter()
        .map(|c| if *c == "body" { "NULL::jsonb AS body" } else { c })
        .collect::<Vec<_>>()
        .join(", ")
}

fn select_list(columns: &[&str], table: Option<&str>) -> String {
    match table {
        Some(table) => columns.iter().map(|c| format!("{table}.{c}")).collect::<Vec<_>>().join(", "),
        None => columns.join(", "),
    }
}

/// One chunk state's totals within a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ChunkTotals {
    pub chunks: i64,
    pub recipients: i64,
    pub delivered: i64,
    pub bounced: i64,
    pub failed: i64,
    pub unknown: i64,
    pub suppressed: i64,
}

/// A request's recipients by outcome, from its chunk totals per state: the accounting of the
/// request log and of the API. At every moment
/// `recipients = pending + in_flight + sent + failed + expired + cancelled + unknown + suppressed`;
/// once every chunk is final, `pending` and `in_flight` are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Outcomes {
    /// In chunks not dispatched yet.
    pub pending: i64,
    /// In chunks handed on and not finished (queued, uploading, uploaded, sending).
    pub in_flight: i64,
    /// Accepted by the provider: in chunks sent or completed, less those it refused, those
    /// whose outcome is unknown and those left out as suppressed.
    pub sent: i64,
    /// In chunks that failed, or refused by the provider within completed chunks.
    pub failed: i64,
    pub expired: i64,
    pub cancelled: i64,
    /// In chunks that ended `unknown`, or single messages handed over without an answer.
    pub unknown: i64,
    /// Left out just before the provider, in chunks that ended (whatever their state): suppressed
    /// after the audience was prepared.
    pub suppressed: i64,
}

impl Outcomes {
    pub fn of(totals: &BTreeMap<ChunkState, ChunkTotals>) -> Self {
        let of = |state: ChunkState| totals.get(&state).copied().unwrap_or_default();
        let recipients_in =
            |states: &[ChunkState]| states.iter().map(|state| of(*state).recipients).sum::<i64>();
        // A chunk that ended counts the recipients it left out as suppressed, whatever became of
        // the rest of it; those it holds are counted by its state.
        let ended = [
            ChunkState::Completed,
            ChunkState::Sent,
            ChunkState::Failed,
            ChunkState::Expired,
            ChunkState::Cancelled,
            ChunkState::Unknown,
        ];
        let held = |state: ChunkState| of(state).recipients - of(state).suppressed;
        // Within completed chunks, the recipients the provider refused and those whose message
        // outcome is unknown were never delivered: they count as failed and unknown, not sent.
        let completed = of(ChunkState::Completed);
        Self {
            pending: recipients_in(&[ChunkState::Pending]),
            in_flight: recipients_in(&[
                ChunkState::Queued,
                ChunkState::Uploading,
                ChunkState::Uploaded,
                ChunkState::Sending,
            ]),
            sent: held(ChunkState::Completed) + held(ChunkState::Sent) - completed.failed - completed.unknown,
            failed: held(ChunkState::Failed) + completed.failed,
            expired: held(ChunkState::Expired),
            cancelled: held(ChunkState::Cancelled),
            unknown: held(ChunkState::Unknown) + completed.unknown,
            suppressed: ended.iter().map(|state| of(*state).suppressed).sum(),
        }
    }
}

#[derive(FromRow)]
struct TotalsRow {
    request_id: RequestId,
    state: ChunkState,
    chunks: i64,
    recipients: i64,
    delivered: i64,
    bounced: i64,
    failed: i64,
    unknown: i64,
    suppressed: i64,
}

impl Store {
    pub async fn request(&self, id: &RequestId) -> Result<Option<RequestRow>> {
        let sql = format!("SELECT {} FROM requests WHERE id = $1", request_columns(None));
        Ok(sqlx::query_as::<_, RequestRow>(&sql).bind(id).fetch_optional(self.pool()).await?)
    }

    /// A request's template and labels, without reading its audience.
    pub async fn request_head(&self, id: &RequestId) -> Result<Option<RequestHead>> {
        let sql = "SELECT body -> 'template' AS template, labels, received_at FROM requests WHERE id = $1";
        Ok(sqlx::query_as::<_, RequestHead>(sql).bind(id).fetch_optional(self.pool()).await?)
    }

    pub async fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkRow>> {
        let sql = format!("SELECT {} FROM chunks WHERE id = $1", chunk_columns(None));
        Ok(sqlx::query_as::<_, ChunkRow>(&sql).bind(id).fetch_optional(self.pool()).await?)
    }

    /// A request's chunks, in audience order.
    pub async fn chunks_of(&self, request: &RequestId) -> Result<Vec<ChunkRow>> {
        let sql = format!("SELECT {} FROM chunks WHERE request_id = $1 ORDER BY seq", chunk_columns(None));
        Ok(sqlx::query_as::<_, ChunkRow>(&sql).bind(request).fetch_all(self.pool()).await?)
    }

    /// A request's chunks summed per state.
    pub async fn chunk_totals(&self, request: &RequestId) -> Result<BTreeMap<ChunkState, ChunkTotals>> {
        let mut of = self.chunk_totals_of(std::slice::from_ref(request)).await?;
        Ok(of.remove(request).unwrap_or_default())
    }

    /// [`Store::chunk_totals`] of several requests, with one query (a request without chunks
    /// is absent).
    pub async fn chunk_totals_of(
        &self,
        requests: &[RequestId],
    ) -> Result<HashMap<RequestId, BTreeMap<ChunkState, ChunkTotals>>> {
        let ids: Vec<&str> = requests.iter().map(RequestId::as_str).collect();
        let rows: Vec<TotalsRow> = sqlx::query_as(
            "SELECT request_id, state, count(*) AS chunks, coalesce(sum(recipients), 0)::bigint AS recipients,
                    coalesce(sum(delivered), 0)::bigint AS delivered,
                    coalesce(sum(bounced), 0)::bigint AS bounced, coalesce(sum(failed), 0)::bigint AS failed,
                    coalesce(sum(unknown), 0)::bigint AS unknown,
                    coalesce(sum(suppressed), 0)::bigint AS suppressed
             FROM chunks WHERE request_id = ANY($1) GROUP BY request_id, state",
        )
        .bind(&ids)
        .fetch_all(self.pool())
        .await?;
        let mut of: HashMap<RequestId, BTreeMap<ChunkState, ChunkTotals>> = HashMap::new();
        for r in rows {
            let totals = ChunkTotals {
                chunks: r.chunks,
                recipients: r.recipients,
                delivered: r.delivered,
                bounced: r.bounced,
                failed: r.failed,
                unknown: r.unknown,
                suppressed: r.suppressed,
            };
            of.entry(r.request_id).or_default().insert(r.state, totals);
        }
        Ok(of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(recipients: i64, failed: i64, suppressed: i64) -> ChunkTotals {
        ChunkTotals { chunks: 1, recipients, failed, suppressed, ..ChunkTotals::default() }
    }

    #[test]
    fn recipients_left_out_as_suppressed_are_their_own_outcome_and_the_sum_holds() {
        let by_state = BTreeMap::from([
            (ChunkState::Completed, totals(10, 1, 2)),
            (ChunkState::Sent, totals(5, 0, 1)),
            (ChunkState::Cancelled, totals(4, 0, 1)),
            (ChunkState::Pending, totals(3, 0, 1)),
        ]);
        let o = Outcomes::of(&by_state);
        assert_eq!((o.sent, o.failed, o.cancelled, o.suppressed, o.pending), (11, 1, 3, 4, 3));
        let sum =
            o.pending + o.in_flight + o.sent + o.failed + o.expired + o.cancelled + o.unknown + o.suppressed;
        assert_eq!(sum, 22);
    }
}
