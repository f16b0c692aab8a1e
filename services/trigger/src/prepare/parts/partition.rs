//! A cut: the rows a group of shards gave some partitions, de-duplicated exactly and cut into
//! chunks.

use std::borrow::Cow;
use std::ops::Range;

use serde_json::value::RawValue;

use super::super::chunker::{AudienceSummary, ChunkTarget, Chunker};
use super::super::rows::RowAt;
use super::super::{PrepareError, records as chunk_records};
use super::kept::ShardObjects;
use super::records::{self, PartRow};
use super::shard::PartLine;
use super::{Cut, groups, part_object, partition_prefix};
use crate::AppState;
use haishin_shared::domain::{DeliveryRequest, RequestId};

/// Only the address key of a partition object's line: an earlier shard's row.
#[derive(serde::Deserialize)]
struct KeyOnly<'a> {
    #[serde(borrow)]
    k: Cow<'a, str>,
}

/// Reads the cut's partitions one after the other and cuts their chunks, numbered from its
/// `first_seq`. In each partition, the keys of the shards before the group are read first, so
/// that their rows win over the group's. When every shard up to the group's last was spread by
/// this instance lately, their objects are read from memory, as kept when they were written.
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
    let kept = state.parts.kept.all_of(&request.id, 0..group.end);
    let kept = kept.filter(|shards| shards.iter().all(|s| s.len() == partitions as usize));
    let mut objects = 0;
    for partition in (cut.residue..partitions).step_by(stride as usize) {
        let cutting = Cutting {
            chunker: &mut chunker,
            request: &request.id,
            partition,
            group: &group,
            sources: &sources,
        };
        objects += match &kept {
            Some(shards) => cutting.kept(state, shards).await?,
            None => cutting.stored(state).await?,
        };
    }
    chunker.flush().await?;
    tracing::info!(
        group = cut.group,
        objects,
        from_memory = kept.is_some(),
        recipients = chunker.summary.recipients,
        chunks = chunker.summary.chunks,
        "Partitions cut."
    );
    Ok((chunker.summary, Vec::new()))
}

/// One partition of a cut: the rows the `group`'s shards gave it, after the keys the shards
/// before the group gave it.
struct Cutting<'c, 'a> {
    chunker: &'c mut Chunker<'a>,
    request: &'c RequestId,
    partition: u32,
    group: &'c Range<u32>,
    sources: &'c [String],
}

impl Cutting<'_, '_> {
    /// Feeds the partition's objects, listed and read from Cloud Storage, to the chunker;
    /// returns how many were read.
    async fn stored(mut self, state: &AppState) -> Result<usize, PrepareError> {
        let prefix = partition_prefix(self.request, self.partition);
        let objects = state.blobs.list(&state.bucket, &prefix).await?;
        let shard_of = |object: &str| -> Option<u32> { object.strip_prefix(&prefix)?.get(..5)?.parse().ok() };
        // Every copy of an address is in one partition: what the chunker keeps of the others
        // never meets this one's.
        self.chunker.forget_keys();
        let mut read = 0;
        for object in &objects {
            let Some(shard) = shard_of(object) else { continue };
            if shard >= self.group.end {
                continue;
            }
            let data = state.blobs.read_all(&state.bucket, object).await?;
            read += 1;
            self.feed(state, shard, object, &data).await?;
        }
        Ok(read)
    }

    /// Feeds the partition's objects as kept by the shards' spreading here, in the order a
    /// listing gives them (by shard, then as written).
    async fn kept(
        mut self,
        state: &AppState,
        shards: &[std::sync::Arc<ShardObjects>],
    ) -> Result<usize, PrepareError> {
        self.chunker.forget_keys();
        let mut read = 0;
        for (shard, objects) in (0..self.group.end).zip(shards) {
            for (n, data) in objects[self.partition as usize].iter().enumerate() {
                read += 1;
                let object = part_object(self.request, self.partition, shard, n as u32);
                self.feed(state, shard, &object, data).await?;
            }
        }
        Ok(read)
    }

    /// Feeds one object of the partition: the keys of a shard before the group, or the rows of
    /// one of its own.
    async fn feed(
        &mut self,
        state: &AppState,
        shard: u32,
        object: &str,
        data: &[u8],
    ) -> Result<(), PrepareError> {
        let unreadable = |e: serde_json::Error| {
            PrepareError::Unusable(format!("gs://{}/{object} is unreadable: {e}", state.bucket))
        };
        let lines = data.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        if shard < self.group.start {
            for line in lines {
                let key: KeyOnly<'_> = serde_json::from_slice(line).map_err(unreadable)?;
                self.chunker.keep_out(&key.k);
            }
            return Ok(());
        }
        for line in lines {
            let part: PartLine<Box<RawValue>> = serde_json::from_slice(line).map_err(unreadable)?;
            let source = self.sources.get(part.s as usize).map_or("?", String::as_str);
            let at = RowAt { source, line: part.l };
            self.chunker.push_checked(part.k, part.r.get().as_bytes(), at).await?;
        }
        Ok(())
    }
}
