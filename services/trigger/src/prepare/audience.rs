//! Reading an audience: inline lists, CSV or NDJSON files in Cloud Storage, and BigQuery exports
//! (see `bigquery`), streamed row by row into the [`Chunker`].
//!
//! An audience small enough ([`worth_parts`]) is read here in one pass, in memory that holds one
//! chunk being filled plus the address keys kept; a larger one is prepared in parts (see
//! `parts`), so that no instance holds more than a partition's keys. A bad row is skipped and
//! counted by reason; it never fails the request. A source that cannot be read at all (missing
//! object, no `email` column) does.

use futures::{Stream, TryStreamExt};
use haishin_shared::domain::{Audience, FileFormat, GcsUri, Recipient};
use haishin_shared::gcp::{BigQuery, Blobs, GcpError};
use haishin_shared::suppression::KnownSuppressions;

use super::chunker::{AudienceSummary, ChunkTarget, Chunker};
use super::rows::{self, RowAt, RowSink};
use super::{PrepareError, records};

/// Where audiences are read from.
pub(super) struct Sources<'a> {
    pub blobs: &'a Blobs,
    pub bigquery: &'a BigQuery,
    /// How long a prepare step waits for a BigQuery export before leaving it to the next attempt.
    pub export_wait: std::time::Duration,
}

/// One file of an audience: a Cloud Storage object and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AudienceFile {
    pub(crate) bucket: String,
    pub(crate) object: String,
    pub(crate) format: FileFormat,
    /// Its size as stored, in bytes.
    pub(crate) size: u64,
}

impl AudienceFile {
    pub(crate) fn name(&self) -> String {
        format!("gs://{}/{}", self.bucket, self.object)
    }

    /// About how many bytes of rows the file holds: a compressed file counts four times its size.
    pub(crate) fn row_bytes(&self) -> u64 {
        let compressed = self.object.to_ascii_lowercase().ends_with(".gz");
        if compressed { self.size.saturating_mul(4) } else { self.size }
    }
}

/// The files of a `gcs` or `bigquery` audience, in the order they are read (a BigQuery audience is
/// exported first); `None` for an inline one.
pub(super) async fn files(
    source: &Sources<'_>,
    bucket: &str,
    request: &haishin_shared::domain::DeliveryRequest,
) -> Result<Option<Vec<AudienceFile>>, PrepareError> {
    let blobs = source.blobs;
    match &request.audience {
        Audience::Inline(_) => Ok(None),
        Audience::Gcs(gcs) => {
            let mut files = Vec::new();
            for uri in &gcs.uris {
                let uri = GcsUri::parse(uri).map_err(PrepareError::Unusable)?;
                for (object, size) in expand_sized(blobs, &uri).await? {
                    let format = gcs.format.or_else(|| guess_format(&object)).unwrap_or(FileFormat::Csv);
                    files.push(AudienceFile { bucket: uri.bucket.clone(), object, format, size });
                }
            }
            Ok(Some(files))
        }
        Audience::Bigquery(audience) => {
            // Boxed: the export's future is large, and every caller's stack would otherwise hold it.
            let shards = Box::pin(super::bigquery::export(
                source.bigquery,
                blobs,
                bucket,
                request,
                audience,
                source.export_wait,
            ))
            .await?;
            Ok(Some(
                shards
                    .into_iter()
                    .map(|(object, size)| AudienceFile {
                        bucket: bucket.to_owned(),
                        object,
                        format: FileFormat::Ndjson,
                        size,
                    })
                    .collect(),
            ))
        }
    }
}

/// Whether an audience of these files is prepared in parts: when it holds more than one
/// partition's worth of rows.
pub(super) fn worth_parts(files: &[AudienceFile], partition_bytes: u64) -> bool {
    files.iter().map(AudienceFile::row_bytes).sum::<u64>() > partition_bytes
}

/// Streams a whole audience (inline, or `files`) into chunk objects under
/// `gs://bucket/requests/<id>/chunks/` and chunk rows, and returns what was found. A stored chunk
/// may be dispatched at once (`target.on_chunk`), while the rest is still being read.
///
/// Preparing the same request again produces the same chunks (ids, objects and contents are
/// derived from the audience), so a prepare step interrupted after some chunks were dispatched
/// can be repeated safely.
#[tracing::instrument(skip_all, fields(request_id = %target.request.id))]
pub(super) async fn read_whole(
    target: ChunkTarget<'_>,
    files: Option<&[AudienceFile]>,
) -> Result<AudienceSummary, PrepareError> {
    let request = target.request;
    let handed_on = records::clear_chunks(target.store, &request.id, 0..u32::MAX).await?;
    let mut chunker = Chunker::new(target, 0, handed_on);
    match (files, &request.audience) {
        (Some(files), _) => {
            for file in files {
                Box::pin(read_object(&mut chunker, target.blobs, file)).await?;
            }
        }
        (None, Audience::Inline(list)) => push_inline(&mut chunker, list).await?,
        (None, _) => return Err(PrepareError::Unusable("the audience lists no file".into())),
    }
    chunker.flush().await?;
    tracing::info!(
        rows = chunker.summary.rows,
        recipients = chunker.summary.recipients,
        chunks = chunker.summary.chunks,
        "Audience prepared."
    );
    Ok(chunker.summary)
}

/// Reads the inline audience of a request not stored yet into chunks held in memory (their lines
/// in their rows), for the caller to write with the request. `known`: the suppressions of its
/// addresses, when read already.
pub(super) async fn read_inline_held<'a>(
    target: ChunkTarget<'a>,
    known: Option<&'a KnownSuppressions>,
) -> Result<(AudienceSummary, Vec<records::NewChunk>), PrepareError> {
    let Audience::Inline(list) = &target.request.audience else {
        return Err(PrepareError::Unusable("the audience is not inline".into()));
    };
    let mut chunker = Chunker::holding(target, known);
    push_inline(&mut chunker, list).await?;
    chunker.flush().await?;
    Ok(chunker.into_held())
}

/// An inline list's recipients into the chunker, each at its line of source `inline`.
async fn push_inline(chunker: &mut Chunker<'_>, list: &[Recipient]) -> Result<(), PrepareError> {
    for (i, recipient) in list.iter().enumerate() {
        chunker.push(Ok(recipient.clone()), RowAt { source: "inline", line: i as u64 + 1 }).await?;
    }
    Ok(())
}

/// Expands a `*` in the object name (as BigQuery exports write) into the matching objects.
pub(crate) async fn expand(blobs: &Blobs, uri: &GcsUri) -> Result<Vec<String>, PrepareError> {
    Ok(expand_sized(blobs, uri).await?.into_iter().map(|(name, _)| name).collect())
}

/// [`expand`], with each object's size (0 for a named object the listing does not show: reading
/// it then says why).
async fn expand_sized(blobs: &Blobs, uri: &GcsUri) -> Result<Vec<(String, u64)>, PrepareError> {
    let Some((prefix, suffix)) = uri.object.split_once('*') else {
        let listed = blobs.list_sized(&uri.bucket, &uri.object).await?;
        let size = listed.into_iter().find(|(name, _)| *name == uri.object).map_or(0, |(_, size)| size);
        return Ok(vec![(uri.object.clone(), size)]);
    };
    let objects = blobs.list_sized(&uri.bucket, prefix).await?;
    let matched: Vec<(String, u64)> = objects.into_iter().filter(|(n, _)| n.ends_with(suffix)).collect();
    if matched.is_empty() {
        return Err(PrepareError::Unusable(format!("{uri} matches no object")));
    }
    Ok(matched)
}

/// The format an object's name says, a `.gz` suffix aside.
pub(crate) fn guess_format(object: &str) -> Option<FileFormat> {
    let lower = object.to_ascii_lowercase();
    let lower = lower.strip_suffix(".gz").unwrap_or(&lower);
    if lower.ends_with(".ndjson") || lower.ends_with(".jsonl") || lower.ends_with(".json") {
        Some(FileFormat::Ndjson)
    } else if lower.ends_with(".csv") {
        Some(FileFormat::Csv)
    } else {
        None
    }
}

/// Streams one file's rows into `sink`.
pub(super) async fn read_object<S: RowSink>(
    sink: &mut S,
    blobs: &Blobs,
    file: &AudienceFile,
) -> Result<(), PrepareError> {
    let (bucket, object) = (&file.bucket, &file.object);
    let stream = blobs.read(bucket, object).await.map_err(|e| match e {
        GcpError::Permanent { detail, .. } => {
            PrepareError::Unusable(format!("cannot read gs://{bucket}/{object}: {detail}"))
        }
        other => other.into(),
    })?;
    read_file(sink, stream, file.format, &file.name()).await
}

/// Streams the rows of a file's bytes, `stream`, into `sink`.
pub(super) async fn read_file<K, S>(
    sink: &mut K,
    stream: S,
    format: FileFormat,
    name: &str,
) -> Result<(), PrepareError>
where
    K: RowSink,
    S: Stream<Item = Result<bytes::Bytes, GcpError>> + Send + Unpin,
{
    let failure = std::sync::Arc::new(std::sync::Mutex::new(None::<GcpError>));
    let keep = failure.clone();
    let reader = tokio_util::io::StreamReader::new(stream.map_err(move |e| {
        let text = e.to_string();
        *keep.lock().expect("lock") = Some(e);
        std::io::Error::other(text)
    }));
    let result = rows::read_rows(sink, reader, format, name).await;
    if let Some(err) = failure.lock().expect("lock").take() {
        return Err(err.into());
    }
    result
}
