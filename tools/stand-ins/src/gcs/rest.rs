//! The Cloud Storage JSON API routes.

use std::collections::BTreeMap;
use std::io::SeekFrom;
use std::ops::Bound;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_ENCODING, CONTENT_LANGUAGE, CONTENT_LENGTH,
    CONTENT_RANGE, CONTENT_TYPE, ETAG, LAST_MODIFIED, LOCATION, RANGE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::multipart::{Multipart, MultipartError, boundary};
use super::{Attributes, Object, Preconditions, Sink, Store, StoreError, Written};
use crate::server::ApiError;

/// The largest JSON metadata accepted in an upload, in bytes.
const MAX_METADATA_BYTES: usize = 1024 * 1024;
/// The most results in one page of a listing (also Cloud Storage's).
const MAX_PAGE: usize = 1000;

pub(super) fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/storage/v1/b", post(insert_bucket))
        .route("/storage/v1/b/{bucket}", get(get_bucket))
        .route("/storage/v1/b/{bucket}/o", get(list_objects))
        .route("/storage/v1/b/{bucket}/o/{object}", get(get_object).delete(delete_object))
        .route("/download/storage/v1/b/{bucket}/o/{object}", get(get_object))
        .route("/upload/storage/v1/b/{bucket}/o", post(upload).put(resume_upload))
        .fallback(|| async { ApiError::storage(StatusCode::NOT_FOUND, "notFound", "Not Found") })
        .with_state(store)
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let (status, reason) = match &err {
            StoreError::NoBucket | StoreError::NoObject(_) => (StatusCode::NOT_FOUND, "notFound"),
            StoreError::Precondition => (StatusCode::PRECONDITION_FAILED, "conditionNotMet"),
            StoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            StoreError::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "backendError"),
        };
        ApiError::storage(status, reason, err.to_string())
    }
}

impl From<MultipartError> for ApiError {
    fn from(err: MultipartError) -> Self {
        StoreError::Invalid(err.to_string()).into()
    }
}

impl From<std::io::Error> for ApiError {
    fn from(err: std::io::Error) -> Self {
        StoreError::Io(err).into()
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    StoreError::Invalid(message.into()).into()
}

/// Every query parameter the routes read.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ObjectQuery {
    alt: Option<String>,
    upload_type: Option<String>,
    name: Option<String>,
    #[serde(rename = "upload_id")]
    upload_id: Option<String>,
    generation: Option<i64>,
    prefix: Option<String>,
    delimiter: Option<String>,
    start_offset: Option<String>,
    end_offset: Option<String>,
    page_token: Option<String>,
    max_results: Option<usize>,
    if_generation_match: Option<i64>,
    if_generation_not_match: Option<i64>,
    if_metageneration_match: Option<i64>,
    if_metageneration_not_match: Option<i64>,
}

impl ObjectQuery {
    fn preconditions(&self) -> Preconditions {
        Preconditions {
            if_generation_match: self.if_generation_match,
            if_generation_not_match: self.if_generation_not_match,
            if_metageneration_match: self.if_metageneration_match,
            if_metageneration_not_match: self.if_metageneration_not_match,
        }
    }
}

async fn insert_bucket(
    State(store): State<Arc<Store>>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    let name = body["name"].as_str().ok_or_else(|| invalid("bucket name is required"))?;
    store.create_bucket(name).map(Json).map_err(|err| match err {
        crate::Error::AlreadyExists(_) => ApiError::storage(
            StatusCode::CONFLICT,
            "conflict",
            "Your previous request to create the named bucket succeeded and you already own it.",
        ),
        other => invalid(other.to_string()),
    })
}

async fn get_bucket(
    State(store): State<Arc<Store>>,
    Path(bucket): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(store.bucket(&bucket)?))
}

async fn get_object(
    State(store): State<Arc<Store>>,
    Path((bucket, name)): Path<(String, String)>,
    Query(query): Query<ObjectQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let object = store.object(&bucket, &name)?;
    if query.generation.is_some_and(|g| g != object.generation) {
        return Err(StoreError::NoObject(format!("{bucket}/{name}")).into());
    }
    if !query.preconditions().hold_for(Some(&object)) {
        return Err(StoreError::Precondition.into());
    }
    if query.alt.as_deref() == Some("media") {
        store.count_read(&name);
        media(&object, headers.get(RANGE)).await
    } else {
        Ok(Json(object.to_json(store.base_url())).into_response())
    }
}

/// The object's data, whole or the requested range, with the headers `read_object` reads.
/// Bytes read from an object's file at a time when serving it.
const READ_BUFFER: usize = 256 * 1024;

async fn media(object: &Object, range: Option<&HeaderValue>) -> Result<Response, ApiError> {
    let size = object.size;
    let range = match range.and_then(|r| r.to_str().ok()) {
        Some(text) => byte_range(text, size).map_err(|()| {
            ApiError::storage(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "requestedRangeNotSatisfiable",
                "Request range not satisfiable",
            )
        })?,
        None => None,
    };
    let (status, start, len) = match range {
        Some((first, last)) => (StatusCode::PARTIAL_CONTENT, first, last - first + 1),
        None => (StatusCode::OK, 0, size),
    };
    let mut file = tokio::fs::File::open(object.path()).await?;
    file.seek(SeekFrom::Start(start)).await?;
    let keep_alive = object.file.clone();
    // Large reads: tokio reads files on its blocking pool, one hop per read, so 4 KiB reads would
    // cost more than the bytes they move.
    let stream = ReaderStream::with_capacity(file.take(len), READ_BUFFER).map(move |chunk| {
        let _file = &keep_alive;
        chunk
    });
    let a = &object.attributes;
    let mut response = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, object.content_type())
        .header(CONTENT_LENGTH, len)
        .header(ACCEPT_RANGES, "bytes")
        .header(ETAG, object.etag())
        .header(LAST_MODIFIED, object.created.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
        .header("x-goog-generation", object.generation)
        .header("x-goog-metageneration", object.metageneration)
        .header("x-goog-stored-content-length", size)
        .header(
            "x-goog-stored-content-encoding",
            if a.content_encoding.is_empty() { "identity" } else { a.content_encoding.as_str() },
        )
        .header("x-goog-storage-class", "STANDARD")
        .header(
            "x-goog-hash",
            format!(
                "crc32c={},md5={}",
                STANDARD.encode(object.crc32c.to_be_bytes()),
                STANDARD.encode(object.md5)
            ),
        );
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(CONTENT_RANGE, format!("bytes {start}-{}/{size}", start + len - 1));
    }
    for (name, value) in [
        (CONTENT_ENCODING, &a.content_encoding),
        (CONTENT_DISPOSITION, &a.content_disposition),
        (CONTENT_LANGUAGE, &a.content_language),
        (CACHE_CONTROL, &a.cache_control),
    ] {
        if !value.is_empty() {
            response = response.header(name, value.as_str());
        }
    }
    for (key, value) in &a.metadata {
        if let Ok(value) = HeaderValue::from_str(value) {
            response = response.header(format!("x-goog-meta-{key}"), value);
        }
    }
    response.body(Body::from_stream(stream)).map_err(|e| invalid(e.to_string()))
}

/// The inclusive byte range a `Range` header asks of an object of `size` bytes: `None` for
/// the whole object (no usable range), `Err` when it cannot be satisfied.
fn byte_range(header: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some((first, last)) = header.trim().strip_prefix("bytes=").and_then(|r| r.split_once('-')) else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(first), Ok(last)) if first <= last => (first, last.min(size.saturating_sub(1))),
        (Ok(first), Err(_)) if last.is_empty() => (first, size.saturating_sub(1)),
        (Err(_), Ok(suffix)) if first.is_empty() => {
            if suffix == 0 {
                return Err(());
            }
            (size.saturating_sub(suffix), size.saturating_sub(1))
        }
        _ => return Ok(None),
    };
    if range.0 >= size { Err(()) } else { Ok(Some(range)) }
}

async fn delete_object(
    State(store): State<Arc<Store>>,
    Path((bucket, name)): Path<(String, String)>,
    Query(query): Query<ObjectQuery>,
) -> Result<StatusCode, ApiError> {
    store.delete(&bucket, &name, query.preconditions())?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_objects(
    State(store): State<Arc<Store>>,
    Path(bucket): Path<String>,
    Query(query): Query<ObjectQuery>,
) -> Result<Json<Value>, ApiError> {
    let prefix = query.prefix.unwrap_or_default();
    store.count_read(&prefix);
    let delimiter = query.delimiter.filter(|d| !d.is_empty());
    let max = query.max_results.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let after = match &query.page_token {
        Some(token) => Some(
            URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| invalid("invalid page token"))?,
        ),
        None => None,
    };
    let start = query.start_offset.unwrap_or_default().max(prefix.clone());
    let lower = match after {
        Some(after) if after >= start => Bound::Excluded(after),
        _ => Bound::Included(start),
    };
    let buckets = store.buckets.lock().expect("buckets lock");
    let objects = &buckets.get(&bucket).ok_or(StoreError::NoBucket)?.objects;
    let (mut items, mut prefixes, mut next_token) = (Vec::new(), Vec::<String>::new(), None);
    // The key a next page resumes after.
    let mut last_key = String::new();
    for (name, object) in objects.range::<String, _>((lower, Bound::Unbounded)) {
        if !name.starts_with(&prefix) || query.end_offset.as_ref().is_some_and(|end| name >= end) {
            break;
        }
        let rolled_up = delimiter.as_ref().and_then(|d| {
            let at = name[prefix.len()..].find(d.as_str())?;
            Some(name[..prefix.len() + at + d.len()].to_owned())
        });
        if rolled_up.is_some() && prefixes.last() == rolled_up.as_ref() {
            continue;
        }
        if items.len() + prefixes.len() == max {
            next_token = Some(URL_SAFE_NO_PAD.encode(&last_key));
            break;
        }
        match rolled_up {
            Some(common) => {
                // Skip every name under this prefix on the next page.
                last_key = format!("{common}{}", char::MAX);
                prefixes.push(common);
            }
            None => {
                last_key.clone_from(name);
                items.push(object.to_json(store.base_url()));
            }
        }
    }
    let mut page = json!({ "kind": "storage#objects" });
    if !items.is_empty() {
        page["items"] = items.into();
    }
    if !prefixes.is_empty() {
        page["prefixes"] = prefixes.into();
    }
    if let Some(token) = next_token {
        page["nextPageToken"] = token.into();
    }
    Ok(Json(page))
}

/// Object metadata as an upload carries it in JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ObjectMetadata {
    name: Option<String>,
    content_type: String,
    content_encoding: String,
    content_disposition: String,
    content_language: String,
    cache_control: String,
    metadata: BTreeMap<String, String>,
    crc32c: Option<String>,
    md5_hash: Option<String>,
}

impl ObjectMetadata {
    fn attributes(&self) -> Attributes {
        Attributes {
            content_type: self.content_type.clone(),
            content_encoding: self.content_encoding.clone(),
            content_disposition: self.content_disposition.clone(),
            content_language: self.content_language.clone(),
            cache_control: self.cache_control.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// Checksums the client computed, to be checked against the data received.
#[derive(Debug, Default, Clone, Copy)]
struct Expected {
    crc32c: Option<u32>,
    md5: Option<[u8; 16]>,
}

impl Expected {
    /// Adds base64 checksums (big-endian CRC32C, MD5), as in metadata or `x-goog-hash`.
    fn add(&mut self, crc32c: Option<&str>, md5: Option<&str>) -> Result<(), ApiError> {
        if let Some(text) = crc32c {
            let bytes: [u8; 4] = STANDARD
                .decode(text)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| invalid(format!("invalid crc32c {text:?}")))?;
            self.crc32c = Some(u32::from_be_bytes(bytes));
        }
        if let Some(text) = md5 {
            let bytes: [u8; 16] = STANDARD
                .decode(text)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| invalid(format!("invalid md5Hash {text:?}")))?;
            self.md5 = Some(bytes);
        }
        Ok(())
    }

    /// Adds the checksums of an `x-goog-hash: crc32c=…,md5=…` header.
    fn add_header(&mut self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(value) = headers.get("x-goog-hash").and_then(|v| v.to_str().ok()) else {
            return Ok(());
        };
        for item in value.split(',') {
            match item.trim().split_once('=') {
                Some(("crc32c", v)) => self.add(Some(v), None)?,
                Some(("md5", v)) => self.add(None, Some(v))?,
                _ => {}
            }
        }
        Ok(())
    }

    fn verify(&self, written: &Written) -> Result<(), ApiError> {
        if let Some(want) = self.crc32c.filter(|c| *c != written.crc32c) {
            return Err(invalid(format!(
                "Provided CRC32C \"{}\" doesn't match calculated CRC32C \"{}\".",
                STANDARD.encode(want.to_be_bytes()),
                STANDARD.encode(written.crc32c.to_be_bytes())
            )));
        }
        if let Some(want) = self.md5.filter(|m| *m != written.md5) {
            return Err(invalid(format!(
                "Provided MD5 hash \"{}\" doesn't match calculated MD5 hash \"{}\".",
                STANDARD.encode(want),
                STANDARD.encode(written.md5)
            )));
        }
        Ok(())
    }
}

fn check_object_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 1024 || name.contains(['\r', '\n']) {
        return Err(invalid(format!("invalid object name {name:?}")));
    }
    Ok(())
}

/// `POST /upload/storage/v1/b/{bucket}/o`: multipart, media or the start of a resumable upload.
async fn upload(
    State(store): State<Arc<Store>>,
    Path(bucket): Path<String>,
    Query(query): Query<ObjectQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    store.check_bucket(&bucket)?;
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    match query.upload_type.as_deref().unwrap_or("media") {
        "multipart" => {
            let boundary =
                boundary(content_type).ok_or_else(|| invalid("expected a multipart/related body"))?;
            multipart_upload(&store, &bucket, &query, Multipart::new(body.into_data_stream(), boundary)).await
        }
        "media" => {
            let name = query.name.clone().ok_or_else(|| invalid("object name is required"))?;
            check_object_name(&name)?;
            let mut sink = store.sink().await?;
            let mut stream = body.into_data_stream();
            while let Some(chunk) = stream.next().await {
                sink.write(&chunk.map_err(|e| invalid(e.to_string()))?).await?;
            }
            let attributes = Attributes { content_type: content_type.to_owned(), ..Attributes::default() };
            let written = sink.finish().await?;
            let object = store.commit(&bucket, &name, attributes, query.preconditions(), written)?;
            Ok(Json(object.to_json(store.base_url())).into_response())
        }
        "resumable" => start_resumable(&store, &bucket, &query, body).await,
        other => Err(invalid(format!("unsupported uploadType {other:?}"))),
    }
}

async fn multipart_upload<S, E>(
    store: &Store,
    bucket: &str,
    query: &ObjectQuery,
    mut parts: Multipart<S>,
) -> Result<Response, ApiError>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    parts.next_part().await?.ok_or_else(|| invalid("missing metadata part"))?;
    let metadata: ObjectMetadata = serde_json::from_slice(&collect_part(&mut parts).await?)
        .map_err(|e| invalid(format!("invalid object metadata: {e}")))?;
    let media_headers = parts.next_part().await?.ok_or_else(|| invalid("missing media part"))?;
    let mut sink = store.sink().await?;
    while let Some(chunk) = parts.chunk().await? {
        sink.write(&chunk).await?;
    }
    let mut expected = Expected::default();
    expected.add(metadata.crc32c.as_deref(), metadata.md5_hash.as_deref())?;
    // The client may send checksums computed while streaming as a third part.
    if parts.next_part().await?.is_some() {
        let trailing: ObjectMetadata = serde_json::from_slice(&collect_part(&mut parts).await?)
            .map_err(|e| invalid(format!("invalid checksums part: {e}")))?;
        expected.add(trailing.crc32c.as_deref(), trailing.md5_hash.as_deref())?;
        if parts.next_part().await?.is_some() {
            return Err(invalid("too many parts in a multipart upload"));
        }
    }
    let written = sink.finish().await?;
    expected.verify(&written)?;
    let name = query
        .name
        .clone()
        .or_else(|| metadata.name.clone())
        .ok_or_else(|| invalid("object name is required"))?;
    check_object_name(&name)?;
    let mut attributes = metadata.attributes();
    if attributes.content_type.is_empty()
        && let Some((_, media_type)) = media_headers.iter().find(|(n, _)| n == "content-type")
    {
        attributes.content_type.clone_from(media_type);
    }
    let object = store.commit(bucket, &name, attributes, query.preconditions(), written)?;
    Ok(Json(object.to_json(store.base_url())).into_response())
}

async fn collect_part<S, E>(parts: &mut Multipart<S>) -> Result<Vec<u8>, ApiError>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut data = Vec::new();
    while let Some(chunk) = parts.chunk().await? {
        data.extend_from_slice(&chunk);
        if data.len() > MAX_METADATA_BYTES {
            return Err(invalid("object metadata is too large"));
        }
    }
    Ok(data)
}

/// A resumable upload in progress (or finished, so that a late status query still succeeds).
pub(crate) struct Session {
    bucket: String,
    name: String,
    attributes: Attributes,
    preconditions: Preconditions,
    expected: Expected,
    sink: Option<Sink>,
    persisted: u64,
    finished: Option<Object>,
}

async fn start_resumable(
    store: &Store,
    bucket: &str,
    query: &ObjectQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let body = axum::body::to_bytes(body, MAX_METADATA_BYTES).await.map_err(|e| invalid(e.to_string()))?;
    let metadata: ObjectMetadata = if body.is_empty() {
        ObjectMetadata::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| invalid(format!("invalid object metadata: {e}")))?
    };
    let name = query
        .name
        .clone()
        .or_else(|| metadata.name.clone())
        .ok_or_else(|| invalid("object name is required"))?;
    check_object_name(&name)?;
    let mut expected = Expected::default();
    expected.add(metadata.crc32c.as_deref(), metadata.md5_hash.as_deref())?;
    let session = Session {
        bucket: bucket.to_owned(),
        name,
        attributes: metadata.attributes(),
        preconditions: query.preconditions(),
        expected,
        sink: Some(store.sink().await?),
        persisted: 0,
        finished: None,
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let location =
        format!("{}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={id}", store.base_url());
    store.sessions.lock().expect("sessions lock").insert(id, Arc::new(tokio::sync::Mutex::new(session)));
    Ok((StatusCode::OK, [(LOCATION, location)]).into_response())
}

/// What a `Content-Range` header of a resumable upload says.
#[derive(Debug, PartialEq, Eq)]
enum ContentRange {
    /// `bytes */*` or `bytes */N`: no data; a status query, or the final size.
    Status { total: Option<u64> },
    /// `bytes A-B/*` or `bytes A-B/N`.
    Data { first: u64, last: u64, total: Option<u64> },
    /// No header: the whole object in this one request.
    Whole,
}

fn content_range(headers: &HeaderMap) -> Result<ContentRange, ApiError> {
    let Some(value) = headers.get(CONTENT_RANGE) else { return Ok(ContentRange::Whole) };
    let text = value.to_str().unwrap_or_default();
    let bad = || invalid(format!("invalid Content-Range {text:?}"));
    let (range, total) = text.strip_prefix("bytes ").and_then(|r| r.split_once('/')).ok_or_else(bad)?;
    let total = match total {
        "*" => None,
        n => Some(n.parse().map_err(|_| bad())?),
    };
    if range == "*" {
        return Ok(ContentRange::Status { total });
    }
    let (first, last) = range.split_once('-').ok_or_else(bad)?;
    let (first, last) = (first.parse().map_err(|_| bad())?, last.parse().map_err(|_| bad())?);
    if first > last {
        return Err(bad());
    }
    Ok(ContentRange::Data { first, last, total })
}

/// `PUT` to a resumable session: a chunk of data, the final size, or a status query.
async fn resume_upload(
    State(store): State<Arc<Store>>,
    Query(query): Query<ObjectQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = query.upload_id.ok_or_else(|| invalid("upload_id is required"))?;
    let session = store.sessions.lock().expect("sessions lock").get(&id).cloned();
    let session = session
        .ok_or_else(|| ApiError::storage(StatusCode::NOT_FOUND, "notFound", "No such upload session"))?;
    let mut session = session.lock().await;
    if let Some(object) = &session.finished {
        return Ok(Json(object.to_json(store.base_url())).into_response());
    }
    let range = content_range(&headers)?;
    let total = match range {
        ContentRange::Status { total } => total,
        ContentRange::Data { first, last, total } => {
            if first > session.persisted {
                return Err(invalid(format!(
                    "upload offset is {} but the chunk starts at {first}",
                    session.persisted
                )));
            }
            let already_persisted = session.persisted - first;
            let received = append(&mut session, body, already_persisted).await?;
            if received != last - first + 1 {
                return Err(invalid("the chunk's length does not match its Content-Range"));
            }
            total
        }
        ContentRange::Whole => {
            append(&mut session, body, 0).await?;
            Some(session.persisted)
        }
    };
    session.expected.add_header(&headers)?;
    match total {
        Some(total) if total == session.persisted => {
            let sink = session.sink.take().ok_or_else(|| invalid("the upload session failed"))?;
            let written = sink.finish().await?;
            session.expected.verify(&written)?;
            let object = store.commit(
                &session.bucket,
                &session.name,
                session.attributes.clone(),
                session.preconditions,
                written,
            )?;
            let json = object.to_json(store.base_url());
            session.finished = Some(object);
            Ok(Json(json).into_response())
        }
        Some(total) if total < session.persisted => {
            Err(invalid("the upload is larger than its declared size"))
        }
        _ => {
            // 308 "Resume Incomplete", with the bytes persisted so far.
            let mut response = StatusCode::PERMANENT_REDIRECT.into_response();
            if session.persisted > 0 {
                let range =
                    HeaderValue::from_str(&format!("bytes=0-{}", session.persisted - 1)).expect("ascii");
                response.headers_mut().insert(RANGE, range);
            }
            Ok(response)
        }
    }
}

/// Appends a request body to the session, skipping its first `skip` bytes (data the session
/// already has); returns the body's length.
async fn append(session: &mut Session, body: Body, mut skip: u64) -> Result<u64, ApiError> {
    let sink = session.sink.as_mut().ok_or_else(|| invalid("the upload session failed"))?;
    let mut stream = body.into_data_stream();
    let mut received = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| invalid(e.to_string()))?;
        received += chunk.len() as u64;
        let dup = usize::try_from(skip.min(chunk.len() as u64)).expect("bounded by a length");
        skip -= dup as u64;
        sink.write(&chunk[dup..]).await?;
        session.persisted += (chunk.len() - dup) as u64;
    }
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_follow_http() {
        assert_eq!(byte_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(byte_range("bytes=90-200", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=5-", 100), Ok(Some((5, 99))));
        assert_eq!(byte_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-500", 100), Ok(Some((0, 99))));
        assert_eq!(byte_range("bytes=100-", 100), Err(()));
        assert_eq!(byte_range("bytes=-0", 100), Err(()));
        assert_eq!(byte_range("items=1-2", 100), Ok(None));
    }

    #[test]
    fn content_ranges_of_resumable_uploads_are_read() {
        let parse = |v: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_RANGE, HeaderValue::from_static(v));
            content_range(&headers).ok()
        };
        assert_eq!(parse("bytes */*"), Some(ContentRange::Status { total: None }));
        assert_eq!(parse("bytes */10"), Some(ContentRange::Status { total: Some(10) }));
        assert_eq!(parse("bytes 0-9/*"), Some(ContentRange::Data { first: 0, last: 9, total: None }));
        assert_eq!(
            parse("bytes 10-19/20"),
            Some(ContentRange::Data { first: 10, last: 19, total: Some(20) })
        );
        assert_eq!(parse("bytes 9-0/*"), None);
        assert_eq!(content_range(&HeaderMap::new()).ok(), Some(ContentRange::Whole));
    }
}
