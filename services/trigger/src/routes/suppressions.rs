//! The suppression list: `PUT`, `GET` and `DELETE /v1/suppressions/{address}`, the list
//! `GET /v1/suppressions`, and `POST /v1/suppressions:import` from files in Cloud Storage.
//!
//! An address in a path is taken as the caller writes it (percent-encoded as a path segment) and
//! looked up under its key, so `User@BÜCHER.example` finds `user@xn--bcher-kva.example`.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use haishin_shared::suppression::GLOBAL;
use serde::Deserialize;
use serde_json::json;

use super::{bad, page_token};
use crate::AppState;
use crate::error::ApiError;
use crate::suppressions::import::{ImportError, import};
use crate::suppressions::{self, Cursor, DEFAULT_PAGE, Filter, MAX_PAGE, Reason};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/suppressions", get(list))
        .route("/v1/suppressions:import", post(import_files))
        .route("/v1/suppressions/{address}", get(read).put(put).delete(delete))
}

/// A JSON body, or the defaults when it is empty.
fn body<T: for<'de> Deserialize<'de> + Default>(
    body: Result<Bytes, BytesRejection>,
    what: &str,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| bad(format!("request body could not be read: {}", e.body_text())))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| bad(format!("body is not {what}: {e}")))
}

fn reason(text: Option<&str>, default: Reason) -> Result<Reason, ApiError> {
    text.map_or(Ok(default), |r| r.parse().map_err(bad))
}

/// The body of `PUT /v1/suppressions/{address}`; every field has a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    /// `global` (the default) or a label `key:value`.
    scope: Option<String>,
    /// `manual` by default.
    reason: Option<String>,
    /// Who or what asked for it (`api` by default).
    source: Option<String>,
}

/// 201 for a new suppression, 200 when the address was already suppressed in that scope (its
/// reason and source are replaced).
async fn put(
    State(state): State<AppState>,
    Path(address): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let address = suppressions::address(&address).map_err(bad)?;
    let body: PutBody = body(raw, "a suppression (scope, reason, source)")?;
    let scope = suppressions::scope(body.scope.as_deref().unwrap_or(GLOBAL)).map_err(bad)?;
    let reason = reason(body.reason.as_deref(), Reason::Manual)?;
    let source = suppressions::source(body.source.as_deref().unwrap_or("api"));
    let (created, entry) = suppressions::put(&state.store, &address, &scope, reason, &source).await?;
    let code = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((code, Json(entry)).into_response())
}

/// Every suppression of the address, one per scope; 404 when it has none.
async fn read(State(state): State<AppState>, Path(address): Path<String>) -> Result<Response, ApiError> {
    let address = suppressions::address(&address).map_err(bad)?;
    let entries = suppressions::of_address(&state.store, &address).await?;
    if entries.is_empty() {
        return Err(ApiError::Absent(format!("`{address}` is not suppressed")));
    }
    Ok(Json(json!({ "address": address, "suppressions": entries })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    scope: Option<String>,
}

/// `?scope=` (`global` by default, as for `PUT`): 204 once lifted, 404 when the address was not
/// suppressed in that scope.
async fn delete(
    State(state): State<AppState>,
    Path(address): Path<String>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| bad(format!("bad query: {}", e.body_text())))?;
    let address = suppressions::address(&address).map_err(bad)?;
    let scope = suppressions::scope(query.scope.as_deref().unwrap_or(GLOBAL)).map_err(bad)?;
    if suppressions::delete(&state.store, &address, &scope).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::Absent(format!("`{address}` is not suppressed in scope `{scope}`")))
    }
}

/// `?scope=…&reason=…&page_size=N&page_token=T`, newest first.
async fn list(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(pairs) = query.map_err(|e| bad(format!("bad query: {}", e.body_text())))?;
    let mut filter = Filter::default();
    let (mut page_size, mut cursor) = (DEFAULT_PAGE, None);
    for (key, value) in pairs {
        match key.as_str() {
            "scope" => filter.scope = Some(suppressions::scope(&value).map_err(bad)?),
            "reason" => filter.reason = Some(value.parse().map_err(bad)?),
            "page_size" => page_size = super::page_size(&value, MAX_PAGE)?,
            "page_token" => cursor = Some(page_token(&value, Cursor::parse)?),
            other => {
                return Err(bad(format!(
                    "unknown query parameter `{other}` (scope, reason, page_size, page_token)"
                )));
            }
        }
    }
    let page = suppressions::list(&state.store, &filter, page_size, cursor.as_ref()).await?;
    Ok(Json(page).into_response())
}

/// The body of `POST /v1/suppressions:import`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportBody {
    /// `gs://bucket/object` each; a `*` in the object name matches several.
    #[serde(default)]
    uris: Vec<String>,
    scope: Option<String>,
    /// `imported` by default.
    reason: Option<String>,
    /// `import` by default.
    source: Option<String>,
}

/// 200 with what was read, added and refused; 400 naming a URI or a file that cannot be read.
async fn import_files(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: ImportBody = body(raw, "an import (uris, scope, reason, source)")?;
    if body.uris.is_empty() {
        return Err(bad("uris is required: one or more gs://bucket/object"));
    }
    let scope = suppressions::scope(body.scope.as_deref().unwrap_or(GLOBAL)).map_err(bad)?;
    let reason = reason(body.reason.as_deref(), Reason::Imported)?;
    let source = suppressions::source(body.source.as_deref().unwrap_or("import"));
    match import(&state.blobs, &state.store, &body.uris, &scope, reason, &source).await {
        Ok(report) => Ok(Json(report).into_response()),
        Err(ImportError::Unusable(reason)) => Err(bad(reason)),
        Err(ImportError::Unavailable(err)) => Err(ApiError::Unavailable(err)),
    }
}
