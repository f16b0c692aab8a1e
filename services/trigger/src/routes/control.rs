//! Managing requests: `GET /v1/requests` (the list) and the custom methods
//! `POST /v1/requests/{id}:pause`, `:resume` and `:cancel`.
//!
//! The router cannot match a suffix after a path parameter, so `POST /v1/requests/{name}` takes
//! the whole last segment and splits the method off at its last `:` (an id may hold `:` itself).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use haishin_shared::domain::{Class, RequestId, RequestState};

use super::{bad, page_token};
use crate::AppState;
use crate::control::{self, Control, Verb};
use crate::error::ApiError;
use crate::intake::records::storable;
use crate::listing::{self, Cursor, DEFAULT_PAGE, Filter, MAX_PAGE, Page};
use crate::status::{RequestStatus, request_status};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/requests", get(list)).route("/v1/requests/{id}", post(method))
}

/// Longest `reason` a pause or a cancel keeps.
const MAX_REASON: usize = 1_000;

/// `?state=…&class=…&label=key:value&page_size=N&page_token=T`: `state` and `class` may repeat
/// (any of them), `label` too (all of them).
async fn list(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(pairs) = query.map_err(|e| bad(format!("bad query: {}", e.body_text())))?;
    let mut filter = Filter::default();
    let mut labels: Vec<(String, String)> = Vec::new();
    let (mut page_size, mut cursor) = (DEFAULT_PAGE, None);
    for (key, value) in pairs {
        match key.as_str() {
            "state" => filter.states.push(value.parse::<RequestState>().map_err(|e| bad(e.to_string()))?),
            "class" => filter.classes.push(value.parse::<Class>().map_err(|e| bad(e.to_string()))?),
            "label" => match value.split_once(':') {
                Some((k, v)) if !k.is_empty() => labels.push((k.to_owned(), v.to_owned())),
                _ => return Err(bad(format!("label `{value}` is not `key:value`"))),
            },
            "page_size" => page_size = super::page_size(&value, MAX_PAGE)?,
            "page_token" => cursor = Some(page_token(&value, Cursor::parse)?),
            other => {
                return Err(bad(format!(
                    "unknown query parameter `{other}` (state, class, label, page_size, page_token)"
                )));
            }
        }
    }
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in labels {
        // One label cannot hold two values: nothing matches both.
        if wanted.get(&key).is_some_and(|held| *held != value) {
            return Ok(Json(Page { requests: Vec::new(), next_page_token: None }));
        }
        wanted.insert(key, value);
    }
    filter.labels = wanted;
    Ok(Json(listing::list(&state.store, &filter, page_size, cursor.as_ref()).await?))
}

/// The optional body of a custom method.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MethodBody {
    /// Kept as the pause's reason, or as the cancelled request's.
    reason: Option<String>,
}

/// `POST /v1/requests/{id}:pause`, `:resume`, `:cancel`: 200 with the request's status (also
/// when it was already so), 404 for an unknown id or method, 409 for a request past the point
/// where the method can apply.
async fn method(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RequestStatus>, ApiError> {
    let no_method = || {
        ApiError::NoMethod(format!(
            "POST /v1/requests/{name}: no such method (use /v1/requests/{{id}}:pause, :resume or :cancel)"
        ))
    };
    let (id, verb) = name.rsplit_once(':').ok_or_else(no_method)?;
    let verb = Verb::parse(verb).ok_or_else(no_method)?;
    let body = body.map_err(|e| bad(format!("request body could not be read: {}", e.body_text())))?;
    let body: MethodBody = if body.iter().all(u8::is_ascii_whitespace) {
        MethodBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(format!("body is not a valid method body: {e}")))?
    };
    let reason = body.reason.map(|r| storable(&r.chars().take(MAX_REASON).collect::<String>()));
    let id = RequestId::from(id);
    let outcome = match verb {
        Verb::Pause => control::pause(&state.store, &id, reason.as_deref()).await?,
        Verb::Resume => control::resume(&state.store, &id).await?,
        Verb::Cancel => control::cancel(&state.store, &id, reason.as_deref()).await?,
    };
    match outcome {
        Control::Done => {}
        Control::NotFound => return Err(ApiError::NotFound(id.to_string())),
        Control::Refused { state, reason } => return Err(ApiError::Conflict { id, state, reason }),
    }
    // A resumed request's chunks go out now; a cancel freed the slots its queued chunks held.
    if verb != Verb::Pause
        && let Err(err) = state.dispatcher.run().await
    {
        tracing::warn!(error = %err, "Dispatch after a request method failed; the next event will retry it.");
    }
    match request_status(&state.store, &id).await? {
        Some(status) => Ok(Json(status)),
        None => Err(ApiError::NotFound(id.to_string())),
    }
}
