//! The trigger's two kinds of failure: work that cannot be done now ([`Unavailable`], the domain's),
//! and the API's answers ([`ApiError`], HTTP's). Routes turn the first into the second, or into
//! the retry that Pub/Sub and Cloud Tasks understand.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use haishin_shared::domain::{RequestId, RequestState};
use haishin_shared::gcp::GcpError;
use haishin_shared::push::{Outcome, RetryReason};
use haishin_shared::store::StoreError;
use serde_json::json;

/// A step that cannot be done now; a later attempt can succeed.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The database or a Google API is down.
    #[error("{0}")]
    Dependency(String),
    /// Another worker holds the work under a lease.
    #[error("{0}")]
    Busy(String),
}

impl From<StoreError> for Unavailable {
    fn from(err: StoreError) -> Self {
        Unavailable::Dependency(err.to_string())
    }
}

impl From<GcpError> for Unavailable {
    fn from(err: GcpError) -> Self {
        Unavailable::Dependency(err.to_string())
    }
}

/// Pub/Sub and Cloud Tasks retry: 409 for busy work (after its lease), 503 otherwise.
impl From<Unavailable> for Outcome {
    fn from(err: Unavailable) -> Self {
        match err {
            Unavailable::Dependency(why) => Outcome::Retry(RetryReason::Unavailable(why)),
            Unavailable::Busy(why) => Outcome::Retry(RetryReason::Busy(why)),
        }
    }
}

/// An answer of the `/v1` API other than success. The body is JSON: `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request can never be accepted; the text says why.
    #[error("{reason}")]
    Rejected { id: Option<RequestId>, reason: String },
    /// 413: the body is larger than the limit, which the answer names.
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// 404: no request with that id.
    #[error("no request with id `{0}`")]
    NotFound(String),
    /// 404: the path names no method this API has; the text says which it has.
    #[error("{0}")]
    NoMethod(String),
    /// 404: nothing is kept under that name (a suppression); the text says what was looked for.
    #[error("{0}")]
    Absent(String),
    /// 409: the request is past the point where this can be done (in the state given); the text
    /// says why.
    #[error("{reason}")]
    Conflict { id: RequestId, state: RequestState, reason: String },
    /// 503: a dependency is down; try again.
    #[error("service unavailable: {0}")]
    Unavailable(#[from] Unavailable),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError::Unavailable(err.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Rejected { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) | ApiError::NoMethod(_) | ApiError::Absent(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => {
                tracing::error!(error = %self, "Request failed.");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let body = match &self {
            ApiError::Rejected { id, reason } => json!({ "error": reason, "id": id }),
            ApiError::Conflict { id, state, reason } => json!({ "error": reason, "id": id, "state": state }),
            ApiError::TooLarge { limit } => json!({ "error": self.to_string(), "limit_bytes": limit }),
            other => json!({ "error": other.to_string() }),
        };
        (status, Json(body)).into_response()
    }
}
