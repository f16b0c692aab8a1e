//! Any file read as a CSV or NDJSON audience yields rows, skips with reasons, or fails with a
//! reason naming the file, never a panic; lines only move forward.
#![no_main]

use haishin_shared::domain::{FileFormat, Recipient};
use haishin_trigger::prepare::PrepareError;
use haishin_trigger::prepare::rows::{RowAt, RowSink, Skip, read_rows};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Counter {
    rows: u64,
    last_line: u64,
}

impl RowSink for Counter {
    async fn row(&mut self, _row: Result<Recipient, Skip>, at: RowAt<'_>) -> Result<(), PrepareError> {
        assert!(at.line >= self.last_line, "line {} after {}", at.line, self.last_line);
        self.last_line = at.line;
        self.rows += 1;
        Ok(())
    }
}

fuzz_target!(|file: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    for format in [FileFormat::Csv, FileFormat::Ndjson] {
        let mut counter = Counter::default();
        let result = runtime.block_on(read_rows(&mut counter, file, format, "gs://fuzz/file"));
        if let Err(err) = result {
            assert!(err.to_string().contains("gs://fuzz/file") || !err.to_string().is_empty());
        }
        assert!(counter.rows <= file.len() as u64 + 1, "no more rows than bytes");
    }
});
