//! A cut: the rows a group of shards gave some partitions, de-duplicated exactly and cut into
//! chunks.

use std::borrow::Cow;
use std::ops::Range;

use serde_json::value::RawValue;

use super::super::chunker::{AudienceSummary, ChunkTarget, Chunker};
use super::super::rows::RowAt;
use super::super::{PrepareError, records as chunk_records};
use super::records::{self, PartRow};
use super::shard::PartLine;
use super::{Cut, groups, partition_prefix};
use crate::AppState;
use haishin_shared::domain::DeliveryRequest;

/// Only the address key of a partition object's line: an earlier shard's row.
#[derive(serde::Deserialize)]
struct KeyOnly<'a> {
    #[serde(borrow)]
    k: Cow<'a, str>,
}

/// Reads the cut's partitions one after the other and cuts their chunks, numbered from its
/// `first_seq`. In each partition, the keys of the shards before the group are read first, so
/// that their rows win over the group's.
pub(super) async fn run(
    state: &AppState,
    request: &DeliveryRequest,
    index: u32,
    row: &PartRow,
) -> Result<(AudienceSummary, Vec<i64>), PrepareError> {
    let cut = Cut::of_index(index);
    let partitions = row.partitions.unwrap_or(1).max(1) as u32;

    let first = row.first_seq.unwrap_or(0).max(0) as u32;
    let most = u64::try_from(row.rows).unwrap_or(0).div_ceil(state.chunk_size.max(1) as u64);
    let end = first.saturating_add(u32::try_from(most).unwrap_or(u32::MAX));
    let handed_on = chunk_records::clear_chunks(&state.store, &request.id, first..end).await?;
    let shards = records::shards(&state.store, &request.id).await?;
    let bytes: Vec<u64> = shards.iter().map(|s| s.1).collect();
    let (group, stride) = match row.stride {
        Some(stride) => {
            (groups(&bytes).get(cut.group as usize).cloned().unwrap_or_default(), stride.max(1) as u32)
        }
        // Recorded before cuts were: one partition, of every shard.
        None => (0..bytes.len() as u32, partitions),
    };
    let sources: Vec<String> = shards.into_iter().map(|s| s.0).collect();
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
    let mut objects = 0;
    for partition in (cut.residue..partitions).step_by(stride as usize) {
        objects += cut_partition(state, &mut chunker, &request.id, partition, &group, &sources).await?;
    }
    chunker.flush().await?;
    tracing::info!(
        group = cut.group,
        objects,
        recipients = chunker.summary.recipients,
        chunks = chunker.summary.chunks,
        "Partitions cut."
    );
    Ok((chunker.summary, Vec::new()))
}

/// Feeds one partition's rows of the `group`'s shards to the chunker, after the keys the shards
/// before the group gave it; returns how many objects were read.
async fn cut_partition(
    state: &AppState,
    chunker: &mut Chunker<'_>,
    request: &haishin_shared::domain::RequestId,
    partition: u32,
    group: &Range<u32>,
    sources: &[String],
) -> Result<usize, PrepareError> {
    let prefix = partition_prefix(request, partition);
    let objects = state.blobs.list(&state.bucket, &prefix).await?;
    let shard_of = |object: &str| -> Option<u32> { object.strip_prefix(&prefix)?.get(..5)?.parse().ok() };
    let unreadable = |object: &str, e: serde_json::Error| {
        PrepareError::Unusable(format!("gs://{}/{object} is unreadable: {e}", state.bucket))
    };
    let mut read = 0;
    // Every copy of an address is in one partition: what the chunker keeps of the others never
    // meets this one's.
    chunker.forget_keys();
    for object in &objects {
        let Some(shard) = shard_of(object) else { continue };
        if shard >= group.end {
            continue;
        }
        let data = state.blobs.read_all(&state.bucket, object).await?;
        read += 1;
        let lines = data.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        if shard < group.start {
            for line in lines {
                let key: KeyOnly<'_> = serde_json::from_slice(line).map_err(|e| unreadable(object, e))?;
                chunker.keep_out(&key.k);
            }
            continue;
        }
        for line in lines {
            let part: PartLine<Box<RawValue>> =
                serde_json::from_slice(line).map_err(|e| unreadable(object, e))?;
            let source = sources.get(part.s as usize).map_or("?", String::as_str);
            let at = RowAt { source, line: part.l };
            chunker.push_checked(part.k, part.r.get().as_bytes(), at).await?;
        }
    }
    Ok(read)
}
