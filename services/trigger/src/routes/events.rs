//! `POST /push/events`: something freed a slot or made work available; dispatch now.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use haishin_shared::messages::{EventKind, PipelineEvent};
use haishin_shared::push::{Delivered, Outcome, PushEnvelope};

use crate::intake::records;
use crate::{AppState, intake};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/push/events", post(event))
}

async fn event(State(state): State<AppState>, Delivered(envelope): Delivered<PushEnvelope>) -> Outcome {
    // Every event means the same thing to the scheduler, so an unreadable one still triggers a round.
    let event = envelope.ok().and_then(|e| e.message.json::<PipelineEvent>().ok());
    if event.as_ref().is_some_and(|e| e.kind == EventKind::Tick) {
        restart_lingering(&state).await;
        report_deadlines_at_risk(&state).await;
    }
    match state.dispatcher.run().await {
        Ok(dispatched) => Outcome::done(format!("{} chunks dispatched", dispatched.len())),
        Err(err) => err.into(),
    }
}

/// On a scheduler tick, restarts requests whose start was lost (their prepare task was never
/// created). Prepare tasks are named per request, so one that exists is not created twice.
async fn restart_lingering(state: &AppState) {
    let ids = match records::lingering_received(&state.store, std::time::Duration::from_secs(30), 100).await {
        Ok(ids) => ids,
        Err(err) => return tracing::warn!(error = %err, "Could not look for lingering requests."),
    };
    for id in ids {
        let request = match state.store.request(&id).await {
            Ok(Some(row)) => row.request(),
            _ => continue,
        };
        if let Ok(request) = request
            && let Err(err) = intake::start(state, &request).await
        {
            tracing::warn!(request_id = %id, error = %err, "Lingering request not restarted.");
        }
    }
}

/// On a scheduler tick, logs each request that will miss its deadline at the current pace: the
/// line an alert counts (terraform/monitoring.tf), so that an operator hears of it before the
/// chunks expire.
async fn report_deadlines_at_risk(state: &AppState) {
    match crate::scheduling::forecast::at_risk(&state.store, 100).await {
        Ok(risky) => {
            for (request, forecast) in risky {
                tracing::warn!(
                    request_id = %request.id,
                    deadline = ?request.deadline,
                    uploads_done_by = ?forecast.uploads_done_by,
                    chunks_left = forecast.chunks_left,
                    "Request at risk of missing its deadline."
                );
            }
        }
        Err(err) => tracing::warn!(error = %err, "Could not forecast open requests."),
    }
}
