//! Cloud Storage objects: writing and reading them whole or streamed, and listing them.

use std::borrow::Cow;

use google_cloud_auth::credentials::Credentials;
use google_cloud_storage::client::Storage;
use google_cloud_storage::read_object::ReadObjectResponse;
use serde_json::value::RawValue;

use super::{GcpArgs, GcpError, anonymous, rest_credentials, rest_headers};
use crate::store::ChunkRow;

/// Cloud Storage: chunk objects and audience files.
#[derive(Clone, Debug)]
pub struct Blobs {
    storage: Storage,
    http: reqwest::Client,
    json_api: String,
    credentials: Credentials,
}

impl Blobs {
    pub async fn connect(args: &GcpArgs) -> anyhow::Result<Self> {
        let mut builder = Storage::builder();
        if let Some(endpoint) = &args.storage_endpoint {
            builder = builder.with_endpoint(endpoint.clone()).with_credentials(anonymous());
        }
        let storage = builder.build().await?;
        let json_api =
            args.storage_endpoint.clone().unwrap_or_else(|| "https://storage.googleapis.com".to_owned());
        let credentials = rest_credentials(args.storage_endpoint.as_ref())?;
        Ok(Self { storage, http: reqwest::Client::new(), json_api, credentials })
    }

    fn bucket_path(bucket: &str) -> String {
        format!("projects/_/buckets/{bucket}")
    }

    /// Writes a whole object.
    pub async fn write(&self, bucket: &str, object: &str, data: bytes::Bytes) -> Result<(), GcpError> {
        self.storage
            .write_object(Self::bucket_path(bucket), object, data)
            .send_buffered()
            .await
            .map(drop)
            .map_err(|e| GcpError::from_gax("writing an object", &e))
    }

    /// Starts reading a whole object: its metadata, then its bytes as they come.
    async fn open(&self, bucket: &str, object: &str) -> Result<ReadObjectResponse, GcpError> {
        self.storage
            .read_object(Self::bucket_path(bucket), object)
            .send()
            .await
            .map_err(|e| GcpError::from_gax("reading an object", &e))
    }

    /// Streams an object's bytes.
    pub async fn read(
        &self,
        bucket: &str,
        object: &str,
    ) -> Result<futures::stream::BoxStream<'static, Result<bytes::Bytes, GcpError>>, GcpError> {
        use futures::StreamExt;
        let response = self.open(bucket, object).await?;
        Ok(futures::stream::unfold(response, |mut response| async move {
            let item = response.next().await?;
            Some((item.map_err(|e| GcpError::from_gax("reading an object", &e)), response))
        })
        .boxed())
    }

    /// Streams `length` bytes of an object from byte `offset` on (fewer where the object ends).
    pub async fn read_range(
        &self,
        bucket: &str,
        object: &str,
        offset: u64,
        length: u64,
    ) -> Result<futures::stream::BoxStream<'static, Result<bytes::Bytes, GcpError>>, GcpError> {
        use futures::StreamExt;
        use google_cloud_storage::model_ext::ReadRange;
        let response = self
            .storage
            .read_object(Self::bucket_path(bucket), object)
            .set_read_range(ReadRange::segment(offset, length))
            .send()
            .await
            .map_err(|e| GcpError::from_gax("reading part of an object", &e))?;
        Ok(futures::stream::unfold(response, |mut response| async move {
            let item = response.next().await?;
            Some((item.map_err(|e| GcpError::from_gax("reading part of an object", &e)), response))
        })
        .boxed())
    }

    /// Reads a whole (small) object, into a buffer of the size its metadata gives.
    pub async fn read_all(&self, bucket: &str, object: &str) -> Result<Vec<u8>, GcpError> {
        let mut response = self.open(bucket, object).await?;
        let mut data = Vec::with_capacity(usize::try_from(response.object().size).unwrap_or(0));
        while let Some(piece) = response.next().await {
            data.extend_from_slice(&piece.map_err(|e| GcpError::from_gax("reading an object", &e))?);
        }
        Ok(data)
    }

    /// The bytes holding a chunk's recipients, for [`lines_in`]: its row's lines, or its
    /// object read whole.
    pub async fn chunk_bytes<'a>(
        &self,
        bucket: &str,
        chunk: &'a ChunkRow,
    ) -> Result<Cow<'a, [u8]>, GcpError> {
        match &chunk.lines {
            Some(lines) => Ok(Cow::Borrowed(lines.as_bytes())),
            None => Ok(Cow::Owned(self.read_all(bucket, &chunk.object).await?)),
        }
    }

    /// A chunk's recipients, each its own copy (see [`lines_in`] for them borrowed): the lines
    /// its row holds, or those of its object. An object that holds fewer lines, or a line that
    /// is not JSON, is [`GcpError::Permanent`]: no retry can mend it.
    pub async fn chunk_lines(&self, bucket: &str, chunk: &ChunkRow) -> Result<Vec<Box<RawValue>>, GcpError> {
        let data = self.chunk_bytes(bucket, chunk).await?;
        Ok(lines_in(&data, chunk)?.into_iter().map(Cow::into_owned).collect())
    }

    /// Names of the objects under `prefix`, in name order.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, GcpError> {
        Ok(self.list_sized(bucket, prefix).await?.into_iter().map(|(name, _)| name).collect())
    }

    /// Names and sizes (bytes, as stored) of the objects under `prefix`, in name order.
    pub async fn list_sized(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, u64)>, GcpError> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            items: Vec<Item>,
            #[serde(rename = "nextPageToken")]
            next_page_token: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Item {
            name: String,
            /// The JSON API writes sizes as decimal strings.
            #[serde(default)]
            size: Option<String>,
        }
        let mut objects = Vec::new();
        let mut page_token: Option<String> = None;
        loop {
            let mut request = self
                .http
                .get(format!("{}/storage/v1/b/{bucket}/o", self.json_api))
                .headers(rest_headers(&self.credentials).await?)
                .query(&[("prefix", prefix)]);
            if let Some(token) = &page_token {
                request = request.query(&[("pageToken", token)]);
            }
            let page: Page = request
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|e| GcpError::from_reqwest("listing objects", &e))?
                .json()
                .await
                .map_err(|e| GcpError::from_reqwest("listing objects", &e))?;
            objects.extend(page.items.into_iter().map(|i| {
                let size = i.size.and_then(|s| s.parse().ok()).unwrap_or(0);
                (i.name, size)
            }));
            match page.next_page_token {
                Some(token) if !token.is_empty() => page_token = Some(token),
                _ => break,
            }
        }
        objects.sort();
        Ok(objects)
    }
}

/// A chunk's recipients in `data`, its bytes (see [`Blobs::chunk_bytes`]): the chunk's range of
/// lines (blank lines not counted), each checked to be one JSON value and borrowed as written,
/// not copied. A line that is not JSON, or fewer lines than the chunk's, is
/// [`GcpError::Permanent`].
pub fn lines_in<'a>(data: &'a [u8], chunk: &ChunkRow) -> Result<Vec<Cow<'a, RawValue>>, GcpError> {
    let (first, count) = (chunk.first_line.max(0) as usize, chunk.recipients.max(0) as usize);
    let name = &chunk.object;
    let corrupt = |detail: String| GcpError::Permanent { what: "reading a chunk object", detail };
    let mut lines = Vec::with_capacity(count);
    for line in data.split(|b| *b == b'\n').filter(|line| !line.is_empty()).skip(first).take(count) {
        let value: &RawValue =
            serde_json::from_slice(line).map_err(|e| corrupt(format!("{name} is unreadable: {e}")))?;
        lines.push(Cow::Borrowed(value));
    }
    if lines.len() != count {
        return Err(corrupt(format!(
            "{name} holds {} lines from line {first}, {count} expected",
            lines.len()
        )));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ChunkId, ChunkState, Class, RequestId};

    /// A chunk of lines `[first_line, first_line + recipients)` of `chunks/c.json`.
    fn chunk(first_line: i32, recipients: i32) -> ChunkRow {
        let request_id = RequestId::from("r");
        ChunkRow {
            id: ChunkId::new(&request_id, 0),
            request_id,
            seq: 0,
            class: Class::Batch,
            priority: 0,
            state: ChunkState::Uploading,
            object: "chunks/c.json".into(),
            first_line,
            recipients,
            lines: None,
            generation: 1,
            upload_attempts: 0,
            send_attempts: 0,
            list_id: None,
            delivery_id: None,
            delivered: None,
            bounced: None,
            failed: None,
            unknown: None,
            suppressed: None,
            progress: 0,
            retry: Vec::new(),
            in_flight: None,
            yields: 0,
            reason: None,
            created_at: chrono::Utc::now(),
            queued_at: None,
            uploaded_at: None,
            sent_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn a_chunks_lines_are_its_range_borrowed_as_written() {
        let data = b"{\"email\":\"a@x.io\"}\n\n{\"email\":\"b@x.io\"}\n{\"email\": \"c@x.io\"}\n";
        let lines = lines_in(data, &chunk(1, 2)).unwrap();
        let texts: Vec<&str> = lines.iter().map(|l| l.get()).collect();
        assert_eq!(texts, ["{\"email\":\"b@x.io\"}", "{\"email\": \"c@x.io\"}"], "blank lines not counted");
        assert!(lines.iter().all(|l| matches!(l, Cow::Borrowed(_))));
    }

    #[test]
    fn a_chunk_object_that_cannot_hold_its_lines_is_a_permanent_error() {
        let cases: [(&[u8], &str); 3] = [
            (b"{\"email\":\"a@x.io\"}\nnot json\n", "unreadable"),
            (b"{\"email\":\"a@x.io\"}\n\"\xff\"\n", "unreadable"),
            (b"{\"email\":\"a@x.io\"}\n", "holds 1 lines from line 0, 2 expected"),
        ];
        for (data, expected) in cases {
            match lines_in(data, &chunk(0, 2)) {
                Err(GcpError::Permanent { detail, .. }) => {
                    assert!(detail.contains("chunks/c.json") && detail.contains(expected), "{detail}")
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(data)),
            }
        }
    }
}
