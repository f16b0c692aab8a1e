//! `POST /push/requests`: delivery requests pushed by Pub/Sub.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use haishin_shared::push::{Delivered, Outcome, PushEnvelope};

use crate::AppState;
use crate::intake::{self, Intake, records};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/push/requests", post(push_request))
}

/// A malformed request is acknowledged (and recorded with its reason): a retry cannot fix it.
async fn push_request(
    State(state): State<AppState>,
    Delivered(envelope): Delivered<PushEnvelope>,
) -> Outcome {
    let envelope = match envelope {
        Ok(envelope) => envelope,
        Err(unreadable) => {
            let reason = format!("unreadable push: {}", unreadable.reason);
            return match records::insert_rejected_message(&state.store, None, &reason, &unreadable.excerpt)
                .await
            {
                Ok(()) => Outcome::done(reason),
                Err(err) => err.into(),
            };
        }
    };
    let message_id = envelope.message.message_id.as_str();
    let body = match envelope.message.data() {
        Ok(body) => body,
        Err(reason) => {
            let data = envelope.message.data.as_bytes();
            return match records::insert_rejected_message(&state.store, Some(message_id), &reason, data).await
            {
                Ok(()) => Outcome::done(reason),
                Err(err) => err.into(),
            };
        }
    };
    match intake::take(&state, &body, Some(message_id)).await {
        Ok(Intake::Accepted { id, .. }) => Outcome::done(format!("request {id} accepted")),
        Ok(Intake::Rejected(rejection)) => Outcome::done(format!("rejected: {}", rejection.reason)),
        Err(retry) => retry.into(),
    }
}
