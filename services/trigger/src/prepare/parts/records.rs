//! What the parts of a large audience's preparation write: the parts themselves, their claims,
//! what each found, and the hand-over from shards to partitions.

use std::time::Duration;

use haishin_shared::domain::{FileFormat, RequestId, RequestState};
use haishin_shared::messages::PreparePart;
use haishin_shared::store::{Result, Store};

use super::super::audience::AudienceFile;
use super::super::chunker::AudienceSummary;
use super::ranges::Shard;
use super::{Cut, closed_groups, groups};

/// A part taken by this worker.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PartRow {
    pub(crate) bucket: Option<String>,
    pub(crate) object: Option<String>,
    pub(crate) format: Option<String>,
    pub(crate) first_seq: Option<i32>,
    /// Rows the shards wrote to this partition (partitions), 0 for a shard.
    pub(crate) rows: i64,
    pub(crate) partitions: Option<i32>,
    pub(crate) start_byte: Option<i64>,
    pub(crate) end_byte: Option<i64>,
    pub(crate) first_line: Option<i64>,
    /// A cut's partitions: those whose number is its own modulo this.
    pub(crate) stride: Option<i32>,
}

impl PartRow {
    /// A shard's file, or range of it.
    pub(crate) fn shard(&self) -> Option<Shard> {
        let format = match self.format.as_deref()? {
            "ndjson" => FileFormat::Ndjson,
            _ => FileFormat::Csv,
        };
        let file =
            AudienceFile { bucket: self.bucket.clone()?, object: self.object.clone()?, format, size: 0 };
        let range = match (self.start_byte, self.end_byte) {
            (Some(start), Some(end)) => Some(start.max(0) as u64..end.max(0) as u64),
            _ => None,
        };
        Some(Shard { file, range, first_line: self.first_line.unwrap_or(1).max(1) as u64, bytes: 0 })
    }
}

/// What taking a part came to.
#[derive(Debug)]
pub(crate) enum PartClaim {
    Claimed(PartRow),
    /// Another worker holds it.
    Busy,
    /// Done already.
    Done,
    /// The request is no longer being prepared (failed, say), or the part is unknown.
    Past(Option<RequestState>),
}

/// The parts of a kind not done yet.
pub(crate) async fn unfinished(store: &Store, id: &RequestId, kind: &str) -> Result<Vec<u32>> {
    let indexes: Vec<i32> = sqlx::query_scalar(
        "SELECT index FROM prepare_parts WHERE request_id = $1 AND kind = $2 AND NOT done ORDER BY index",
    )
    .bind(id)
    .bind(kind)
    .fetch_all(store.pool())
    .await?;
    Ok(indexes.into_iter().map(|i| i.max(0) as u32).collect())
}

/// Takes a part for `lease`: one not done, whose request is being prepared, that no other worker
/// holds.
pub(crate) async fn claim(
    store: &Store,
    id: &RequestId,
    part: PreparePart,
    lease: Duration,
) -> Result<PartClaim> {
    let claimed = sqlx::query_as::<_, PartRow>(
        "UPDATE prepare_parts p SET lease_until = now() + $4
         FROM requests r
         WHERE p.request_id = $1 AND p.kind = $2 AND p.index = $3 AND NOT p.done
           AND (p.lease_until IS NULL OR p.lease_until < now())
           AND r.id = p.request_id AND r.state = 'preparing'
         RETURNING p.bucket, p.object, p.format, p.first_seq, p.rows, r.partitions, p.start_byte,
             p.end_byte, p.first_line, p.stride",
    )
    .bind(id)
    .bind(part.kind())
    .bind(part.index() as i32)
    .bind(lease)
    .fetch_optional(store.pool())
    .await?;
    if let Some(row) = claimed {
        return Ok(PartClaim::Claimed(row));
    }
    let found: Option<(RequestState, Option<bool>)> = sqlx::query_as(
        "SELECT r.state, p.done FROM requests r
         LEFT JOIN prepare_parts p ON p.request_id = r.id AND p.kind = $2 AND p.index = $3
         WHERE r.id = $1",
    )
    .bind(id)
    .bind(part.kind())
    .bind(part.index() as i32)
    .fetch_optional(store.pool())
    .await?;
    Ok(match found {
        Some((RequestState::Preparing, Some(true))) => PartClaim::Done,
        Some((RequestState::Preparing, Some(false))) => PartClaim::Busy,
        Some((state, _)) => PartClaim::Past(Some(state)),
        None => PartClaim::Past(None),
    })
}

/// Lets the next attempt at a part start at once.
pub(crate) async fn drop_lease(store: &Store, id: &RequestId, part: PreparePart) -> Result<()> {
    sqlx::query(
        "UPDATE prepare_parts SET lease_until = NULL
         WHERE request_id = $1 AND kind = $2 AND index = $3 AND NOT done",
    )
    .bind(id)
    .bind(part.kind())
    .bind(part.index() as i32)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// The request's shards, in order: each one's file (a file read in ranges once for each) and
/// about how many bytes of rows it holds.
pub(crate) async fn shards(store: &Store, id: &RequestId) -> Result<Vec<(String, u64)>> {
    let shards: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT 'gs://' || bucket || '/' || object, bytes FROM prepare_parts
         WHERE request_id = $1 AND kind = 'shard' ORDER BY index",
    )
    .bind(id)
    .fetch_all(store.pool())
    .await?;
    Ok(shards.into_iter().map(|(name, bytes)| (name, bytes.unwrap_or(0).max(0) as u64)).collect())
}

/// What a part found: its summary and, for a shard, its valid rows written to each partition.
pub(crate) struct Found<'a> {
    pub(crate) summary: &'a AudienceSummary,
    pub(crate) partition_rows: &'a [i64],
}

/// Ends a part with what it `found` (`None`: it was done already). Returns the cuts to start
/// once their shards are done (see [`open_cuts`]), or the request's whole summary when every
/// part is. The request's row is locked meanwhile, so that of two parts ending together,
/// one sees the other's end.
pub(crate) async fn finish(
    store: &Store,
    id: &RequestId,
    part: PreparePart,
    found: Option<Found<'_>>,
    chunk_size: usize,
    partition_bytes: u64,
) -> Result<Finished> {
    let mut tx = store.pool().begin().await?;
    sqlx::query("SELECT 1 FROM requests WHERE id = $1 FOR UPDATE").bind(id).execute(&mut *tx).await?;
    if let Some(Found { summary: found, partition_rows }) = found {
        record(&mut tx, id, part, found, partition_rows).await?;
    }
    let finished = match part {
        PreparePart::Shard(_) => {
            let open = open_cuts(&mut tx, id, chunk_size, partition_bytes).await?;
            // Every cut done already: a plan closed after the last of them ends the request.
            let summary = if open.is_empty() { summary_when_done(&mut tx, id).await? } else { None };
            match summary {
                Some(summary) => Finished::Request(Some(summary)),
                None => Finished::Partitions(open),
            }
        }
        PreparePart::Partition(_) => Finished::Request(summary_when_done(&mut tx, id).await?),
    };
    tx.commit().await?;
    Ok(finished)
}

async fn record(
    tx: &mut sqlx::PgConnection,
    id: &RequestId,
    part: PreparePart,
    found: &AudienceSummary,
    partition_rows: &[i64],
) -> Result<()> {
    sqlx::query(
        "UPDATE prepare_parts SET done = true, lease_until = NULL, rows = CASE WHEN kind = 'shard'
             THEN $4 ELSE rows END, recipients = $5, chunks = $6, skipped = $7, skipped_at = $8,
             partition_rows = $9
         WHERE request_id = $1 AND kind = $2 AND index = $3 AND NOT done",
    )
    .bind(id)
    .bind(part.kind())
    .bind(part.index() as i32)
    .bind(found.rows as i64)
    .bind(found.recipients as i64)
    .bind(found.chunks as i32)
    .bind(serde_json::to_value(&found.skipped).unwrap_or_default())
    .bind(serde_json::to_value(&found.skipped_at).unwrap_or_default())
    .bind(partition_rows)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// What ending a part led to.
#[derive(Debug)]
pub(crate) enum Finished {
    /// The cuts not done yet whose shards are.
    Partitions(Vec<u32>),
    /// The request's summary, when every partition is done.
    Request(Option<AudienceSummary>),
}

/// Records the cuts of each group of shards whose shards are done, and of every group before
/// it (the cuts of group `g` de-duplicate against the rows of every shard before the group),
/// and returns the cuts not done yet. A group's partitions are cut `stride` at a time, about a
/// partition's bytes of rows each, and each cut's first chunk number leaves room for every row
/// of the cuts recorded before it.
async fn open_cuts(
    tx: &mut sqlx::PgConnection,
    id: &RequestId,
    chunk_size: usize,
    partition_bytes: u64,
) -> Result<Vec<u32>> {
    let (partitions, plan_open): (i32, bool) =
        sqlx::query_as("SELECT COALESCE(partitions, 1), plan_open FROM requests WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
    let partitions = partitions.max(1) as u32;
    type ShardDone = (bool, Vec<i64>, Option<i64>);
    let shards: Vec<ShardDone> = sqlx::query_as(
        "SELECT done, partition_rows, bytes FROM prepare_parts
         WHERE request_id = $1 AND kind = 'shard' ORDER BY index",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    // A partition recorded without a stride was recorded before cuts were: it covers every
    // shard, and its request's partitions are all recorded already.
    let opened: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT DISTINCT index >> 16, stride IS NULL FROM prepare_parts
         WHERE request_id = $1 AND kind = 'partition'",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let legacy = opened.iter().any(|o| o.1);
    let opened: Vec<i32> = opened.into_iter().map(|o| o.0).collect();
    let chunk = chunk_size.max(1) as i64;
    let mut next_seq: i64 = sqlx::query_scalar(
        "SELECT COALESCE(max(first_seq + (rows + $2 - 1) / $2), 0)::bigint FROM prepare_parts
         WHERE request_id = $1 AND kind = 'partition'",
    )
    .bind(id)
    .bind(chunk)
    .fetch_one(&mut *tx)
    .await?;
    let bytes: Vec<u64> = shards.iter().map(|s| s.2.unwrap_or(0).max(0) as u64).collect();
    let (mut indexes, mut rows, mut firsts, mut strides) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // While the plan is open, its last group may still grow: only the groups closed are cut.
    let groups = if plan_open { closed_groups(&bytes) } else { groups(&bytes) };
    for (group, members) in groups.into_iter().enumerate() {
        let group = group as u32;
        if legacy || !shards[..members.end as usize].iter().all(|s| s.0) {
            break;
        }
        if !opened.contains(&(group as i32)) {
            let of_group = &shards[members.start as usize..members.end as usize];
            let bytes: u64 = of_group.iter().map(|s| s.2.unwrap_or(0).max(0) as u64).sum();
            let stride = bytes.div_ceil(partition_bytes.max(1)).clamp(1, u64::from(partitions));
            let stride = (stride as u32).next_power_of_two().min(partitions);
            for residue in 0..stride {
                let count: i64 = (residue..partitions)
                    .step_by(stride as usize)
                    .map(|p| of_group.iter().map(|s| s.1.get(p as usize).copied().unwrap_or(0)).sum::<i64>())
                    .sum();
                indexes.push(Cut { group, residue }.index() as i32);
                rows.push(count);
                firsts.push(next_seq as i32);
                strides.push(stride as i32);
                next_seq += (count + chunk - 1) / chunk;
            }
        }
    }
    sqlx::query(
        "INSERT INTO prepare_parts (request_id, kind, index, rows, first_seq, stride)
         SELECT $1, 'partition', i, r, f, s FROM unnest($2::int[], $3::bigint[], $4::int[], $5::int[])
             AS t(i, r, f, s)
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(&indexes)
    .bind(&rows)
    .bind(&firsts)
    .bind(&strides)
    .execute(&mut *tx)
    .await?;
    let open: Vec<i32> = sqlx::query_scalar(
        "SELECT index FROM prepare_parts WHERE request_id = $1 AND kind = 'partition' AND NOT done
         ORDER BY index",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    Ok(open.into_iter().map(|i| i.max(0) as u32).collect())
}

/// The request's summary, the sum of its parts', once every part is done.
async fn summary_when_done(tx: &mut sqlx::PgConnection, id: &RequestId) -> Result<Option<AudienceSummary>> {
    type Found = (String, bool, i64, i64, i32, serde_json::Value, serde_json::Value);
    let parts: Vec<Found> = sqlx::query_as(
        "SELECT kind, done, rows, recipients, chunks, skipped, skipped_at FROM prepare_parts
         WHERE request_id = $1 ORDER BY kind DESC, index",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let plan_open: bool = sqlx::query_scalar("SELECT plan_open FROM requests WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    let partitions = parts.iter().filter(|p| p.0 == "partition").count();
    if plan_open || partitions == 0 || parts.iter().any(|p| !p.1) {
        return Ok(None);
    }
    let mut summary = AudienceSummary::default();
    for (kind, _, rows, recipients, chunks, skipped, skipped_at) in parts {
        summary.add(AudienceSummary {
            // A partition's rows are the shards' rows again.
            rows: if kind == "shard" { rows.max(0) as u64 } else { 0 },
            recipients: recipients.max(0) as u64,
            chunks: chunks.max(0) as u32,
            skipped: serde_json::from_value(skipped).unwrap_or_default(),
            skipped_at: serde_json::from_value(skipped_at).unwrap_or_default(),
        });
    }
    Ok(Some(summary))
}
