//! The ESP simulator: a real HTTP server that behaves like an email service provider (ESP)
//! with the constraints Haishin is built around, and keeps a ledger of everything it did.
//!
//! It is the reference server of the list-send protocol (the client is `ListSendEsp` in Haishin's
//! shared crate; the simulator depends on none of Haishin's crates, only on the protocol's
//! documented shape) and is what the local stack, the tests and the benchmarks deliver to:
//! - **concurrency limits** per API (list upload, send): a call that arrives while `limit`
//!   calls of its API are in progress gets 429 with `Retry-After`, does nothing, and is
//!   counted as an over-limit attempt. Lookups and status reads are not limited. A limit can
//!   be changed while the simulator runs ([`EspSimHandle::set_limit`]), as an ESP's real limit
//!   drops when another system shares it;
//! - **a calls-per-second limit** (`calls_per_second`, optional) over uploads and sends
//!   together: a call arriving when the last second (sliding) already holds `floor(rate)`
//!   accepted calls gets 429 with `Retry-After` and is counted as an over-rate attempt. It is
//!   checked before the concurrency limits;
//! - **latency** per call and per recipient. The work runs in its own task, so it completes
//!   (and holds its slot) even when the caller hangs up, as at an ESP that accepted it;
//! - **no de-duplication**: a send records its idempotency key for lookups only; sending
//!   a list twice delivers twice, and the ledger counts the duplicates;
//! - **faults**, seeded so that runs repeat: 500s and 429s that do nothing, latency spikes,
//!   and timeouts after accept (the work is done and recorded, the answer never arrives);
//! - **a ledger and report**: per API, calls, over-limit attempts, injected faults, peak
//!   concurrency, busy slot-seconds, the busy timeline and every accepted call's request and
//!   span ([`CallSpan`]); with a rate, the most calls in any 1-s window, over-rate attempts
//!   and the rate's utilisation ([`RateReport`]); deliveries in total, unique (request, address) pairs, duplicates and bounces, overall and per request.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use haishin_esp_sim::{EspSim, EspSimConfig};
//!
//! let sim = EspSim::start(EspSimConfig::default()).await?;
//! let esp_url = sim.url(); // give this to `HttpEspConfig::new`
//! // ... deliver ...
//! let report = sim.shutdown().await?;
//! assert_eq!(report.deliveries.duplicates, 0);
//! # Ok(()) }
//! ```
//!
//! # HTTP API
//! - `POST /v1/lists` `{idempotency_key, request_id, recipients: [{email, params}]}` → 201
//!   `{list_id}`; the same key again returns the same list. Latency
//!   `upload_call_latency + upload_per_recipient × n`.
//! - `POST /v1/sends` `{idempotency_key, request_id, list_id, template, class}` → 202
//!   `{delivery_id}`, 404 `list_not_found`; or with `recipients` (as in a list upload) in place of
//!   `list_id`, a send to the recipients given, at most `inline_recipients_max` (400 beyond it).
//!   Latency `send_call_latency + send_per_recipient × n`. Recipients at the bounce domain
//!   (`bounce.invalid`) bounce.
//! - `POST /v1/send-batches` `{template, class, parts: [{idempotency_key, request_id,
//!   recipients}]}` → 202 `{deliveries: [{idempotency_key, delivery_id}]}`: sends that share a
//!   template in one call (one slot), each part recorded as a send of its own, under its own key
//!   and request; at most `inline_recipients_max` recipients in all (400 beyond it).
//! - `GET /v1/sends?idempotency_key=K` → 200 `{delivery_id, accepted_at}` (the first send
//!   accepted with that key) or 404 `delivery_not_found`. A send enters the history when its
//!   work completes, so a send still in progress is not found yet.
//! - `GET /v1/sends/{delivery_id}` → 200 `{state: processing|done, delivered, bounced, failed}`,
//!   done `settle_delay` after accept.
//! - `GET /_sim/report[?timeline=false]` → [`SimReport`]; `GET /_sim/deliveries?request_id=R`
//!   → [`RequestDeliveries`]; `GET`/`POST /_sim/faults` → [`Faults`]; `GET /healthz`.
//!
//! `/v1` calls need `Authorization: Bearer <key>` when a key is configured. Errors are
//! `{"error": code, "message": text}`.
//!
//! # Layout
//! - [`config`]: [`EspSimConfig`], [`Faults`] and the [`Api`] names;
//! - `routes`: the HTTP handlers;
//! - `state`: slots, fault dice and the busy timeline per API;
//! - `rate`: the calls-per-second limit and the arrivals it keeps;
//! - `ledger`: lists, sends and deliveries, kept compact (hashes of addresses);
//! - [`report`]: [`SimReport`] and its busy-slot arithmetic;
//! - [`client`]: [`SimClient`], to read a simulator running in another process;
//! - [`cli`]: the `esp-sim` binary's flags.

pub mod cli;
pub mod client;
pub mod config;
mod ledger;
mod rate;
pub mod report;
mod routes;
mod state;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::task::JoinHandle;

pub use client::SimClient;
pub use config::{Api, EspSimConfig, FaultRates, Faults};
pub use report::{
    ApiReport, CallSpan, DeliveredRecipient, DeliveryCounts, FaultCounts, LimitChange, RateReport,
    RequestDeliveries, RequestReport, SimReport, TimelinePoint,
};

use state::SimState;

/// How long shutting down waits for calls in progress before it stops the server anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Starts simulators.
#[derive(Debug)]
pub struct EspSim;

impl EspSim {
    /// Binds 127.0.0.1 on `config.port` (0 picks a free port) and serves until the handle
    /// is shut down or dropped.
    pub async fn start(config: EspSimConfig) -> anyhow::Result<EspSimHandle> {
        config.validate().map_err(|e| anyhow::anyhow!("invalid esp simulator configuration: {e}"))?;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, config.port))
            .await
            .with_context(|| format!("binding 127.0.0.1:{}", config.port))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let state = Arc::new(SimState::new(config));
        let router = routes::router(Arc::clone(&state));
        let stop = state.shutdown.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener.tap_io(set_no_delay), router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        tracing::info!(%addr, "ESP simulator listening.");
        Ok(EspSimHandle { addr, state, server: Some(server) })
    }
}

/// A running simulator. Dropping it stops the server.
pub struct EspSimHandle {
    addr: SocketAddr,
    state: Arc<SimState>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for EspSimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspSimHandle").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl EspSimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The configuration it runs with (faults as at start: see [`EspSimHandle::faults`]).
    pub fn config(&self) -> &EspSimConfig {
        &self.state.config
    }

    /// A snapshot of the ledger, timeline included.
    pub fn report(&self) -> SimReport {
        self.state.report(true)
    }

    /// A snapshot of the ledger without the timeline and the calls: cheap enough to take often.
    pub fn counts(&self) -> SimReport {
        self.state.report(false)
    }

    /// Who a request was delivered to; `None` when it had no send accepted.
    pub fn deliveries(&self, request_id: &str) -> Option<RequestDeliveries> {
        self.state.ledger().request_deliveries(request_id)
    }

    /// The faults in effect.
    pub fn faults(&self) -> Faults {
        self.state.faults()
    }

    /// Replaces the faults in effect, from the next call on.
    pub fn set_faults(&self, faults: Faults) -> anyhow::Result<()> {
        self.state.set_faults(faults).map_err(|e| anyhow::anyhow!("invalid faults: {e}"))
    }

    /// Changes the calls of `api` allowed in progress at once, as an ESP whose limit is lowered
    /// (or shared with another system) mid-run: calls in progress finish, and a call that
    /// arrives while `limit` or more are in progress gets 429.
    pub fn set_limit(&self, api: Api, limit: u32) -> anyhow::Result<()> {
        self.state.set_limit(api, limit).map_err(|e| anyhow::anyhow!("invalid limit: {e}"))
    }

    /// Stops serving: withheld answers are dropped, calls in progress get up to 10 s to
    /// finish. Returns the final report.
    pub async fn shutdown(mut self) -> anyhow::Result<SimReport> {
        self.state.shutdown.cancel();
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(joined) => joined
                    .context("the esp simulator's server task failed")?
                    .context("serving the esp simulator")?,
                Err(_) => {
                    tracing::warn!("ESP simulator calls still in progress at shutdown; stopping anyway.");
                    server.abort();
                }
            }
        }
        Ok(self.state.report(true))
    }
}

impl Drop for EspSimHandle {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
    }
}

/// Answers without Nagle's delay, as the services do: small answers would otherwise wait for the
/// caller's delayed ACK.
fn set_no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(error = %err, "TCP_NODELAY not set.");
    }
}
