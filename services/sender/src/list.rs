//! Sending through a list-based ESP: one call sends the template to the chunk's uploaded list,
//! or, for a small realtime chunk the trigger sent on without a list, to its recipients given in
//! the call (read from the chunk object and checked against the suppressions, as an upload is).
//! Such sends of one template that wait for a slot together go in one call, a send batch
//! ([`crate::coalesce`]), each chunk a part under its own key.
//!
//! The send carries an idempotency key derived from the chunk, and the ESP's delivery history is
//! checked under that key before any chunk whose earlier attempt has no recorded outcome is sent
//! again. When the history cannot tell, the chunk ends `unknown`: never re-sent blindly. The
//! ESP's counts arrive later, when the completion job polls the delivery.

use futures::future::join_all;
use haishin_shared::domain::{ChunkId, ChunkState, Recipient, Template};
use haishin_shared::esp::{DeliveryId, EspError, EspProvider, ListId, SendPart, SendRequest, SendTo};
use haishin_shared::gcp::{Blobs, GcpError};
use haishin_shared::messages::EventKind;
use haishin_shared::push::{Outcome, RetryReason};
use haishin_shared::store::{ChunkRow, Claimed, RateSchedule, Step};
use haishin_shared::suppression::leave_out_suppressed;
use haishin_shared::telemetry::metrics::{Api, metrics, outcome};
use tracing::{Instrument, Span};

use crate::coalesce::{Coalescer, PartResult, Ticket};
use crate::{AppState, fail, give_back, publish_event, unknown};

/// Where the recipients of chunks sent without a list come from, and how their sends are made.
pub struct InlineSends {
    /// Most recipients one send carries (`ESP_INLINE_RECIPIENTS_MAX`).
    pub max: u32,
    pub blobs: Blobs,
    pub bucket: String,
    /// The sends of a template waiting for a slot, made in one call.
    pub batches: Coalescer,
}

/// The ESP's idempotency key for a chunk's send: the same for every attempt.
pub fn send_key(chunk_id: &ChunkId) -> String {
    format!("send:{chunk_id}")
}

/// A claimed chunk whose send is ready: its key, template and recipients (a list, or given in
/// the call).
pub(crate) struct Ready {
    chunk: ChunkRow,
    key: String,
    template: Template,
    to: SendTo,
}

/// Sends a claimed chunk's template to its list, or to its recipients given in the call.
pub(crate) async fn send(
    state: &AppState,
    esp: &dyn EspProvider,
    calls: Option<&RateSchedule>,
    inline: Option<&InlineSends>,
    claimed: Claimed,
) -> Outcome {
    match ready(state, esp, inline, claimed).await {
        Ok(ready) => make(state, esp, calls, queue(esp, inline, ready)).await,
        Err(outcome) => outcome,
    }
}

/// Sends claimed chunks delivered in one message: each is made ready, then all are queued before
/// any call is made, so that those sent without a list whose requests share a template go in one
/// call ([`crate::coalesce`]). One outcome per chunk.
pub(crate) async fn send_together(
    state: &AppState,
    esp: &dyn EspProvider,
    calls: Option<&RateSchedule>,
    inline: Option<&InlineSends>,
    claimed: Vec<(Claimed, Span)>,
) -> Vec<Outcome> {
    let prepared = join_all(claimed.into_iter().map(|(claimed, span)| async move {
        let ready = ready(state, esp, inline, claimed).instrument(span.clone()).await;
        (ready, span)
    }))
    .await;
    let queued: Vec<_> = prepared
        .into_iter()
        .map(|(ready, span)| (span.in_scope(|| ready.map(|ready| queue(esp, inline, ready))), span))
        .collect();
    let called = join_all(queued.into_iter().map(|(queued, span)| async move {
        match queued {
            Ok(queued) => Ok((call(state, esp, calls, queued).instrument(span.clone()).await, span)),
            Err(outcome) => Err(outcome),
        }
    }))
    .await;
    // The sends the ESP accepted are recorded together; any other result is settled on its own.
    let (mut outcomes, mut accepted, mut others) = (Vec::new(), Vec::new(), Vec::new());
    for called in called {
        match called {
            Err(outcome) => outcomes.push(outcome),
            Ok(((chunk, _, Ok(Ok(delivery))), span)) => accepted.push((chunk, delivery, span)),
            Ok(((chunk, key, result), span)) => others.push((chunk, key, result, span)),
        }
    }
    let settled = join_all(others.into_iter().map(|(chunk, key, result, span)| async move {
        match result {
            Ok(result) => settle(state, esp, &chunk, &key, result).instrument(span).await,
            Err(err) => give_back(state, &chunk, Outcome::unavailable(err), false).instrument(span).await,
        }
    }));
    let (settled, recorded) = tokio::join!(settled, record_all_sent(state, accepted));
    outcomes.extend(settled);
    outcomes.extend(recorded);
    outcomes
}

/// A ready send: its call to make, or its part queued for a call shared with others.
enum Queued<'a> {
    Call { chunk: ChunkRow, send: SendRequest },
    Part { chunk: ChunkRow, key: String, ticket: Ticket<'a> },
}

/// Queues a send with its recipients in the call for a shared call; a send to a list is made alone.
fn queue<'a>(esp: &dyn EspProvider, inline: Option<&'a InlineSends>, ready: Ready) -> Queued<'a> {
    let Ready { chunk, key, template, to } = ready;
    match (to, inline) {
        (SendTo::Recipients { recipients }, Some(inline)) => {
            let part =
                SendPart { idempotency_key: key.clone(), request_id: chunk.request_id.clone(), recipients };
            let ticket = inline.batches.queue(esp, &template, chunk.class, part);
            Queued::Part { chunk, key, ticket }
        }
        (to, _) => {
            let send = SendRequest {
                idempotency_key: key,
                request_id: chunk.request_id.clone(),
                to,
                template,
                class: chunk.class,
            };
            Queued::Call { chunk, send }
        }
    }
}

/// Everything before the call: the ESP's history when an earlier attempt may have reached it,
/// the request's template, and the recipients. `Err` is the chunk's outcome when there is
/// nothing to send now.
async fn ready(
    state: &AppState,
    esp: &dyn EspProvider,
    inline: Option<&InlineSends>,
    claimed: Claimed,
) -> Result<Ready, Outcome> {
    let chunk = claimed.chunk;
    let key = send_key(&chunk.id);
    // An earlier attempt may have reached the ESP: its history decides.
    if claimed.takeover || chunk.send_attempts > 1 {
        match esp.find_delivery(&key).await {
            Ok(Some(delivery)) => {
                return Err(record_sent(state, &chunk, &delivery, "found in the ESP's history").await);
            }
            Ok(None) => {}
            Err(err) if err.is_retryable() => {
                return Err(give_back(state, &chunk, Outcome::unavailable(&err), true).await);
            }
            Err(err) => {
                let reason = format!("the ESP's history cannot tell whether it was sent: {err}");
                return Err(unknown(state, &chunk, &reason).await);
            }
        }
    }
    let head = state.store.request_head(&chunk.request_id).await;
    let template = match head.map(|h| h.map(|h| h.template_and_labels(&chunk.request_id))) {
        Ok(Some(Ok((template, _)))) => template,
        Ok(_) => return Err(unknown(state, &chunk, "the chunk's request is missing").await),
        Err(err) => return Err(give_back(state, &chunk, err.into(), false).await),
    };
    let to = match (chunk.list_id.clone(), inline) {
        (Some(list_id), _) => SendTo::List { list_id: ListId(list_id) },
        (None, Some(inline)) if u32::try_from(chunk.recipients).is_ok_and(|n| n <= inline.max) => {
            SendTo::Recipients { recipients: inline_recipients(state, inline, &chunk).await? }
        }
        (None, _) => return Err(fail(state, &chunk, "chunk has no uploaded list").await),
    };
    Ok(Ready { chunk, key, template, to })
}

/// Makes a ready send's call in a slot, within the declared rate (or waits for the shared call
/// of its part), and records what it came to.
async fn make(
    state: &AppState,
    esp: &dyn EspProvider,
    calls: Option<&RateSchedule>,
    queued: Queued<'_>,
) -> Outcome {
    let (chunk, key, result) = call(state, esp, calls, queued).await;
    match result {
        Ok(result) => settle(state, esp, &chunk, &key, result).await,
        Err(err) => give_back(state, &chunk, Outcome::unavailable(err), false).await,
    }
}

/// A ready send's call, made in a slot within the declared rate (or its part's shared call):
/// the chunk, its key, and what the call came to.
async fn call(
    state: &AppState,
    esp: &dyn EspProvider,
    calls: Option<&RateSchedule>,
    queued: Queued<'_>,
) -> (ChunkRow, String, PartResult) {
    match queued {
        Queued::Part { chunk, key, ticket } => {
            let result = ticket.complete(esp, &state.slots, calls).await;
            (chunk, key, result)
        }
        Queued::Call { chunk, send } => {
            let result = send_in_a_slot(state, esp, calls, &send).await;
            (chunk, send.idempotency_key, result)
        }
    }
}

/// Records the sends the ESP accepted, each in its chunk's span, with one statement; if that
/// fails, chunk by chunk, so that each gets its own outcome.
async fn record_all_sent(state: &AppState, accepted: Vec<(ChunkRow, DeliveryId, Span)>) -> Vec<Outcome> {
    if accepted.len() >= 2 {
        let results: Vec<(ChunkId, String)> =
            accepted.iter().map(|(chunk, delivery, _)| (chunk.id.clone(), delivery.to_string())).collect();
        match state.store.finish_steps(&results, Step::Send).await {
            Ok(finished) => {
                return accepted
                    .into_iter()
                    .map(|(chunk, delivery, span)| {
                        span.in_scope(|| {
                            if finished.contains(&chunk.id) {
                                sent(&chunk, &delivery, "sent")
                            } else {
                                Outcome::done("chunk was taken over while sending")
                            }
                        })
                    })
                    .collect();
            }
            Err(err) => {
                tracing::warn!(error = %err, chunks = accepted.len(), "Sends not recorded together; one by one.")
            }
        }
    }
    let each = accepted.into_iter().map(|(chunk, delivery, span)| async move {
        record_sent(state, &chunk, &delivery, "sent").instrument(span).await
    });
    join_all(each).await
}

/// One send call in a slot, within the declared rate; `Err` is the rate schedule's error.
async fn send_in_a_slot(
    state: &AppState,
    esp: &dyn EspProvider,
    calls: Option<&RateSchedule>,
    send: &SendRequest,
) -> PartResult {
    let _slot = state.slots.acquire().await.expect("the semaphore is never closed");
    if let Some(calls) = calls {
        calls.wait(1).await.map_err(|err| err.to_string())?;
    }
    let call = metrics().esp_call(Api::Send, send.class);
    let result = esp.send(send).await;
    call.finish(outcome(result.as_ref().map(drop)));
    Ok(result)
}

/// Records what the send call came to for one chunk.
async fn settle(
    state: &AppState,
    esp: &dyn EspProvider,
    chunk: &ChunkRow,
    key: &str,
    result: Result<DeliveryId, EspError>,
) -> Outcome {
    match result {
        Ok(delivery) => record_sent(state, chunk, &delivery, "sent").await,
        Err(err) if err.maybe_accepted() => {
            // The ESP may have taken it: only its history can say.
            match esp.find_delivery(key).await {
                Ok(Some(delivery)) => {
                    record_sent(state, chunk, &delivery, "accepted despite the error").await
                }
                Ok(None) => give_back(state, chunk, Outcome::unavailable(&err), false).await,
                Err(_) => give_back(state, chunk, Outcome::unavailable(&err), true).await,
            }
        }
        Err(err @ EspError::RateLimited { .. }) => {
            tracing::warn!(api = "send", "ESP rate limited the call.");
            give_back(state, chunk, Outcome::Retry(RetryReason::Throttled(err.to_string())), false).await
        }
        Err(err) if err.is_retryable() => give_back(state, chunk, Outcome::unavailable(&err), false).await,
        Err(err) => fail(state, chunk, &format!("send refused by the ESP: {err}")).await,
    }
}

/// The recipients of a chunk sent without a list: its lines of the chunk object, less those
/// suppressed since it was prepared (recorded on the chunk). `Err` is the push's outcome when
/// there is nothing to send (every recipient suppressed) or the recipients cannot be read now.
async fn inline_recipients(
    state: &AppState,
    inline: &InlineSends,
    chunk: &ChunkRow,
) -> Result<Vec<Recipient>, Outcome> {
    let lines = match inline.blobs.chunk_lines(&inline.bucket, chunk).await {
        Ok(lines) => lines,
        Err(err @ GcpError::Permanent { .. }) => return Err(fail(state, chunk, &err.to_string()).await),
        Err(err) => return Err(give_back(state, chunk, Outcome::unavailable(err), false).await),
    };
    let (lines, suppressed) = match leave_out_suppressed(&state.store, &chunk.request_id, lines).await {
        Ok(kept) => kept,
        Err(err) => return Err(give_back(state, chunk, err.into(), false).await),
    };
    if lines.is_empty() {
        let reason = "every recipient was suppressed before the send";
        let done =
            state.store.finish_all_suppressed(&chunk.id, ChunkState::Sending, suppressed, reason).await;
        return Err(match done {
            Ok(true) => {
                tracing::info!(suppressed, "Every recipient of the chunk is suppressed: nothing to send.");
                publish_event(state, chunk, EventKind::ChunkFinished).await;
                Outcome::done("every recipient suppressed")
            }
            Ok(false) => Outcome::done("chunk was taken over while sending"),
            Err(err) => give_back(state, chunk, err.into(), false).await,
        });
    }
    if suppressed > 0 {
        match record_suppressed(state, chunk, suppressed).await {
            Ok(true) => {}
            Ok(false) => return Err(Outcome::done("chunk was taken over while sending")),
            Err(err) => return Err(give_back(state, chunk, err.into(), false).await),
        }
    }
    parse(state, chunk, &lines).await
}

/// The chunk object's lines as recipients; a line that is not one fails the chunk (the trigger
/// wrote it, so it cannot get better).
async fn parse(
    state: &AppState,
    chunk: &ChunkRow,
    lines: &[Box<serde_json::value::RawValue>],
) -> Result<Vec<Recipient>, Outcome> {
    let mut recipients = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line.get()) {
            Ok(recipient) => recipients.push(recipient),
            Err(err) => {
                let line = chunk.first_line.max(0) as usize + i;
                let reason = format!("line {line} of the chunk object is not a recipient: {err}");
                return Err(fail(state, chunk, &reason).await);
            }
        }
    }
    Ok(recipients)
}

/// Records the recipients left out as suppressed. False when the chunk is no longer this attempt's.
async fn record_suppressed(
    state: &AppState,
    chunk: &ChunkRow,
    suppressed: i64,
) -> haishin_shared::store::Result<bool> {
    let done = sqlx::query("UPDATE chunks SET suppressed = $2 WHERE id = $1 AND state = 'sending'")
        .bind(&chunk.id)
        .bind(suppressed)
        .execute(state.store.pool())
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn record_sent(state: &AppState, chunk: &ChunkRow, delivery: &DeliveryId, how: &str) -> Outcome {
    match state.store.finish_step(&chunk.id, Step::Send, &delivery.to_string()).await {
        Ok(true) => sent(chunk, delivery, how),
        Ok(false) => Outcome::done("chunk was taken over while sending"),
        Err(err) => err.into(),
    }
}

/// The outcome of a send recorded: no pipeline event, since a sent chunk frees none of a
/// list-based ESP's slots (those are upload slots, freed when the list is uploaded).
fn sent(chunk: &ChunkRow, delivery: &DeliveryId, how: &str) -> Outcome {
    tracing::info!(recipients = chunk.recipients, delivery = %delivery, how, "Chunk sent.");
    Outcome::done(how.to_owned())
}
