//! Writing the logs of what finished: one row per final chunk, then one summary row per finished
//! request (once all its chunks are logged, so that both tables agree), each written once.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use haishin_shared::domain::{ChunkState, Class, RequestId, RequestState};
use haishin_shared::gcp::Topic;
use haishin_shared::store::{
    ChunkRow, RequestRow, Result, Store, chunk_columns, request_columns_without_body,
};
use haishin_shared::telemetry::metrics::{KeyValue, metrics};
use haishin_shared::telemetry::{join_trace, parse_traceparent};
use serde_json::Value;
use tracing::field::Empty;
use tracing::{Instrument, Span};

use super::{DeliveryLog, LogSink, RequestCompleted, RequestLog};
use crate::{BATCH, PassReport};

/// Writes the rows of what finished since the last pass and announces finished requests.
pub(crate) async fn write_logs(
    store: &Store,
    sink: &dyn LogSink,
    completed: &Topic,
    report: &mut PassReport,
) -> anyhow::Result<()> {
    let chunks = unlogged_chunks(store, BATCH).await?;
    if !chunks.is_empty() {
        let requests = labels_of(store, &chunks).await?;
        let unknown = (Value::Null, None);
        let of = |chunk: &ChunkRow| requests.get(&chunk.request_id).unwrap_or(&unknown);
        let rows: Vec<DeliveryLog> = chunks.iter().map(|c| DeliveryLog::from_chunk(c, &of(c).0)).collect();
        sink.write_deliveries(&rows).await?;
        for chunk in &chunks {
            count_outcomes(chunk, of(chunk).1);
        }
        let ids: Vec<&str> = chunks.iter().map(|c| c.id.as_str()).collect();
        sqlx::query("UPDATE chunks SET logged_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(store.pool())
            .await?;
        report.delivery_rows = ids.len() as u64;
    }
    let requests = unlogged_requests(store, BATCH).await?;
    let rows = request_logs(store, &requests).await?;
    if !rows.is_empty() {
        // One span per request, in the request's own trace, from before its row is written until
        // its completion is announced: the last hop of the request's trace.
        let spans: Vec<Span> = requests.iter().map(logged_span).collect();
        sink.write_requests(&rows).await?;
        // Announced all at once, so that the publisher sends them in a few batches rather than
        // waiting out its batching delay once per request.
        let announcements = rows.iter().zip(&spans).map(|(row, span)| announce(completed, row, span));
        futures::future::join_all(announcements).await;
        let ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
        sqlx::query("UPDATE requests SET logged_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(store.pool())
            .await?;
        report.request_rows = ids.len() as u64;
    }
    Ok(())
}

/// The labels and intake time of the chunks' requests, read with one query.
async fn labels_of(
    store: &Store,
    chunks: &[ChunkRow],
) -> Result<HashMap<RequestId, (Value, Option<DateTime<Utc>>)>> {
    let ids: Vec<&str> = chunks.iter().map(|c| c.request_id.as_str()).collect();
    let found: Vec<(RequestId, Value, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, labels, received_at FROM requests WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(store.pool())
            .await?;
    Ok(found.into_iter().map(|(id, labels, received)| (id, (labels, Some(received)))).collect())
}

/// Finished requests' log rows, with their chunks' totals and their feedback (one query each for
/// all of them).
async fn request_logs(store: &Store, requests: &[RequestRow]) -> Result<Vec<RequestLog>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<RequestId> = requests.iter().map(|r| r.id.clone()).collect();
    let (mut totals, mut feedback) =
        futures::future::try_join(store.chunk_totals_of(&ids), store.feedback_counts_of(&ids)).await?;
    Ok(requests
        .iter()
        .map(|r| {
            let totals = totals.remove(&r.id).unwrap_or_default();
            RequestLog::new(r, &totals, feedback.remove(&r.id).unwrap_or_default())
        })
        .collect())
}

/// Publishes a request's `request-completed` message, in the span of its log row.
async fn announce(completed: &Topic, row: &RequestLog, span: &Span) {
    let message =
        RequestCompleted { request_id: row.request_id.clone(), state: row.state, summary: row.clone() };
    let announced =
        completed.publish(&message, &[("state", row.state.as_str())]).instrument(span.clone()).await;
    if let Err(err) = announced {
        tracing::warn!(request_id = %row.request_id, error = %err, "Completion not announced.");
    }
    let skipped = row.skipped.values().sum::<i64>();
    span.in_scope(|| tracing::info!(request_id = %row.request_id, state = %row.state, sent = row.sent, skipped, "Request finished."));
}

/// Adds a logged chunk's recipients to the outcome counters and, for a realtime chunk the ESP
/// accepted, its request's wait from intake to that moment to the latency histogram.
fn count_outcomes(chunk: &ChunkRow, received_at: Option<DateTime<Utc>>) {
    let m = metrics();
    let class = KeyValue::new("class", chunk.class.as_str());
    let terminal = match chunk.state {
        ChunkState::Expired => Some("expired"),
        ChunkState::Cancelled => Some("cancelled"),
        _ => None,
    };
    let counts: Vec<(&str, i64)> = match terminal {
        // Nothing of these was handed over: every recipient ended the chunk's way.
        Some(outcome) => vec![(outcome, i64::from(chunk.recipients))],
        None => vec![
            ("delivered", chunk.delivered.unwrap_or(0)),
            ("bounced", chunk.bounced.unwrap_or(0)),
            ("failed", chunk.failed.unwrap_or(0)),
            ("unknown", chunk.unknown.unwrap_or(0)),
            ("suppressed", chunk.suppressed.unwrap_or(0)),
        ],
    };
    for (outcome, n) in counts.into_iter().filter(|(_, n)| *n > 0) {
        m.recipients.add(n as u64, &[KeyValue::new("outcome", outcome), class.clone()]);
    }
    if chunk.class == Class::Realtime
        && let (Some(sent), Some(received)) = (chunk.sent_at, received_at)
    {
        m.realtime_latency.record((sent - received).as_seconds_f64().max(0.0), &[]);
    }
}

/// The span of a request's log row, in the request's trace.
fn logged_span(request: &RequestRow) -> Span {
    let span = tracing::info_span!(
        "request_logged",
        request_id = %request.id,
        class = %request.class,
        state = %request.state,
        trace_id = Empty,
        span_id = Empty,
    );
    join_trace(&span, request.traceparent.as_deref().and_then(parse_traceparent).as_ref());
    span
}

/// Final chunks whose delivery-log row is not written yet.
async fn unlogged_chunks(store: &Store, limit: i64) -> Result<Vec<ChunkRow>> {
    let sql = format!(
        "SELECT {} FROM chunks WHERE logged_at IS NULL AND state = ANY($1) ORDER BY finished_at LIMIT $2",
        chunk_columns(None)
    );
    Ok(sqlx::query_as(&sql).bind(ChunkState::FINAL).bind(limit).fetch_all(store.pool()).await?)
}

/// Finished requests whose summary row is not written yet (without their bodies: a log row holds
/// no audience).
pub async fn unlogged_requests(store: &Store, limit: i64) -> Result<Vec<RequestRow>> {
    let sql = format!(
        "SELECT {} FROM requests WHERE logged_at IS NULL AND state = ANY($1) ORDER BY finished_at LIMIT $2",
        request_columns_without_body()
    );
    Ok(sqlx::query_as(&sql).bind(RequestState::FINAL).bind(limit).fetch_all(store.pool()).await?)
}
