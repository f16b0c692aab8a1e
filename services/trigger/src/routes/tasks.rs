//! `POST /tasks/prepare`: Cloud Tasks asks for a request's audience to be prepared.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use haishin_shared::messages::PrepareTask;
use haishin_shared::push::Outcome;

use crate::{AppState, intake};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/tasks/prepare", post(prepare))
}

async fn prepare(State(state): State<AppState>, Json(task): Json<PrepareTask>) -> Outcome {
    intake::prepare(&state, &task.request_id).await
}
