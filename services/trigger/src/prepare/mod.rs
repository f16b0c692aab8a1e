//! The prepare step: a request's audience becomes chunk objects in Cloud Storage and chunk rows,
//! and the scheduler runs as each chunk is stored.
//!
//! - this module: [`run`], the step under its lease, returning a domain outcome;
//! - `audience`: listing an audience's files, and streaming a small audience (inline, or files)
//!   in one pass;
//! - [`parts`]: a large audience prepared in parts (shards, then partitions), each its own task;
//! - `bigquery`: a BigQuery audience's `EXPORT DATA` job, run once per request, and its shards;
//! - [`rows`]: reading a CSV or NDJSON file's rows;
//! - `recipient`: checking one row (address, parameter size) and the reasons rows are skipped;
//! - `chunker`: de-duplicating within the request (or partition), leaving out suppressed recipients (one query
//!   per chunk), and writing chunks as they fill;
//! - [`records`]: what the step writes to the database;
//! - [`together`]: inline requests prepared as they are taken in, stored a group at a time.

pub(crate) mod audience;
mod bigquery;
mod chunker;
pub mod parts;
pub(crate) mod recipient;
pub mod records;
pub mod rows;
pub mod together;

use haishin_shared::domain::{DeliveryRequest, RequestId, RequestState};
use haishin_shared::gcp::GcpError;
use haishin_shared::messages::PreparePart;
use haishin_shared::store::{Claim, StoreError};
use tracing::Instrument;

use crate::AppState;
use crate::error::Unavailable;

pub use chunker::AudienceSummary;
pub use parts::Parts;

/// Why an audience could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The audience can never be read as given; the request fails with this reason.
    #[error("{0}")]
    Unusable(String),
    #[error(transparent)]
    Storage(#[from] GcpError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PrepareError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, PrepareError::Unusable(_) | PrepareError::Storage(GcpError::Permanent { .. }))
    }
}

/// What the prepare step came to.
#[derive(Debug)]
pub enum Prepared {
    /// The audience is in chunks, all of them eligible for dispatch.
    Chunks(u32),
    /// The audience is being prepared in parts, by tasks of their own.
    InParts,
    /// Nothing to do: the request is past this step (in the state given), or unknown.
    Past(Option<RequestState>),
    /// The request can never be delivered; it failed with this reason.
    Failed(String),
}

/// Prepares a request's audience, if no other worker is, and dispatches as chunks are stored: a
/// small audience here, a large one by planning its parts (see [`parts`]). With `part`, runs that
/// part of a large audience's preparation.
#[tracing::instrument(skip_all, fields(request_id = %id))]
pub async fn run(
    state: &AppState,
    id: &RequestId,
    part: Option<PreparePart>,
) -> Result<Prepared, Unavailable> {
    if let Some(part) = part {
        return parts::run(state, id, part).await;
    }
    if parts::plan::planned(&state.store, id).await?.is_some() {
        // Planned already (this task is a redelivery): its shards' tasks are made sure of.
        return parts::start_shards(state, id).await;
    }
    let row = match records::claim_prepare(&state.store, id, state.prepare_lease).await? {
        Claim::Claimed(row) => row,
        Claim::Busy => return Err(Unavailable::Busy(format!("request {id} is being prepared"))),
        Claim::Done(past) => return Ok(Prepared::Past(past)),
    };
    let request = match row.request() {
        Ok(request) => request,
        Err(err) => return fail(state, id, &err.to_string()).await,
    };
    let sources = audience::Sources {
        blobs: &state.blobs,
        bigquery: &state.bigquery,
        export_wait: state.prepare_lease / 2,
    };
    // Boxed: the reading's future is large, and every caller's stack would otherwise hold it.
    let prepared = match Box::pin(audience::files(&sources, &state.bucket, &request)).await {
        Ok(Some(files)) if audience::worth_parts(&files, state.parts.partition_bytes) => {
            return match parts::plan::plan(state, &request, &files).await {
                Err(err) => {
                    let _ = records::drop_request_lease(&state.store, id).await;
                    Err(err)
                }
                done => done,
            };
        }
        Ok(files) => {
            let dispatch_now = dispatch_now(state);
            let target = chunker::ChunkTarget {
                blobs: &state.blobs,
                store: &state.store,
                bucket: &state.bucket,
                request: &request,
                chunk_size: state.chunk_size,
                on_chunk: &dispatch_now,
            };
            Box::pin(audience::read_whole(target, files.as_deref())).await
        }
        Err(err) => Err(err),
    };
    match prepared {
        Ok(summary) => {
            records::finish_prepare(&state.store, id, &summary).await?;
            dispatch_after_prepare(state).await;
            Ok(Prepared::Chunks(summary.chunks))
        }
        Err(err) if err.is_permanent() => fail(state, id, &err.to_string()).await,
        Err(err) => {
            if let PrepareError::Store(_) | PrepareError::Storage(_) = err {
                let _ = records::drop_request_lease(&state.store, id).await;
            }
            Err(Unavailable::Dependency(err.to_string()))
        }
    }
}

/// Prepares an inline request as it is taken in, before it is stored: its chunks are built in
/// memory (rows checked, repeated and suppressed addresses left out, lines kept in the chunk
/// rows) and stored with the request, already `dispatching`, by one statement shared with the
/// requests taken in beside it (see [`together`]); a dispatch round follows. Returns false,
/// having written nothing, when the id was taken already.
pub async fn at_intake(state: &AppState, request: &DeliveryRequest) -> Result<bool, PrepareError> {
    let stored = state.together.store(request.clone()).await?;
    if stored.created {
        let summary = &stored.summary;
        tracing::info!(recipients = summary.recipients, chunks = summary.chunks, "Audience prepared.");
        dispatch_after_prepare(state).await;
    }
    Ok(stored.created)
}

/// What runs as each chunk is stored: a dispatch round, in the background.
fn dispatch_now(state: &AppState) -> impl Fn() + Sync + use<> {
    let dispatcher = state.dispatcher.clone();
    move || {
        let dispatcher = dispatcher.clone();
        tokio::spawn(async move { dispatcher.run().await }.in_current_span());
    }
}

/// The dispatch round once a request is prepared.
async fn dispatch_after_prepare(state: &AppState) {
    if let Err(err) = state.dispatcher.run().await {
        tracing::warn!(error = %err, "Dispatch after prepare failed; the next event will retry it.");
    }
}

async fn fail(state: &AppState, id: &RequestId, reason: &str) -> Result<Prepared, Unavailable> {
    tracing::warn!(%reason, "Request failed.");
    records::fail_request(&state.store, id, RequestState::Preparing, reason).await?;
    Ok(Prepared::Failed(reason.to_owned()))
}
