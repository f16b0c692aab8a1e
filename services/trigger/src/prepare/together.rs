//! Inline requests prepared as they are taken in, a group at a time: while one group is being
//! written, the requests arriving queue up, and the next group is checked against the
//! suppressions with one query and stored with one statement. A quiet trigger writes each request
//! on its own at once; a flooded one writes many per statement, so that the database's work per
//! request falls as the load grows, and no request waits for a group to fill.
//!
//! A group whose query or statement fails is written again request by request, so that each
//! request gets its own answer (a refused one does not take the others down with it).

use std::collections::HashSet;

use haishin_shared::domain::{Audience, DeliveryRequest, RequestId};
use haishin_shared::gcp::Blobs;
use haishin_shared::store::{Store, StoreError};
use haishin_shared::suppression::{KnownSuppressions, address_key};
use tokio::sync::{mpsc, oneshot};

use super::chunker::{AudienceSummary, ChunkTarget};
use super::records::{self, NewChunk, Prepared};
use super::{PrepareError, audience};

/// Most requests one statement stores.
const GROUP_MAX: usize = 64;
/// A group takes no more requests once it holds this many recipients (a fan-out or two).
const GROUP_RECIPIENTS_MAX: usize = 20_000;

/// What became of a request handed to [`Together::store`].
#[derive(Debug)]
pub struct Stored {
    /// False: its id was taken already, and nothing of it was written.
    pub created: bool,
    pub summary: AudienceSummary,
}

/// The queue of inline requests waiting to be prepared and stored, and its writer.
pub struct Together {
    queue: mpsc::UnboundedSender<Waiting>,
}

struct Waiting {
    request: DeliveryRequest,
    traceparent: Option<String>,
    answer: oneshot::Sender<Result<Stored, PrepareError>>,
}

impl Together {
    /// Starts the writer, which runs until the last handle is dropped.
    pub fn start(store: Store, blobs: Blobs, bucket: String, chunk_size: usize) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        let writer = Writer { store, blobs, bucket, chunk_size };
        tokio::spawn(writer.run(waiting));
        Self { queue }
    }

    /// Prepares an inline request and stores it with its chunks, in the trace of the caller's
    /// span, together with whatever requests are waiting beside it.
    pub async fn store(&self, request: DeliveryRequest) -> Result<Stored, PrepareError> {
        let (answer, answered) = oneshot::channel();
        let traceparent = haishin_shared::telemetry::current_traceparent();
        let stopped = || PrepareError::Store(StoreError::Database(sqlx::Error::WorkerCrashed));
        self.queue.send(Waiting { request, traceparent, answer }).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

struct Writer {
    store: Store,
    blobs: Blobs,
    bucket: String,
    chunk_size: usize,
}

fn recipients(request: &DeliveryRequest) -> usize {
    match &request.audience {
        Audience::Inline(list) => list.len(),
        _ => 0,
    }
}

impl Writer {
    async fn run(self, mut waiting: mpsc::UnboundedReceiver<Waiting>) {
        while let Some(first) = waiting.recv().await {
            let mut held = recipients(&first.request);
            let mut group = vec![first];
            while group.len() < GROUP_MAX && held < GROUP_RECIPIENTS_MAX {
                let Ok(next) = waiting.try_recv() else { break };
                held += recipients(&next.request);
                group.push(next);
            }
            self.write(group).await;
        }
    }

    async fn write(&self, group: Vec<Waiting>) {
        // One request per id in a statement: a repeat is answered as an id already taken.
        let mut ids: HashSet<RequestId> = HashSet::new();
        let (group, repeats): (Vec<_>, Vec<_>) =
            group.into_iter().partition(|w| ids.insert(w.request.id.clone()));
        for repeat in repeats {
            let _ = repeat.answer.send(Ok(Stored { created: false, summary: AudienceSummary::default() }));
        }
        match self.write_group(&group).await {
            Ok(answers) => {
                for (waiting, answer) in group.into_iter().zip(answers) {
                    let _ = waiting.answer.send(answer);
                }
            }
            Err(err) => {
                if group.len() > 1 {
                    tracing::warn!(error = %err, requests = group.len(), "Group not stored; storing its requests one by one.");
                }
                for waiting in group {
                    let answer = self.write_one(&waiting).await;
                    let _ = waiting.answer.send(answer);
                }
            }
        }
    }

    fn target<'a>(&'a self, request: &'a DeliveryRequest) -> ChunkTarget<'a> {
        ChunkTarget {
            blobs: &self.blobs,
            store: &self.store,
            bucket: &self.bucket,
            request,
            chunk_size: self.chunk_size,
            on_chunk: &|| {},
        }
    }

    /// The group's answers, one per request in order; `Err` when its query or statement failed.
    async fn write_group(
        &self,
        group: &[Waiting],
    ) -> Result<Vec<Result<Stored, PrepareError>>, PrepareError> {
        let keys: HashSet<String> = group
            .iter()
            .flat_map(|w| match &w.request.audience {
                Audience::Inline(list) => list.iter().map(|r| address_key(&r.email)).collect(),
                _ => Vec::new(),
            })
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let known = KnownSuppressions::of(&self.store, &keys).await?;
        let mut read: Vec<Result<(AudienceSummary, Vec<NewChunk>), PrepareError>> = Vec::new();
        for waiting in group {
            read.push(audience::read_inline_held(self.target(&waiting.request), Some(&known)).await);
        }
        let prepared: Vec<Prepared<'_>> = group
            .iter()
            .zip(&read)
            .filter_map(|(w, read)| {
                let (summary, chunks) = read.as_ref().ok()?;
                Some(Prepared { request: &w.request, traceparent: w.traceparent.as_deref(), summary, chunks })
            })
            .collect();
        let stored = if prepared.is_empty() {
            HashSet::new()
        } else {
            records::insert_prepared(&self.store, &prepared).await?
        };
        Ok(group
            .iter()
            .zip(read)
            .map(|(w, read)| {
                let (summary, _) = read?;
                Ok(Stored { created: stored.contains(&w.request.id), summary })
            })
            .collect())
    }

    /// One request on its own: its chunks ask for their suppressions, and one statement stores it.
    async fn write_one(&self, waiting: &Waiting) -> Result<Stored, PrepareError> {
        let request = &waiting.request;
        let (summary, chunks) = audience::read_inline_held(self.target(request), None).await?;
        let prepared = Prepared {
            request,
            traceparent: waiting.traceparent.as_deref(),
            summary: &summary,
            chunks: &chunks,
        };
        let stored = records::insert_prepared(&self.store, &[prepared]).await?;
        Ok(Stored { created: stored.contains(&request.id), summary })
    }
}
