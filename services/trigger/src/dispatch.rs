//! Driving the scheduling rule ([`crate::scheduling`]).
//!
//! Each event (a request prepared, a chunk uploaded or sent, a scheduler tick) asks for a dispatch
//! round. Rounds never overlap within an instance, and requests that arrive while one runs are
//! folded into one more round after it, so a burst of events costs one or two rounds, not one
//! each. Across instances, the store's slot lock keeps rounds consistent.
//!
//! A chunk dispatched is handed on ([`Handoff`]): as an upload task to the list-uploader for a
//! list-based ESP, or published to the sender for a message-based provider and for a small
//! realtime chunk sent without a list. Small realtime chunks whose requests share a template go
//! in one message, for the sender to send in one call. One that cannot be handed on goes back in
//! line.
//!
//! Each round reports the slots it granted against ([`scheduling::adaptive`]) as the
//! `esp_limit` gauge, so that a lowered limit shows beside the configured one.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use futures::future::join_all;
use haishin_shared::domain::ChunkId;
use haishin_shared::esp::Shape;
use haishin_shared::gcp::{GcpError, TaskQueue, Topic};
use haishin_shared::messages::{Companion, DeliveryMessage, UploadTask};
use haishin_shared::store::{Store, StoreError};
use haishin_shared::telemetry::metrics::{Api, metrics};
use haishin_shared::telemetry::{join_trace, parse_traceparent};
use tokio::sync::Mutex;
use tracing::Instrument;
use tracing::field::Empty;

use crate::scheduling::{self, Dispatched, SlotLimits};

pub struct Dispatcher {
    store: Store,
    handoff: Handoff,
    limits: SlotLimits,
    running: Mutex<()>,
    wanted: AtomicBool,
    /// The slots the last round granted against, as the gauge last showed them.
    slots: AtomicU32,
}

/// Where a dispatched chunk goes next.
pub enum Handoff {
    /// A list-based ESP: an upload task for the list-uploader, which holds the upload slot; a
    /// chunk sent with its recipients in the call (`inline`) goes to the sender's topic.
    Upload { queue: TaskQueue, deliveries: Topic },
    /// A message-based provider: a delivery message for the sender, which holds the send slot
    /// (the chunk object in Cloud Storage is the list).
    Deliveries(Topic),
}

impl Handoff {
    /// Hands a unit on (one chunk, or the chunks of one send call: see [`units`]) in a span of
    /// its first chunk's request trace, whatever event started the round, so that the task or
    /// message carries that trace on.
    async fn hand_off(&self, unit: &[&Dispatched]) -> Result<(), GcpError> {
        let lead = unit[0];
        let span = tracing::info_span!(
            "dispatch",
            request_id = %lead.request_id,
            chunk = %lead.chunk_id,
            class = %lead.class,
            generation = lead.generation,
            chunks = unit.len(),
            trace_id = Empty,
            span_id = Empty,
        );
        join_trace(&span, lead.traceparent.as_deref().and_then(parse_traceparent).as_ref());
        self.send(unit).instrument(span).await
    }

    async fn send(&self, unit: &[&Dispatched]) -> Result<(), GcpError> {
        let lead = unit[0];
        match self {
            Handoff::Upload { deliveries, .. } if lead.inline => publish(deliveries, unit).await,
            Handoff::Upload { queue, .. } => {
                let task = UploadTask {
                    chunk_id: lead.chunk_id.clone(),
                    request_id: lead.request_id.clone(),
                    generation: lead.generation,
                };
                let name = upload_task_name(&lead.chunk_id, lead.generation);
                queue.enqueue(Some(&name), &task).await.map(drop)
            }
            Handoff::Deliveries(topic) => publish(topic, unit).await,
        }
    }
}

/// What a round hands on, unit by unit: the chunks of each send call together (one message for
/// the sender), every other chunk alone.
fn units(dispatched: &[Dispatched]) -> Vec<Vec<&Dispatched>> {
    let mut units: Vec<Vec<&Dispatched>> = Vec::new();
    let mut by_call: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for chunk in dispatched {
        match chunk.send_call {
            Some(call) => match by_call.get(&call) {
                Some(&unit) => units[unit].push(chunk),
                None => {
                    by_call.insert(call, units.len());
                    units.push(vec![chunk]);
                }
            },
            None => units.push(vec![chunk]),
        }
    }
    units
}

/// Publishes a delivery message for the sender: the unit's first chunk, with the others of its
/// send call.
async fn publish(topic: &Topic, unit: &[&Dispatched]) -> Result<(), GcpError> {
    let lead = unit[0];
    let message = DeliveryMessage {
        chunk_id: lead.chunk_id.clone(),
        request_id: lead.request_id.clone(),
        class: lead.class,
        with: unit[1..]
            .iter()
            .map(|chunk| Companion {
                chunk_id: chunk.chunk_id.clone(),
                request_id: chunk.request_id.clone(),
                traceparent: chunk.traceparent.clone(),
            })
            .collect(),
    };
    topic.publish(&message, &message.attributes()).await.map(drop)
}

/// The Cloud Tasks name of a chunk's upload task for one dispatch. Hashed, because Cloud Tasks
/// slows down on sequential names; deterministic, so that re-dispatch after a crash cannot create a
/// second task.
pub fn upload_task_name(chunk_id: &ChunkId, generation: i32) -> String {
    haishin_shared::gcp::task_name(&format!("upload:{chunk_id}:{generation}"))
}

impl Dispatcher {
    pub fn new(store: Store, handoff: Handoff, limits: SlotLimits) -> Self {
        Self {
            store,
            handoff,
            limits,
            running: Mutex::new(()),
            wanted: AtomicBool::new(false),
            slots: AtomicU32::new(limits.limit),
        }
    }

    /// The topic chunks that go straight to the sender are published to.
    pub fn deliveries(&self) -> &Topic {
        match &self.handoff {
            Handoff::Deliveries(topic) | Handoff::Upload { deliveries: topic, .. } => topic,
        }
    }

    /// Runs dispatch rounds until no more were asked for. Returns the chunks this call dispatched;
    /// a call that finds a round already running leaves the work to it and returns at once.
    pub async fn run(&self) -> Result<Vec<Dispatched>, StoreError> {
        self.wanted.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        loop {
            let Ok(guard) = self.running.try_lock() else { return Ok(all) };
            while self.wanted.swap(false, Ordering::SeqCst) {
                all.extend(self.round().await?);
            }
            drop(guard);
            // An event may have arrived between the last check and the release.
            if !self.wanted.load(Ordering::SeqCst) {
                return Ok(all);
            }
        }
    }

    async fn round(&self) -> Result<Vec<Dispatched>, StoreError> {
        let round = scheduling::dispatch_round(&self.store, self.limits).await?;
        if round.more {
            // The round took as many chunks as one round may: another follows at once.
            self.wanted.store(true, Ordering::SeqCst);
        }
        if self.slots.swap(round.slots.effective, Ordering::Relaxed) != round.slots.effective {
            let api = match self.limits.shape {
                Shape::Lists => Api::Upload,
                Shape::Messages => Api::Send,
            };
            metrics().esp_limit(api, round.slots.effective);
        }
        if round.expired > 0 {
            tracing::info!(chunks = round.expired, "Chunks expired before dispatch.");
        }
        let units = units(&round.dispatched);
        let results =
            join_all(units.iter().map(|unit| async move { (unit, self.handoff.hand_off(unit).await) })).await;
        let mut dispatched = Vec::new();
        for (unit, result) in results {
            for chunk in unit {
                match &result {
                    Ok(()) => {
                        tracing::debug!(request_id = %chunk.request_id, chunk = %chunk.chunk_id, class = %chunk.class, "Chunk dispatched.");
                        dispatched.push((*chunk).clone());
                    }
                    Err(err) => {
                        tracing::warn!(request_id = %chunk.request_id, chunk = %chunk.chunk_id, error = %err, "Chunk not handed on; back in line.");
                        scheduling::undo_dispatch(&self.store, chunk, self.limits.shape).await?;
                    }
                }
            }
        }
        Ok(dispatched)
    }
}

#[cfg(test)]
mod tests {
    use haishin_shared::domain::ChunkId;

    use super::upload_task_name;

    #[test]
    fn task_names_are_stable_and_differ_per_generation() {
        let (one, two) = (ChunkId::from("r~000001"), ChunkId::from("r~000002"));
        assert_eq!(upload_task_name(&one, 1), upload_task_name(&one, 1));
        assert_ne!(upload_task_name(&one, 1), upload_task_name(&one, 2));
        assert_ne!(upload_task_name(&one, 1), upload_task_name(&two, 1));
        assert_eq!(upload_task_name(&one, 1).len(), 32);
    }
}
