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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use haishin_shared::domain::{Class, Recipient, Template};
use haishin_shared::esp::{
    EspError, MessageOutcome, MessageProvider, MessageRenderer, MessageSetup, OutgoingMessage, RenderSettings,
};
use haishin_shared::gcp::{Blobs, GcpError};
use haishin_shared::messages::EventKind;
use haishin_shared::push::{Outcome, RetryReason};
use haishin_shared::store::{ChunkRow, Claimed, RateSchedule, Reservation};
use serde_json::value::RawValue;

use crate::{AppState, fail, publish_event};
use fence::Fence;

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
            schedule: setup.schedule,
            blobs,
            bucket,
            batch,
        })
    }
}

/// The stable key of one recipient of a request: its line in the chunk object. Chunks cut at the
/// tail share an object but never a line, so the key never changes between attempts.
fn message_key(chunk: &ChunkRow, index: i32) -> String {
    format!("{}:{}", chunk.object, chunk.first_line + index)
}

/// Where this attempt stands in the chunk.
struct Place {
    /// The next index of the chunk never tried.
    progress: i32,
    /// Indexes tried but not handed over, due before the untried ones.
    retry: VecDeque<i32>,
    total: i32,
}

impl Place {
    fn of(chunk: &ChunkRow) -> Self {
        Self {
            progress: chunk.progress,
            retry: chunk.retry.iter().copied().collect(),
            total: chunk.recipients,
        }
    }

    /// Takes the next batch: due retries first, then untried messages.
    fn take(&mut self, size: usize) -> Vec<i32> {
        let mut taken: Vec<i32> = Vec::with_capacity(size);
        while taken.len() < size
            && let Some(index) = self.retry.pop_front()
        {
            taken.push(index);
        }
        while taken.len() < size && self.progress < self.total {
            taken.push(self.progress);
            self.progress += 1;
        }
        taken
    }

    fn remaining(&self) -> i64 {
        self.retry.len() as i64 + i64::from(self.total - self.progress)
    }
}

/// One batch's outcomes, as they are added to the chunk.
#[derive(Default)]
struct Tally {
    delivered: i64,
    failed: i64,
    unknown: i64,
    deferred: Vec<i32>,
    /// The first refusal's reason, kept on the chunk.
    reason: Option<String>,
    /// How long the provider asked to wait, when it deferred messages.
    pause: Option<Duration>,
}

impl Tally {
    fn refuse(&mut self, reason: String) {
        self.failed += 1;
        self.reason.get_or_insert(reason);
    }

    fn add(&mut self, index: i32, outcome: MessageOutcome) {
        match outcome {
            MessageOutcome::Accepted { .. } => self.delivered += 1,
            MessageOutcome::Refused { reason } => self.refuse(format!("refused by the provider: {reason}")),
            MessageOutcome::Unknown { .. } => self.unknown += 1,
            MessageOutcome::Deferred { retry_after, .. } => {
                self.deferred.push(index);
                let pause = retry_after.unwrap_or(Duration::from_secs(1)).min(MAX_PAUSE);
                self.pause = Some(self.pause.map_or(pause, |p| p.max(pause)));
            }
        }
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
    let renderer = match request_renderer(state, path, &chunk).await {
        Ok(renderer) => renderer,
        Err(Ok(reason)) => return fail(state, &chunk, &reason).await,
        Err(Err(outcome)) => return crate::give_back(state, &chunk, outcome, false).await,
    };
    let (first, count) = (chunk.first_line.max(0) as usize, chunk.recipients.max(0) as usize);
    let lines = match path.blobs.read_lines(&path.bucket, &chunk.object, first, count).await {
        Ok(lines) => lines,
        Err(err @ GcpError::Permanent { .. }) => return fail(state, &chunk, &err.to_string()).await,
        Err(err) => return crate::give_back(state, &chunk, Outcome::unavailable(err), false).await,
    };
    let mut place = Place::of(&chunk);
    let mut pauses = 0;
    loop {
        let indexes = place.take(path.batch);
        if indexes.is_empty() {
            break;
        }
        let messages = render_batch(&renderer, &chunk, &lines, &indexes);
        let tally = match hand_over(state, path, &fence, &place, messages).await {
            Ok(tally) => tally,
            Err(outcome) => return outcome,
        };
        place.retry.extend(&tally.deferred);
        if place.remaining() > 0 && chunk.class == Class::Batch {
            match fence.yield_to_realtime().await {
                Ok(true) => {
                    tracing::info!(
                        left = place.remaining(),
                        "Batch chunk gave its slot up to realtime work."
                    );
                    publish_event(state, &chunk, EventKind::ChunkFinished).await;
                    return Outcome::done("gave its slot up to realtime work");
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "Could not look for waiting realtime work."),
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

/// The renderer of the chunk's request; `Err(Ok(reason))` when it can never render (the chunk
/// fails), `Err(Err(outcome))` when the request cannot be read now.
async fn request_renderer(
    state: &AppState,
    path: &MessagePath,
    chunk: &ChunkRow,
) -> Result<MessageRenderer, Result<String, Outcome>> {
    let request = match state.store.request(&chunk.request_id).await {
        Ok(Some(row)) => row.request().map_err(|e| Ok(e.to_string()))?,
        Ok(None) => return Err(Ok("the chunk's request is missing".to_owned())),
        Err(err) => return Err(Err(err.into())),
    };
    MessageRenderer::new(&request.template, &path.render).map_err(|e| Ok(e.to_string()))
}

/// Each index's message, or why it cannot be sent.
fn render_batch(
    renderer: &MessageRenderer,
    chunk: &ChunkRow,
    lines: &[Box<RawValue>],
    indexes: &[i32],
) -> Vec<(i32, Result<OutgoingMessage, String>)> {
    indexes
        .iter()
        .map(|&index| {
            let message = serde_json::from_str::<Recipient>(lines[index as usize].get())
                .map_err(|e| format!("recipient unreadable: {e}"))
                .and_then(|recipient| {
                    let key = message_key(chunk, index);
                    renderer.render(&recipient, &key, &key).map_err(|e| format!("cannot be rendered: {e}"))
                });
            (index, message)
        })
        .collect()
}

/// Hands one batch over and records its outcomes.
async fn hand_over(
    state: &AppState,
    path: &MessagePath,
    fence: &Fence<'_>,
    place: &Place,
    batch: Vec<(i32, Result<OutgoingMessage, String>)>,
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
    fence.take(&indexes, place).await?;
    if !messages.is_empty() {
        let result = {
            let _slot = state.slots.acquire().await.expect("the semaphore is never closed");
            let pace = match &path.schedule {
                Some(schedule) => schedule.reserve(messages.len() as u32).await,
                None => Ok(Reservation::now()),
            };
            match pace {
                Ok(pace) => path.provider.send_batch(&messages, &pace).await,
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
