//! `GET` and `POST /unsubscribe/{token}`: no OIDC token, since recipients reach them from their
//! mail client (see `crate::unsubscribe`). Served by the trigger among its public routes, and
//! alone by the public entry (`crate::public`).

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;

use crate::suppressions::{self, Reason};
use crate::unsubscribe::{Refusal, UnsubscribeState, confirmation, done, one_click};

/// Largest POST body read: a one-click body is a few dozen bytes.
const MAX_BODY: usize = 16 * 1024;

/// The unsubscribe routes, on any state that holds an [`UnsubscribeState`].
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    UnsubscribeState: FromRef<S>,
{
    Router::new()
        .route("/unsubscribe/{token}", get(confirm).post(unsubscribe))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// The confirmation page; changes nothing.
async fn confirm(
    State(state): State<UnsubscribeState>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    match state.check(&token) {
        Ok(claims) => confirmation(&claims),
        Err(refusal) => refusal.answer(&headers),
    }
}

/// The one-click unsubscribe: 200 once the address is suppressed in the token's scope (also when
/// it already was).
async fn unsubscribe(
    State(state): State<UnsubscribeState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let claims = match state.check(&token) {
        Ok(claims) => claims,
        Err(refusal) => return refusal.answer(&headers),
    };
    let Some(via) = body.ok().and_then(|body| one_click(&headers, &body)) else {
        return Refusal::Body.answer(&headers);
    };
    let address = [claims.address.clone()];
    match suppressions::add_many(
        state.store.pool(),
        &address,
        &claims.scope,
        Reason::Unsubscribed,
        via.source(),
    )
    .await
    {
        Ok(added) => {
            tracing::info!(scope = %claims.scope, source = via.source(), new = added == 1, "Unsubscribed.");
            done(&headers, &claims)
        }
        Err(err) => {
            tracing::error!(error = %err, "Unsubscribe not recorded.");
            Refusal::Unavailable.answer(&headers)
        }
    }
}
