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
