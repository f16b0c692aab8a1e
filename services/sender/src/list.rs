//! Sending through a list-based ESP: one call sends the template to the chunk's uploaded list.
//!
//! The send carries an idempotency key derived from the chunk, and the ESP's delivery history is
//! checked under that key before any chunk whose earlier attempt has no recorded outcome is sent
//! again. When the history cannot tell, the chunk ends `unknown`: never re-sent blindly. The
//! ESP's counts arrive later, when the completion job polls the delivery.

use haishin_shared::domain::ChunkId;
use haishin_shared::esp::{DeliveryId, EspError, EspProvider, ListId, SendRequest};
use haishin_shared::messages::EventKind;
use haishin_shared::push::{Outcome, RetryReason};
use haishin_shared::store::{ChunkRow, Claimed, RateSchedule, Step};
use haishin_shared::telemetry::metrics::{Api, metrics, outcome};

use crate::{AppState, fail, give_back, publish_event, unknown};

/// The ESP's idempotency key for a chunk's send: the same for every attempt.
pub fn send_key(chunk_id: &ChunkId) -> String {
    format!("send:{chunk_id}")
}

/// Sends a claimed chunk's template to its list.
pub(crate) async fn send(
    state: &AppState,
    esp: &dyn EspProvider,
    calls: Option<&RateSchedule>,
    claimed: Claimed,
) -> Outcome {
    let chunk = claimed.chunk;
    let key = send_key(&chunk.id);
    // An earlier attempt may have reached the ESP: its history decides.
    if claimed.takeover || chunk.send_attempts > 1 {
        match esp.find_delivery(&key).await {
            Ok(Some(delivery)) => {
                return record_sent(state, &chunk, &delivery, "found in the ESP's history").await;
            }
            Ok(None) => {}
            Err(err) if err.is_retryable() => {
                return give_back(state, &chunk, Outcome::unavailable(&err), true).await;
            }
            Err(err) => {
                return unknown(
                    state,
                    &chunk,
                    &format!("the ESP's history cannot tell whether it was sent: {err}"),
                )
                .await;
            }
        }
    }
    let request = match state.store.request(&chunk.request_id).await.map(|r| r.map(|r| r.request())) {
        Ok(Some(Ok(request))) => request,
        Ok(_) => return unknown(state, &chunk, "the chunk's request is missing").await,
        Err(err) => return give_back(state, &chunk, err.into(), false).await,
    };
    let Some(list_id) = chunk.list_id.clone() else {
        return fail(state, &chunk, "chunk has no uploaded list").await;
    };
    let send = SendRequest {
        idempotency_key: key.clone(),
        request_id: chunk.request_id.clone(),
        list_id: ListId(list_id),
        template: request.template,
        class: chunk.class,
    };
    let result = {
        let _slot = state.slots.acquire().await.expect("the semaphore is never closed");
        if let Some(calls) = calls
            && let Err(err) = calls.wait(1).await
        {
            return give_back(state, &chunk, err.into(), false).await;
        }
        let call = metrics().esp_call(Api::Send, chunk.class);
        let result = esp.send(&send).await;
        call.finish(outcome(result.as_ref().map(drop)));
        result
    };
    match result {
        Ok(delivery) => record_sent(state, &chunk, &delivery, "sent").await,
        Err(err) if err.maybe_accepted() => {
            // The ESP may have taken it: only its history can say.
            match esp.find_delivery(&key).await {
                Ok(Some(delivery)) => {
                    record_sent(state, &chunk, &delivery, "accepted despite the error").await
                }
                Ok(None) => give_back(state, &chunk, Outcome::unavailable(&err), false).await,
                Err(_) => give_back(state, &chunk, Outcome::unavailable(&err), true).await,
            }
        }
        Err(err @ EspError::RateLimited { .. }) => {
            tracing::warn!(api = "send", "ESP rate limited the call.");
            give_back(state, &chunk, Outcome::Retry(RetryReason::Throttled(err.to_string())), false).await
        }
        Err(err) if err.is_retryable() => give_back(state, &chunk, Outcome::unavailable(&err), false).await,
        Err(err) => fail(state, &chunk, &format!("send refused by the ESP: {err}")).await,
    }
}

async fn record_sent(state: &AppState, chunk: &ChunkRow, delivery: &DeliveryId, how: &str) -> Outcome {
    match state.store.finish_step(&chunk.id, Step::Send, &delivery.to_string()).await {
        Ok(true) => {
            tracing::info!(recipients = chunk.recipients, delivery = %delivery, how, "Chunk sent.");
            publish_event(state, chunk, EventKind::ChunkSent).await;
            Outcome::done(how.to_owned())
        }
        Ok(false) => Outcome::done("chunk was taken over while sending"),
        Err(err) => err.into(),
    }
}
