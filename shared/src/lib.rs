//! Haishin's shared library: the contracts between the services, and the plumbing they all use.
//!
//! What only one service does lives in that service (the trigger's intake, audience reader and
//! scheduling rule; the completion job's passes and log sinks). `ARCHITECTURE.md` at the
//! repository's root maps the whole house.
//!
//! # Layout
//! - [`domain`]: delivery requests, audiences, templates; classes and states; request and chunk ids.
//! - [`messages`]: the task and Pub/Sub payloads the services exchange (ids, never recipients).
//! - [`store`]: the PostgreSQL schema (`migrations/`), the rows every service reads, and the chunk
//!   transitions that more than one service makes.
//! - [`esp`]: the ESP provider trait, the providers, and `ESP_PROVIDER` that chooses one.
//! - [`gcp`]: Pub/Sub, Cloud Tasks, Cloud Storage and BigQuery clients, built once at start.
//! - [`push`]: Pub/Sub push and Cloud Tasks envelopes, and the done/retry outcome of a handler.
//! - [`server`]: the push services' scaffold: token check, `/healthz`, tracing, graceful shutdown.
//! - [`config`]: configuration every push service reads.
//! - [`suppression`]: the addresses not to be sent to, the key they are kept under, and the one
//!   query both checks make.
//! - [`unsubscribe`]: the signed, expiring tokens of one-click unsubscribe links.
//! - [`telemetry`]: logging setup (Cloud Logging JSON on Cloud Run, text locally).
//! - `auth` (private): how push and task routes are authenticated (`PUSH_AUTH`), used by [`server`].

mod auth;
pub mod config;
pub mod domain;
pub mod esp;
pub mod gcp;
pub mod messages;
pub mod push;
pub mod server;
pub mod store;
pub mod suppression;
pub mod telemetry;
pub mod unsubscribe;
