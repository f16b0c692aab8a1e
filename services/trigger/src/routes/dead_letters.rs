//! `POST /push/dead-letters`: messages Pub/Sub gave up delivering, from every dead-letter topic.
//!
//! Each is kept against its request, so that `GET /v1/requests/{id}` shows it. A dead-lettered
//! delivery request is also taken in again (intake is idempotent), and a dead-lettered chunk
//! message needs nothing more: the completion job re-publishes chunks that linger unsent.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use haishin_shared::domain::DeliveryRequest;
use haishin_shared::push::{Delivered, Outcome, PushEnvelope};
use haishin_shared::telemetry::metrics::{KeyValue, metrics};
use serde_json::Value;

use crate::AppState;
use crate::intake::{self, records};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/push/dead-letters", post(dead_letter))
}

/// Every dead letter is acknowledged once recorded, an unreadable one too (in the rejections):
/// only a database that is down makes Pub/Sub retry, so the route never loops.
async fn dead_letter(State(state): State<AppState>, Delivered(envelope): Delivered<PushEnvelope>) -> Outcome {
    let envelope = match envelope {
        Ok(envelope) => envelope,
        Err(unreadable) => {
            let reason = format!("unreadable dead letter: {}", unreadable.reason);
            return match records::insert_rejected_message(&state.store, None, &reason, &unreadable.excerpt)
                .await
            {
                Ok(()) => Outcome::done(reason),
                Err(err) => err.into(),
            };
        }
    };
    let message = &envelope.message;
    let body = message.data().unwrap_or_else(|_| message.data.clone().into_bytes());
    let source = message
        .attributes
        .get("CloudPubSubDeadLetterSourceSubscription")
        .cloned()
        .unwrap_or_else(|| envelope.subscription.clone());
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
    let letter = records::DeadLettered {
        message_id: &message.message_id,
        source: &source,
        request_id: text("request_id").or_else(|| text("id")).map(|id| records::storable(&id).into()),
        chunk_id: text("chunk_id").map(|id| records::storable(&id).into()),
        body: &body,
    };
    let request_id = letter.request_id.as_ref().map_or("-", |id| id.as_str());
    tracing::warn!(%source, request_id, "Message dead-lettered.");
    match records::insert_dead_letter(&state.store, &letter).await {
        // Counted once, however often the dead letter itself is delivered.
        Ok(true) => metrics().dead_letters.add(1, &[KeyValue::new("subscription", source.clone())]),
        Ok(false) => {}
        Err(err) => return err.into(),
    }
    if DeliveryRequest::parse(&body).is_ok()
        && let Err(retry) = intake::take(&state, &body, Some(&message.message_id)).await
    {
        return retry.into();
    }
    Outcome::done("dead letter recorded")
}
