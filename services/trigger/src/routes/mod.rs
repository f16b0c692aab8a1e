//! HTTP routes. Push and task routes sit behind OIDC verification; the `/v1` API is for direct
//! callers and is protected by Cloud Run's IAM in production.

mod api;
mod dead_letters;
mod events;
mod push;
mod tasks;

use axum::Router;
use axum::routing::get;

use crate::AppState;

pub fn router(state: AppState) -> Router {
    let authenticated = Router::new()
        .merge(push::router())
        .merge(tasks::router())
        .merge(events::router())
        .merge(dead_letters::router())
        .layer(axum::middleware::from_fn_with_state(
            state.verifier.clone(),
            haishin_shared::auth::require_token,
        ));
    let router = Router::new()
        .merge(api::router())
        .merge(authenticated)
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state);
    haishin_shared::server::with_tracing(router)
}
