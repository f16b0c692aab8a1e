//! Cutting an audience's files into shards: a large file is read in byte ranges, each its own
//! shard, cut where a row ends. The first shards are small and each is twice the one before,
//! up to a partition's size, so that the first chunks are cut while most of the audience is
//! still being spread (see `parts`).
//!
//! A range ends after a line break that ends a row: any line break of an NDJSON file, and of a
//! CSV file one outside a quoted field, told by following the quoting as the CSV reader does. A
//! compressed file cannot be read from the middle and is one shard, whatever its size.

use std::ops::Range;

use futures::TryStreamExt;
use haishin_shared::domain::FileFormat;
use haishin_shared::gcp::Blobs;
use tokio::sync::mpsc::UnboundedSender;

use super::super::PrepareError;
use super::super::audience::AudienceFile;

/// The first shard's size: the first chunks are cut once it is spread.
const FIRST_SHARD_BYTES: u64 = 256 * 1024;

/// One shard: a file, or a byte range of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shard {
    pub(crate) file: AudienceFile,
    /// The bytes read, the whole file when `None`.
    pub(crate) range: Option<Range<u64>>,
    /// The file's line the shard starts at (1 first).
    pub(crate) first_line: u64,
    /// About how many bytes of rows the shard holds.
    pub(crate) bytes: u64,
}

/// The size each next shard aims at: doubling from [`FIRST_SHARD_BYTES`] up to `most`.
struct Sizes {
    next: u64,
    most: u64,
}

impl Sizes {
    fn take(&mut self) -> u64 {
        let size = self.next;
        self.next = self.next.saturating_mul(2).min(self.most);
        size
    }
}

/// Files read at once while an audience is cut into shards.
const FILES_AT_ONCE: usize = 4;

/// Cuts an audience's files into shards, each at most about `most` bytes, and hands each to
/// `found` in order as soon as it is known, so that the first are spread while the rest of the
/// audience is still being read. The files are read one after the other while the shards grow,
/// then [`FILES_AT_ONCE`] at a time.
pub(crate) async fn shards(
    blobs: &Blobs,
    files: &[AudienceFile],
    most: u64,
    found: &UnboundedSender<Shard>,
) -> Result<(), PrepareError> {
    // A shard nobody waits for any more is dropped with the plan it was for.
    let mut hand = |shard| drop(found.send(shard));
    let most = most.max(1);
    let mut sizes = Sizes { next: FIRST_SHARD_BYTES.min(most), most };
    let mut files = files.iter();
    while sizes.next < most {
        let Some(file) = files.next() else { break };
        cut(blobs, file, &mut sizes, &mut hand).await?;
    }
    let rest = files.as_slice();
    for batch in rest.chunks(FILES_AT_ONCE) {
        let cut = futures::future::try_join_all(batch.iter().map(|file| cut_at_most(blobs, file, most)));
        cut.await?.into_iter().flatten().for_each(&mut hand);
    }
    Ok(())
}

/// The shards of one file, each at most `most` bytes.
async fn cut_at_most(blobs: &Blobs, file: &AudienceFile, most: u64) -> Result<Vec<Shard>, PrepareError> {
    let mut shards = Vec::new();
    cut(blobs, file, &mut Sizes { next: most, most }, &mut |shard| shards.push(shard)).await?;
    Ok(shards)
}

/// Cuts one file into shards, each given to `found` as it is known: the file itself when it is
/// small or compressed, else its ranges.
async fn cut(
    blobs: &Blobs,
    file: &AudienceFile,
    sizes: &mut Sizes,
    found: &mut impl FnMut(Shard),
) -> Result<(), PrepareError> {
    let whole = || Shard { file: file.clone(), range: None, first_line: 1, bytes: file.row_bytes() };
    if file.row_bytes() <= sizes.next || file.row_bytes() != file.size {
        sizes.take();
        found(whole());
    } else if !cut_file(blobs, file, sizes, found).await? {
        found(whole());
    }
    Ok(())
}

/// Reads a file once and cuts it into ranges of the sizes `sizes` gives, each ending where a row
/// does, given to `found` as each ends; false (and none given) for a compressed file.
async fn cut_file(
    blobs: &Blobs,
    file: &AudienceFile,
    sizes: &mut Sizes,
    found: &mut impl FnMut(Shard),
) -> Result<bool, PrepareError> {
    let mut stream = blobs.read(&file.bucket, &file.object).await?;
    let mut rows = RowEnds::new(file.format);
    let (mut at, mut start, mut lines, mut first_line) = (0u64, 0u64, 0u64, 1u64);
    let mut target = sizes.take();
    while let Some(data) = stream.try_next().await? {
        if at == 0 && data.starts_with(&[0x1f, 0x8b]) {
            return Ok(false);
        }
        rows.scan(&data, |offset, ends| {
            lines += 1;
            // The byte after the line break: where the next shard would start.
            let next = at + offset as u64 + 1;
            if ends && next - start >= target {
                found(range_shard(file, start..next, first_line));
                (start, first_line, target) = (next, lines + 1, sizes.take());
            }
        });
        at += data.len() as u64;
    }
    if at > start {
        found(range_shard(file, start..at, first_line));
    }
    Ok(true)
}

fn range_shard(file: &AudienceFile, range: Range<u64>, first_line: u64) -> Shard {
    Shard { file: file.clone(), bytes: range.end - range.start, range: Some(range), first_line }
}

/// Follows a file and tells which line breaks end a row.
pub(crate) struct RowEnds {
    csv: Option<Quoting>,
}

/// Where a CSV reader is within a row, as far as quoting goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    /// At the start of a field: a quote here opens a quoted field.
    FieldStart,
    /// In a field not quoted: quotes in it are its text.
    Unquoted,
    Quoted,
    /// A quote in a quoted field: the field's end, or the first of two (a quote in the text).
    QuoteInQuoted,
}

impl Quoting {
    /// Where a reader outside a quoted field is after `byte`, not a quote: at a field's start
    /// after a comma or a line break, else in a field not quoted.
    fn outside_quotes_after(byte: u8) -> Self {
        if matches!(byte, b',' | b'\n') { Self::FieldStart } else { Self::Unquoted }
    }
}

impl RowEnds {
    pub(crate) fn new(format: FileFormat) -> Self {
        let csv = match format {
            FileFormat::Csv => Some(Quoting::FieldStart),
            FileFormat::Ndjson => None,
        };
        Self { csv }
    }

    /// Takes the next byte; true when it is a line break that ends a row.
    pub(crate) fn step(&mut self, byte: u8) -> bool {
        let Some(state) = self.csv else { return byte == b'\n' };
        use Quoting::*;
        let (next, ends) = match (state, byte) {
            (Quoted, b'"') => (QuoteInQuoted, false),
            (Quoted, _) => (Quoted, false),
            (QuoteInQuoted, b'"') => (Quoted, false),
            (FieldStart, b'"') => (Quoted, false),
            (_, b',') => (FieldStart, false),
            (_, b'\n') => (FieldStart, true),
            _ => (Unquoted, false),
        };
        self.csv = Some(next);
        ends
    }

    /// Takes the next block of bytes, as [`RowEnds::step`] would take each of them, and calls
    /// `on_break` with the offset of each line break in it and whether it ends a row. It stops
    /// only at quotes and line breaks, found with `memchr`: outside a quoted field, the bytes
    /// between them only tell whether the next quote opens a field (it does right after a
    /// comma), so a file is cut at the speed it is read.
    pub(crate) fn scan(&mut self, data: &[u8], mut on_break: impl FnMut(usize, bool)) {
        let Some(mut state) = self.csv else {
            memchr::memchr_iter(b'\n', data).for_each(|at| on_break(at, true));
            return;
        };
        // Most files quote nothing: then every line break ends a row.
        let in_quotes = matches!(state, Quoting::Quoted | Quoting::QuoteInQuoted);
        if !in_quotes && memchr::memchr(b'"', data).is_none() {
            memchr::memchr_iter(b'\n', data).for_each(|at| on_break(at, true));
            self.csv = data.last().map(|&last| Quoting::outside_quotes_after(last)).or(self.csv);
            return;
        }
        let mut from = 0;
        while from < data.len() {
            let rest = &data[from..];
            // After a quote in a quoted field, the next byte alone tells what it was.
            let found = match state {
                Quoting::QuoteInQuoted => Some(0),
                _ => memchr::memchr2(b'"', b'\n', rest),
            };
            let skipped = found.unwrap_or(rest.len());
            // Other bytes leave a quoted field quoted; outside one, each makes the state a
            // field's start (a comma) or a field not quoted (any other), as `step` does.
            if skipped > 0 && state != Quoting::Quoted {
                state = Quoting::outside_quotes_after(rest[skipped - 1]);
            }
            let Some(offset) = found else { break };
            let at = from + offset;
            self.csv = Some(state);
            let ends = self.step(data[at]);
            state = self.csv.unwrap_or(Quoting::FieldStart);
            if data[at] == b'\n' {
                on_break(at, ends);
            }
            from = at + 1;
        }
        self.csv = Some(state);
    }
}

/// The bytes of a CSV file's header row, the line break that ends it included, from the first
/// bytes of the file; `None` when they hold no whole row.
pub(crate) fn header_of(head: &[u8]) -> Option<&[u8]> {
    let mut rows = RowEnds::new(FileFormat::Csv);
    head.iter().position(|&b| rows.step(b)).map(|end| &head[..=end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(format: FileFormat, text: &str) -> Vec<usize> {
        let mut rows = RowEnds::new(format);
        text.bytes().enumerate().filter(|&(_, b)| rows.step(b)).map(|(i, _)| i).collect()
    }

    #[test]
    fn a_line_break_in_a_quoted_field_does_not_end_the_row() {
        let text = "email,address\na@x.io,\"1 Main St\nFlat 2\"\nb@x.io,plain\n";
        let breaks: Vec<usize> = text.match_indices('\n').map(|(i, _)| i).collect();
        assert_eq!(ends(FileFormat::Csv, text), vec![breaks[0], breaks[2], breaks[3]]);
    }

    #[test]
    fn quotes_inside_an_unquoted_field_or_doubled_are_text() {
        // `5"10` is unquoted text; `"say ""hi"""` holds doubled quotes; neither opens a field.
        let text = "email,note\na@x.io,5\"10\nb@x.io,\"say \"\"hi\"\"\"\nc@x.io,x\n";
        assert_eq!(ends(FileFormat::Csv, text).len(), 4);
    }

    #[test]
    fn every_line_break_ends_an_ndjson_row() {
        assert_eq!(ends(FileFormat::Ndjson, "{\"email\":\"a\\nb\"}\n{}\n"), vec![16, 19]);
    }

    #[test]
    fn a_header_is_its_first_row() {
        assert_eq!(header_of(b"email,\"first\nname\"\na@x.io,A\n"), Some(&b"email,\"first\nname\"\n"[..]));
        assert_eq!(header_of(b"email,name"), None);
    }

    /// What `scan` reports over `text` given in blocks of `block` bytes.
    fn scanned(format: FileFormat, text: &str, block: usize) -> Vec<(usize, bool)> {
        let mut rows = RowEnds::new(format);
        let mut breaks = Vec::new();
        for (n, data) in text.as_bytes().chunks(block).enumerate() {
            rows.scan(data, |at, ends| breaks.push((n * block + at, ends)));
        }
        breaks
    }

    #[test]
    fn scanning_blocks_finds_the_line_breaks_and_row_ends_that_stepping_does() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let pieces = ["a", "b@x.io", ",", "\n", "\"", "\"\"", " ", "5\"10"];
        for _ in 0..500 {
            let text: String =
                (0..rng.random_range(0..80)).map(|_| pieces[rng.random_range(0..pieces.len())]).collect();
            for format in [FileFormat::Csv, FileFormat::Ndjson] {
                let mut rows = RowEnds::new(format);
                let stepped: Vec<(usize, bool)> = text
                    .bytes()
                    .enumerate()
                    .map(|(i, b)| (i, b, rows.step(b)))
                    .filter(|&(_, b, _)| b == b'\n')
                    .map(|(i, _, ends)| (i, ends))
                    .collect();
                for block in [1, 2, 3, 7, 64] {
                    assert_eq!(scanned(format, &text, block), stepped, "{text:?} in blocks of {block}");
                }
            }
        }
    }

    #[test]
    fn shard_sizes_double_up_to_the_most() {
        let mut sizes = Sizes { next: 100, most: 350 };
        let taken: Vec<u64> = (0..4).map(|_| sizes.take()).collect();
        assert_eq!(taken, vec![100, 200, 350, 350]);
    }
}
