//! The direct API: `POST /v1/requests` and `GET /v1/requests/{id}`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use haishin_shared::domain::{MAX_REQUEST_BYTES, RequestId};
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;
use crate::intake::{self, Intake};
use crate::status::request_status;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/requests", post(create).layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES)))
        .route("/v1/requests/{id}", get(status))
}

/// 202 for a new request, 200 for an id already known, 400 with the reason for a bad one, 413
/// for one larger than [`MAX_REQUEST_BYTES`].
async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge { limit: MAX_REQUEST_BYTES },
        _ => ApiError::Rejected {
            id: None,
            reason: format!("request body could not be read: {}", rejection.body_text()),
        },
    })?;
    match intake::take(&state, &body, None).await? {
        Intake::Accepted { id, created } => {
            let code = if created { StatusCode::ACCEPTED } else { StatusCode::OK };
            let current = state.store.request(&id).await?.map(|row| row.state);
            Ok((code, Json(json!({ "id": id, "created": created, "state": current }))))
        }
        Intake::Rejected(rejection) => Err(ApiError::Rejected { id: rejection.id, reason: rejection.reason }),
    }
}

async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    match request_status(&state.store, &RequestId::from(id.as_str())).await? {
        Some(status) => Ok(Json(status)),
        None => Err(ApiError::NotFound(id)),
    }
}
