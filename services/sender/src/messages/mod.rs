//! Sending through a message-based provider (SMTP, SES): each recipient's message rendered and
//! handed over in batches, with one outcome per message.
//!
//! # Never twice
//! The chunk row keeps the sender's place (`progress`, `retry`, `in_flight`; see migration 0005).
//! Before a batch is handed over, its indexes are written as `in_flight` together with the place
//! after it; after the call, its outcomes are added and `in_flight` is cleared. Every write is
//! fenced by the attempt's number (`send_attempts`), so an attempt that was taken over can record
//! nothing more. An attempt that takes over a chunk whose `in_flight` is still set cannot know
//! what became of those messages: they end `unknown`, never handed over again. A crash therefore
//! leaves at most one batch (`ESP_BATCH_SIZE` messages) unknown.
//!
//! # Outcomes
//! Accepted messages count `delivered`; refused ones (an SMTP 5xx, SES `MessageRejected`) and
//! those that cannot be rendered count `failed`, with the first reason kept; unknown ones count
//! `unknown`. Deferred ones (an SMTP 4xx, throttling, a call that ran out of time) go back in the
//! chunk's `retry` list: the attempt pauses and tries them again, and after a few pauses hands the
//! chunk back for a later delivery of its message. A chunk whose messages are still deferred after
//! [`MAX_SEND_ATTEMPTS`] attempts counts them `failed`: nothing is retried forever.
//!
//! # Suppressed since preparation
//! Before each batch, its recipients are checked against the suppressions (one query): an address
//! suppressed since the chunk was prepared is never handed over, and counts `suppressed` on the
//! chunk, written with the batch's place. Each message carries its recipient's signed unsubscribe
//! token (`haishin_shared::unsubscribe`), scoped by the request's `UNSUBSCRIBE_SCOPE_LABEL`.

use haishin_shared::telemetry::metrics::{Api, metrics, outcome};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use haishin_shared::domain::{Class, Template};
use haishin_shared::esp::{
    EspError, MessageOutcome, MessageProvider, MessageRenderer, MessageSetup, OutgoingMessage, RenderSettings,
};
use haishin_shared::gcp::{Blobs, GcpError};
use haishin_shared::messages::EventKind;
use haishin_shared::push::{Outcome, RetryReason};
use haishin_shared::store::{ChunkRow, Claimed, RateSchedule, Reservation};
use haishin_shared::unsubscribe::TokenIssuer;

use crate::{AppState, fail, publish_event};
use batch::{Place, Rendering, Tally};
use fence::Fence;

mod batch;
mod fence;

/// Attempts after which messages the provider still defers count `failed`.
pub const MAX_SEND_ATTEMPTS: i32 = 10;
/// Pauses for deferred messages within one attempt before the chunk is handed back.
const MAX_PAUSES: u32 = 3;
/// The longest pause within an attempt; a provider that asks for longer gets the chunk back later.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// A message-based provider, and what the sender needs to hand it a chunk.
pub struct MessagePath {
    provider: Arc<dyn MessageProvider>,
    render: RenderSettings,
    tokens: TokenIssuer,
    schedule: Option<RateSchedule>,
    blobs: Blobs,
    bucket: String,
    batch: usize,
}

impl MessagePath {
    /// Checks the sender settings now (the `From`, the unsubscribe URL), not at the first chunk.
    pub fn new(setup: MessageSetup, blobs: Blobs, bucket: String) -> anyhow::Result<Self> {
        let probe = Template::Inline { subject: "-".into(), text: Some("-".into()), html: None };
        MessageRenderer::new(&probe, &setup.render)
            .context("MAIL_FROM, MAIL_ENVELOPE_FROM or UNSUBSCRIBE_URL")?;
        let batch = setup.provider.limits().max_batch.max(1);
        Ok(Self {
            provider: setup.provider,
            render: setup.render,
            tokens: setup.tokens,
            schedule: setup.schedule,
            blobs,
            bucket,
            batch,
        })
    }
}

/// Sends a claimed chunk's messages.
pub(crate) async fn send(state: &AppState, path: &MessagePath, claimed: Claimed) -> Outcome {
    let chunk = claimed.chunk;
    let fence = Fence { store: &state.store, chunk: &chunk, lease: state.lease };
    if let Some(lost) = &chunk.in_flight {
        tracing::error!(
            messages = lost.len(),
            "Messages handed over by an attempt that ended without an answer: unknown."
        );
        if let Err(outcome) = fence.settle_lost().await {
            return outcome;
        }
    }
    let rendering = match request_rendering(state, path, &chunk).await {
        Ok(rendering) => rendering,
        Err(Ok(reason)) => return fail(state, &chunk, &reason).await,
        Err(Err(outcome)) => return crate::give_back(state, &chunk, outcome, false).await,
    };
    let lines = match path.blobs.chunk_lines(&path.bucket, &chunk).await {
        Ok(lines) => lines,
        Err(err @ GcpError::Permanent { .. }) => return fail(state, &chunk, &err.to_string()).await,
        Err(err) => return crate::give_back(state, &chunk, Outcome::unavailable(err), false).await,
    };
    let mut place = Place::of(&chunk);
    let mut pauses = 0;
    // One attempt sends for at most half its lease, well inside the push's ack deadline; then the
    // chunk goes back in line with its place kept, and the trigger hands it on again at once.
    let (started, turn) = (tokio::time::Instant::now(), state.lease / 2);
    loop {
        let indexes = place.take(path.batch);
        if indexes.is_empty() {
            break;
        }
        // Addresses suppressed since the chunk was prepared are left out, and counted.
        let read = match batch::read(&state.store, &chunk, &lines, &indexes).await {
            Ok(read) => read,
            Err(err) => {
                let _ = fence.hand_back().await;
                return Outcome::unavailable(err);
            }
        };
        let messages = batch::render(&rendering, &chunk, read.recipients);
        let tally = match hand_over(state, path, &fence, &place, messages, read.suppressed).await {
            Ok(tally) => tally,
            Err(outcome) => return outcome,
        };
        place.retry.extend(&tally.deferred);
        if place.remaining() > 0 {
            let turn_over = started.elapsed() >= turn;
            let gave_way = match (turn_over, chunk.class) {
                (true, _) => fence.back_in_line().await,
                (false, Class::Batch) => fence.yield_to_realtime().await,
                (false, Class::Realtime) => Ok(false),
            };
            match gave_way {
                Ok(true) => {
                    let why = if turn_over { "its turn is over" } else { "realtime work is waiting" };
                    tracing::info!(left = place.remaining(), why, "Chunk back in line with its place kept.");
                    publish_event(state, &chunk, EventKind::ChunkFinished).await;
                    return Outcome::done(format!("back in line: {why}"));
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "Could not put the chunk back in line; it goes on."),
            }
        }
        if let Some(pause) = tally.pause {
            pauses += 1;
            if pauses > MAX_PAUSES {
                return hand_back(state, &fence, &place, "the provider keeps deferring messages").await;
            }
            tokio::time::sleep(pause).await;
        }
    }
    match fence.complete().await {
        Ok(true) => {
            tracing::info!(recipients = chunk.recipients, provider = path.provider.name(), "Chunk sent.");
            publish_event(state, &chunk, EventKind::ChunkFinished).await;
            Outcome::done("sent")
        }
        Ok(false) => Outcome::done("chunk was taken over while sending"),
        Err(err) => err.into(),
    }
}

/// How the chunk's request is rendered; `Err(Ok(reason))` when it can never render (the chunk
/// fails), `Err(Err(outcome))` when the request cannot be read now.
async fn request_rendering<'a>(
    state: &AppState,
    path: &'a MessagePath,
    chunk: &ChunkRow,
) -> Result<Rendering<'a>, Result<String, Outcome>> {
    let (template, labels) = match state.store.request_head(&chunk.request_id).await {
        Ok(Some(head)) => head.template_and_labels(&chunk.request_id).map_err(|e| Ok(e.to_string()))?,
        Ok(None) => return Err(Ok("the chunk's request is missing".to_owned())),
        Err(err) => return Err(Err(err.into())),
    };
    let renderer = MessageRenderer::new(&template, &path.render)
        .map_err(|e| Ok(e.to_string()))?
        .for_request(chunk.request_id.as_str());
    Ok(Rendering { renderer, tokens: &path.tokens, scope: path.tokens.scope(&labels) })
}

/// Hands one batch over and records its outcomes.
async fn hand_over(
    state: &AppState,
    path: &MessagePath,
    fence: &Fence<'_>,
    place: &Place,
    batch: Vec<(i32, Result<OutgoingMessage, String>)>,
    suppressed: i64,
) -> Result<Tally, Outcome> {
    let mut tally = Tally::default();
    let (mut indexes, mut messages) = (Vec::new(), Vec::new());
    for (index, message) in batch {
        match message {
            Ok(message) => {
                indexes.push(index);
                messages.push(message);
            }
            Err(reason) => tally.refuse(reason),
        }
    }
    fence.take(&indexes, place, suppressed).await?;
    if !messages.is_empty() {
        let result = {
            let _slot = state.slots.acquire().await.expect("the semaphore is never closed");
            let pace = match &path.schedule {
                Some(schedule) => schedule.reserve(messages.len() as u32).await,
                None => Ok(Reservation::now()),
            };
            match pace {
                Ok(pace) => {
                    let call = metrics().esp_call(Api::Send, fence.chunk.class);
                    let result = path.provider.send_batch(&messages, &pace).await;
                    call.finish(outcome(result.as_ref().map(drop)));
                    result
                }
                Err(err) => Err(EspError::Transient(err.to_string())),
            }
        };
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(err) => whole_call(&err, messages.len()),
        };
        for (index, outcome) in indexes.into_iter().zip(outcomes) {
            tally.add(index, outcome);
        }
    }
    fence.record(&tally).await?;
    Ok(tally)
}

/// One outcome per message for a call that failed as a whole: nothing was handed over, so the
/// messages are deferred, or refused when no retry can help (the login refused).
fn whole_call(err: &EspError, messages: usize) -> Vec<MessageOutcome> {
    if matches!(err, EspError::RateLimited { .. }) {
        tracing::warn!(api = "send", "ESP rate limited the call.");
    }
    let outcome = match err {
        EspError::Permanent(reason) => MessageOutcome::Refused { reason: reason.clone() },
        EspError::Indeterminate(reason) => MessageOutcome::Unknown { reason: reason.clone() },
        other => MessageOutcome::Deferred { reason: other.to_string(), retry_after: other.retry_after() },
    };
    vec![outcome; messages]
}

/// Gives the chunk back for a later delivery of its message, or, when it has had its attempts,
/// counts what is still deferred `failed`.
async fn hand_back(state: &AppState, fence: &Fence<'_>, place: &Place, why: &str) -> Outcome {
    let chunk = fence.chunk;
    if chunk.send_attempts - chunk.yields >= MAX_SEND_ATTEMPTS {
        let reason = format!(
            "{why}: {} messages still deferred after {MAX_SEND_ATTEMPTS} attempts",
            place.remaining()
        );
        tracing::warn!(%reason, "Deferred messages given up.");
        return match fence.give_up(place.remaining(), &reason).await {
            Ok(_) => {
                publish_event(state, chunk, EventKind::ChunkFinished).await;
                Outcome::done(reason)
            }
            Err(err) => err.into(),
        };
    }
    match fence.hand_back().await {
        Ok(_) => Outcome::Retry(RetryReason::Throttled(why.to_owned())),
        Err(err) => err.into(),
    }
}
