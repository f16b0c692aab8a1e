//! The plan of a large audience: its files cut into shards, each recorded as it is found, so that
//! the first are spread while the rest of the audience is still being read (see the module above).
//! Until the reading ends the plan is open (`requests.plan_open`).

use futures::TryFutureExt;
use haishin_shared::domain::{DeliveryRequest, FileFormat, RequestId};
use haishin_shared::messages::PreparePart;
use haishin_shared::store::{Result, Store};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::super::audience::AudienceFile;
use super::super::{PrepareError, Prepared};
use super::ranges::{self, Shard};
use super::{SHARDS_AHEAD, run, start, start_shards};
use crate::AppState;
use crate::error::Unavailable;

/// Most shards a plan records in one statement, of those found while it recorded the last.
const RECORDED_AT_ONCE: usize = 1_000;

/// Plans a request's parts: cuts its files into shards and records each as it is found, so that
/// the first are spread while the rest of the audience is still being read. The first shard is
/// spread here, at once, and each of the next up to [`SHARDS_AHEAD`] gets its task as it is
/// found; the reading's end closes the plan. A crash meanwhile is covered by this plan's own
/// task, not acknowledged yet: redelivered, it plans again, finding the same shards, and creates
/// the tasks of those not done.
pub(crate) async fn plan(
    state: &AppState,
    request: &DeliveryRequest,
    files: &[AudienceFile],
) -> Result<Prepared, Unavailable> {
    let partitions = state.parts.partitions(files);
    let (found, shards) = mpsc::unbounded_channel();
    let read = async move {
        // The sender goes with the reading: the recording ends when the reading does.
        let found = found;
        ranges::shards(&state.blobs, files, state.parts.partition_bytes, &found).await.map_err(Stopped::Read)
    };
    let mut recording = Recording { state, id: &request.id, partitions, recorded: 0, first: None };
    // Whichever fails first stops the other: a plan that cannot record reads no further.
    let planned = futures::future::try_join(read, recording.record(shards).map_err(Stopped::Record)).await;
    recording.first_spread().await;
    match planned {
        Err(Stopped::Read(err)) if err.is_permanent() => {
            return super::super::fail(state, &request.id, &err.to_string()).await;
        }
        Err(Stopped::Read(err)) => return Err(Unavailable::Dependency(err.to_string())),
        Err(Stopped::Record(err)) => return Err(err),
        Ok(_) => {}
    }
    close_plan(&state.store, &request.id).await?;
    tracing::info!(
        files = files.len(),
        shards = recording.recorded,
        partitions,
        "Audience prepared in parts."
    );
    start_shards(state, &request.id).await
}

/// Why a plan stopped before it read the whole audience.
enum Stopped {
    Read(PrepareError),
    Record(Unavailable),
}

/// The shards of a plan recorded as they are found.
struct Recording<'a> {
    state: &'a AppState,
    id: &'a RequestId,
    partitions: u32,
    recorded: u32,
    /// The first shard, spread by this instance as soon as it was recorded.
    first: Option<JoinHandle<Result<Prepared, Unavailable>>>,
}

impl Recording<'_> {
    /// Records the shards as they are `found`, those found together at once, and starts the
    /// first [`SHARDS_AHEAD`]: the first here, the others by their tasks (the next ones get
    /// theirs as shards end).
    async fn record(&mut self, mut found: mpsc::UnboundedReceiver<Shard>) -> Result<(), Unavailable> {
        let mut shards = Vec::new();
        while found.recv_many(&mut shards, RECORDED_AT_ONCE).await > 0 {
            let first = self.recorded;
            record_shards(&self.state.store, self.id, first, &shards, self.partitions).await?;
            self.recorded += shards.len() as u32;
            shards.clear();
            for index in first..self.recorded.min(SHARDS_AHEAD as u32) {
                if index == 0 {
                    let (state, id) = (self.state.clone(), self.id.clone());
                    let spread = async move { run(&state, &id, PreparePart::Shard(0)).await };
                    self.first = Some(tokio::spawn(spread.in_current_span()));
                } else {
                    start(self.state, self.id, std::iter::once(PreparePart::Shard(index))).await?;
                }
            }
        }
        if self.recorded == 0 {
            // No shard at all: the plan is recorded all the same, and closes.
            record_shards(&self.state.store, self.id, 0, &[], self.partitions).await?;
        }
        Ok(())
    }

    /// Waits for the first shard's spreading (and its first cut), if it is under way: the
    /// plan's task covers it until then. Its result is its own: a shard left undone gets its
    /// task when the plan ends, or from the plan again.
    async fn first_spread(&mut self) {
        let Some(first) = self.first.take() else { return };
        let spread =
            first.await.map_err(|err| err.to_string()).and_then(|r| r.map_err(|err| err.to_string()));
        if let Err(err) = spread {
            tracing::warn!(error = %err, "First shard not spread here; its task will spread it.");
        }
    }
}

/// The request's partition count, once its plan has recorded every shard and it is still being
/// prepared.
pub(crate) async fn planned(store: &Store, id: &RequestId) -> Result<Option<u32>> {
    let partitions: Option<Option<i32>> = sqlx::query_scalar(
        "SELECT partitions FROM requests WHERE id = $1 AND state = 'preparing' AND NOT plan_open",
    )
    .bind(id)
    .fetch_optional(store.pool())
    .await?;
    Ok(partitions.flatten().map(|p| p.max(1) as u32))
}

/// Records shards of a request, numbered from `first`, and how many partitions they spread over;
/// the first record opens the plan (see [`close_plan`]). A shard recorded again changes nothing.
async fn record_shards(
    store: &Store,
    id: &RequestId,
    first: u32,
    shards: &[Shard],
    partitions: u32,
) -> Result<()> {
    let mut tx = store.pool().begin().await?;
    let buckets: Vec<&str> = shards.iter().map(|s| s.file.bucket.as_str()).collect();
    let objects: Vec<&str> = shards.iter().map(|s| s.file.object.as_str()).collect();
    let formats: Vec<&str> = shards
        .iter()
        .map(|s| match s.file.format {
            FileFormat::Ndjson => "ndjson",
            FileFormat::Csv => "csv",
        })
        .collect();
    let range = |end: bool| -> Vec<Option<i64>> {
        let at = |r: &std::ops::Range<u64>| if end { r.end } else { r.start };
        shards.iter().map(|s| s.range.as_ref().map(|r| at(r) as i64)).collect()
    };
    let first_lines: Vec<i64> = shards.iter().map(|s| s.first_line as i64).collect();
    let bytes: Vec<i64> = shards.iter().map(|s| s.bytes as i64).collect();
    sqlx::query(
        "INSERT INTO prepare_parts
             (request_id, kind, index, bucket, object, format, start_byte, end_byte, first_line, bytes)
         SELECT $1, 'shard', $9 + n - 1, b, o, f, s, e, l, y
         FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[],
                     $8::bigint[]) WITH ORDINALITY AS t(b, o, f, s, e, l, y, n)
         ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(&buckets)
    .bind(&objects)
    .bind(&formats)
    .bind(range(false))
    .bind(range(true))
    .bind(&first_lines)
    .bind(&bytes)
    .bind(first as i32)
    .execute(&mut *tx)
    .await?;
    // The plan opens with its first record; a plan taken up again finds it open still. Last,
    // so that the request's row, which every part's end locks, is held only for the commit.
    sqlx::query(
        "UPDATE requests SET plan_open = plan_open OR partitions IS NULL,
             partitions = COALESCE(partitions, $2)
         WHERE id = $1",
    )
    .bind(id)
    .bind(partitions as i32)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Closes a request's plan once every shard is recorded: its last group of shards can be cut,
/// and its parts summed.
async fn close_plan(store: &Store, id: &RequestId) -> Result<()> {
    sqlx::query("UPDATE requests SET plan_open = false WHERE id = $1").bind(id).execute(store.pool()).await?;
    Ok(())
}
