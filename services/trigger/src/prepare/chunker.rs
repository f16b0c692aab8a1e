//! Filling chunks: recipients are de-duplicated within the request, checked against the
//! suppressions (one query per chunk), written to Cloud Storage `chunk_size` candidates at a
//! time, and each chunk is recorded as it is written, so that it can be dispatched while the rest
//! of the audience is still being read.
//!
//! A chunk's candidates are the de-duplicated recipients `[seq × chunk_size, (seq + 1) ×
//! chunk_size)`, whatever the suppressions say, so the chunks of a prepare step repeated after an
//! interruption line up with the first attempt's. A chunk the first attempt already handed on
//! keeps its object and row (suppressions may have changed since); the summary counts what it
//! holds. A chunk whose candidates are all suppressed is not written.
//!
//! A request cancelled while it is prepared is read to its end all the same, so that its summary
//! counts the whole audience, but its chunks from then on are recorded `cancelled` and their
//! objects, which nothing will read, are not written.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::ops::Range;

use haishin_shared::domain::{ChunkId, ChunkState, DeliveryRequest, Recipient, chunk_object, template};
use haishin_shared::gcp::Blobs;
use haishin_shared::store::Store;
use haishin_shared::suppression::{address_key, scopes_of, suppressed_among};
use serde::Serialize;

use super::PrepareError;
use super::recipient::{Skip, check};
use super::records::{self, NewChunk};
use super::rows::{RowAt, RowSink};

/// What the prepare step found in an audience.
#[derive(Debug, Clone, Default, Serialize)]
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

/// How many skipped rows of each reason the summary points at.
pub(super) const EXAMPLES_PER_REASON: usize = 5;

impl RowSink for Chunker<'_> {
    /// A file whose columns leave a placeholder of the template without a value fails before
    /// any of its rows becomes a chunk.
    fn columns(&mut self, source: &str, columns: &[&str]) -> Result<(), PrepareError> {
        let needed = template::placeholders(&self.request.template).map_err(PrepareError::Unusable)?;
        let given: serde_json::Map<String, serde_json::Value> =
            columns.iter().map(|c| ((*c).to_owned(), serde_json::Value::String(String::new()))).collect();
        match template::missing_value(&self.request.template, &needed, &given) {
            Some(name) => Err(PrepareError::Unusable(format!(
                "{source}: the template uses `{name}`, which the file has no column for (its columns: {})",
                columns.join(", ")
            ))),
            None => Ok(()),
        }
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

/// Fills chunks and writes them.
pub(super) struct Chunker<'a> {
    blobs: &'a Blobs,
    store: &'a Store,
    bucket: &'a str,
    request: &'a DeliveryRequest,
    chunk_size: usize,
    on_chunk: &'a (dyn Fn() + Sync),
    seen: HashSet<u64, std::hash::RandomState>,
    hasher: std::hash::RandomState,
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
    pub(super) summary: AudienceSummary,
}

impl<'a> Chunker<'a> {
    pub(super) fn new(
        blobs: &'a Blobs,
        store: &'a Store,
        bucket: &'a str,
        request: &'a DeliveryRequest,
        chunk_size: usize,
        on_chunk: &'a (dyn Fn() + Sync),
        handed_on: BTreeMap<u32, i32>,
    ) -> Self {
        Self {
            blobs,
            store,
            bucket,
            request,
            chunk_size: chunk_size.max(1),
            on_chunk,
            seen: HashSet::default(),
            hasher: std::hash::RandomState::new(),
            scopes: scopes_of(&request.labels),
            buffer: Vec::new(),
            candidates: Vec::new(),
            sources: Vec::new(),
            seq: 0,
            handed_on,
            cancelled: false,
            summary: AudienceSummary::default(),
        }
    }

    fn skip(&mut self, reason: Skip, source: &str, line: u64) {
        self.skip_many(reason, 1);
        let examples = self.summary.skipped_at.entry(reason.as_str().to_owned()).or_default();
        if examples.len() < EXAMPLES_PER_REASON {
            examples.push(format!("{source}:{line}"));
        }
    }

    fn skip_many(&mut self, reason: Skip, count: u64) {
        if count > 0 {
            *self.summary.skipped.entry(reason.as_str().to_owned()).or_default() += count;
        }
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
        let mut hasher = self.hasher.build_hasher();
        hasher.write(key.as_bytes());
        if !self.seen.insert(hasher.finish()) {
            self.skip(Skip::Duplicate, at.source, at.line);
            return Ok(());
        }
        if self.sources.last().is_none_or(|last| last != at.source) {
            self.sources.push(at.source.to_owned());
        }
        let start = self.buffer.len();
        serde_json::to_writer(&mut self.buffer, &recipient)
            .map_err(|e| PrepareError::Unusable(e.to_string()))?;
        self.buffer.push(b'\n');
        let line = start..self.buffer.len();
        self.candidates.push(Candidate { key, line, source: self.sources.len() - 1, at_line: at.line });
        if self.candidates.len() >= self.chunk_size {
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
        let suppressed = suppressed_among(self.store, &keys, &self.scopes).await?;
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
        let object = chunk_object(&self.request.id, seq);
        if !self.cancelled {
            self.blobs.write(self.bucket, &object, bytes::Bytes::from(data)).await?;
        }
        let chunk = NewChunk { id: ChunkId::new(&self.request.id, seq), seq, object, recipients };
        let stored = records::insert_chunks(self.store, self.request, &[chunk]).await?;
        if stored == ChunkState::Cancelled && !self.cancelled {
            tracing::info!(
                chunk = seq,
                "Request cancelled while prepared: its chunks from here on are cancelled."
            );
            self.cancelled = true;
        }
        self.summary.chunks += 1;
        (self.on_chunk)();
        Ok(())
    }
}
