//! Errors of the trigger's API routes.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request can never be accepted; the text says why.
    #[error("{reason}")]
    Rejected { id: Option<String>, reason: String },
    /// 404: no request with that id.
    #[error("no request with id `{0}`")]
    NotFound(String),
    /// 503: a dependency is down; try again.
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

impl From<haishin_shared::store::StoreError> for ApiError {
    fn from(err: haishin_shared::store::StoreError) -> Self {
        ApiError::Unavailable(err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Rejected { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => {
                tracing::error!(error = %self, "Request failed.");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let body = match &self {
            ApiError::Rejected { id, reason } => json!({ "error": reason, "id": id }),
            other => json!({ "error": other.to_string() }),
        };
        (status, Json(body)).into_response()
    }
}
