//! Taking in delivery requests and preparing their audiences.

use haishin_shared::audience::{self, PrepareError};
use haishin_shared::domain::{Audience, DeliveryRequest, Rejection, RequestState};
use haishin_shared::messages::PrepareTask;
use haishin_shared::push::{Outcome, RetryReason};
use haishin_shared::store::Claim;

use crate::AppState;

/// What became of a request body.
#[derive(Debug)]
pub enum Intake {
    /// Stored (or already known under its id) and on its way.
    Accepted { id: String, created: bool },
    /// Refused for good; recorded with the reason where the request had an id.
    Rejected(Rejection),
}

/// Validates and stores a request body, then starts its preparation. The same id twice makes one
/// request, whatever the second body says.
#[tracing::instrument(skip_all, fields(request_id))]
pub async fn take(state: &AppState, body: &[u8], message_id: Option<&str>) -> Result<Intake, Outcome> {
    let request = match DeliveryRequest::parse(body) {
        Ok(request) => request,
        Err(rejection) => {
            match &rejection.id {
                Some(id) => {
                    tracing::Span::current().record("request_id", id.as_str());
                    state.store.insert_rejected(id, &rejection.reason).await?;
                }
                None => state.store.insert_rejected_message(message_id, &rejection.reason, body).await?,
            }
            tracing::warn!(reason = %rejection.reason, "Request rejected.");
            return Ok(Intake::Rejected(rejection));
        }
    };
    tracing::Span::current().record("request_id", request.id.as_str());
    let created = state.store.insert_request(&request).await?;
    if created {
        tracing::info!(class = %request.class, priority = request.priority, audience = request.audience.kind(), "Request received.");
    }
    // A request left in `received` (its earlier start failed) is started again; the prepare step
    // itself is guarded, so doing this twice is harmless.
    if let Some(row) = state.store.request(&request.id).await?
        && row.state() == RequestState::Received
    {
        // The body stored first is the request, whatever later copies say.
        start(state, &row.request()?).await?;
    }
    Ok(Intake::Accepted { id: request.id, created })
}

/// Starts preparing a request: small inline audiences at once, others through the prepare queue.
pub async fn start(state: &AppState, request: &DeliveryRequest) -> Result<(), Outcome> {
    match &request.audience {
        Audience::Inline(list) if list.len() <= state.inline_prepare_max => {
            match Box::pin(prepare(state, &request.id)).await {
                Outcome::Done(_) => Ok(()),
                retry => Err(retry),
            }
        }
        _ => {
            let name = prepare_task_name(&request.id);
            state
                .prepare_queue
                .enqueue(Some(&name), &PrepareTask { request_id: request.id.clone() })
                .await
                .map(drop)
                .map_err(Outcome::unavailable)
        }
    }
}

/// Name of a request's prepare task: one per request, ever.
pub fn prepare_task_name(request_id: &str) -> String {
    haishin_shared::gcp::task_name(&format!("prepare:{request_id}"))
}

/// The prepare step: the audience becomes chunk objects and chunk rows, then dispatch runs.
#[tracing::instrument(skip_all, fields(request_id = %id))]
pub async fn prepare(state: &AppState, id: &str) -> Outcome {
    let row = match state.store.claim_prepare(id, state.prepare_lease).await {
        Ok(Claim::Claimed(row)) => row,
        Ok(Claim::Busy) => {
            return Outcome::Retry(RetryReason::Busy(format!("request {id} is being prepared")));
        }
        Ok(Claim::Done(state)) => {
            return Outcome::done(format!("request {id} is {}", state.as_deref().unwrap_or("unknown")));
        }
        Err(err) => return err.into(),
    };
    let request = match row.request() {
        Ok(request) => request,
        Err(err) => return fail(state, id, &err.to_string()).await,
    };
    let dispatcher = state.dispatcher.clone();
    let dispatch_now = move || {
        let dispatcher = dispatcher.clone();
        tokio::spawn(async move { dispatcher.run().await });
    };
    let prepared = audience::prepare(
        &state.blobs,
        &state.store,
        &state.bucket,
        &request,
        state.chunk_size,
        &dispatch_now,
    )
    .await;
    match prepared {
        Ok(summary) => {
            if let Err(err) = state.store.finish_prepare(id, &summary).await {
                return err.into();
            }
            if let Err(err) = state.dispatcher.run().await {
                tracing::warn!(error = %err, "Dispatch after prepare failed; the next event will retry it.");
            }
            Outcome::done(format!("request {id} prepared: {} chunks", summary.chunks))
        }
        Err(err) if err.is_permanent() => fail(state, id, &err.to_string()).await,
        Err(err) => {
            if let PrepareError::Store(_) | PrepareError::Storage(_) = err {
                let _ = state.store.drop_request_lease(id).await;
            }
            Outcome::unavailable(err)
        }
    }
}

async fn fail(state: &AppState, id: &str, reason: &str) -> Outcome {
    tracing::warn!(%reason, "Request failed.");
    match state.store.fail_request(id, RequestState::Preparing, reason).await {
        Ok(_) => Outcome::done(format!("request {id} failed: {reason}")),
        Err(err) => err.into(),
    }
}
