//! A Cloud Storage stand-in: the JSON API subset the official `Storage` client and Haishin's
//! REST calls use.
//!
//! Served:
//! - uploads (`POST /upload/storage/v1/b/{bucket}/o`): `uploadType=multipart` (what
//!   `write_object` sends below its resumable threshold), `uploadType=resumable` (above it;
//!   the session URL names this server's own address, so any port works) and
//!   `uploadType=media`; checksums the client sends are verified;
//! - reads (`GET /storage/v1/b/{bucket}/o/{object}?alt=media`, also under `/download`), whole
//!   or ranged, with the `x-goog-*` headers `read_object` relies on;
//! - object metadata (`GET` without `alt=media`), `DELETE`, and listing
//!   (`GET /storage/v1/b/{bucket}/o` with `prefix`, `delimiter`, `startOffset`, `endOffset`,
//!   `maxResults` and `pageToken`);
//! - bucket insert and get (`POST /storage/v1/b`, `GET /storage/v1/b/{bucket}`), or
//!   [`GcsServer::create_bucket`].
//!
//! `ifGenerationMatch`, `ifGenerationNotMatch`, `ifMetagenerationMatch` and
//! `ifMetagenerationNotMatch` are honoured (412 when they fail). Only the live generation of an
//! object is kept; there is no versioning, no ACL, no decompressive transcoding and no
//! metadata update. Object data lives in files under a directory of its own, removed when the
//! server is dropped, so large objects do not take memory.

mod multipart;
mod rest;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, SecondsFormat, Utc};
use md5::{Digest, Md5};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::server::Served;

/// The Cloud Storage stand-in.
///
/// Dropping it stops the server; its storage directory goes once the last request ends.
#[derive(Debug)]
pub struct GcsServer {
    store: Arc<Store>,
    served: Served,
}

impl GcsServer {
    /// Starts the stand-in on `port` (0: any free port), storing objects in a new directory
    /// under `dir` (the system's temporary directory when `None`).
    pub async fn start(port: u16, dir: Option<PathBuf>) -> Result<Self, Error> {
        let root = dir
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("haishin-gcs-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::create_dir_all(&root).await?;
        let store = Arc::new(Store {
            root,
            base_url: OnceLock::new(),
            buckets: Mutex::default(),
            sessions: Mutex::default(),
            files: AtomicU64::new(0),
            last_generation: AtomicI64::new(0),
            reads: Mutex::default(),
        });
        let served = Served::start(port, rest::router(store.clone()), CancellationToken::new()).await?;
        store.base_url.set(served.url()).expect("set once");
        Ok(Self { store, served })
    }

    /// The endpoint for `Storage::builder().with_endpoint(..)` and for JSON API calls.
    pub fn endpoint(&self) -> String {
        self.served.url()
    }

    /// How many times objects whose name starts with `prefix` were read (their data, whole or
    /// a range) or listed (a listing of a prefix under it counts once), since the start.
    pub fn reads_under(&self, prefix: &str) -> u64 {
        let reads = self.store.reads.lock().expect("reads lock");
        reads.iter().filter(|(name, _)| name.starts_with(prefix)).map(|(_, n)| n).sum()
    }

    /// Creates an empty bucket.
    pub fn create_bucket(&self, name: &str) -> Result<(), Error> {
        self.store.create_bucket(name).map(|_| ())
    }

    /// Stops the server.
    pub async fn shutdown(self) {
        self.served.shutdown().await;
    }
}

/// Buckets, objects and upload sessions.
pub(crate) struct Store {
    root: PathBuf,
    base_url: OnceLock<String>,
    buckets: Mutex<HashMap<String, Bucket>>,
    sessions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<rest::Session>>>>,
    files: AtomicU64,
    last_generation: AtomicI64,
    /// Reads and listings served, by object name or listed prefix.
    reads: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish_non_exhaustive()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.root) {
            tracing::warn!(dir = %self.root.display(), error = %err, "Could not remove the storage directory.");
        }
    }
}

struct Bucket {
    created: DateTime<Utc>,
    objects: BTreeMap<String, Object>,
}

/// The live generation of an object.
#[derive(Debug, Clone)]
struct Object {
    bucket: String,
    name: String,
    generation: i64,
    metageneration: i64,
    size: u64,
    crc32c: u32,
    md5: [u8; 16],
    attributes: Attributes,
    created: DateTime<Utc>,
    file: Arc<ObjectFile>,
}

/// What a client may set on an object when writing it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Attributes {
    content_type: String,
    content_encoding: String,
    content_disposition: String,
    content_language: String,
    cache_control: String,
    metadata: BTreeMap<String, String>,
}

/// An object's data file, removed when no object or reader refers to it any more.
#[derive(Debug)]
struct ObjectFile(PathBuf);

impl Drop for ObjectFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Object data being written, hashed as it arrives.
struct Sink {
    file: Arc<ObjectFile>,
    out: tokio::fs::File,
    size: u64,
    crc32c: u32,
    md5: Md5,
}

impl Sink {
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes).await?;
        self.size += bytes.len() as u64;
        self.crc32c = crc32c::crc32c_append(self.crc32c, bytes);
        self.md5.update(bytes);
        Ok(())
    }

    async fn finish(mut self) -> std::io::Result<Written> {
        self.out.flush().await?;
        Ok(Written { file: self.file, size: self.size, crc32c: self.crc32c, md5: self.md5.finalize().into() })
    }
}

/// Data written in full.
struct Written {
    file: Arc<ObjectFile>,
    size: u64,
    crc32c: u32,
    md5: [u8; 16],
}

/// Conditions on the live generation of an object (`ifGenerationMatch=0`: it must not exist).
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Preconditions {
    if_generation_match: Option<i64>,
    if_generation_not_match: Option<i64>,
    if_metageneration_match: Option<i64>,
    if_metageneration_not_match: Option<i64>,
}

impl Preconditions {
    fn hold_for(&self, live: Option<&Object>) -> bool {
        let generation = live.map_or(0, |o| o.generation);
        let metageneration = live.map(|o| o.metageneration);
        self.if_generation_match.is_none_or(|g| g == generation)
            && self.if_generation_not_match.is_none_or(|g| g != generation)
            && self.if_metageneration_match.is_none_or(|m| Some(m) == metageneration)
            && self.if_metageneration_not_match.is_none_or(|m| metageneration.is_some_and(|have| have != m))
    }
}

/// Why a store operation failed, mapped to Cloud Storage's errors by the REST layer.
#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("The specified bucket does not exist.")]
    NoBucket,
    #[error("No such object: {0}")]
    NoObject(String),
    #[error("At least one of the pre-conditions you specified did not hold.")]
    Precondition,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Store {
    fn count_read(&self, name: &str) {
        *self.reads.lock().expect("reads lock").entry(name.to_owned()).or_default() += 1;
    }

    fn create_bucket(&self, name: &str) -> Result<Value, Error> {
        let valid = (3..=63).contains(&name.len())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
        if !valid {
            return Err(Error::InvalidArgument(format!("invalid bucket name {name:?}")));
        }
        let mut buckets = self.buckets.lock().expect("buckets lock");
        if buckets.contains_key(name) {
            return Err(Error::AlreadyExists(name.to_owned()));
        }
        let bucket = Bucket { created: Utc::now(), objects: BTreeMap::new() };
        let json = bucket_json(name, &bucket);
        buckets.insert(name.to_owned(), bucket);
        Ok(json)
    }

    fn bucket(&self, name: &str) -> Result<Value, StoreError> {
        let buckets = self.buckets.lock().expect("buckets lock");
        buckets.get(name).map(|b| bucket_json(name, b)).ok_or(StoreError::NoBucket)
    }

    /// The live object, if its bucket exists.
    fn object(&self, bucket: &str, name: &str) -> Result<Object, StoreError> {
        let buckets = self.buckets.lock().expect("buckets lock");
        let bucket_ref = buckets.get(bucket).ok_or(StoreError::NoBucket)?;
        bucket_ref.objects.get(name).cloned().ok_or_else(|| StoreError::NoObject(format!("{bucket}/{name}")))
    }

    fn check_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        let buckets = self.buckets.lock().expect("buckets lock");
        buckets.contains_key(bucket).then_some(()).ok_or(StoreError::NoBucket)
    }

    /// A new, empty data file.
    async fn sink(&self) -> std::io::Result<Sink> {
        let path = self.root.join(self.files.fetch_add(1, Ordering::Relaxed).to_string());
        let out = tokio::fs::File::create(&path).await?;
        Ok(Sink { file: Arc::new(ObjectFile(path)), out, size: 0, crc32c: 0, md5: Md5::new() })
    }

    /// Makes written data the live generation of `bucket/name`.
    fn commit(
        &self,
        bucket: &str,
        name: &str,
        attributes: Attributes,
        preconditions: Preconditions,
        written: Written,
    ) -> Result<Object, StoreError> {
        let mut buckets = self.buckets.lock().expect("buckets lock");
        let objects = &mut buckets.get_mut(bucket).ok_or(StoreError::NoBucket)?.objects;
        if !preconditions.hold_for(objects.get(name)) {
            return Err(StoreError::Precondition);
        }
        let object = Object {
            bucket: bucket.to_owned(),
            name: name.to_owned(),
            generation: self.next_generation(),
            metageneration: 1,
            size: written.size,
            crc32c: written.crc32c,
            md5: written.md5,
            attributes,
            created: Utc::now(),
            file: written.file,
        };
        objects.insert(name.to_owned(), object.clone());
        Ok(object)
    }

    fn delete(&self, bucket: &str, name: &str, preconditions: Preconditions) -> Result<(), StoreError> {
        let mut buckets = self.buckets.lock().expect("buckets lock");
        let objects = &mut buckets.get_mut(bucket).ok_or(StoreError::NoBucket)?.objects;
        let live = objects.get(name).ok_or_else(|| StoreError::NoObject(format!("{bucket}/{name}")))?;
        if !preconditions.hold_for(Some(live)) {
            return Err(StoreError::Precondition);
        }
        objects.remove(name);
        Ok(())
    }

    /// Generations are microseconds since the epoch, as Cloud Storage's, and always increase.
    fn next_generation(&self) -> i64 {
        let now = Utc::now().timestamp_micros();
        let previous = self
            .last_generation
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(now.max(last + 1)))
            .expect("the closure always returns Some");
        now.max(previous + 1)
    }

    fn base_url(&self) -> &str {
        self.base_url.get().map_or("", String::as_str)
    }
}

impl Object {
    /// The object resource of the JSON API.
    fn to_json(&self, base_url: &str) -> Value {
        let encoded: String = reqwest::Url::parse("http://x/")
            .map(|mut u| {
                u.path_segments_mut().expect("base URL").push(&self.name);
                u.path()[1..].to_owned()
            })
            .unwrap_or_default();
        let time = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut json = json!({
            "kind": "storage#object",
            "id": format!("{}/{}/{}", self.bucket, self.name, self.generation),
            "selfLink": format!("{base_url}/storage/v1/b/{}/o/{encoded}", self.bucket),
            "mediaLink": format!("{base_url}/download/storage/v1/b/{}/o/{encoded}?generation={}&alt=media", self.bucket, self.generation),
            "name": self.name,
            "bucket": self.bucket,
            "generation": self.generation.to_string(),
            "metageneration": self.metageneration.to_string(),
            "contentType": self.content_type(),
            "storageClass": "STANDARD",
            "size": self.size.to_string(),
            "md5Hash": STANDARD.encode(self.md5),
            "crc32c": STANDARD.encode(self.crc32c.to_be_bytes()),
            "etag": self.etag(),
            "timeCreated": time(self.created),
            "updated": time(self.created),
            "timeStorageClassUpdated": time(self.created),
            "timeFinalized": time(self.created),
        });
        let a = &self.attributes;
        for (key, value) in [
            ("contentEncoding", &a.content_encoding),
            ("contentDisposition", &a.content_disposition),
            ("contentLanguage", &a.content_language),
            ("cacheControl", &a.cache_control),
        ] {
            if !value.is_empty() {
                json[key] = value.as_str().into();
            }
        }
        if !a.metadata.is_empty() {
            json["metadata"] = json!(a.metadata);
        }
        json
    }

    fn content_type(&self) -> &str {
        match self.attributes.content_type.as_str() {
            "" => "application/octet-stream",
            set => set,
        }
    }

    fn etag(&self) -> String {
        let mut bytes = self.generation.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.metageneration.to_be_bytes());
        STANDARD.encode(bytes)
    }

    fn path(&self) -> &Path {
        &self.file.0
    }
}

fn bucket_json(name: &str, bucket: &Bucket) -> Value {
    let created = bucket.created.to_rfc3339_opts(SecondsFormat::Millis, true);
    json!({
        "kind": "storage#bucket",
        "id": name,
        "name": name,
        "projectNumber": "0",
        "metageneration": "1",
        "location": "US",
        "storageClass": "STANDARD",
        "etag": "CAE=",
        "timeCreated": created,
        "updated": created,
    })
}
