//! A large audience prepared in parts, each its own prepare task, so that the work spreads over
//! trigger instances, no instance holds more than about one partition's recipients, and the
//! first chunks are stored while most of the audience is still being read.
//!
//! 1. **Plan** (the request's prepare task): the audience's files are listed (a BigQuery audience
//!    exported first) and cut into shards: a large file is read in byte ranges, each ending
//!    where a row does, the first small and each next one twice as large up to a partition's
//!    size (see `ranges`). A `shard` part is recorded for each as it is found, with the number
//!    of partitions (a power of two, about [`Parts::partition_bytes`] of rows each): the plan
//!    spreads the first shard itself at once, and creates the tasks of the next ones up to
//!    [`SHARDS_AHEAD`] as they are found; each shard's end creates the next ones'. Until every
//!    shard is recorded the plan is open: its last group is not cut, nor the request summed.
//! 2. **Shards** (`shard`): a shard reads its range, checks each row (bad rows are skipped and
//!    counted there), and appends each valid one to its partition, chosen by a hash of the
//!    address key, as objects `requests/<id>/parts/<partition>/<shard>-<n>.json`.
//! 3. **Cuts** (`partition` parts): the shards fall in groups, shard 0 alone, then each group as
//!    few shards as hold the bytes of all before it (see [`groups`]). Once a group's shards and
//!    all before them are done, its rows are cut: each cut takes the group's rows of some
//!    partitions, keeps the first row of each address unless a shard before the group holds it
//!    (exact: every copy of an address is in the same partition, and the earlier shards' keys
//!    are read back), and cuts chunks numbered from its `first_seq`. The shard whose end opens
//!    cuts runs the first of them itself, at once (the others are tasks); when this instance
//!    spread every shard the cut needs, it reads them from memory, as kept when they were written
//!    (see `kept`), without a round trip to Cloud Storage. The last part to end
//!    sums the parts into the request's summary and hands the request to dispatch; its chunks
//!    were dispatched as they were stored.
//!
//! The groups double in bytes, so the earlier shards' keys are read back about once in all, and
//! the first chunks wait only for the first, small shard.
//!
//! Every step is idempotent: a part's objects, chunks and numbers are derived from the audience,
//! so a part redone after a crash or a redelivery writes the same again, and a part done already
//! only checks that what follows it has started.

mod kept;
mod partition;
pub(super) mod plan;
mod ranges;
pub(super) mod records;
mod shard;
mod turns;

use std::ops::Range;
use std::sync::Arc;

use haishin_shared::domain::RequestId;
use haishin_shared::messages::{PreparePart, PrepareTask};
use tokio::sync::Semaphore;
use turns::Turns;

use super::Prepared;
use super::audience::AudienceFile;
use crate::AppState;
use crate::error::Unavailable;
use records::{Finished, PartClaim};

/// Most partitions an audience is spread over.
const MAX_PARTITIONS: u64 = 4_096;
/// Shard tasks waiting in the queue at once, so that the cuts of the shards done are not queued
/// behind all the others.
const SHARDS_AHEAD: usize = 4;

/// How large audiences are prepared in parts.
#[derive(Clone, Debug)]
pub struct Parts {
    /// Rows (bytes of files) per partition.
    pub partition_bytes: u64,
    /// Parts this instance prepares at once.
    at_once: Arc<Semaphore>,
    /// Shards among them: one less, so that a cut never waits for the shards queued before it.
    /// Taken in the order of the shards' index, so that each request's first shard (and its
    /// first chunks) goes before any request's later ones.
    shards_at_once: Turns,
    /// The objects of the shards spread here lately, for the cuts that follow.
    kept: kept::Kept,
}

impl Parts {
    pub fn new(partition_bytes: u64, at_once: usize, kept_bytes: usize) -> Self {
        let at_once = at_once.max(1);
        Self {
            partition_bytes: partition_bytes.max(1),
            at_once: Arc::new(Semaphore::new(at_once)),
            shards_at_once: Turns::new((at_once - 1).max(1)),
            kept: kept::Kept::new(kept_bytes),
        }
    }

    /// Partitions for an audience of these files: a power of two, so that a group's cuts can
    /// take every second, fourth, ... partition.
    pub(super) fn partitions(&self, files: &[AudienceFile]) -> u32 {
        let bytes: u64 = files.iter().map(AudienceFile::row_bytes).sum();
        let partitions = bytes.div_ceil(self.partition_bytes).clamp(1, MAX_PARTITIONS) as u32;
        partitions.next_power_of_two().min(MAX_PARTITIONS as u32)
    }
}

/// The groups of shards whose rows are cut together, given each shard's bytes: shard 0 alone,
/// then each group as few shards as hold at least the bytes of all the groups before it, and the
/// shards left over. The groups double in bytes, so each group's cuts read back about as many
/// earlier keys as its own rows, and each waits for about as much spreading as the groups before
/// it take to send.
pub(super) fn groups(bytes: &[u64]) -> Vec<Range<u32>> {
    let mut groups = closed_groups(bytes);
    let start = groups.last().map_or(0, |g| g.end);
    if (start as usize) < bytes.len() {
        groups.push(start..bytes.len() as u32);
    }
    groups
}

/// The groups that no shard recorded after these can change: all but the shards left over.
pub(super) fn closed_groups(bytes: &[u64]) -> Vec<Range<u32>> {
    let (mut groups, mut start, mut before, mut current) = (Vec::new(), 0, 0u64, 0u64);
    for (i, &b) in bytes.iter().enumerate() {
        current += b.max(1);
        if current >= before {
            groups.push(start..i as u32 + 1);
            (start, before, current) = (i as u32 + 1, before + current, 0);
        }
    }
    groups
}

/// A cut: the rows of a group of shards in the partitions whose number is `residue` modulo the
/// cut's stride. As a part, its index is `group << 16 | residue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cut {
    pub(super) group: u32,
    pub(super) residue: u32,
}

impl Cut {
    pub(super) fn index(self) -> u32 {
        self.group << 16 | self.residue
    }

    pub(super) fn of_index(index: u32) -> Self {
        Self { group: index >> 16, residue: index & 0xffff }
    }
}

/// The partition of an address key among `partitions`: a hash that is the same in every trigger
/// instance and every release (FNV-1a, then mixed so that every bit counts in the modulo).
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    (hash % u64::from(partitions.max(1))) as u32
}

/// Where a shard's `n`th piece of a partition is written. Zero-padded, so that listing a
/// partition's objects gives them in shard order, and each shard's in the order written.
pub fn part_object(request: &RequestId, partition: u32, shard: u32, n: u32) -> String {
    format!("{}{shard:05}-{n:06}.json", partition_prefix(request, partition))
}

/// The prefix of a partition's objects.
pub(super) fn partition_prefix(request: &RequestId, partition: u32) -> String {
    format!("requests/{request}/parts/{partition:05}/")
}

/// Creates the tasks of the first [`SHARDS_AHEAD`] shards not done yet (again, for a plan that
/// was interrupted: a task of the same name is created once).
pub(super) async fn start_shards(state: &AppState, id: &RequestId) -> Result<Prepared, Unavailable> {
    let shards = queue_shards(state, id).await?;
    if shards == 0 {
        // Every shard is done: what follows them is checked as a shard's end checks it.
        return Box::pin(run(state, id, PreparePart::Shard(0))).await;
    }
    Ok(Prepared::InParts)
}

/// Creates the tasks of the next shards not done; returns how many shards are not done.
async fn queue_shards(state: &AppState, id: &RequestId) -> Result<usize, Unavailable> {
    let shards = records::unfinished(&state.store, id, "shard").await?;
    start(state, id, shards.iter().take(SHARDS_AHEAD).map(|&s| PreparePart::Shard(s))).await?;
    Ok(shards.len())
}

async fn start(
    state: &AppState,
    id: &RequestId,
    parts: impl Iterator<Item = PreparePart>,
) -> Result<(), Unavailable> {
    for part in parts {
        let task = PrepareTask { request_id: id.clone(), part: Some(part) };
        let name = haishin_shared::gcp::task_name(&format!("prepare:{id}:{}:{}", part.kind(), part.index()));
        state.prepare_queue.enqueue(Some(&name), &task).await?;
    }
    Ok(())
}

/// Runs one part of a request's preparation, and whatever its end starts.
#[tracing::instrument(skip_all, fields(request_id = %id, part = %part))]
pub async fn run(state: &AppState, id: &RequestId, part: PreparePart) -> Result<Prepared, Unavailable> {
    let shard_permit = match part {
        PreparePart::Shard(shard) => Some(state.parts.shards_at_once.take(shard).await),
        PreparePart::Partition(_) => None,
    };
    let _permit = state.parts.at_once.acquire().await.expect("the semaphore is never closed");
    let prepared = Box::pin(run_held(state, id, part)).await?;
    let Ended::Cuts(open) = prepared else { return Ok(prepared.into()) };
    // The first cut whose shards are done is cut here and now, by the instance that has just
    // spread the last of them, rather than waiting in the prepare queue behind the shard tasks
    // queued before it: the request's first chunks leave as soon as its first shard is spread.
    // The rest are tasks, for other instances. A crash meanwhile is covered by the shard's own
    // task, not acknowledged yet: redelivered, it finds the cut still open and starts it again.
    let (now, later) = open.split_first().map_or((None, &[][..]), |(first, rest)| (Some(*first), rest));
    start(state, id, later.iter().map(|&p| PreparePart::Partition(p))).await?;
    queue_shards(state, id).await?;
    drop(shard_permit);
    let Some(now) = now else { return Ok(Prepared::InParts) };
    match Box::pin(run_held(state, id, PreparePart::Partition(now))).await {
        Ok(_) => Ok(Prepared::InParts),
        // Another instance holds the cut, or held it and died: its task (created now, if it
        // was not already) takes it over once the lease runs out.
        Err(Unavailable::Busy(_)) => {
            start(state, id, std::iter::once(PreparePart::Partition(now))).await?;
            Ok(Prepared::InParts)
        }
        Err(err) => Err(err),
    }
}

/// What a part's end leads to: the cuts its shards opened, or what became of the request.
enum Ended {
    /// The cuts not done yet whose shards are (a shard's end).
    Cuts(Vec<u32>),
    Request(Prepared),
}

impl From<Ended> for Prepared {
    fn from(ended: Ended) -> Self {
        match ended {
            Ended::Cuts(_) => Prepared::InParts,
            Ended::Request(prepared) => prepared,
        }
    }
}

/// One part under its lease, with this instance's permits already held.
async fn run_held(state: &AppState, id: &RequestId, part: PreparePart) -> Result<Ended, Unavailable> {
    let ended = |prepared| Ok(Ended::Request(prepared));
    let row = match records::claim(&state.store, id, part, state.prepare_lease).await? {
        PartClaim::Claimed(row) => Some(row),
        PartClaim::Done => None,
        PartClaim::Busy => {
            return Err(Unavailable::Busy(format!("{part} of request {id} is being prepared")));
        }
        PartClaim::Past(past) => return ended(Prepared::Past(past)),
    };
    let Some(request) = state.store.request(id).await? else { return ended(Prepared::Past(None)) };
    let request = match request.request() {
        Ok(request) => request,
        Err(err) => return ended(super::fail(state, id, &err.to_string()).await?),
    };
    let found = match row {
        None => None,
        Some(row) => {
            let done = match part {
                PreparePart::Shard(shard) => Box::pin(shard::run(state, &request, shard, &row)).await,
                PreparePart::Partition(p) => Box::pin(partition::run(state, &request, p, &row)).await,
            };
            match done {
                Ok(found) => Some(found),
                Err(err) if err.is_permanent() => {
                    return ended(super::fail(state, id, &err.to_string()).await?);
                }
                Err(err) => {
                    let _ = records::drop_lease(&state.store, id, part).await;
                    return Err(Unavailable::Dependency(err.to_string()));
                }
            }
        }
    };
    let found = found.as_ref().map(|(summary, rows)| records::Found { summary, partition_rows: rows });
    let finished =
        records::finish(&state.store, id, part, found, state.chunk_size, state.parts.partition_bytes);
    match finished.await? {
        Finished::Partitions(open) => Ok(Ended::Cuts(open)),
        Finished::Request(None) => ended(Prepared::InParts),
        Finished::Request(Some(summary)) => {
            state.parts.kept.forget_request(id);
            super::records::finish_prepare(&state.store, id, &summary).await?;
            tracing::info!(
                rows = summary.rows,
                recipients = summary.recipients,
                chunks = summary.chunks,
                "Audience prepared."
            );
            super::dispatch_after_prepare(state).await;
            ended(Prepared::Chunks(summary.chunks))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread_evenly() {
        assert_eq!(partition_of("someone@example.com", 64), partition_of("someone@example.com", 64));
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("user{i}@example.com"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn partition_objects_list_in_shard_order() {
        let id = RequestId::from("r-1");
        let a = part_object(&id, 3, 2, 10);
        let b = part_object(&id, 3, 10, 0);
        assert!(a < b && a.starts_with(&partition_prefix(&id, 3)), "{a} {b}");
        assert!(a.ends_with(".json"), "the export lifecycle rule covers parts");
    }

    #[test]
    fn groups_of_shards_double_in_bytes_and_cover_every_shard_once() {
        // Shards doubling up to a most of 8, then 8 each.
        let bytes = [1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8, 3];
        assert_eq!(groups(&bytes), vec![0..1, 1..2, 2..3, 3..4, 4..6, 6..10, 10..12]);
        // Until every shard is recorded, the shards left over may yet close a group otherwise.
        assert_eq!(closed_groups(&bytes), vec![0..1, 1..2, 2..3, 3..4, 4..6, 6..10]);
        assert_eq!(closed_groups(&bytes[..5]), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(groups(&[5]), vec![0..1]);
        assert!(groups(&[]).is_empty());
    }

    #[test]
    fn a_cut_is_its_group_and_residue() {
        let cut = Cut { group: 5, residue: 4_095 };
        assert_eq!(Cut::of_index(cut.index()), cut);
        assert_eq!(Cut::of_index(3), Cut { group: 0, residue: 3 });
    }

    #[test]
    fn an_audience_gets_one_partition_per_partition_size() {
        let parts = Parts::new(100, 1, 0);
        let file = |size| AudienceFile {
            bucket: "b".into(),
            object: "o.csv".into(),
            format: haishin_shared::domain::FileFormat::Csv,
            size,
        };
        assert_eq!(parts.partitions(&[file(250)]), 4, "a power of two");
        assert_eq!(parts.partitions(&[file(200)]), 2);
        assert_eq!(parts.partitions(&[file(50), file(50)]), 1);
        assert_eq!(Parts::new(1, 1, 0).partitions(&[file(u64::MAX)]), MAX_PARTITIONS as u32);
    }
}
