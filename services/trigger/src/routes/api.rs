//! The direct API: `POST /v1/requests` and `GET /v1/requests/{id}`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use haishin_shared::push::Outcome;
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;
use crate::intake::{self, Intake};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/requests", post(create)).route("/v1/requests/{id}", get(status))
}

/// 202 for a new request, 200 for an id already known, 400 with the reason for a bad one.
async fn create(State(state): State<AppState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    match intake::take(&state, &body, None).await {
        Ok(Intake::Accepted { id, created }) => {
            let status = if created { StatusCode::ACCEPTED } else { StatusCode::OK };
            let current = state.store.request_status(&id).await?.map(|s| s.state);
            Ok((status, Json(json!({ "id": id, "created": created, "state": current }))))
        }
        Ok(Intake::Rejected(rejection)) => {
            Err(ApiError::Rejected { id: rejection.id, reason: rejection.reason })
        }
        Err(Outcome::Retry(reason)) => Err(ApiError::Unavailable(format!("{reason:?}"))),
        Err(Outcome::Done(what)) => Err(ApiError::Unavailable(what)),
    }
}

async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    match state.store.request_status(&id).await? {
        Some(status) => Ok(Json(status)),
        None => Err(ApiError::NotFound(id)),
    }
}
