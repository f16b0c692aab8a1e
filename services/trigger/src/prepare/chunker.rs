//! Filling chunks: recipients are de-duplicated exactly (by their address key), checked against the
//! suppressions (one query per chunk), written to Cloud Storage `chunk_size` candidates at a
//! time, and each chunk is recorded as it is written, so that it can be dispatched while the rest
//! of the audience is still being read. A chunk of an inline audience (at most 10,000
//! recipients, already in the request's body) keeps its lines in its row instead of an object.
//!
//! A chunk's candidates are the de-duplicated recipients from `(seq - first) × chunk_size` on,
//! `chunk_size` of them, where `first` is the chunker's first chunk number (0, or a partition's
//! `first_seq`: see `parts`), whatever the suppressions say, so the chunks of a prepare step
//! repeated after an interruption line up with the first attempt's. A chunk the first attempt
//! already handed on keeps its object and row (suppressions may have changed since); the summary
//! counts what it holds. A chunk whose candidates are all suppressed is not written.
//!
//! A request cancelled while it is prepared is read to its end all the same, so that its summary
//! counts the whole audience, but its chunks from then on are recorded `cancelled` and their
//! objects, which nothing will read, are not written.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use haishin_shared::domain::{
    Audience, ChunkId, ChunkState, DeliveryRequest, Recipient, chunk_object, template,
};
use haishin_shared::gcp::Blobs;
use haishin_shared::store::Store;
use haishin_shared::suppression::{KnownSuppressions, address_key, scopes_of, suppressed_among};
use serde::Serialize;

use super::PrepareError;
use super::recipient::{Skip, check};
use super::records::{self, NewChunk};
use super::rows::{RowAt, RowSink};

/// What the prepare step found in an audience.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct AudienceSummary {
    /// Rows read, valid or not.
    pub rows: u64,
    /// Recipients kept (valid, not repeated, not suppressed).
    pub recipients: u64,
    /// Rows skipped, by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Where the first few rows skipped for each reason are (`SOURCE:LINE`, at most
    /// [`EXAMPLES_PER_REASON`]), so that whoever made the file can find them.
    pub skipped_at: BTreeMap<String, Vec<String>>,
    pub chunks: u32,
}

impl AudienceSummary {
    /// Counts a row skipped, and points at it if it is among the first of its reason.
    pub(super) fn skip(&mut self, reason: Skip, source: &str, line: u64) {
        self.skip_many(reason, 1);
        let examples = self.skipped_at.entry(reason.as_str().to_owned()).or_default();
        if examples.len() < EXAMPLES_PER_REASON {
            examples.push(format!("{source}:{line}"));
        }
    }

    pub(super) fn skip_many(&mut self, reason: Skip, count: u64) {
        if count > 0 {
            *self.skipped.entry(reason.as_str().to_owned()).or_default() += count;
        }
    }

    /// Adds another part's findings to these: counts summed, examples kept up to the limit in the
    /// order the parts are added.
    pub(super) fn add(&mut self, other: AudienceSummary) {
        self.rows += other.rows;
        self.recipients += other.recipients;
        self.chunks += other.chunks;
        for (reason, count) in other.skipped {
            *self.skipped.entry(reason).or_default() += count;
        }
        for (reason, at) in other.skipped_at {
            let examples = self.skipped_at.entry(reason).or_default();
            let room = EXAMPLES_PER_REASON.saturating_sub(examples.len());
            examples.extend(at.into_iter().take(room));
        }
    }
}

/// How many skipped rows of each reason the summary points at.
pub(super) const EXAMPLES_PER_REASON: usize = 5;

/// A file whose columns leave a placeholder of the template without a value fails before any of
/// its rows becomes a chunk.
pub(super) fn check_columns(
    request: &DeliveryRequest,
    source: &str,
    columns: &[&str],
) -> Result<(), PrepareError> {
    let needed = template::placeholders(&request.template).map_err(PrepareError::Unusable)?;
    let given: serde_json::Map<String, serde_json::Value> =
        columns.iter().map(|c| ((*c).to_owned(), serde_json::Value::String(String::new()))).collect();
    match template::missing_value(&request.template, &needed, &given) {
        Some(name) => Err(PrepareError::Unusable(format!(
            "{source}: the template uses `{name}`, which the file has no column for (its columns: {})",
            columns.join(", ")
        ))),
        None => Ok(()),
    }
}

impl RowSink for Chunker<'_> {
    fn columns(&mut self, source: &str, columns: &[&str]) -> Result<(), PrepareError> {
        check_columns(self.target.request, source, columns)
    }

    async fn row(&mut self, row: Result<Recipient, Skip>, at: RowAt<'_>) -> Result<(), PrepareError> {
        self.push(row, at).await
    }
}

/// A recipient of the chunk being filled: its key, its line in the buffer, and where it was read.
struct Candidate {
    key: String,
    line: Range<usize>,
    source: usize,
    at_line: u64,
}

/// Where chunks go, and how large they are.
#[derive(Clone, Copy)]
pub(super) struct ChunkTarget<'a> {
    pub blobs: &'a Blobs,
    pub store: &'a Store,
    pub bucket: &'a str,
    pub request: &'a DeliveryRequest,
    pub chunk_size: usize,
    /// Runs after each chunk is stored.
    pub on_chunk: &'a (dyn Fn() + Sync),
}

/// Fills chunks and writes them.
pub(super) struct Chunker<'a> {
    target: ChunkTarget<'a>,
    /// The address keys kept so far. Exact: two addresses are one recipient only when their keys
    /// are equal. Its size is what bounds the memory of a prepare step, which is why a large
    /// audience is prepared a partition at a time.
    seen: HashSet<Box<str>>,
    /// The scopes of suppressions that hold for this request.
    scopes: Vec<String>,
    /// The recipients of the chunk being filled, as NDJSON lines, and who they are.
    buffer: Vec<u8>,
    candidates: Vec<Candidate>,
    /// The sources rows were read from (files, or `inline`), which candidates point into: one
    /// name per file.
    sources: Vec<String>,
    /// The next chunk's place in the audience.
    seq: u32,
    /// Chunks an earlier attempt handed on (by `seq`), with their recipients: left as they are.
    handed_on: BTreeMap<u32, i32>,
    /// The request's cancel was seen: chunks are recorded `cancelled`, their objects not written.
    cancelled: bool,
    /// Chunks kept for the caller to write instead of being stored one by one (see
    /// [`Chunker::holding`]).
    held: Option<Vec<NewChunk>>,
    /// The suppressions of every address, when read beforehand; otherwise each chunk asks.
    known: Option<&'a KnownSuppressions>,
    pub(super) summary: AudienceSummary,
}

impl<'a> Chunker<'a> {
    /// A chunker whose first chunk is number `first_seq`.
    pub(super) fn new(target: ChunkTarget<'a>, first_seq: u32, handed_on: BTreeMap<u32, i32>) -> Self {
        Self {
            target: ChunkTarget { chunk_size: target.chunk_size.max(1), ..target },
            seen: HashSet::default(),
            scopes: scopes_of(&target.request.labels),
            buffer: Vec::new(),
            candidates: Vec::new(),
            sources: Vec::new(),
            seq: first_seq,
            handed_on,
            cancelled: false,
            held: None,
            known: None,
            summary: AudienceSummary::default(),
        }
    }

    /// A chunker for a request not stored yet: its chunks are kept, not stored, and handed over
    /// by [`Chunker::into_held`] to be written with the request. `known`: the suppressions of
    /// its addresses, read already.
    pub(super) fn holding(target: ChunkTarget<'a>, known: Option<&'a KnownSuppressions>) -> Self {
        Self { held: Some(Vec::new()), known, ..Self::new(target, 0, BTreeMap::new()) }
    }

    /// What was found, and the chunks kept by a [`Chunker::holding`].
    pub(super) fn into_held(self) -> (AudienceSummary, Vec<NewChunk>) {
        (self.summary, self.held.unwrap_or_default())
    }

    fn skip(&mut self, reason: Skip, source: &str, line: u64) {
        self.summary.skip(reason, source, line);
    }

    fn skip_many(&mut self, reason: Skip, count: u64) {
        self.summary.skip_many(reason, count);
    }

    pub(super) async fn push(
        &mut self,
        row: Result<Recipient, Skip>,
        at: RowAt<'_>,
    ) -> Result<(), PrepareError> {
        self.summary.rows += 1;
        let recipient = match row.and_then(check) {
            Ok(r) => r,
            Err(reason) => {
                self.skip(reason, at.source, at.line);
                return Ok(());
            }
        };
        let key = address_key(&recipient.email);
        if self.seen.contains(key.as_str()) {
            self.skip(Skip::Duplicate, at.source, at.line);
            return Ok(());
        }
        let start = self.buffer.len();
        serde_json::to_writer(&mut self.buffer, &recipient)
            .map_err(|e| PrepareError::Unusable(e.to_string()))?;
        self.keep(key, start, at).await
    }

    /// Keeps an address out: a row of it seen from now on is a duplicate (an earlier part kept
    /// its first row).
    pub(super) fn keep_out(&mut self, key: &str) {
        if !self.seen.contains(key) {
            self.seen.insert(key.into());
        }
    }

    /// Forgets the address keys kept so far, for rows none of which can share an address with
    /// those before (another partition's).
    pub(super) fn forget_keys(&mut self) {
        self.seen = HashSet::default();
    }

    /// Takes a recipient checked already (a partition's, written by a shard step): its address
    /// key and its line as the chunk object holds it. The row was counted where it was read.
    pub(super) async fn push_checked(
        &mut self,
        key: String,
        line: &[u8],
        at: RowAt<'_>,
    ) -> Result<(), PrepareError> {
        if self.seen.contains(key.as_str()) {
            self.skip(Skip::Duplicate, at.source, at.line);
            return Ok(());
        }
        let start = self.buffer.len();
        self.buffer.extend_from_slice(line);
        self.keep(key, start, at).await
    }

    /// Keeps a new recipient whose line starts at `start` in the buffer.
    async fn keep(&mut self, key: String, start: usize, at: RowAt<'_>) -> Result<(), PrepareError> {
        self.buffer.push(b'\n');
        if self.sources.last().is_none_or(|last| last != at.source) {
            self.sources.push(at.source.to_owned());
        }
        self.seen.insert(key.as_str().into());
        let line = start..self.buffer.len();
        self.candidates.push(Candidate { key, line, source: self.sources.len() - 1, at_line: at.line });
        if self.candidates.len() >= self.target.chunk_size {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes the chunk being filled, less its suppressed recipients.
    pub(super) async fn flush(&mut self) -> Result<(), PrepareError> {
        if self.candidates.is_empty() {
            return Ok(());
        }
        let seq = self.seq;
        self.seq += 1;
        let candidates = std::mem::take(&mut self.candidates);
        let buffer = std::mem::take(&mut self.buffer);
        if let Some(&kept) = self.handed_on.get(&seq) {
            // Handed on by an earlier attempt: its object and row stand as they are.
            let kept = u64::try_from(kept).unwrap_or(0);
            self.skip_many(Skip::Suppressed, (candidates.len() as u64).saturating_sub(kept));
            self.summary.recipients += kept;
            self.summary.chunks += 1;
            return Ok(());
        }
        let keys: Vec<&str> = candidates.iter().map(|c| c.key.as_str()).collect();
        let ChunkTarget { blobs, store, bucket, request, on_chunk, .. } = self.target;
        let suppressed = match self.known {
            Some(known) => known.among(&keys, &self.scopes),
            None => suppressed_among(store, &keys, &self.scopes).await?,
        };
        let data = if suppressed.is_empty() {
            buffer
        } else {
            let mut kept = Vec::with_capacity(buffer.len());
            for candidate in &candidates {
                if suppressed.contains(&candidate.key) {
                    let source = self.sources[candidate.source].clone();
                    self.skip(Skip::Suppressed, &source, candidate.at_line);
                } else {
                    kept.extend_from_slice(&buffer[candidate.line.clone()]);
                }
            }
            kept
        };
        let recipients = candidates.iter().filter(|c| !suppressed.contains(&c.key)).count() as u32;
        self.summary.recipients += u64::from(recipients);
        if recipients == 0 {
            return Ok(());
        }
        let object = chunk_object(&request.id, seq);
        let lines = if matches!(request.audience, Audience::Inline(_)) {
            Some(String::from_utf8(data).map_err(|e| PrepareError::Unusable(e.to_string()))?)
        } else {
            if !self.cancelled {
                blobs.write(bucket, &object, bytes::Bytes::from(data)).await?;
            }
            None
        };
        let chunk = NewChunk { id: ChunkId::new(&request.id, seq), seq, object, recipients, lines };
        if let Some(held) = &mut self.held {
            held.push(chunk);
            self.summary.chunks += 1;
            return Ok(());
        }
        let stored = records::insert_chunks(store, request, &[chunk]).await?;
        if stored == ChunkState::Cancelled && !self.cancelled {
            tracing::info!(
                chunk = seq,
                "Request cancelled while prepared: its chunks from here on are cancelled."
            );
            self.cancelled = true;
        }
        self.summary.chunks += 1;
        on_chunk();
        Ok(())
    }
}
