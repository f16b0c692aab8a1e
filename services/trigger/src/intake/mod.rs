//! Taking in delivery requests: validate, store, start their preparation.
//!
//! - this module: [`take`] and [`start`], which return domain outcomes; the routes decide the
//!   HTTP answer;
//! - [`records`]: what intake writes to the database.

pub mod records;

use haishin_shared::domain::{Audience, DeliveryRequest, RequestId, RequestState};
use haishin_shared::messages::PrepareTask;
use haishin_shared::store::StoreError;

use crate::AppState;
use crate::error::Unavailable;
use crate::prepare::{self, PrepareError};

pub use haishin_shared::domain::Rejection;

/// What became of a request body.
#[derive(Debug)]
pub enum Intake {
    /// Stored (or already known under its id) and on its way.
    Accepted { id: RequestId, created: bool },
    /// Refused for good; recorded with the reason (against its id where it had one).
    Rejected(Rejection),
}

/// Validates and stores a request body, then starts its preparation. The same id twice makes one
/// request, whatever the second body says.
#[tracing::instrument(skip_all, fields(request_id))]
pub async fn take(state: &AppState, body: &[u8], message_id: Option<&str>) -> Result<Intake, Unavailable> {
    let request = match DeliveryRequest::parse(body) {
        Ok(request) => request,
        Err(rejection) => {
            match &rejection.id {
                Some(id) => {
                    tracing::Span::current().record("request_id", id.as_str());
                    records::insert_rejected(&state.store, id, &rejection.reason).await?;
                }
                None => {
                    records::insert_rejected_message(&state.store, message_id, &rejection.reason, body)
                        .await?
                }
            }
            tracing::warn!(reason = %rejection.reason, "Request rejected.");
            return Ok(Intake::Rejected(rejection));
        }
    };
    tracing::Span::current().record("request_id", request.id.as_str());
    let (stored, prepared) = store(state, &request).await;
    let created = match stored {
        Ok(created) => created,
        // The database refused the request's data: no retry can store it.
        Err(err) if err.is_refused_data() => {
            let rejection = Rejection {
                id: Some(request.id.clone()),
                reason: format!("request cannot be stored: {err}"),
            };
            records::insert_rejected(&state.store, &request.id, &rejection.reason).await?;
            tracing::warn!(reason = %rejection.reason, "Request rejected.");
            return Ok(Intake::Rejected(rejection));
        }
        Err(err) => return Err(err.into()),
    };
    if created {
        tracing::info!(class = %request.class, priority = request.priority, audience = request.audience.kind(), "Request received.");
    }
    // A request just stored is started; one stored before and left in `received` (its earlier
    // start failed) is started again. The prepare step itself is guarded, so doing this twice is
    // harmless.
    let started = if prepared {
        Ok(())
    } else if created {
        start(state, &request).await
    } else {
        match state.store.request(&request.id).await? {
            // The body stored first is the request, whatever later copies say.
            Some(row) if row.state == RequestState::Received => start(state, &row.request()?).await,
            _ => Ok(()),
        }
    };
    match started {
        // Another copy of the same request, arrived at the same moment, is preparing it.
        Ok(()) | Err(Unavailable::Busy(_)) => {}
        Err(err) => return Err(err),
    }
    Ok(Intake::Accepted { id: request.id, created })
}

/// Stores a request: an inline one of at most `inline_prepare_max` recipients prepared already
/// (see [`prepare::at_intake`]), any other in `received`. Returns whether it was stored (false:
/// the id was taken), and whether prepared.
async fn store(state: &AppState, request: &DeliveryRequest) -> (Result<bool, StoreError>, bool) {
    if matches!(&request.audience, Audience::Inline(list) if list.len() <= state.inline_prepare_max) {
        match prepare::at_intake(state, request).await {
            Ok(created) => return (Ok(created), created),
            Err(PrepareError::Store(err)) => return (Err(err), false),
            // It cannot be prepared (it would fail): it is stored `received`, and the prepare step
            // records why.
            Err(err) => tracing::warn!(error = %err, "Request not prepared as taken in."),
        }
    }
    (records::insert_request(&state.store, request).await, false)
}

/// Starts preparing a request: small inline audiences at once, others through the prepare queue.
pub async fn start(state: &AppState, request: &DeliveryRequest) -> Result<(), Unavailable> {
    match &request.audience {
        Audience::Inline(list) if list.len() <= state.inline_prepare_max => {
            // Type-erased: the prepare step's future is too deep a type for the compiler to
            // prove the handler's future `Send` through it.
            let prepared: futures::future::BoxFuture<'_, _> =
                Box::pin(prepare::run(state, &request.id, None));
            prepared.await.map(drop)
        }
        _ => {
            let name = prepare_task_name(&request.id);
            state
                .prepare_queue
                .enqueue(Some(&name), &PrepareTask { request_id: request.id.clone(), part: None })
                .await?;
            Ok(())
        }
    }
}

/// Name of a request's prepare task: one per request, ever.
pub fn prepare_task_name(request_id: &RequestId) -> String {
    haishin_shared::gcp::task_name(&format!("prepare:{request_id}"))
}
