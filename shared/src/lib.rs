//! Haishin's shared library: what more than one service needs.
//!
//! # Layout
//! - [`domain`]: delivery requests, audiences, templates, request and chunk states.
//! - [`messages`]: the task and Pub/Sub payloads the services exchange (ids, never recipients).
//! - [`store`]: PostgreSQL schema (`migrations/`) and every guarded state change.
//! - [`audience`]: streaming an audience into validated, de-duplicated chunk objects.
//! - [`esp`]: the ESP provider trait and its HTTP implementation.
//! - [`gcp`]: Pub/Sub, Cloud Tasks and Cloud Storage clients, built once at start.
//! - [`push`]: Pub/Sub push and Cloud Tasks envelopes, and the done/retry outcome of a handler.
//! - [`auth`]: OIDC token verification for push and task routes.
//! - [`logs`]: delivery and request log rows and the sinks they go to.
//! - [`telemetry`]: logging setup (Cloud Logging JSON on Cloud Run, text locally).
//! - [`server`]: serving a router with graceful shutdown.
//! - [`config`]: configuration every service reads.

pub mod audience;
pub mod auth;
pub mod config;
pub mod domain;
pub mod esp;
pub mod gcp;
pub mod logs;
pub mod messages;
pub mod push;
pub mod server;
pub mod store;
pub mod telemetry;
