//! A partition: every valid row the shards gave it, de-duplicated exactly and cut into chunks.

use serde_json::value::RawValue;

use super::super::chunker::{AudienceSummary, ChunkTarget, Chunker};
use super::super::rows::RowAt;
use super::super::{PrepareError, records as chunk_records};
use super::partition_prefix;
use super::records::{self, PartRow};
use super::shard::PartLine;
use crate::AppState;
use haishin_shared::domain::DeliveryRequest;

/// Reads the partition's objects in order and cuts its chunks, numbered from its `first_seq`.
pub(super) async fn run(
    state: &AppState,
    request: &DeliveryRequest,
    partition: u32,
    row: &PartRow,
) -> Result<(AudienceSummary, Vec<i64>), PrepareError> {
    let first = row.first_seq.unwrap_or(0).max(0) as u32;
    let most = u64::try_from(row.rows).unwrap_or(0).div_ceil(state.chunk_size.max(1) as u64);
    let end = first.saturating_add(u32::try_from(most).unwrap_or(u32::MAX));
    let handed_on = chunk_records::clear_chunks(&state.store, &request.id, first..end).await?;
    let sources = records::shard_names(&state.store, &request.id).await?;
    let dispatch_now = super::super::dispatch_now(state);
    let target = ChunkTarget {
        blobs: &state.blobs,
        store: &state.store,
        bucket: &state.bucket,
        request,
        chunk_size: state.chunk_size,
        on_chunk: &dispatch_now,
    };
    let mut chunker = Chunker::new(target, first, handed_on);
    let objects = state.blobs.list(&state.bucket, &partition_prefix(&request.id, partition)).await?;
    for object in &objects {
        let data = state.blobs.read_all(&state.bucket, object).await?;
        for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let part: PartLine<Box<RawValue>> = serde_json::from_slice(line).map_err(|e| {
                PrepareError::Unusable(format!("gs://{}/{object} is unreadable: {e}", state.bucket))
            })?;
            let source = sources.get(part.s as usize).map_or("?", String::as_str);
            let at = RowAt { source, line: part.l };
            chunker.push_checked(part.k, part.r.get().as_bytes(), at).await?;
        }
    }
    chunker.flush().await?;
    tracing::info!(
        objects = objects.len(),
        recipients = chunker.summary.recipients,
        chunks = chunker.summary.chunks,
        "Partition prepared."
    );
    Ok((chunker.summary, Vec::new()))
}
