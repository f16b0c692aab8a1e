//! Reading the rows of an audience file, CSV or NDJSON, streamed, each row handed to a
//! [`RowSink`] with where it is. A row that cannot be parsed is skipped (`malformed`) and reading
//! goes on at the next; a file that cannot be trusted (a quote left open that would swallow the
//! rows after it) fails with the file and line.

use std::future::Future;

use futures::StreamExt;
use haishin_shared::domain::{FileFormat, Recipient};
use serde_json::{Map, Value};
use tokio::io::AsyncBufReadExt;

use super::PrepareError;
pub use super::recipient::Skip;

/// Where a row is: its file (or `inline`) and line (1 first).
#[derive(Debug, Clone, Copy)]
pub struct RowAt<'a> {
    pub source: &'a str,
    pub line: u64,
}

/// Where the rows of an audience go: the chunker, or a test's (or a fuzzer's) counter.
pub trait RowSink: Send {
    /// Sees a file's columns before its rows (CSV); refusing them fails the file.
    fn columns(&mut self, _source: &str, _columns: &[&str]) -> Result<(), PrepareError> {
        Ok(())
    }

    /// Takes one row: a recipient, or why it is skipped.
    fn row(
        &mut self,
        row: Result<Recipient, Skip>,
        at: RowAt<'_>,
    ) -> impl Future<Output = Result<(), PrepareError>> + Send;
}

/// Reads every row of a file named `name` in `format` into `sink`. The file may be
/// gzip-compressed (as exports often are: a `.gz` object, or one stored with
/// `Content-Encoding: gzip` and served as stored): compression is told by the gzip magic bytes,
/// not the name, and the rows are streamed out of it either way.
pub async fn read_rows<R, S>(
    sink: &mut S,
    reader: R,
    format: FileFormat,
    name: &str,
) -> Result<(), PrepareError>
where
    R: tokio::io::AsyncRead + Send + Unpin,
    S: RowSink,
{
    let mut buffered = tokio::io::BufReader::with_capacity(256 * 1024, reader);
    let head = buffered.fill_buf().await.map_err(|e| PrepareError::Unusable(format!("{name}: {e}")))?;
    // Boxed: the reader's state machine is large, and the prepare step's future holds it.
    if head.starts_with(&[0x1f, 0x8b]) {
        let mut gunzip = async_compression::tokio::bufread::GzipDecoder::new(buffered);
        gunzip.multiple_members(true);
        Box::pin(read_format(sink, gunzip, format, name)).await
    } else {
        Box::pin(read_format(sink, buffered, format, name)).await
    }
}

async fn read_format<R, S>(
    sink: &mut S,
    reader: R,
    format: FileFormat,
    name: &str,
) -> Result<(), PrepareError>
where
    R: tokio::io::AsyncRead + Send + Unpin,
    S: RowSink,
{
    match format {
        FileFormat::Csv => read_csv(sink, reader, name).await,
        FileFormat::Ndjson => read_ndjson(sink, reader, name).await,
    }
}

async fn read_csv<R, S>(chunker: &mut S, reader: R, name: &str) -> Result<(), PrepareError>
where
    R: tokio::io::AsyncRead + Send + Unpin,
    S: RowSink,
{
    let mut csv =
        csv_async::AsyncReaderBuilder::new().flexible(true).trim(csv_async::Trim::All).create_reader(reader);
    let headers = csv.headers().await.map_err(|e| PrepareError::Unusable(format!("{name}: {e}")))?.clone();
    let Some(email_at) = headers.iter().position(|h| h.eq_ignore_ascii_case("email")) else {
        return Err(PrepareError::Unusable(format!("{name} has no `email` column")));
    };
    let columns: Vec<&str> =
        headers.iter().enumerate().filter(|(i, _)| *i != email_at).map(|(_, h)| h).collect();
    chunker.columns(name, &columns)?;
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
        chunker.row(row, at).await?;
    }
    Ok(())
}

/// Most lines one CSV record may span: a quoted field may hold a line break or two (an address),
/// but a record running on for more is a quote left open, swallowing the rows after it.
const MAX_RECORD_LINES: usize = 10;

fn spans_too_many_lines(record: &csv_async::StringRecord) -> bool {
    record.iter().map(|field| field.matches('\n').count()).sum::<usize>() >= MAX_RECORD_LINES
}

async fn read_ndjson<R, S>(chunker: &mut S, reader: R, name: &str) -> Result<(), PrepareError>
where
    R: tokio::io::AsyncRead + Send + Unpin,
    S: RowSink,
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
                chunker.row(Err(Skip::Malformed), at).await?;
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
                // A NULL is a missing value (BigQuery's JSON exports write or omit it).
                None | Some(Value::Null) => Err(Skip::MissingColumn),
                Some(_) => Err(Skip::InvalidEmail),
            },
        };
        chunker.row(row, at).await?;
    }
    Ok(())
}
