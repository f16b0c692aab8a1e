//! Filling chunks: recipients are de-duplicated within the request, written to Cloud Storage
//! `chunk_size` at a time, and each chunk is recorded as it is written, so that it can be
//! dispatched while the rest of the audience is still being read.
//!
//! A request cancelled while it is prepared is read to its end all the same, so that its summary
//! counts the whole audience, but its chunks from then on are recorded `cancelled` and their
//! objects, which nothing will read, are not written.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hasher};

use haishin_shared::domain::{ChunkId, ChunkState, DeliveryRequest, Recipient, chunk_object, template};
use haishin_shared::gcp::Blobs;
use haishin_shared::store::Store;
use serde::Serialize;

use super::PrepareError;
use super::recipient::{Skip, check, dedup_key};
use super::records::{self, NewChunk};
use super::rows::{RowAt, RowSink};

/// What the prepare step found in an audience.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AudienceSummary {
    /// Rows read, valid or not.
    pub rows: u64,
    /// Recipients kept (valid and not repeated).
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
    buffer: Vec<u8>,
    in_buffer: u32,
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
            buffer: Vec::new(),
            in_buffer: 0,
            cancelled: false,
            summary: AudienceSummary::default(),
        }
    }

    fn skip(&mut self, reason: Skip, at: RowAt<'_>) {
        *self.summary.skipped.entry(reason.as_str().to_owned()).or_default() += 1;
        let examples = self.summary.skipped_at.entry(reason.as_str().to_owned()).or_default();
        if examples.len() < EXAMPLES_PER_REASON {
            examples.push(format!("{}:{}", at.source, at.line));
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
                self.skip(reason, at);
                return Ok(());
            }
        };
        let mut hasher = self.hasher.build_hasher();
        hasher.write(dedup_key(&recipient.email).as_bytes());
        if !self.seen.insert(hasher.finish()) {
            self.skip(Skip::Duplicate, at);
            return Ok(());
        }
        serde_json::to_writer(&mut self.buffer, &recipient)
            .map_err(|e| PrepareError::Unusable(e.to_string()))?;
        self.buffer.push(b'\n');
        self.in_buffer += 1;
        self.summary.recipients += 1;
        if self.in_buffer as usize >= self.chunk_size {
            self.flush().await?;
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self) -> Result<(), PrepareError> {
        if self.in_buffer == 0 {
            return Ok(());
        }
        let seq = self.summary.chunks;
        let object = chunk_object(&self.request.id, seq);
        let data = bytes::Bytes::from(std::mem::take(&mut self.buffer));
        if !self.cancelled {
            self.blobs.write(self.bucket, &object, data).await?;
        }
        let chunk =
            NewChunk { id: ChunkId::new(&self.request.id, seq), seq, object, recipients: self.in_buffer };
        let stored = records::insert_chunks(self.store, self.request, &[chunk]).await?;
        if stored == ChunkState::Cancelled && !self.cancelled {
            tracing::info!(
                chunk = seq,
                "Request cancelled while prepared: its chunks from here on are cancelled."
            );
            self.cancelled = true;
        }
        self.summary.chunks += 1;
        self.in_buffer = 0;
        (self.on_chunk)();
        Ok(())
    }
}
