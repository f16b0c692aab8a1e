//! The messages the services exchange. They carry ids, never recipient lists.

use serde::{Deserialize, Serialize};

use crate::domain::Class;

/// Cloud Tasks payload for the trigger's prepare step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrepareTask {
    pub request_id: String,
}

/// Cloud Tasks payload for the list-uploader: one chunk to upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadTask {
    pub chunk_id: String,
    pub request_id: String,
    /// The dispatch this task belongs to; a chunk re-dispatched later gets a new generation.
    pub generation: i32,
}

/// Pub/Sub message on `deliveries`: an uploaded chunk ready to send.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeliveryMessage {
    pub chunk_id: String,
    pub request_id: String,
    pub class: Class,
}

/// Pub/Sub message on `pipeline-events`: something freed a slot or made work available.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PipelineEvent {
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    RequestPrepared,
    ChunkUploaded,
    ChunkSent,
    ChunkFinished,
    Tick,
}

impl PipelineEvent {
    pub fn chunk(kind: EventKind, request_id: &str, chunk_id: &str) -> Self {
        Self { kind, request_id: Some(request_id.to_owned()), chunk_id: Some(chunk_id.to_owned()) }
    }
}

/// Pub/Sub message on `request-completed`, for the marketing platform.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestCompleted {
    pub request_id: String,
    pub state: String,
    pub summary: crate::logs::RequestLog,
}
