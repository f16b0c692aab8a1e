//! Turning an audience into chunks: rows are streamed, validated, de-duplicated within the
//! request, and written to Cloud Storage `chunk_size` recipients at a time.
//!
//! Memory holds one chunk being filled plus eight bytes per kept recipient (the de-duplication
//! set), never the audience itself. A bad row is skipped and counted by reason; it never fails the
//! request. A source that cannot be read at all (missing object, no `email` column) does.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};

use futures::{Stream, StreamExt, TryStreamExt};
use serde_json::{Map, Value};
use tokio::io::AsyncBufReadExt;

use crate::domain::{Audience, DeliveryRequest, FileFormat, GcsUri, Recipient, chunk_id, chunk_object};
use crate::gcp::{Blobs, GcpError};
use crate::store::{AudienceSummary, NewChunk, Store, StoreError};

/// Longest accepted address (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;
/// Largest accepted parameter set per recipient, in bytes of JSON.
pub const MAX_PARAMS_BYTES: usize = 8 * 1024;

/// Why a row was skipped; the names are the keys of the request's `skipped` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    InvalidEmail,
    MissingColumn,
    Malformed,
    Oversize,
    Duplicate,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::InvalidEmail => "invalid_email",
            Skip::MissingColumn => "missing_column",
            Skip::Malformed => "malformed",
            Skip::Oversize => "oversize",
            Skip::Duplicate => "duplicate",
        }
    }
}

/// Why an audience could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The audience can never be read as given; the request fails with this reason.
    #[error("{0}")]
    Unusable(String),
    #[error(transparent)]
    Storage(#[from] GcpError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PrepareError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, PrepareError::Unusable(_) | PrepareError::Storage(GcpError::Permanent { .. }))
    }
}

/// Checks an address: one `@`, a non-empty local part, a dotted domain, no spaces, sane length.
pub fn valid_email(email: &str) -> bool {
    if email.len() > MAX_EMAIL_LEN || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = email.rsplit_once('@') else { return false };
    !local.is_empty()
        && local.len() <= 64
        && !local.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain.chars().all(|c| c.is_alphanumeric() || c == '.' || c == '-')
}

/// Validates one recipient; the address is trimmed.
pub fn check(mut recipient: Recipient) -> Result<Recipient, Skip> {
    recipient.email = recipient.email.trim().to_owned();
    if !valid_email(&recipient.email) {
        return Err(Skip::InvalidEmail);
    }
    let params_len = serde_json::to_vec(&recipient.params).map_or(usize::MAX, |v| v.len());
    if params_len > MAX_PARAMS_BYTES {
        return Err(Skip::Oversize);
    }
    Ok(recipient)
}

/// Fills chunks and writes them.
struct Chunker<'a> {
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
    summary: AudienceSummary,
}

impl<'a> Chunker<'a> {
    fn new(
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
            summary: AudienceSummary::default(),
        }
    }

    fn skip(&mut self, reason: Skip) {
        *self.summary.skipped.entry(reason.as_str().to_owned()).or_default() += 1;
    }

    async fn push(&mut self, row: Result<Recipient, Skip>) -> Result<(), PrepareError> {
        self.summary.rows += 1;
        let recipient = match row.and_then(check) {
            Ok(r) => r,
            Err(reason) => {
                self.skip(reason);
                return Ok(());
            }
        };
        let mut hasher = self.hasher.build_hasher();
        hasher.write(recipient.email.to_ascii_lowercase().as_bytes());
        if !self.seen.insert(hasher.finish()) {
            self.skip(Skip::Duplicate);
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

    async fn flush(&mut self) -> Result<(), PrepareError> {
        if self.in_buffer == 0 {
            return Ok(());
        }
        let seq = self.summary.chunks;
        let object = chunk_object(&self.request.id, seq);
        let data = bytes::Bytes::from(std::mem::take(&mut self.buffer));
        self.blobs.write(self.bucket, &object, data).await?;
        let chunk = NewChunk { id: chunk_id(&self.request.id, seq), seq, object, recipients: self.in_buffer };
        self.store.insert_chunks(self.request, &[chunk]).await?;
        self.summary.chunks += 1;
        self.in_buffer = 0;
        (self.on_chunk)();
        Ok(())
    }
}

/// Streams the request's audience into chunk objects under `gs://bucket/requests/<id>/chunks/`
/// and chunk rows, and returns what was found. `on_chunk` runs after each chunk is stored: a
/// stored chunk may be dispatched at once, while the rest of the audience is still being read.
///
/// Preparing the same request again produces the same chunks (ids, objects and contents are
/// derived from the audience), so a prepare step interrupted after some chunks were dispatched
/// can be repeated safely.
#[tracing::instrument(skip_all, fields(request_id = %request.id))]
pub async fn prepare(
    blobs: &Blobs,
    store: &Store,
    bucket: &str,
    request: &DeliveryRequest,
    chunk_size: usize,
    on_chunk: &(dyn Fn() + Sync),
) -> Result<AudienceSummary, PrepareError> {
    store.clear_chunks(&request.id).await?;
    let mut chunker = Chunker::new(blobs, store, bucket, request, chunk_size, on_chunk);
    match &request.audience {
        Audience::Inline(list) => {
            for recipient in list {
                chunker.push(Ok(recipient.clone())).await?;
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
        FileFormat::Ndjson => read_ndjson(chunker, reader).await,
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
        let row = match record {
            Err(e) if e.is_io_error() => return Err(PrepareError::Unusable(format!("{name}: {e}"))),
            Err(_) => Err(Skip::Malformed),
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
        chunker.push(row).await?;
    }
    Ok(())
}

async fn read_ndjson<R>(chunker: &mut Chunker<'_>, reader: R) -> Result<(), PrepareError>
where
    R: tokio::io::AsyncRead + Send + Unpin,
{
    let mut lines = tokio::io::BufReader::new(reader).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                chunker.push(Err(Skip::Malformed)).await?;
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
        chunker.push(row).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_for_shape() {
        for ok in ["a@example.com", "first.last+tag@sub.example.co.jp", "x@a-b.io"] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "",
            "no-at.example.com",
            "@example.com",
            "a@nodot",
            "a b@example.com",
            "a@.example.com",
            "a@example..com",
            "a@b@example.com",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn oversize_parameters_are_skipped() {
        let mut params = Map::new();
        params.insert("blob".into(), Value::String("x".repeat(MAX_PARAMS_BYTES + 1)));
        assert_eq!(check(Recipient { email: "a@example.com".into(), params }), Err(Skip::Oversize));
    }

    #[test]
    fn addresses_are_trimmed() {
        let r = check(Recipient { email: "  a@example.com ".into(), params: Map::new() }).unwrap();
        assert_eq!(r.email, "a@example.com");
    }
}
