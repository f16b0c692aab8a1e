//! Google Cloud clients, built once at start and shared.
//!
//! In production the clients use Application Default Credentials and Google's endpoints. When an
//! endpoint is given (the local stack), the client talks to it with anonymous credentials.
//!
//! - this module: where the APIs are ([`GcpArgs`]), credentials for hand-made REST calls, and
//!   [`GcpError`], the one classification of Google errors into transient and permanent;
//! - `pubsub`: [`Topic`]; `tasks`: [`TaskQueue`]; `storage`: [`Blobs`];
//! - `bigquery`: [`BigQuery`], queries and query jobs over REST, and [`BigQueryError`].

mod bigquery;
mod pubsub;
mod storage;
mod tasks;

use google_cloud_auth::credentials::Credentials;
use google_cloud_gax::error::rpc::Code;

pub use bigquery::{BigQuery, BigQueryError, Job};
pub use pubsub::Topic;
pub use storage::{Blobs, lines_in};
pub use tasks::{Enqueued, QueueTarget, TaskQueue, task_name};

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

pub(crate) fn anonymous() -> Credentials {
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
    /// Classifies a failed call by what a retry can do: the one rule for every Google API the
    /// services call. Permanent: the request itself is wrong, or names what does not exist or may
    /// not be touched (gRPC `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`,
    /// `FAILED_PRECONDITION`, `OUT_OF_RANGE`, `UNIMPLEMENTED`; HTTP 400, 403, 404, 405, 410, 412,
    /// 413, 414, 422). Everything else, a call that got no answer included, is worth a retry
    /// (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL`,
    /// `UNAUTHENTICATED` while credentials refresh; HTTP 401, 408, 429, 5xx).
    pub fn classify(what: &'static str, grpc: Option<Code>, http: Option<u16>, detail: String) -> Self {
        let permanent = matches!(
            grpc,
            Some(
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::PermissionDenied
                    | Code::FailedPrecondition
                    | Code::OutOfRange
                    | Code::Unimplemented
            )
        ) || matches!(http, Some(400 | 403 | 404 | 405 | 410 | 412 | 413 | 414 | 422));
        if permanent { GcpError::Permanent { what, detail } } else { GcpError::Transient { what, detail } }
    }

    pub(crate) fn from_gax(what: &'static str, err: &google_cloud_gax::error::Error) -> Self {
        Self::classify(what, err.status().map(|s| s.code), err.http_status_code(), err.to_string())
    }

    pub(crate) fn from_reqwest(what: &'static str, err: &reqwest::Error) -> Self {
        Self::classify(what, None, err.status().map(|s| s.as_u16()), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permanent(grpc: Option<Code>, http: Option<u16>) -> bool {
        matches!(GcpError::classify("calling", grpc, http, String::new()), GcpError::Permanent { .. })
    }

    #[test]
    fn what_no_retry_can_change_is_permanent() {
        for code in [Code::InvalidArgument, Code::NotFound, Code::PermissionDenied, Code::FailedPrecondition]
        {
            assert!(permanent(Some(code), None), "{code:?}");
        }
        for status in [400, 403, 404, 410, 412, 422] {
            assert!(permanent(None, Some(status)), "{status}");
        }
    }

    #[test]
    fn what_a_retry_can_fix_is_transient() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unauthenticated,
        ] {
            assert!(!permanent(Some(code), None), "{code:?}");
        }
        for status in [401, 408, 429, 500, 502, 503, 504] {
            assert!(!permanent(None, Some(status)), "{status}");
        }
        assert!(!permanent(None, None), "a call that got no answer");
    }
}
