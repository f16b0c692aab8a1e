//! `POST /tasks/prepare`: Cloud Tasks asks for a request's audience to be prepared.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use haishin_shared::messages::PrepareTask;
use haishin_shared::push::{Delivered, Outcome};

use crate::AppState;
use crate::prepare::{self, Prepared};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/tasks/prepare", post(prepare))
}

/// Done once the audience is prepared, the request is past this step, or it failed for good.
async fn prepare(State(state): State<AppState>, Delivered(task): Delivered<PrepareTask>) -> Outcome {
    let task = match task {
        Ok(task) => task,
        Err(unreadable) => {
            tracing::warn!(reason = %unreadable.reason, "Unreadable prepare task dropped.");
            return Outcome::done(unreadable.reason);
        }
    };
    let id = &task.request_id;
    match prepare::run(&state, id).await {
        Ok(Prepared::Chunks(chunks)) => Outcome::done(format!("request {id} prepared: {chunks} chunks")),
        Ok(Prepared::Past(past)) => {
            Outcome::done(format!("request {id} is {}", past.map_or("unknown", |s| s.as_str())))
        }
        Ok(Prepared::Failed(reason)) => Outcome::done(format!("request {id} failed: {reason}")),
        Err(retry) => retry.into(),
    }
}
