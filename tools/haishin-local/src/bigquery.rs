//! Local BigQuery: bqemulator (PyPI, DuckDB-backed, started through
//! `scripts/bqemulator-launcher.py`) behind a small front that the services are pointed at.
//!
//! This is the one place where the local stack does not do what production does. BigQuery's
//! `EXPORT DATA` writes its files into Cloud Storage; bqemulator writes them as NDJSON into a
//! local folder (`BQEMU_GCS_LOCAL_ROOT`, one sub-folder per bucket) instead. So the front copies
//! what the emulator exported into the local Cloud Storage (the stand-in) before it hands on an
//! answer saying an `EXPORT DATA` job is done: the trigger, which lists the export's shards once
//! its job is done, then finds them where BigQuery would have put them. Every other call passes
//! through unchanged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// The project the emulator serves by default.
pub const PROJECT: &str = crate::stack::PROJECT;

/// The Python that has bqemulator (`BQEMULATOR_PYTHON`, else the project's test virtualenv).
pub fn python() -> String {
    std::env::var("BQEMULATOR_PYTHON").unwrap_or_else(|_| "/var/tmp/haishin-venv/bin/python".into())
}

/// Why bqemulator cannot run here, or `None` when it can.
pub fn missing() -> Option<String> {
    let installed = std::process::Command::new(python())
        .args(["-c", "import bqemulator"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!installed)
        .then(|| format!("bqemulator is not installed for {}: run scripts/install-test-deps", python()))
}

/// A running emulator and its front; both stop when this is dropped.
pub struct LocalBigQuery {
    /// The emulator itself, for loading tables.
    pub emulator: String,
    front: String,
    exports: Arc<Exports>,
    _process: Child,
    _root: TempDir,
}

impl LocalBigQuery {
    /// Starts bqemulator on free ports and its front. Fails when it is not installed
    /// (see [`missing`]).
    pub async fn start() -> anyhow::Result<Self> {
        if let Some(reason) = missing() {
            bail!(reason);
        }
        let root = TempDir(std::env::temp_dir().join(format!("haishin-bq-exports-{}", unique())));
        std::fs::create_dir_all(&root.0)?;
        let launcher = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bqemulator-launcher.py");
        let free = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
        };
        let (rest, grpc) = (free()?, free()?);
        let process = Command::new(python())
            .arg(&launcher)
            .args(["start", "--rest-host", "127.0.0.1", "--grpc-host", "127.0.0.1", "--project", PROJECT])
            .args([
                "--rest-port",
                &rest.to_string(),
                "--grpc-port",
                &grpc.to_string(),
                "--log-level",
                "error",
            ])
            .env("BQEMU_GCS_LOCAL_ROOT", &root.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting bqemulator")?;
        let emulator = format!("http://127.0.0.1:{rest}");
        let probe = format!("{emulator}/bigquery/v2/projects/{PROJECT}/datasets");
        let mut ready = false;
        for _ in 0..600 {
            if reqwest::get(&probe).await.is_ok_and(|r| r.status().is_success()) {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !ready {
            bail!("bqemulator did not start listening on {emulator}");
        }
        let exports = Arc::new(Exports {
            root: root.0.clone(),
            storage: Mutex::default(),
            copied: Mutex::default(),
            faults: Mutex::default(),
            failed_jobs: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let front = format!("http://{}", listener.local_addr()?);
        tokio::spawn(serve(listener, emulator.clone(), exports.clone()));
        Ok(Self { emulator, front, exports, _process: process, _root: root })
    }

    /// The endpoint the services use (`BIGQUERY_ENDPOINT`).
    pub fn endpoint(&self) -> String {
        self.front.clone()
    }

    /// Where exports are copied to: the local Cloud Storage's JSON API endpoint.
    pub fn copy_exports_to(&self, storage_endpoint: &str) {
        *self.exports.storage.lock().expect("lock") = Some(storage_endpoint.trim_end_matches('/').to_owned());
    }

    /// Makes the next job inserts fail, one fault each, in order.
    pub fn inject(&self, faults: &[Fault]) {
        self.exports.faults.lock().expect("lock").extend(faults);
    }

    /// A call to the emulator's REST API under the project (`datasets`, `queries`, …); an
    /// answer holding an error is an error.
    pub async fn call(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("{}/bigquery/v2/projects/{PROJECT}/{path}", self.emulator);
        let answer: Value = reqwest::Client::new().post(url).json(body).send().await?.json().await?;
        let failed = answer.get("error").or_else(|| answer.get("errors"));
        if failed.is_some() || answer["insertErrors"].as_array().is_some_and(|e| !e.is_empty()) {
            bail!("bqemulator {path}: {answer}");
        }
        Ok(answer)
    }

    /// Creates `dataset.table` with STRING columns and loads `rows` (column values, `None`: NULL).
    pub async fn load_table(
        &self,
        dataset: &str,
        table: &str,
        columns: &[&str],
        rows: impl IntoIterator<Item = Vec<Option<String>>>,
    ) -> anyhow::Result<()> {
        let created = self
            .call("datasets", &json!({ "datasetReference": { "projectId": PROJECT, "datasetId": dataset } }))
            .await;
        if let Err(err) = created
            && !err.to_string().contains("duplicate")
            && !err.to_string().contains("Already Exists")
        {
            return Err(err);
        }
        let fields: Vec<Value> = columns.iter().map(|c| json!({ "name": c, "type": "STRING" })).collect();
        self.call(
            &format!("datasets/{dataset}/tables"),
            &json!({
                "tableReference": { "projectId": PROJECT, "datasetId": dataset, "tableId": table },
                "schema": { "fields": fields },
            }),
        )
        .await?;
        let mut batch = Vec::new();
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            batch.clear();
            for row in rows.by_ref().take(10_000) {
                let object: serde_json::Map<String, Value> = columns
                    .iter()
                    .zip(row)
                    .map(|(c, v)| ((*c).to_owned(), v.map_or(Value::Null, Value::String)))
                    .collect();
                batch.push(json!({ "json": object }));
            }
            self.call(&format!("datasets/{dataset}/tables/{table}/insertAll"), &json!({ "rows": batch }))
                .await?;
        }
        Ok(())
    }
}

/// Where the demo's batch audiences come from (`haishin-local demo --audience`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AudienceSource {
    /// A generated CSV file in the local Cloud Storage (a `gcs` audience).
    #[default]
    Gcs,
    /// The same recipients loaded into a BigQuery table (a `bigquery` audience), exported by the
    /// trigger; needs bqemulator.
    Bigquery,
}

/// The BigQuery the demo's batch audiences are loaded into, while the demo runs.
static BATCHES: Mutex<Option<Arc<LocalBigQuery>>> = Mutex::new(None);

/// Keeps the demo's BigQuery running; dropping it stops the emulator.
#[derive(Debug)]
pub struct BatchesGuard(());

impl Drop for BatchesGuard {
    fn drop(&mut self) {
        BATCHES.lock().expect("lock").take();
    }
}

/// Starts BigQuery for the batch audiences when `source` asks for it (failing, with the reason,
/// when bqemulator is not installed).
pub async fn for_batches(source: AudienceSource) -> anyhow::Result<Option<BatchesGuard>> {
    if source == AudienceSource::Gcs {
        return Ok(None);
    }
    let bigquery = LocalBigQuery::start().await.context("--audience bigquery")?;
    *BATCHES.lock().expect("lock") = Some(Arc::new(bigquery));
    Ok(Some(BatchesGuard(())))
}

/// The trigger's `BIGQUERY_ENDPOINT` when batch audiences are in BigQuery.
pub fn batch_endpoint() -> Option<String> {
    BATCHES.lock().expect("lock").as_ref().map(|b| b.endpoint())
}

/// When batch audiences are in BigQuery: loads campaign `n`'s generated CSV (`email,…` header,
/// no quoted fields) into the table `demo.campaign_n` and returns the request's audience for it.
pub async fn batch_audience(
    stack: &crate::stack::LocalStack,
    n: usize,
    csv: &[u8],
) -> anyhow::Result<Option<Value>> {
    let Some(bigquery) = BATCHES.lock().expect("lock").clone() else { return Ok(None) };
    bigquery.copy_exports_to(&stack.endpoints.storage);
    let text = std::str::from_utf8(csv).context("the generated audience is not UTF-8")?;
    let mut lines = text.lines();
    let columns: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let rows = lines.map(|line| line.split(',').map(|v| Some(v.to_owned())).collect::<Vec<_>>());
    let table = format!("campaign_{n}");
    bigquery.load_table("demo", &table, &columns, rows).await?;
    Ok(Some(json!({ "bigquery": { "table": format!("demo.{table}") } })))
}

/// A failure the front gives a job insert instead of the emulator's answer (fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The insert is answered 503 `backendError`, and no job is made.
    Unavailable,
    /// The job runs, but the front reports it failed with `backendError`, now and on every look.
    JobFails,
}

/// The emulator's export folder and what of it was copied (file → its size and time then), and
/// the faults to inject.
struct Exports {
    root: PathBuf,
    storage: Mutex<Option<String>>,
    copied: Mutex<HashMap<PathBuf, (u64, SystemTime)>>,
    faults: Mutex<VecDeque<Fault>>,
    failed_jobs: Mutex<HashSet<String>>,
}

impl Exports {
    /// Copies every file exported since the last copy into the local Cloud Storage, as the
    /// object `<path under the bucket's folder>` of the bucket the folder is named after.
    async fn copy(&self) -> anyhow::Result<()> {
        let Some(storage) = self.storage.lock().expect("lock").clone() else { return Ok(()) };
        let mut files = Vec::new();
        walk(&self.root, &mut files)?;
        for file in files {
            let meta = std::fs::metadata(&file)?;
            let stamp = (meta.len(), meta.modified()?);
            if self.copied.lock().expect("lock").get(&file) == Some(&stamp) {
                continue;
            }
            let relative = file.strip_prefix(&self.root)?.to_string_lossy().replace('\\', "/");
            let Some((bucket, object)) = relative.split_once('/') else { continue };
            let data = tokio::fs::read(&file).await?;
            let response = reqwest::Client::new()
                .post(format!("{storage}/upload/storage/v1/b/{bucket}/o"))
                .query(&[("uploadType", "media"), ("name", object)])
                .header("content-type", "application/x-ndjson")
                .body(data)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("copying the export {relative} into Cloud Storage: {}", response.status());
            }
            self.copied.lock().expect("lock").insert(file, stamp);
        }
        Ok(())
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() { walk(&path, out)? } else { out.push(path) }
    }
    Ok(())
}

/// Serves the front: each HTTP/1.1 request is passed to the emulator and its answer back, one
/// request per connection.
async fn serve(listener: TcpListener, emulator: String, exports: Arc<Exports>) {
    let http = reqwest::Client::new();
    while let Ok((stream, _)) = listener.accept().await {
        let (http, emulator, exports) = (http.clone(), emulator.clone(), exports.clone());
        tokio::spawn(async move {
            if let Err(err) = pass_on(stream, &http, &emulator, &exports).await {
                tracing::warn!(error = %err, "The local BigQuery front failed a call.");
            }
        });
    }
}

async fn pass_on(
    mut stream: TcpStream,
    http: &reqwest::Client,
    emulator: &str,
    exports: &Exports,
) -> anyhow::Result<()> {
    let mut buffer = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (request_line.next().unwrap_or("GET"), request_line.next().unwrap_or("/"));
    let mut length = 0;
    let mut content_type = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse()?,
                "content-type" => content_type = Some(value.trim().to_owned()),
                _ => {}
            }
        }
    }
    while buffer.len() < head_end + length {
        let mut chunk = vec![0u8; head_end + length - buffer.len()];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the request body ended early");
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let path = target.split('?').next().unwrap_or_default();
    let mut job = path.split_once("/jobs/").map(|(_, id)| id.to_owned());
    if method == "POST" && path.ends_with("/jobs") {
        let sent: Value = serde_json::from_slice(&buffer[head_end..]).unwrap_or_default();
        job = sent["jobReference"]["jobId"].as_str().map(str::to_owned);
        let fault = exports.faults.lock().expect("lock").pop_front();
        match (fault, &job) {
            (Some(Fault::Unavailable), _) => {
                let error = json!({ "reason": "backendError", "message": "Backend error (injected)." });
                let body =
                    json!({ "error": { "code": 503, "message": error["message"], "errors": [error] } });
                return answer(
                    &mut stream,
                    reqwest::StatusCode::SERVICE_UNAVAILABLE,
                    body.to_string().as_bytes(),
                )
                .await;
            }
            (Some(Fault::JobFails), Some(id)) => {
                exports.failed_jobs.lock().expect("lock").insert(id.clone());
            }
            _ => {}
        }
    }
    let mut request =
        http.request(method.parse()?, format!("{emulator}{target}")).body(buffer[head_end..].to_vec());
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await?;
    let status = response.status();
    let mut body = response.bytes().await?.to_vec();
    // An export the emulator reports done is copied before the answer is handed on.
    if memchr_str(&body, b"\"EXPORT_DATA\"") {
        exports.copy().await?;
    }
    if job.is_some_and(|id| exports.failed_jobs.lock().expect("lock").contains(&id)) {
        let mut described: Value = serde_json::from_slice(&body)?;
        let error = json!({ "reason": "backendError", "message": "Backend error (injected)." });
        described["status"] = json!({ "state": "DONE", "errorResult": error, "errors": [error] });
        body = serde_json::to_vec(&described)?;
    }
    answer(&mut stream, status, &body).await
}

/// Writes one HTTP/1.1 answer and closes the connection.
async fn answer(stream: &mut TcpStream, status: reqwest::StatusCode, body: &[u8]) -> anyhow::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await?;
    Ok(())
}

fn memchr_str(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
