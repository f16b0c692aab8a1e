//! A shard: one audience file read, its rows checked, and the valid ones spread over the
//! request's partitions.
//!
//! Each partition's rows gather in a buffer, written out as the partition's next object of this
//! shard when it reaches [`PIECE_BYTES`], or, when all buffers together reach [`BUFFERED_BYTES`],
//! the largest one is: a shard holds at most that much, whatever the file's size. Which buffer is
//! written when depends on the rows alone, so a shard read again writes the same objects.

use std::ops::Range;

use futures::{StreamExt, TryStreamExt};
use haishin_shared::domain::{DeliveryRequest, FileFormat, Recipient};
use haishin_shared::gcp::{Blobs, GcpError};
use haishin_shared::suppression::address_key;
use serde::Serialize;

use super::super::chunker::{AudienceSummary, check_columns};
use super::super::recipient::{Skip, check};
use super::super::rows::{RowAt, RowSink};
use super::super::{PrepareError, audience};
use super::kept::ShardObjects;
use super::ranges::{self, Shard};
use super::records::PartRow;
use super::{part_object, partition_of};
use crate::AppState;

/// A partition's piece of a shard is written once it holds this much.
const PIECE_BYTES: usize = 1024 * 1024;
/// What a shard holds at most before it writes its largest buffer.
const BUFFERED_BYTES: usize = 8 * 1024 * 1024;
/// How far into a CSV file its header row may end.
const HEADER_BYTES: u64 = 64 * 1024;

/// A valid row as a partition object holds it: the address key, where the row was (shard, line),
/// and the recipient as its chunk will hold it.
#[derive(Serialize, serde::Deserialize)]
pub(super) struct PartLine<R> {
    pub k: String,
    pub s: u32,
    pub l: u64,
    pub r: R,
}

/// Reads the shard's file (or its range of it) into its partitions; returns what it found and
/// its valid rows by partition.
pub(super) async fn run(
    state: &AppState,
    request: &DeliveryRequest,
    shard: u32,
    row: &PartRow,
) -> Result<(AudienceSummary, Vec<i64>), PrepareError> {
    let part = row.shard().ok_or_else(|| PrepareError::Unusable(format!("shard {shard} names no file")))?;
    let partitions = row.partitions.unwrap_or(1).max(1) as u32;
    let mut spread = Spreader {
        blobs: &state.blobs,
        bucket: &state.bucket,
        request,
        shard,
        buffers: vec![Vec::new(); partitions as usize],
        written: vec![0; partitions as usize],
        rows: vec![0; partitions as usize],
        buffered: 0,
        line_offset: 0,
        summary: AudienceSummary::default(),
        kept: state
            .parts
            .kept
            .may_keep(&request.id, part.bytes)
            .then(|| vec![Vec::new(); partitions as usize]),
        kept_bytes: 0,
        most_kept: state.parts.kept.shard_most(),
    };
    match &part.range {
        None => audience::read_object(&mut spread, &state.blobs, &part.file).await?,
        Some(range) => read_range(&mut spread, &state.blobs, &part, range.clone()).await?,
    }
    for p in 0..partitions {
        spread.write(p).await?;
    }
    if let Some(objects) = spread.kept.take() {
        state.parts.kept.keep(&request.id, shard, objects);
    }
    tracing::info!(
        rows = spread.summary.rows,
        file = %part.file.name(),
        first_line = part.first_line,
        "Shard spread over its partitions."
    );
    Ok((spread.summary, spread.rows))
}

/// Reads a range of a file: a CSV file's header row first, unless the range starts with it.
async fn read_range(
    spread: &mut Spreader<'_>,
    blobs: &Blobs,
    shard: &Shard,
    range: Range<u64>,
) -> Result<(), PrepareError> {
    let file = &shard.file;
    let unreadable = |e: GcpError| match e {
        GcpError::Permanent { detail, .. } => {
            PrepareError::Unusable(format!("cannot read {}: {detail}", file.name()))
        }
        other => other.into(),
    };
    let body = blobs.read_range(&file.bucket, &file.object, range.start, range.end - range.start).await;
    let body = body.map_err(unreadable)?;
    // The line the reader numbers 1 is the file's `first_line`, or the header's line.
    let mut given_first_line = 1;
    let stream = if range.start == 0 || file.format == FileFormat::Ndjson {
        body
    } else {
        let head = blobs.read_range(&file.bucket, &file.object, 0, HEADER_BYTES).await.map_err(unreadable)?;
        let head: Vec<u8> = head.map_ok(|b| b.to_vec()).try_concat().await?;
        let header = ranges::header_of(&head).ok_or_else(|| {
            PrepareError::Unusable(format!(
                "{}: no header row ends in its first {HEADER_BYTES} bytes",
                file.name()
            ))
        })?;
        given_first_line += header.iter().filter(|&&b| b == b'\n').count() as u64;
        let header = bytes::Bytes::copy_from_slice(header);
        futures::stream::once(async move { Ok(header) }).chain(body).boxed()
    };
    spread.line_offset = shard.first_line.saturating_sub(given_first_line);
    audience::read_file(spread, stream, file.format, &file.name()).await
}

struct Spreader<'a> {
    blobs: &'a Blobs,
    bucket: &'a str,
    request: &'a DeliveryRequest,
    shard: u32,
    /// Each partition's rows not written yet.
    buffers: Vec<Vec<u8>>,
    /// Objects written to each partition.
    written: Vec<u32>,
    /// Valid rows given to each partition.
    rows: Vec<i64>,
    /// The buffers' bytes together.
    buffered: usize,
    /// How many lines of the file precede the first the reader numbers as its own.
    line_offset: u64,
    summary: AudienceSummary,
    /// The objects written, for the cuts of this instance (see `kept`); `None` for a shard too
    /// large to keep, or once its objects outgrew `most_kept` bytes.
    kept: Option<ShardObjects>,
    kept_bytes: usize,
    most_kept: usize,
}

impl RowSink for Spreader<'_> {
    fn columns(&mut self, source: &str, columns: &[&str]) -> Result<(), PrepareError> {
        check_columns(self.request, source, columns)
    }

    async fn row(&mut self, row: Result<Recipient, Skip>, at: RowAt<'_>) -> Result<(), PrepareError> {
        self.summary.rows += 1;
        let at = RowAt { line: at.line + self.line_offset, ..at };
        let recipient = match row.and_then(check) {
            Ok(r) => r,
            Err(reason) => {
                self.summary.skip(reason, at.source, at.line);
                return Ok(());
            }
        };
        let key = address_key(&recipient.email);
        let p = partition_of(&key, self.buffers.len() as u32);
        let buffer = &mut self.buffers[p as usize];
        let before = buffer.len();
        let line = PartLine { k: key, s: self.shard, l: at.line, r: &recipient };
        serde_json::to_writer(&mut *buffer, &line).map_err(|e| PrepareError::Unusable(e.to_string()))?;
        buffer.push(b'\n');
        self.buffered += buffer.len() - before;
        self.rows[p as usize] += 1;
        if buffer.len() >= PIECE_BYTES {
            self.write(p).await?;
        } else if self.buffered >= BUFFERED_BYTES {
            let largest = (0..self.buffers.len()).max_by_key(|&i| self.buffers[i].len()).unwrap_or(0);
            self.write(largest as u32).await?;
        }
        Ok(())
    }
}

impl Spreader<'_> {
    /// Writes a partition's buffer as its next object, if it holds anything.
    async fn write(&mut self, p: u32) -> Result<(), PrepareError> {
        let data = std::mem::take(&mut self.buffers[p as usize]);
        if data.is_empty() {
            return Ok(());
        }
        self.buffered -= data.len();
        let n = self.written[p as usize];
        let object = part_object(&self.request.id, p, self.shard, n);
        let data = bytes::Bytes::from(data);
        self.blobs.write(self.bucket, &object, data.clone()).await?;
        self.written[p as usize] = n + 1;
        self.kept_bytes += data.len();
        match &mut self.kept {
            Some(_) if self.kept_bytes > self.most_kept => self.kept = None,
            Some(kept) => kept[p as usize].push(data),
            None => {}
        }
        Ok(())
    }
}
