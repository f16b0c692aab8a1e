//! Reading an audience: inline lists, CSV or NDJSON files in Cloud Storage, and BigQuery exports
//! (see `bigquery`), streamed row by row into the [`Chunker`].
//!
//! Memory holds one chunk being filled plus eight bytes per kept recipient (the de-duplication
//! set), never the audience itself. A bad row is skipped and counted by reason; it never fails the
//! request. A source that cannot be read at all (missing object, no `email` column) does.

use futures::{Stream, TryStreamExt};
use haishin_shared::domain::{Audience, DeliveryRequest, FileFormat, GcsUri};
use haishin_shared::gcp::{BigQuery, Blobs, GcpError};
use haishin_shared::store::Store;

use super::chunker::{AudienceSummary, Chunker};
use super::rows::{self, RowAt};
use super::{PrepareError, records};

/// Where audiences are read from.
pub(super) struct Sources<'a> {
    pub blobs: &'a Blobs,
    pub bigquery: &'a BigQuery,
    /// How long a prepare step waits for a BigQuery export before leaving it to the next attempt.
    pub export_wait: std::time::Duration,
}

/// Streams the request's audience into chunk objects under `gs://bucket/requests/<id>/chunks/`
/// and chunk rows, and returns what was found. `on_chunk` runs after each chunk is stored: a
/// stored chunk may be dispatched at once, while the rest of the audience is still being read.
///
/// Preparing the same request again produces the same chunks (ids, objects and contents are
/// derived from the audience), so a prepare step interrupted after some chunks were dispatched
/// can be repeated safely.
#[tracing::instrument(skip_all, fields(request_id = %request.id))]
pub(super) async fn read_audience(
    source: &Sources<'_>,
    store: &Store,
    bucket: &str,
    request: &DeliveryRequest,
    chunk_size: usize,
    on_chunk: &(dyn Fn() + Sync),
) -> Result<AudienceSummary, PrepareError> {
    let blobs = source.blobs;
    let handed_on = records::clear_chunks(store, &request.id).await?;
    let mut chunker = Chunker::new(blobs, store, bucket, request, chunk_size, on_chunk, handed_on);
    match &request.audience {
        Audience::Inline(list) => {
            for (i, recipient) in list.iter().enumerate() {
                chunker.push(Ok(recipient.clone()), RowAt { source: "inline", line: i as u64 + 1 }).await?;
            }
        }
        Audience::Gcs(gcs) => {
            for uri in &gcs.uris {
                let uri = GcsUri::parse(uri).map_err(PrepareError::Unusable)?;
                for object in expand(blobs, &uri).await? {
                    let format = gcs.format.or_else(|| guess_format(&object)).unwrap_or(FileFormat::Csv);
                    Box::pin(read_object(&mut chunker, blobs, &uri.bucket, &object, format)).await?;
                }
            }
        }
        Audience::Bigquery(audience) => {
            // Boxed, as the files' reading: the step's future stays small on every caller's stack.
            let shards = Box::pin(super::bigquery::export(
                source.bigquery,
                blobs,
                bucket,
                request,
                audience,
                source.export_wait,
            ))
            .await?;
            for object in shards {
                Box::pin(read_object(&mut chunker, blobs, bucket, &object, FileFormat::Ndjson)).await?;
            }
        }
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

/// Expands a `*` in the object name (as BigQuery exports write) into the matching objects.
pub(crate) async fn expand(blobs: &Blobs, uri: &GcsUri) -> Result<Vec<String>, PrepareError> {
    let Some((prefix, suffix)) = uri.object.split_once('*') else {
        return Ok(vec![uri.object.clone()]);
    };
    let names = blobs.list(&uri.bucket, prefix).await?;
    let matched: Vec<String> = names.into_iter().filter(|n| n.ends_with(suffix)).collect();
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

/// Streams one object's rows into the chunker.
async fn read_object(
    chunker: &mut Chunker<'_>,
    blobs: &Blobs,
    bucket: &str,
    object: &str,
    format: FileFormat,
) -> Result<(), PrepareError> {
    let stream = blobs.read(bucket, object).await.map_err(|e| match e {
        GcpError::Permanent { detail, .. } => {
            PrepareError::Unusable(format!("cannot read gs://{bucket}/{object}: {detail}"))
        }
        other => other.into(),
    })?;
    read_file(chunker, stream, format, &format!("gs://{bucket}/{object}")).await
}

async fn read_file<S>(
    chunker: &mut Chunker<'_>,
    stream: S,
    format: FileFormat,
    name: &str,
) -> Result<(), PrepareError>
where
    S: Stream<Item = Result<bytes::Bytes, GcpError>> + Send + Unpin,
{
    let failure = std::sync::Arc::new(std::sync::Mutex::new(None::<GcpError>));
    let keep = failure.clone();
    let reader = tokio_util::io::StreamReader::new(stream.map_err(move |e| {
        let text = e.to_string();
        *keep.lock().expect("lock") = Some(e);
        std::io::Error::other(text)
    }));
    let result = rows::read_rows(chunker, reader, format, name).await;
    if let Some(err) = failure.lock().expect("lock").take() {
        return Err(err.into());
    }
    result
}
