//! HTTP routes. Push and task routes sit behind OIDC verification; the `/v1` API is for direct
//! callers and is protected by Cloud Run's IAM in production; `/unsubscribe/*` is for recipients
//! and `/webhooks/*` are for recipients and providers and need no token (in production they are
//! reached through the public entry, `crate::public`).

mod api;
mod control;
mod dead_letters;
mod events;
pub mod feedback;
mod push;
mod suppressions;
mod tasks;
pub mod unsubscribe;

use axum::Router;
use haishin_shared::server::PushService;

use crate::AppState;
use crate::error::ApiError;

/// An answer 400 naming what is wrong with the call.
fn bad(reason: impl Into<String>) -> ApiError {
    ApiError::Rejected { id: None, reason: reason.into() }
}

/// A list's `page_size` parameter: from 1 to `max`.
fn page_size(value: &str, max: i64) -> Result<i64, ApiError> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| bad(format!("page_size must be between 1 and {max}")))
}

/// A list's `page_token` parameter, read back with `parse` (which refuses a token it did not make).
fn page_token<C>(value: &str, parse: impl FnOnce(&str) -> Option<C>) -> Result<C, ApiError> {
    parse(value).ok_or_else(|| bad("page_token is not one this service gave"))
}

/// Every route of the trigger on the push services' scaffold.
pub fn router(service: &PushService, state: AppState) -> Router {
    let authenticated = Router::new()
        .merge(push::router())
        .merge(tasks::router())
        .merge(events::router())
        .merge(dead_letters::router());
    let public = api::router()
        .merge(control::router())
        .merge(suppressions::router())
        .merge(unsubscribe::router())
        .merge(feedback::router());
    service.router(state, authenticated, public)
}
