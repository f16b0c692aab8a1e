//! `POST /webhooks/ses` and `POST /webhooks/sendgrid`: the provider's bounce and complaint
//! reports (see `crate::feedback`). No Google token: the providers sign their posts instead, and
//! the signature is what is checked. Served by the trigger among its public routes, and by the
//! public entry (`crate::public`).

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

use crate::feedback::sns::{Envelope, Verified};
use crate::feedback::{self, Feedback, FeedbackState, Refused, sendgrid};

/// Largest post read: SendGrid batches events up to a few hundred kilobytes.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// The feedback routes, on any state that holds a [`FeedbackState`].
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    FeedbackState: FromRef<S>,
{
    Router::new()
        .route("/webhooks/ses", post(ses))
        .route("/webhooks/sendgrid", post(sendgrid_events))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            Refused::Unauthorized(why) => (StatusCode::UNAUTHORIZED, why),
            Refused::Malformed(why) => (StatusCode::BAD_REQUEST, why),
            Refused::NotConfigured(what) => (StatusCode::NOT_FOUND, format!("{what} is not configured here")),
            Refused::Unavailable(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(%error, "Feedback not taken; the provider will retry.");
        } else {
            tracing::info!(status = status.as_u16(), %error, "Feedback refused.");
        }
        (status, axum::Json(json!({ "error": error }))).into_response()
    }
}

/// An SNS message: a subscription to confirm, or an SES notification.
async fn ses(State(state): State<FeedbackState>, body: Result<Bytes, BytesRejection>) -> Response {
    let Some(verifier) = state.sns.clone() else {
        return Refused::NotConfigured("the SES feedback webhook (SNS_TOPIC_ARNS)").into_response();
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return Refused::Malformed(rejection.body_text()).into_response(),
    };
    // Unsigned garbage is unauthorized, not malformed: nothing about it can be believed.
    let envelope: Envelope = match serde_json::from_slice(&body) {
        Ok(envelope) => envelope,
        Err(e) => return Refused::Unauthorized(format!("not a signed SNS message: {e}")).into_response(),
    };
    match verifier.verify(&envelope).await {
        Ok(Verified::Confirm(url)) => match verifier.confirm(url).await {
            Ok(()) => {
                tracing::info!("SNS subscription confirmed.");
                (StatusCode::OK, axum::Json(json!({ "confirmed": true }))).into_response()
            }
            Err(refused) => refused.into_response(),
        },
        Ok(Verified::Unsubscribed) => {
            tracing::warn!("The SNS subscription was removed: SES feedback no longer arrives.");
            StatusCode::OK.into_response()
        }
        Ok(Verified::Feedback(reports)) => keep(&state, "ses", &reports).await,
        Err(refused) => refused.into_response(),
    }
}

/// A batch of SendGrid events.
async fn sendgrid_events(
    State(state): State<FeedbackState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(key) = state.sendgrid.clone() else {
        return Refused::NotConfigured("the SendGrid event webhook (SENDGRID_WEBHOOK_PUBLIC_KEY)")
            .into_response();
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return Refused::Malformed(rejection.body_text()).into_response(),
    };
    if let Err(refused) = key.verify(&headers, &body, chrono::Utc::now()) {
        return refused.into_response();
    }
    match sendgrid::feedback(&body) {
        Ok(reports) => keep(&state, "sendgrid", &reports).await,
        Err(refused) => refused.into_response(),
    }
}

async fn keep(state: &FeedbackState, provider: &str, reports: &[Feedback]) -> Response {
    match feedback::record(&state.store, provider, reports).await {
        Ok(done) => {
            if done.recorded > 0 {
                tracing::info!(
                    recorded = done.recorded,
                    repeated = done.repeated,
                    suppressed = done.suppressed,
                    "Feedback recorded."
                );
            }
            (StatusCode::OK, axum::Json(done)).into_response()
        }
        Err(err) => Refused::Unavailable(format!("the database is unavailable: {err}")).into_response(),
    }
}
