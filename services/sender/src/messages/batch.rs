//! One batch of a chunk: where the attempt stands in the chunk ([`Place`]), the batch's
//! recipients (read from the chunk object, checked against the suppressions once more, rendered
//! with their unsubscribe tokens) and its outcomes ([`Tally`]).

use std::collections::VecDeque;
use std::time::Duration;

use haishin_shared::domain::Recipient;
use haishin_shared::esp::{MessageOutcome, MessageRenderer, OutgoingMessage};
use haishin_shared::store::{ChunkRow, Store, StoreError};
use haishin_shared::suppression::{address_key, suppressed_for_request};
use haishin_shared::unsubscribe::TokenIssuer;
use serde_json::value::RawValue;

use super::MAX_PAUSE;

/// The stable key of one recipient of a request: its line in the chunk object. Chunks cut at the
/// tail share an object but never a line, so the key never changes between attempts.
pub(super) fn message_key(chunk: &ChunkRow, index: i32) -> String {
    format!("{}:{}", chunk.object, chunk.first_line + index)
}

/// Where this attempt stands in the chunk.
pub(super) struct Place {
    /// The next index of the chunk never tried.
    pub(super) progress: i32,
    /// Indexes tried but not handed over, due before the untried ones.
    pub(super) retry: VecDeque<i32>,
    total: i32,
}

impl Place {
    pub(super) fn of(chunk: &ChunkRow) -> Self {
        Self {
            progress: chunk.progress,
            retry: chunk.retry.iter().copied().collect(),
            total: chunk.recipients,
        }
    }

    /// Takes the next batch: due retries first, then untried messages.
    pub(super) fn take(&mut self, size: usize) -> Vec<i32> {
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

    pub(super) fn remaining(&self) -> i64 {
        self.retry.len() as i64 + i64::from(self.total - self.progress)
    }
}

/// One batch's outcomes, as they are added to the chunk.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) delivered: i64,
    pub(super) failed: i64,
    pub(super) unknown: i64,
    pub(super) deferred: Vec<i32>,
    /// The first refusal's reason, kept on the chunk.
    pub(super) reason: Option<String>,
    /// How long the provider asked to wait, when it deferred messages.
    pub(super) pause: Option<Duration>,
}

impl Tally {
    pub(super) fn refuse(&mut self, reason: String) {
        self.failed += 1;
        self.reason.get_or_insert(reason);
    }

    pub(super) fn add(&mut self, index: i32, outcome: MessageOutcome) {
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

/// A batch's recipients, read and checked, before rendering.
pub(super) struct Batch {
    /// Each index's recipient, or why its line cannot be read.
    pub(super) recipients: Vec<(i32, Result<Recipient, String>)>,
    /// Indexes left out: suppressed since the chunk was prepared.
    pub(super) suppressed: i64,
}

/// Reads the batch's recipients and leaves out those suppressed for the chunk's request: one
/// query for the whole batch.
pub(super) async fn read(
    store: &Store,
    chunk: &ChunkRow,
    lines: &[Box<RawValue>],
    indexes: &[i32],
) -> Result<Batch, StoreError> {
    let recipients: Vec<(i32, Result<Recipient, String>)> = indexes
        .iter()
        .map(|&index| {
            let recipient = serde_json::from_str::<Recipient>(lines[index as usize].get())
                .map_err(|e| format!("recipient unreadable: {e}"));
            (index, recipient)
        })
        .collect();
    let keys: Vec<String> =
        recipients.iter().filter_map(|(_, r)| r.as_ref().ok()).map(|r| address_key(&r.email)).collect();
    let asked: Vec<&str> = keys.iter().map(String::as_str).collect();
    let suppressed = suppressed_for_request(store, &chunk.request_id, &asked).await?;
    if suppressed.is_empty() {
        return Ok(Batch { recipients, suppressed: 0 });
    }
    let before = recipients.len();
    let recipients: Vec<_> = recipients
        .into_iter()
        .filter(|(_, r)| r.as_ref().map_or(true, |r| !suppressed.contains(&address_key(&r.email))))
        .collect();
    Ok(Batch { suppressed: (before - recipients.len()) as i64, recipients })
}

/// What every message of a request is rendered with: its template, and the scope an unsubscribe
/// from it applies to.
pub(super) struct Rendering<'a> {
    pub(super) renderer: MessageRenderer,
    pub(super) tokens: &'a TokenIssuer,
    pub(super) scope: String,
}

/// Each index's message, with its recipient's unsubscribe token, or why it cannot be sent.
pub(super) fn render(
    rendering: &Rendering<'_>,
    chunk: &ChunkRow,
    recipients: Vec<(i32, Result<Recipient, String>)>,
) -> Vec<(i32, Result<OutgoingMessage, String>)> {
    let now = chrono::Utc::now();
    recipients
        .into_iter()
        .map(|(index, recipient)| {
            let message = recipient.and_then(|recipient| {
                let key = message_key(chunk, index);
                let token = rendering.tokens.token(&address_key(&recipient.email), &rendering.scope, now);
                rendering
                    .renderer
                    .render(&recipient, &key, &token)
                    .map_err(|e| format!("cannot be rendered: {e}"))
            });
            (index, message)
        })
        .collect()
}
