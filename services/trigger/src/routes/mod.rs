//! HTTP routes. Push and task routes sit behind OIDC verification; the `/v1` API is for direct
//! callers and is protected by Cloud Run's IAM in production.

mod api;
mod control;
mod dead_letters;
mod events;
mod push;
mod tasks;

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
    service.router(state, authenticated, api::router().merge(control::router()))
}
