//! The HTTP API: the ESP protocol under `/v1` and the simulator's controls under `/_sim`.

use std::borrow::Cow;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::config::{Api, Faults};
use crate::ledger::{Kept, ListData, address_hash, at_domain};
use crate::state::{Plan, Refusal, SimState};

/// Largest accepted body: a list of a few hundred thousand recipients with parameters.
const MAX_BODY: usize = 512 * 1024 * 1024;

pub(crate) fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/v1/lists", post(upload_list))
        .route("/v1/sends", post(send).get(find_send))
        .route("/v1/sends/{delivery_id}", get(send_status))
        .route("/v1/send-batches", post(send_batch))
        .route("/_sim/report", get(report))
        .route("/_sim/deliveries", get(deliveries))
        .route("/_sim/faults", get(faults).post(set_faults))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// An error answer: `{"error": code, "message": ...}`.
fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": code, "message": message.into() }))).into_response()
}

fn too_many(state: &SimState, code: &'static str, message: &str) -> Response {
    let mut response = error(StatusCode::TOO_MANY_REQUESTS, code, message);
    let seconds = state.config.retry_after.as_secs_f64().ceil() as u64;
    response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// The 401 for a call without `Authorization: Bearer <key>`, when the simulator has a key.
fn unauthorized(state: &SimState, headers: &HeaderMap) -> Option<Response> {
    let key = state.config.api_key.as_ref()?;
    let given =
        headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        return None;
    }
    let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong api key");
    response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(response)
}

/// Answers a call whose work is done: at once, or (timeout after accept) never in time.
async fn answer(state: &SimState, plan: Plan, status: StatusCode, body: serde_json::Value) -> Response {
    let Some(hold) = plan.withhold else {
        return (status, Json(body)).into_response();
    };
    tokio::select! {
        () = tokio::time::sleep(hold) => {}
        () = state.shutdown.cancelled() => {}
    }
    // A body that fails makes the server drop the connection: the caller never learns the id.
    let failing = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("answer withheld"))
    });
    (status, Body::from_stream(failing)).into_response()
}

/// The answer to a call the dice or the limit turned away.
fn refusal(state: &SimState, refusal: Refusal) -> Response {
    match refusal {
        Refusal::InjectedError => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "injected server error")
        }
        Refusal::InjectedRateLimit => too_many(state, "rate_limited", "injected rate limit"),
        Refusal::OverLimit => too_many(state, "over_limit", "too many calls in progress for this api"),
        Refusal::OverRate => too_many(state, "over_rate", "too many calls in the last second"),
    }
}

#[derive(Deserialize)]
struct ListBody<'a> {
    #[serde(borrow)]
    idempotency_key: Cow<'a, str>,
    #[serde(borrow)]
    request_id: Cow<'a, str>,
    #[serde(borrow)]
    recipients: Vec<RecipientBody<'a>>,
}

/// A recipient as the simulator reads it: its parameters are kept (as raw JSON) only where its
/// address is.
#[derive(Deserialize)]
struct RecipientBody<'a> {
    #[serde(borrow)]
    email: Cow<'a, str>,
    #[serde(borrow, default)]
    params: Option<&'a serde_json::value::RawValue>,
}

/// A send as the simulator reads it: to a list, or to the recipients it carries. The template
/// and the class must be there, and are not used.
#[derive(Deserialize)]
struct SendBody<'a> {
    idempotency_key: String,
    request_id: String,
    list_id: Option<String>,
    #[serde(borrow)]
    recipients: Option<Vec<RecipientBody<'a>>>,
    #[serde(rename = "template")]
    _template: serde::de::IgnoredAny,
    #[serde(rename = "class")]
    _class: serde::de::IgnoredAny,
}

/// Parses a list upload into its key, request id and compact list.
fn parse_list(state: &SimState, body: &[u8]) -> Result<(String, String, ListData), String> {
    let list: ListBody<'_> = serde_json::from_slice(body).map_err(|e| format!("invalid list upload: {e}"))?;
    if list.idempotency_key.is_empty() || list.request_id.is_empty() {
        return Err("idempotency_key and request_id are required".into());
    }
    if list.recipients.is_empty() {
        return Err("the list has no recipients".into());
    }
    let list_data = list_data(state, list.recipients)?;
    Ok((list.idempotency_key.into_owned(), list.request_id.into_owned(), list_data))
}

/// Recipients reduced to what a send needs: their hashes, who bounces, and (for a few) the addresses.
fn list_data(state: &SimState, recipients: Vec<RecipientBody<'_>>) -> Result<ListData, String> {
    let keep = recipients.len() <= state.config.keep_addresses_max;
    let bounce_domain = state.config.bounce_domain.as_deref();
    let mut hashes = Vec::with_capacity(recipients.len());
    let mut bounced = Vec::new();
    for (i, r) in recipients.iter().enumerate() {
        if !r.email.contains('@') {
            return Err(format!("recipient {i} has no valid address"));
        }
        hashes.push(address_hash(&r.email));
        if bounce_domain.is_some_and(|d| at_domain(&r.email, d)) {
            bounced.push(u32::try_from(i).map_err(|_| "the list is too long")?);
        }
    }
    let addresses = keep.then(|| {
        recipients
            .into_iter()
            .map(|r| Kept {
                email: Box::from(r.email.as_ref()),
                params: r.params.map(|p| Box::from(p.get())),
            })
            .collect()
    });
    Ok(ListData { hashes, bounced, addresses })
}

/// A call refused before any work: its status, error code and message.
type Refused = (StatusCode, &'static str, String);

/// Who a send goes to: its list, or the recipients it carries (at most `inline_recipients_max`).
fn send_audience(state: &SimState, send: SendBody<'_>) -> Result<Arc<ListData>, Refused> {
    let invalid = |message: String| (StatusCode::BAD_REQUEST, "invalid_request", message);
    match (send.list_id, send.recipients) {
        (Some(list_id), None) => state
            .ledger()
            .list(&list_id)
            .ok_or_else(|| (StatusCode::NOT_FOUND, "list_not_found", format!("no list `{list_id}`"))),
        (None, Some(recipients)) => {
            let max = state.config.inline_recipients_max;
            if recipients.is_empty() {
                return Err(invalid("the send has no recipients".into()));
            }
            if recipients.len() > max {
                return Err(invalid(format!(
                    "a send carries at most {max} recipients; {} given: upload them as a list",
                    recipients.len()
                )));
            }
            list_data(state, recipients).map(Arc::new).map_err(invalid)
        }
        (Some(_), Some(_)) => Err(invalid("a send has a list_id or recipients, not both".into())),
        (None, None) => Err(invalid("a send needs a list_id or recipients".into())),
    }
}

/// Admits a call, then does its work once the call's latency has passed, holding its slot until
/// then. The work runs on a task of its own, so it goes on when the caller hangs up, as at an ESP
/// that accepted the call. `Err` is the answer to a call turned away.
async fn perform<T: Send + 'static>(
    state: &Arc<SimState>,
    api: Api,
    request_id: &str,
    recipients: usize,
    work: impl FnOnce(&SimState) -> T + Send + 'static,
) -> Result<(T, Plan), Response> {
    let (slot, plan) = state.admit(api, request_id, recipients).map_err(|refused| refusal(state, refused))?;
    let (done, result) = oneshot::channel();
    let worker = Arc::clone(state);
    tokio::spawn(async move {
        tokio::time::sleep(plan.latency).await;
        let out = work(&worker);
        drop(slot);
        let _ = done.send(out);
    });
    match result.await {
        Ok(out) => Ok((out, plan)),
        Err(_) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the call failed")),
    }
}

/// `POST /v1/lists`: stores a list (idempotent by key) → 201 `{list_id}`.
async fn upload_list(State(state): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        state.invalid_call(Api::Upload);
        return refused;
    }
    let (key, request_id, list) = match parse_list(&state, &body) {
        Ok(parsed) => parsed,
        Err(message) => {
            state.invalid_call(Api::Upload);
            return error(StatusCode::BAD_REQUEST, "invalid_request", message);
        }
    };
    drop(body);
    let recipients = list.len();
    let work = move |sim: &SimState| sim.ledger().store_list(&key, list);
    let (list_id, plan) = match perform(&state, Api::Upload, &request_id, recipients, work).await {
        Ok(done) => done,
        Err(refused) => return refused,
    };
    tracing::debug!(request_id, recipients, list_id, "List uploaded.");
    answer(&state, plan, StatusCode::CREATED, json!({ "list_id": list_id })).await
}

/// `POST /v1/sends`: delivers to every recipient of a list, or to the recipients the send
/// carries → 202 `{delivery_id}`.
async fn send(State(state): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        state.invalid_call(Api::Send);
        return refused;
    }
    let send: SendBody<'_> = match serde_json::from_slice(&body) {
        Ok(send) => send,
        Err(e) => {
            state.invalid_call(Api::Send);
            return error(StatusCode::BAD_REQUEST, "invalid_request", format!("invalid send: {e}"));
        }
    };
    if send.idempotency_key.is_empty() || send.request_id.is_empty() {
        state.invalid_call(Api::Send);
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "idempotency_key and request_id are required",
        );
    }
    let (key, request_id) = (send.idempotency_key.clone(), send.request_id.clone());
    let list = match send_audience(&state, send) {
        Ok(list) => list,
        Err((status, code, message)) => {
            state.invalid_call(Api::Send);
            return error(status, code, message);
        }
    };
    drop(body);
    let recipients = list.len();
    let send = {
        let request_id = request_id.clone();
        move |sim: &SimState| sim.ledger().record_send(&key, &request_id, &list, sim.clock.now())
    };
    let (delivery_id, plan) = match perform(&state, Api::Send, &request_id, recipients, send).await {
        Ok(done) => done,
        Err(refused) => return refused,
    };
    tracing::debug!(request_id, recipients, delivery_id, "Send accepted.");
    answer(&state, plan, StatusCode::ACCEPTED, json!({ "delivery_id": delivery_id })).await
}

/// A batch of sends sharing one template, as the simulator reads it: each part is a send of
/// its own (its key, its request, its recipients), all in one call.
#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    parts: Vec<PartBody<'a>>,
    #[serde(rename = "template")]
    _template: serde::de::IgnoredAny,
    #[serde(rename = "class")]
    _class: serde::de::IgnoredAny,
}

#[derive(Deserialize)]
struct PartBody<'a> {
    idempotency_key: String,
    request_id: String,
    #[serde(borrow)]
    recipients: Vec<RecipientBody<'a>>,
}

/// Each part of a batch as a key, a request and its recipients; the recipients of all parts
/// together are at most `inline_recipients_max`.
fn batch_parts(state: &SimState, batch: BatchBody<'_>) -> Result<Vec<(String, String, ListData)>, String> {
    if batch.parts.is_empty() {
        return Err("the batch has no parts".into());
    }
    let max = state.config.inline_recipients_max;
    let total: usize = batch.parts.iter().map(|p| p.recipients.len()).sum();
    if total > max {
        return Err(format!(
            "a batch carries at most {max} recipients in all; {total} given: upload them as lists"
        ));
    }
    batch
        .parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| {
            if part.idempotency_key.is_empty() || part.request_id.is_empty() {
                return Err(format!("part {i}: idempotency_key and request_id are required"));
            }
            if part.recipients.is_empty() {
                return Err(format!("part {i} has no recipients"));
            }
            let list = list_data(state, part.recipients).map_err(|e| format!("part {i}: {e}"))?;
            Ok((part.idempotency_key, part.request_id, list))
        })
        .collect()
}

/// `POST /v1/send-batches`: one call delivering several sends that share a template, each part
/// recorded as its own send under its own key → 202 `{deliveries: [{idempotency_key,
/// delivery_id}]}`, in the parts' order. The call takes one slot, as any send does.
async fn send_batch(State(state): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        state.invalid_call(Api::Send);
        return refused;
    }
    let parts = match serde_json::from_slice(&body)
        .map_err(|e| format!("invalid send batch: {e}"))
        .and_then(|batch| batch_parts(&state, batch))
    {
        Ok(parts) => parts,
        Err(message) => {
            state.invalid_call(Api::Send);
            return error(StatusCode::BAD_REQUEST, "invalid_request", message);
        }
    };
    drop(body);
    let recipients: usize = parts.iter().map(|(_, _, list)| list.len()).sum();
    let request_id = parts[0].1.clone();
    let send = move |sim: &SimState| {
        let now = sim.clock.now();
        let mut ledger = sim.ledger();
        let deliveries: Vec<_> = parts
            .iter()
            .map(|(key, request_id, list)| {
                json!({ "idempotency_key": key, "delivery_id": ledger.record_send(key, request_id, list, now) })
            })
            .collect();
        deliveries
    };
    let (deliveries, plan) = match perform(&state, Api::Send, &request_id, recipients, send).await {
        Ok(done) => done,
        Err(refused) => return refused,
    };
    tracing::debug!(parts = deliveries.len(), recipients, "Send batch accepted.");
    answer(&state, plan, StatusCode::ACCEPTED, json!({ "deliveries": deliveries })).await
}

#[derive(Deserialize)]
struct FindParams {
    idempotency_key: Option<String>,
}

/// `GET /v1/sends?idempotency_key=K`: the first accepted send with that key.
async fn find_send(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    Query(params): Query<FindParams>,
) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let Some(key) = params.idempotency_key.filter(|k| !k.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request", "idempotency_key is required");
    };
    let ledger = state.ledger();
    match ledger.find_by_key(&key) {
        Some((delivery_id, delivery)) => Json(json!({
            "delivery_id": delivery_id,
            "accepted_at": delivery.accepted_at,
        }))
        .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "delivery_not_found",
            "no send was accepted with this idempotency key",
        ),
    }
}

/// `GET /v1/sends/{delivery_id}`: processing until `settle_delay` after accept, then done.
async fn send_status(
    State(state): State<Arc<SimState>>,
    headers: HeaderMap,
    Path(delivery_id): Path<String>,
) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let ledger = state.ledger();
    let Some(delivery) = ledger.delivery(&delivery_id) else {
        return error(StatusCode::NOT_FOUND, "delivery_not_found", format!("no delivery `{delivery_id}`"));
    };
    let settle = chrono::Duration::from_std(state.config.settle_delay).unwrap_or(chrono::Duration::MAX);
    if state.clock.now() < delivery.accepted_at + settle {
        return Json(json!({ "state": "processing", "delivered": 0, "bounced": 0, "failed": 0 }))
            .into_response();
    }
    Json(json!({
        "state": "done",
        "delivered": delivery.delivered,
        "bounced": delivery.bounced,
        "failed": 0,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ReportParams {
    timeline: Option<bool>,
}

/// `GET /_sim/report[?timeline=false]`.
async fn report(State(state): State<Arc<SimState>>, Query(params): Query<ReportParams>) -> Response {
    Json(state.report(params.timeline.unwrap_or(true))).into_response()
}

#[derive(Deserialize)]
struct DeliveriesParams {
    request_id: String,
}

/// `GET /_sim/deliveries?request_id=R`: who a request was delivered to, with counts.
async fn deliveries(State(state): State<Arc<SimState>>, Query(params): Query<DeliveriesParams>) -> Response {
    match state.ledger().request_deliveries(&params.request_id) {
        Some(d) => Json(d).into_response(),
        None => error(StatusCode::NOT_FOUND, "request_not_found", "no send was accepted for this request"),
    }
}

/// `GET /_sim/faults`.
async fn faults(State(state): State<Arc<SimState>>) -> Json<Faults> {
    Json(state.faults())
}

/// `POST /_sim/faults`: replaces the faults in effect.
async fn set_faults(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", format!("invalid faults: {e}")),
    };
    match state.set_faults(faults) {
        Ok(()) => Json(state.faults()).into_response(),
        Err(message) => error(StatusCode::BAD_REQUEST, "invalid_request", message),
    }
}
