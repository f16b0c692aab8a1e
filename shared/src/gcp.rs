//! Google Cloud clients, built once at start and shared.
//!
//! In production the clients use Application Default Credentials and Google's endpoints. When an
//! endpoint is given (the local stack), the client talks to it with anonymous credentials.

use std::collections::HashMap;
use std::time::Duration;

use google_cloud_auth::credentials::Credentials;
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::Publisher;
use google_cloud_storage::client::Storage;
use google_cloud_tasks_v2::client::CloudTasks;
use google_cloud_tasks_v2::model::{HttpMethod, HttpRequest, OidcToken, Task};
use serde::Serialize;

/// Where the Google APIs are; set only to point the services at local stand-ins.
#[derive(Debug, Clone, clap::Args)]
pub struct GcpArgs {
    /// The Google Cloud project.
    #[arg(long, env = "GOOGLE_CLOUD_PROJECT")]
    pub project: String,
    /// Pub/Sub endpoint override (local stack only).
    #[arg(long, env = "PUBSUB_ENDPOINT")]
    pub pubsub_endpoint: Option<String>,
    /// Cloud Tasks endpoint override (local stack only).
    #[arg(long, env = "TASKS_ENDPOINT")]
    pub tasks_endpoint: Option<String>,
    /// Cloud Storage endpoint override (local stack only).
    #[arg(long, env = "STORAGE_ENDPOINT")]
    pub storage_endpoint: Option<String>,
    /// BigQuery endpoint override (local stack only).
    #[arg(long, env = "BIGQUERY_ENDPOINT")]
    pub bigquery_endpoint: Option<String>,
}

fn anonymous() -> Credentials {
    google_cloud_auth::credentials::anonymous::Builder::new().build()
}

/// Credentials for a Google REST API that no client crate covers: Application Default
/// Credentials, or anonymous ones when `endpoint` points at a local stand-in.
pub fn rest_credentials(endpoint: Option<&String>) -> anyhow::Result<Credentials> {
    match endpoint {
        Some(_) => Ok(anonymous()),
        None => Ok(google_cloud_auth::credentials::Builder::default()
            .with_scopes(["https://www.googleapis.com/auth/cloud-platform"])
            .build()?),
    }
}

/// The `Authorization` (and quota) headers for one REST call.
pub async fn rest_headers(credentials: &Credentials) -> Result<http::HeaderMap, GcpError> {
    use google_cloud_auth::credentials::CacheableResource;
    match credentials.headers(http::Extensions::new()).await {
        Ok(CacheableResource::New { data, .. }) => Ok(data),
        Ok(CacheableResource::NotModified) => Ok(http::HeaderMap::new()),
        Err(err) => Err(GcpError::Transient { what: "getting credentials", detail: err.to_string() }),
    }
}

/// Errors from Google APIs, split by whether a retry can help.
#[derive(Debug, thiserror::Error)]
pub enum GcpError {
    #[error("{what} failed, worth a retry: {detail}")]
    Transient { what: &'static str, detail: String },
    #[error("{what} failed: {detail}")]
    Permanent { what: &'static str, detail: String },
}

impl GcpError {
    fn from_gax(what: &'static str, err: &google_cloud_gax::error::Error) -> Self {
        let detail = err.to_string();
        let code = err.status().map(|s| s.code);
        let permanent = matches!(
            code,
            Some(Code::InvalidArgument | Code::NotFound | Code::PermissionDenied | Code::FailedPrecondition)
        ) || matches!(err.http_status_code(), Some(400 | 403 | 404));
        if permanent { GcpError::Permanent { what, detail } } else { GcpError::Transient { what, detail } }
    }
}

/// A Pub/Sub topic to publish JSON messages to.
#[derive(Clone, Debug)]
pub struct Topic {
    publisher: Publisher,
}

impl Topic {
    /// A publisher for `projects/<project>/topics/<topic>`.
    pub async fn connect(args: &GcpArgs, topic: &str) -> anyhow::Result<Self> {
        let name = format!("projects/{}/topics/{topic}", args.project);
        let mut builder = Publisher::builder(name).set_delay_threshold(Duration::from_millis(2));
        if let Some(endpoint) = &args.pubsub_endpoint {
            builder = builder.with_endpoint(endpoint.clone()).with_credentials(anonymous());
        }
        let publisher = builder.build().await?;
        Ok(Self { publisher })
    }

    /// Publishes `message` as JSON with `attributes`; returns the message id.
    pub async fn publish<T: Serialize>(
        &self,
        message: &T,
        attributes: &[(&str, &str)],
    ) -> Result<String, GcpError> {
        let data = serde_json::to_vec(message)
            .map_err(|e| GcpError::Permanent { what: "encoding a message", detail: e.to_string() })?;
        let attributes: HashMap<String, String> =
            attributes.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let message = google_cloud_pubsub::model::Message::new().set_data(data).set_attributes(attributes);
        self.publisher
            .publish(message)
            .await
            .map_err(|e| GcpError::Transient { what: "publishing", detail: e.to_string() })
    }

    /// Sends whatever is batched.
    pub async fn flush(&self) {
        self.publisher.flush().await;
    }
}

/// A Cloud Tasks queue whose tasks POST JSON to one URL with an OIDC token.
#[derive(Clone, Debug)]
pub struct TaskQueue {
    client: CloudTasks,
    queue: String,
    url: String,
    service_account: String,
    audience: String,
}

/// What creating a named task found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Created,
    /// A task of that name exists (or did recently): the work is already queued.
    AlreadyExists,
}

/// Settings of one queue target.
#[derive(Debug, Clone)]
pub struct QueueTarget {
    /// `projects/P/locations/L/queues/Q`.
    pub queue: String,
    /// Where tasks are delivered.
    pub url: String,
    /// The account whose OIDC token the tasks carry.
    pub service_account: String,
    /// The token's audience (the target service's URL).
    pub audience: String,
}

/// A Cloud Tasks task name derived from `key`: deterministic, so that creating the task again
/// finds the first one; hashed, because Cloud Tasks slows down on sequential names.
pub fn task_name(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

impl TaskQueue {
    pub async fn connect(args: &GcpArgs, target: QueueTarget) -> anyhow::Result<Self> {
        let mut builder = CloudTasks::builder();
        if let Some(endpoint) = &args.tasks_endpoint {
            builder = builder.with_endpoint(endpoint.clone()).with_credentials(anonymous());
        }
        let client = builder.build().await?;
        Ok(Self {
            client,
            queue: target.queue,
            url: target.url,
            service_account: target.service_account,
            audience: target.audience,
        })
    }

    /// Creates a task delivering `body`. A named task is created at most once: Cloud Tasks refuses
    /// a name it has seen, which makes re-dispatch after a crash harmless.
    pub async fn enqueue<T: Serialize>(&self, name: Option<&str>, body: &T) -> Result<Enqueued, GcpError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| GcpError::Permanent { what: "encoding a task", detail: e.to_string() })?;
        let http = HttpRequest::new()
            .set_url(self.url.clone())
            .set_http_method(HttpMethod::Post)
            .set_headers([("Content-Type", "application/json")])
            .set_body(body)
            .set_oidc_token(
                OidcToken::new()
                    .set_service_account_email(self.service_account.clone())
                    .set_audience(self.audience.clone()),
            );
        let mut task = Task::new().set_http_request(http);
        if let Some(name) = name {
            task = task.set_name(format!("{}/tasks/{name}", self.queue));
        }
        match self.client.create_task().set_parent(self.queue.clone()).set_task(task).send().await {
            Ok(_) => Ok(Enqueued::Created),
            Err(err) if err.status().is_some_and(|s| s.code == Code::AlreadyExists) => {
                Ok(Enqueued::AlreadyExists)
            }
            Err(err) => Err(GcpError::from_gax("creating a task", &err)),
        }
    }
}

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

    /// Streams an object's bytes.
    pub async fn read(
        &self,
        bucket: &str,
        object: &str,
    ) -> Result<futures::stream::BoxStream<'static, Result<bytes::Bytes, GcpError>>, GcpError> {
        use futures::StreamExt;
        let response = self
            .storage
            .read_object(Self::bucket_path(bucket), object)
            .send()
            .await
            .map_err(|e| GcpError::from_gax("reading an object", &e))?;
        Ok(futures::stream::unfold(response, |mut response| async move {
            let item = response.next().await?;
            Some((item.map_err(|e| GcpError::from_gax("reading an object", &e)), response))
        })
        .boxed())
    }

    /// Reads a whole (small) object.
    pub async fn read_all(&self, bucket: &str, object: &str) -> Result<Vec<u8>, GcpError> {
        use futures::TryStreamExt;
        let stream = self.read(bucket, object).await?;
        stream
            .try_fold(Vec::new(), |mut acc, chunk| async move {
                acc.extend_from_slice(&chunk);
                Ok(acc)
            })
            .await
    }

    /// Names of the objects under `prefix`, in name order.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, GcpError> {
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
        }
        let mut names = Vec::new();
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
                .map_err(|e| GcpError::Transient { what: "listing objects", detail: e.to_string() })?
                .json()
                .await
                .map_err(|e| GcpError::Transient { what: "listing objects", detail: e.to_string() })?;
            names.extend(page.items.into_iter().map(|i| i.name));
            match page.next_page_token {
                Some(token) if !token.is_empty() => page_token = Some(token),
                _ => break,
            }
        }
        names.sort();
        Ok(names)
    }
}
