//! `POST /v1/suppressions:import`: addresses read from files in Cloud Storage, streamed and added
//! a batch at a time.
//!
//! A file holds one address per line, or is a CSV whose header names an `email` column (the
//! first line decides); either may be gzip-compressed. A line that holds no address is counted
//! and pointed at (`gs://bucket/object:LINE`), never fatal. A file that cannot be read at all (a
//! missing object, a `gs://` URI naming none) fails the import naming it; what was added before
//! stays, and importing again adds nothing twice.

use std::io;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use haishin_shared::domain::GcsUri;
use haishin_shared::gcp::{Blobs, GcpError};
use haishin_shared::store::Store;
use serde::Serialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use super::{Reason, add_many, address};
use crate::error::Unavailable;
use crate::prepare::PrepareError;
use crate::prepare::audience::expand;

/// Addresses added in one statement.
const BATCH: usize = 1_000;
/// Longest line read as an address, in bytes; a longer one is a bad line.
const MAX_LINE: usize = 4 * 1024;
/// Bad lines the answer points at.
const BAD_EXAMPLES: usize = 20;

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    /// The objects read, in order.
    pub files: Vec<String>,
    /// Lines (CSV records) read, headers and blank lines aside.
    pub lines: u64,
    /// Addresses newly suppressed.
    pub added: u64,
    /// Addresses already suppressed in the scope (or repeated in the files).
    pub already_suppressed: u64,
    /// Lines that hold no address.
    pub bad: u64,
    /// Where the first bad lines are (`gs://bucket/object:LINE`).
    pub bad_at: Vec<String>,
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file that can never be read as given; the text names it.
    #[error("{0}")]
    Unusable(String),
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

impl From<PrepareError> for ImportError {
    fn from(err: PrepareError) -> Self {
        if err.is_permanent() {
            ImportError::Unusable(err.to_string())
        } else {
            ImportError::Unavailable(Unavailable::Dependency(err.to_string()))
        }
    }
}

impl From<haishin_shared::store::StoreError> for ImportError {
    fn from(err: haishin_shared::store::StoreError) -> Self {
        ImportError::Unavailable(err.into())
    }
}

/// Where the addresses go: a batch being filled and the report.
struct Sink<'a> {
    store: &'a Store,
    scope: &'a str,
    reason: Reason,
    source: &'a str,
    batch: Vec<String>,
    report: ImportReport,
}

impl Sink<'_> {
    async fn address(&mut self, text: &str, name: &str, line: u64) -> Result<(), ImportError> {
        self.report.lines += 1;
        match address(text) {
            Ok(key) => {
                self.batch.push(key);
                if self.batch.len() >= BATCH {
                    self.flush().await?;
                }
            }
            Err(_) => self.bad(name, line),
        }
        Ok(())
    }

    fn bad(&mut self, name: &str, line: u64) {
        self.report.bad += 1;
        if self.report.bad_at.len() < BAD_EXAMPLES {
            self.report.bad_at.push(format!("{name}:{line}"));
        }
    }

    async fn flush(&mut self) -> Result<(), ImportError> {
        let batch = std::mem::take(&mut self.batch);
        let added = add_many(self.store.pool(), &batch, self.scope, self.reason, self.source).await?;
        self.report.added += added;
        self.report.already_suppressed += batch.len() as u64 - added;
        Ok(())
    }
}

/// Reads every address in the objects `uris` name (a `*` in an object name matches several) and
/// suppresses it in `scope`.
pub async fn import(
    blobs: &Blobs,
    store: &Store,
    uris: &[String],
    scope: &str,
    reason: Reason,
    source: &str,
) -> Result<ImportReport, ImportError> {
    let parsed: Vec<GcsUri> =
        uris.iter().map(|uri| GcsUri::parse(uri)).collect::<Result<_, _>>().map_err(ImportError::Unusable)?;
    let mut sink = Sink { store, scope, reason, source, batch: Vec::new(), report: ImportReport::default() };
    for uri in &parsed {
        for object in expand(blobs, uri).await? {
            let name = format!("gs://{}/{object}", uri.bucket);
            let stream = blobs.read(&uri.bucket, &object).await.map_err(|e| unreadable(&name, e))?;
            sink.report.files.push(name.clone());
            read_file(&mut sink, stream, &name).await?;
        }
    }
    sink.flush().await?;
    tracing::info!(
        files = sink.report.files.len(),
        added = sink.report.added,
        already = sink.report.already_suppressed,
        bad = sink.report.bad,
        %scope,
        "Suppressions imported."
    );
    Ok(sink.report)
}

fn unreadable(name: &str, err: GcpError) -> ImportError {
    match err {
        GcpError::Permanent { detail, .. } => ImportError::Unusable(format!("cannot read {name}: {detail}")),
        other => ImportError::Unavailable(other.into()),
    }
}

async fn read_file<S>(sink: &mut Sink<'_>, stream: S, name: &str) -> Result<(), ImportError>
where
    S: futures::Stream<Item = Result<bytes::Bytes, GcpError>> + Send + Unpin,
{
    // The stream's own error is kept, so that a transient one is retried and a permanent one named.
    let failure = Arc::new(Mutex::new(None::<GcpError>));
    let keep = failure.clone();
    let reader = tokio_util::io::StreamReader::new(stream.map_err(move |e| {
        let text = e.to_string();
        *keep.lock().expect("lock") = Some(e);
        io::Error::other(text)
    }));
    let mut buffered = BufReader::with_capacity(64 * 1024, reader);
    let head = buffered.fill_buf().await.map_err(|e| ImportError::Unusable(format!("{name}: {e}")));
    let result = match head.map(|head| head.starts_with(&[0x1f, 0x8b])) {
        Ok(true) => {
            let mut gunzip = async_compression::tokio::bufread::GzipDecoder::new(buffered);
            gunzip.multiple_members(true);
            Box::pin(read_text(sink, BufReader::new(gunzip), name)).await
        }
        Ok(false) => Box::pin(read_text(sink, buffered, name)).await,
        Err(err) => Err(err),
    };
    if let Some(err) = failure.lock().expect("lock").take() {
        return Err(unreadable(name, err));
    }
    result
}

/// One address per line, or a CSV with an `email` column when the first line is its header.
async fn read_text<R>(sink: &mut Sink<'_>, mut reader: R, name: &str) -> Result<(), ImportError>
where
    R: AsyncBufRead + Send + Unpin,
{
    let io_error = |e: io::Error| ImportError::Unusable(format!("{name}: {e}"));
    let mut line = Vec::new();
    let mut number = 0;
    while let Some(fits) = next_line(&mut reader, &mut line).await.map_err(io_error)? {
        number += 1;
        let text = std::str::from_utf8(&line).ok().filter(|_| fits);
        if number == 1
            && let Some(header) = text
            && let Some(column) = email_column(header)
        {
            let mut head = line.clone();
            head.push(b'\n');
            return read_csv(sink, std::io::Cursor::new(head).chain(reader), column, name).await;
        }
        match text.map(str::trim) {
            Some("") => {}
            Some(address) => sink.address(address, name, number).await?,
            None => {
                sink.report.lines += 1;
                sink.bad(name, number);
            }
        }
    }
    Ok(())
}

/// The `email` column of a CSV header, if the line is one.
fn email_column(header: &str) -> Option<usize> {
    header.split(',').position(|field| field.trim().trim_matches('"').eq_ignore_ascii_case("email"))
}

async fn read_csv<R>(sink: &mut Sink<'_>, reader: R, column: usize, name: &str) -> Result<(), ImportError>
where
    R: AsyncRead + Send + Unpin,
{
    let mut csv =
        csv_async::AsyncReaderBuilder::new().flexible(true).trim(csv_async::Trim::All).create_reader(reader);
    let mut records = csv.records();
    while let Some(record) = records.next().await {
        let line = match &record {
            Ok(record) => record.position().map_or(0, csv_async::Position::line),
            Err(e) => e.position().map_or(0, csv_async::Position::line),
        };
        match record {
            Err(e) if e.is_io_error() => return Err(ImportError::Unusable(format!("{name}: {e}"))),
            Ok(record) if record.get(column).is_some_and(|email| !email.is_empty()) => {
                sink.address(&record[column], name, line).await?;
            }
            _ => {
                sink.report.lines += 1;
                sink.bad(name, line);
            }
        }
    }
    Ok(())
}

/// Reads the next line into `line`, without its end; at most [`MAX_LINE`] bytes of it are kept,
/// and `Some(false)` says it was longer. `None` at the end of the file.
async fn next_line<R>(reader: &mut R, line: &mut Vec<u8>) -> io::Result<Option<bool>>
where
    R: AsyncBufRead + Send + Unpin,
{
    line.clear();
    let read = (&mut *reader).take(MAX_LINE as u64 + 1).read_until(b'\n', line).await?;
    if read == 0 {
        return Ok(None);
    }
    let mut fits = true;
    if line.last() != Some(&b'\n') && line.len() > MAX_LINE {
        fits = false;
        let mut rest = Vec::new();
        loop {
            rest.clear();
            let read = (&mut *reader).take(64 * 1024).read_until(b'\n', &mut rest).await?;
            if read == 0 || rest.last() == Some(&b'\n') {
                break;
            }
        }
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(Some(fits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csv_header_is_told_by_its_email_column() {
        assert_eq!(email_column("id,Email,name"), Some(1));
        assert_eq!(email_column("\"email\""), Some(0));
        assert_eq!(email_column("a@example.com"), None);
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_told() {
        let text = format!("a@example.com\r\n{}\nb@example.com", "x".repeat(MAX_LINE + 10));
        let mut reader = BufReader::new(text.as_bytes());
        let mut line = Vec::new();
        assert_eq!(next_line(&mut reader, &mut line).await.unwrap(), Some(true));
        assert_eq!(line, b"a@example.com");
        assert_eq!(next_line(&mut reader, &mut line).await.unwrap(), Some(false));
        assert_eq!(next_line(&mut reader, &mut line).await.unwrap(), Some(true));
        assert_eq!(line, b"b@example.com");
        assert_eq!(next_line(&mut reader, &mut line).await.unwrap(), None);
    }
}
