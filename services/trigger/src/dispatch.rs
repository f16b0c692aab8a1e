//! Driving the scheduling rule ([`crate::scheduling`]).
//!
//! Each event (a request prepared, a chunk uploaded or sent, a scheduler tick) asks for a dispatch
//! round. Rounds never overlap within an instance, and requests that arrive while one runs are
//! folded into one more round after it, so a burst of events costs one or two rounds, not one
//! each. Across instances, the store's slot lock keeps rounds consistent.

use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::join_all;
use haishin_shared::domain::ChunkId;
use haishin_shared::gcp::TaskQueue;
use haishin_shared::messages::UploadTask;
use haishin_shared::store::{Store, StoreError};
use tokio::sync::Mutex;

use crate::scheduling::{self, Dispatched, SlotLimits};

pub struct Dispatcher {
    store: Store,
    upload_queue: TaskQueue,
    limits: SlotLimits,
    running: Mutex<()>,
    wanted: AtomicBool,
}

/// The Cloud Tasks name of a chunk's upload task for one dispatch. Hashed, because Cloud Tasks
/// slows down on sequential names; deterministic, so that re-dispatch after a crash cannot create a
/// second task.
pub fn upload_task_name(chunk_id: &ChunkId, generation: i32) -> String {
    haishin_shared::gcp::task_name(&format!("upload:{chunk_id}:{generation}"))
}

impl Dispatcher {
    pub fn new(store: Store, upload_queue: TaskQueue, limits: SlotLimits) -> Self {
        Self { store, upload_queue, limits, running: Mutex::new(()), wanted: AtomicBool::new(false) }
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
        if round.expired > 0 {
            tracing::info!(chunks = round.expired, "Chunks expired before dispatch.");
        }
        let results = join_all(round.dispatched.iter().map(|chunk| async move {
            let task = UploadTask {
                chunk_id: chunk.chunk_id.clone(),
                request_id: chunk.request_id.clone(),
                generation: chunk.generation,
            };
            let name = upload_task_name(&chunk.chunk_id, chunk.generation);
            (chunk, self.upload_queue.enqueue(Some(&name), &task).await)
        }))
        .await;
        let mut dispatched = Vec::new();
        for (chunk, result) in results {
            match result {
                Ok(_) => {
                    tracing::debug!(request_id = %chunk.request_id, chunk = %chunk.chunk_id, class = %chunk.class, "Chunk dispatched.");
                    dispatched.push(chunk.clone());
                }
                Err(err) => {
                    tracing::warn!(request_id = %chunk.request_id, chunk = %chunk.chunk_id, error = %err, "Upload task not created; chunk back in line.");
                    scheduling::undo_dispatch(&self.store, &chunk.chunk_id, chunk.generation).await?;
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
