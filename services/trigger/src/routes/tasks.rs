//! `POST /tasks/prepare`: Cloud Tasks asks for a request's audience to be prepared, or one part of
//! a large audience's preparation to be done.

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
    match Box::pin(prepare::run(&state, id, task.part)).await {
        Ok(Prepared::Chunks(chunks)) => Outcome::done(format!("request {id} prepared: {chunks} chunks")),
        Ok(Prepared::InParts) => match task.part {
            Some(part) => Outcome::done(format!("{part} of request {id} prepared")),
            None => Outcome::done(format!("request {id} is being prepared in parts")),
        },
        Ok(Prepared::Past(past)) => {
            Outcome::done(format!("request {id} is {}", past.map_or("unknown", |s| s.as_str())))
        }
        Ok(Prepared::Failed(reason)) => Outcome::done(format!("request {id} failed: {reason}")),
        Err(retry) => retry.into(),
    }
}
