//! The direct API: `POST /v1/requests`, `GET /v1/requests/{id}` and `GET /v1/rejections` (the list
//! of requests and their methods are in `control`), described by the OpenAPI document at
//! `GET /openapi.json` (`services/trigger/openapi.json`).

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use haishin_shared::domain::{MAX_REQUEST_BYTES, RequestId};
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;
use crate::intake::{self, Intake};
use crate::rejections::{self, Cursor, MAX_PAGE};
use crate::status::request_status;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/requests", post(create).layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES)))
        .route("/v1/requests/{id}", get(status))
        .route("/v1/rejections", get(rejections))
        .route("/openapi.json", get(openapi))
}

/// The API's OpenAPI document: every route above, its parameters, bodies and answers.
const OPENAPI: &str = include_str!("../../openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

#[derive(Debug, serde::Deserialize)]
struct RejectionsQuery {
    #[serde(default = "default_page")]
    limit: i64,
    page_token: Option<String>,
}

fn default_page() -> i64 {
    50
}

/// What was refused, newest first: `?limit=` (1 to 200, default 50) and `?page_token=` from the
/// previous page's `next_page_token`.
async fn rejections(
    State(state): State<AppState>,
    query: Result<Query<RejectionsQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::Rejected { id: None, reason: format!("bad query: {}", e.body_text()) })?;
    let cursor = match &query.page_token {
        Some(token) => Some(Cursor::parse(token).ok_or_else(|| ApiError::Rejected {
            id: None,
            reason: "page_token is not one this service gave".into(),
        })?),
        None => None,
    };
    if !(1..=MAX_PAGE).contains(&query.limit) {
        return Err(ApiError::Rejected {
            id: None,
            reason: format!("limit must be between 1 and {MAX_PAGE}"),
        });
    }
    Ok(Json(rejections::list(&state.store, query.limit, cursor.as_ref()).await?))
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
