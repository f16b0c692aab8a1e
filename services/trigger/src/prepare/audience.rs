//! Reading an audience: inline lists, and CSV or NDJSON files in Cloud Storage, streamed row by
//! row into the [`Chunker`].
//!
//! Memory holds one chunk being filled plus eight bytes per kept recipient (the de-duplication
//! set), never the audience itself. A bad row is skipped and counted by reason; it never fails the
//! request. A source that cannot be read at all (missing object, no `email` column) does.

use futures::{Stream, StreamExt, TryStreamExt};
use haishin_shared::domain::{Audience, DeliveryRequest, FileFormat, GcsUri, Recipient};
use haishin_shared::gcp::{Blobs, GcpError};
use haishin_shared::store::Store;
use serde_json::{Map, Value};
use tokio::io::AsyncBufReadExt;

use super::PrepareError;
use super::chunker::{AudienceSummary, Chunker, RowAt};
use super::recipient::Skip;
use super::records;

/// Streams the request's audience into chunk objects under `gs://bucket/requests/<id>/chunks/`
/// and chunk rows, and returns what was found. `on_chunk` runs after each chunk is stored: a
/// stored chunk may be dispatched at once, while the rest of the audience is still being read.
///
/// Preparing the same request again produces the same chunks (ids, objects and contents are
/// derived from the audience), so a prepare step interrupted after some chunks were dispatched
/// can be repeated safely.
#[tracing::instrument(skip_all, fields(request_id = %request.id))]
pub(super) async fn read_audience(
    blobs: &Blobs,
    store: &Store,
    bucket: &str,
    request: &DeliveryRequest,
    chunk_size: usize,
    on_chunk: &(dyn Fn() + Sync),
) -> Result<AudienceSummary, PrepareError> {
    records::clear_chunks(store, &request.id).await?;
    let mut chunker = Chunker::new(blobs, store, bucket, request, chunk_size, on_chunk);
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
                    let stream = blobs.read(&uri.bucket, &object).await.map_err(|e| match e {
                        GcpError::Permanent { detail, .. } => PrepareError::Unusable(format!(
                            "cannot read gs://{}/{object}: {detail}",
                            uri.bucket
                        )),
                        other => other.into(),
                    })?;
                    let name = format!("gs://{}/{object}", uri.bucket);
                    read_file(&mut chunker, stream, format, &name).await?;
                }
            }
        }
        Audience::Bigquery(_) => {
            return Err(PrepareError::Unusable(
                "bigquery audiences are not supported by this deployment".into(),
            ));
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
async fn expand(blobs: &Blobs, uri: &GcsUri) -> Result<Vec<String>, PrepareError> {
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

fn guess_format(object: &str) -> Option<FileFormat> {
    let lower = object.to_ascii_lowercase();
    if lower.ends_with(".ndjson") || lower.ends_with(".jsonl") || lower.ends_with(".json") {
        Some(FileFormat::Ndjson)
    } else if lower.ends_with(".csv") {
        Some(FileFormat::Csv)
    } else {
        None
    }
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
    let result = match format {
        FileFormat::Csv => read_csv(chunker, reader, name).await,
        FileFormat::Ndjson => read_ndjson(chunker, reader, name).await,
    };
    if let Some(err) = failure.lock().expect("lock").take() {
        return Err(err.into());
    }
    result
}

async fn read_csv<R>(chunker: &mut Chunker<'_>, reader: R, name: &str) -> Result<(), PrepareError>
where
    R: tokio::io::AsyncRead + Send + Unpin,
{
    let mut csv =
        csv_async::AsyncReaderBuilder::new().flexible(true).trim(csv_async::Trim::All).create_reader(reader);
    let headers = csv.headers().await.map_err(|e| PrepareError::Unusable(format!("{name}: {e}")))?.clone();
    let Some(email_at) = headers.iter().position(|h| h.eq_ignore_ascii_case("email")) else {
        return Err(PrepareError::Unusable(format!("{name} has no `email` column")));
    };
    let mut records = csv.records();
    while let Some(record) = records.next().await {
        let line = match &record {
            Ok(record) => record.position().map_or(0, csv_async::Position::line),
            Err(e) => e.position().map_or(0, csv_async::Position::line),
        };
        let at = RowAt { source: name, line };
        let row = match record {
            Err(e) if e.is_io_error() => return Err(PrepareError::Unusable(format!("{name}: {e}"))),
            Err(_) => Err(Skip::Malformed),
            Ok(record) if spans_too_many_lines(&record) => {
                return Err(PrepareError::Unusable(format!(
                    "{name}, line {line}: a quoted field runs over more than {MAX_RECORD_LINES} lines \
                     (an unbalanced quote?); the file cannot be trusted and is not read further"
                )));
            }
            Ok(record) if record.len() != headers.len() => Err(Skip::MissingColumn),
            Ok(record) => {
                let mut params = Map::new();
                for (i, (header, value)) in headers.iter().zip(record.iter()).enumerate() {
                    if i != email_at {
                        params.insert(header.to_owned(), Value::String(value.to_owned()));
                    }
                }
                Ok(Recipient { email: record[email_at].to_owned(), params })
            }
        };
        chunker.push(row, at).await?;
    }
    Ok(())
}

/// Most lines one CSV record may span: a quoted field may hold a line break or two (an address),
/// but a record running on for more is a quote left open, swallowing the rows after it.
const MAX_RECORD_LINES: usize = 10;

fn spans_too_many_lines(record: &csv_async::StringRecord) -> bool {
    record.iter().map(|field| field.matches('\n').count()).sum::<usize>() >= MAX_RECORD_LINES
}

async fn read_ndjson<R>(chunker: &mut Chunker<'_>, reader: R, name: &str) -> Result<(), PrepareError>
where
    R: tokio::io::AsyncRead + Send + Unpin,
{
    let mut lines = tokio::io::BufReader::new(reader).lines();
    let mut number = 0;
    loop {
        number += 1;
        let at = RowAt { source: name, line: number };
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                chunker.push(Err(Skip::Malformed), at).await?;
                continue;
            }
            Err(e) => return Err(PrepareError::Unusable(e.to_string())),
        };
        if line.trim().is_empty() {
            continue;
        }
        let row = match serde_json::from_str::<Map<String, Value>>(&line) {
            Err(_) => Err(Skip::Malformed),
            Ok(mut object) => match object.remove("email") {
                Some(Value::String(email)) => {
                    let params = match object.remove("params") {
                        Some(Value::Object(params)) => params,
                        _ => object,
                    };
                    Ok(Recipient { email, params })
                }
                Some(_) => Err(Skip::InvalidEmail),
                None => Err(Skip::MissingColumn),
            },
        };
        chunker.push(row, at).await?;
    }
    Ok(())
}
