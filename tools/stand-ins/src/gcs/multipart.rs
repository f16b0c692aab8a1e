//! A streaming reader of `multipart/related` bodies (Cloud Storage's multipart upload).
//!
//! Parts are read one after the other, and a part's body is handed out in pieces as it
//! arrives, so a large media part goes to disk without being held in memory.

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use memchr::memmem;

/// Why a multipart body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MultipartError {
    #[error("multipart body ended early")]
    Truncated,
    #[error("reading the request body: {0}")]
    Body(String),
}

/// Reads the parts of a body delimited by `boundary`.
pub(crate) struct Multipart<S> {
    body: S,
    buf: BytesMut,
    /// `\r\n--BOUNDARY`.
    delimiter: Vec<u8>,
    in_part: bool,
}

impl<S, E> Multipart<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    pub(crate) fn new(body: S, boundary: &str) -> Self {
        // A leading CRLF lets the first delimiter match like the others.
        Self {
            body,
            buf: BytesMut::from(&b"\r\n"[..]),
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            in_part: false,
        }
    }

    /// Moves to the next part and returns its headers (names in lower case), or `None` after
    /// the closing delimiter. The rest of the current part is skipped.
    pub(crate) async fn next_part(&mut self) -> Result<Option<Vec<(String, String)>>, MultipartError> {
        while self.chunk().await?.is_some() {}
        let at = self.find(&self.delimiter.clone(), true).await?;
        self.buf.advance(at + self.delimiter.len());
        while self.buf.len() < 2 {
            self.fill().await?;
        }
        if self.buf.starts_with(b"--") {
            return Ok(None);
        }
        let at = self.find(b"\r\n", false).await?;
        self.buf.advance(at + 2);
        while self.buf.len() < 2 {
            self.fill().await?;
        }
        let headers = if self.buf.starts_with(b"\r\n") {
            self.buf.advance(2);
            Vec::new()
        } else {
            let at = self.find(b"\r\n\r\n", false).await?;
            let block = self.buf.split_to(at + 4);
            String::from_utf8_lossy(&block[..at])
                .lines()
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
                .collect()
        };
        self.in_part = true;
        Ok(Some(headers))
    }

    /// The next piece of the current part's body, or `None` at its end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if !self.in_part {
            return Ok(None);
        }
        loop {
            match memmem::find(&self.buf, &self.delimiter) {
                Some(0) => {
                    self.in_part = false;
                    return Ok(None);
                }
                Some(at) => return Ok(Some(self.buf.split_to(at).freeze())),
                None => {
                    // Everything but a possible start of the delimiter can go out.
                    let safe = self.buf.len().saturating_sub(self.delimiter.len() - 1);
                    if safe > 0 {
                        return Ok(Some(self.buf.split_to(safe).freeze()));
                    }
                    self.fill().await?;
                }
            }
        }
    }

    /// Reads until `needle` is in the buffer and returns its position. With `discard`, bytes
    /// that cannot begin a match are dropped while searching (a preamble).
    async fn find(&mut self, needle: &[u8], discard: bool) -> Result<usize, MultipartError> {
        loop {
            if let Some(at) = memmem::find(&self.buf, needle) {
                return Ok(at);
            }
            if discard {
                let drop = self.buf.len().saturating_sub(needle.len() - 1);
                self.buf.advance(drop);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), MultipartError> {
        match self.body.next().await {
            Some(Ok(bytes)) => {
                self.buf.extend_from_slice(&bytes);
                Ok(())
            }
            Some(Err(err)) => Err(MultipartError::Body(err.to_string())),
            None => Err(MultipartError::Truncated),
        }
    }
}

/// The `boundary` parameter of a `multipart/related` content type.
pub(crate) fn boundary(content_type: &str) -> Option<&str> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/related") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (name, value) = p.split_once('=')?;
        name.trim().eq_ignore_ascii_case("boundary").then(|| value.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes, so delimiters straddle reads.
    fn pieces(body: &[u8], step: usize) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures::stream::iter(body.chunks(step).map(|c| Ok(Bytes::copy_from_slice(c))).collect::<Vec<_>>())
    }

    async fn read_all(body: &[u8], step: usize) -> Vec<(Vec<(String, String)>, Vec<u8>)> {
        let mut parts = Vec::new();
        let mut reader = Multipart::new(pieces(body, step), "XyZ");
        while let Some(headers) = reader.next_part().await.unwrap() {
            let mut data = Vec::new();
            while let Some(chunk) = reader.chunk().await.unwrap() {
                data.extend_from_slice(&chunk);
            }
            parts.push((headers, data));
        }
        parts
    }

    #[tokio::test]
    async fn parts_are_read_whatever_the_read_sizes() {
        // Near misses of the delimiter, which must stay in the data.
        let media = b"line one\r\n--XyY\r\n-- XyZ\r\n--Xy\rZ\r\r\n-\r\nend".repeat(50);
        let mut body =
            b"preamble\r\n--XyZ\r\nContent-Type: application/json\r\n\r\n{\"a\":1}\r\n--XyZ\r\n\r\n".to_vec();
        body.extend_from_slice(&media);
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        for step in [1, 3, 7, 64, 4096] {
            let parts = read_all(&body, step).await;
            assert_eq!(parts.len(), 2, "step {step}");
            assert_eq!(parts[0].0, [("content-type".to_owned(), "application/json".to_owned())]);
            assert_eq!(parts[0].1, b"{\"a\":1}");
            assert!(parts[1].0.is_empty());
            assert_eq!(parts[1].1, media, "step {step}");
        }
    }

    #[tokio::test]
    async fn a_body_without_its_closing_delimiter_is_an_error() {
        let mut reader = Multipart::new(pieces(b"--XyZ\r\n\r\nthe data goes on and on", 4), "XyZ");
        assert!(reader.next_part().await.unwrap().is_some());
        let mut data = Vec::new();
        let err = loop {
            match reader.chunk().await {
                Ok(Some(chunk)) => data.extend_from_slice(&chunk),
                Ok(None) => panic!("the part cannot end without a delimiter"),
                Err(err) => break err,
            }
        };
        assert!(matches!(err, MultipartError::Truncated));
        assert!(b"the data goes on and on".starts_with(&data));
    }

    #[test]
    fn the_boundary_is_read_from_the_content_type() {
        assert_eq!(boundary("multipart/related; boundary=abc"), Some("abc"));
        assert_eq!(boundary("Multipart/Related; charset=x; boundary=\"a b\""), Some("a b"));
        assert_eq!(boundary("multipart/form-data; boundary=abc"), None);
    }
}
