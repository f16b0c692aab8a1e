//! The messages the services exchange. They carry ids, never recipient lists.

use serde::{Deserialize, Serialize};

use crate::domain::{ChunkId, Class, RequestId};
use crate::store::ChunkRow;

/// Cloud Tasks payload for the trigger's prepare step: the whole request, or one part of a large
/// audience's preparation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrepareTask {
    pub request_id: RequestId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PreparePart>,
}

/// One part of a large audience's preparation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PreparePart {
    /// Reading one audience file and spreading its recipients over the partitions.
    Shard(u32),
    /// De-duplicating one partition and cutting it into chunks.
    Partition(u32),
}

impl PreparePart {
    /// The part's kind, as the store names it.
    pub fn kind(self) -> &'static str {
        match self {
            PreparePart::Shard(_) => "shard",
            PreparePart::Partition(_) => "partition",
        }
    }

    pub fn index(self) -> u32 {
        match self {
            PreparePart::Shard(i) | PreparePart::Partition(i) => i,
        }
    }
}

impl std::fmt::Display for PreparePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind(), self.index())
    }
}

/// Cloud Tasks payload for the list-uploader: one chunk to upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadTask {
    pub chunk_id: ChunkId,
    pub request_id: RequestId,
    /// The dispatch this task belongs to; a chunk re-dispatched later gets a new generation.
    pub generation: i32,
}

/// Pub/Sub message on `deliveries`: an uploaded chunk ready to send, and the chunks to send with
/// it in one call (small realtime chunks of requests sharing its template, sent without a list).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeliveryMessage {
    pub chunk_id: ChunkId,
    pub request_id: RequestId,
    pub class: Class,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub with: Vec<Companion>,
}

/// A chunk sent with another's message, and the trace of its request (the message's own
/// attributes carry the first chunk's), so that its send joins its own request's trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Companion {
    pub chunk_id: ChunkId,
    pub request_id: RequestId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl DeliveryMessage {
    /// The message that hands `chunk` to the sender.
    pub fn for_chunk(chunk: &ChunkRow) -> Self {
        Self {
            chunk_id: chunk.id.clone(),
            request_id: chunk.request_id.clone(),
            class: chunk.class,
            with: Vec::new(),
        }
    }

    /// The message's Pub/Sub attributes. `class` routes it: the realtime and the batch push
    /// subscriptions on `deliveries` filter on it, so that realtime sends never queue behind batch ones.
    pub fn attributes(&self) -> [(&'static str, &str); 2] {
        [("class", self.class.as_str()), ("request_id", self.request_id.as_str())]
    }
}

/// Pub/Sub message on `pipeline-events`: something freed a slot or made work available.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PipelineEvent {
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_id: Option<ChunkId>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    ChunkUploaded,
    /// A message of chunks sent without a list is done with: one of the send slots the trigger
    /// counts for such messages is free.
    InlineSent,
    ChunkFinished,
    Tick,
}

impl PipelineEvent {
    /// An event about one chunk.
    pub fn chunk(kind: EventKind, chunk: &ChunkRow) -> Self {
        Self { kind, request_id: Some(chunk.request_id.clone()), chunk_id: Some(chunk.id.clone()) }
    }

    /// The scheduler's safety net, published by each completion pass.
    pub fn tick() -> Self {
        Self { kind: EventKind::Tick, request_id: None, chunk_id: None }
    }
}
