//! `haishin-local`: Haishin's whole pipeline on one machine.
//!
//! # Layout
//! - [`stack`]: starts PostgreSQL, the Google Cloud stand-ins, the ESP simulator and the four
//!   services, wired as in production.
//! - [`bigquery`]: bqemulator behind a front that copies its exports into the local Cloud Storage.
//! - [`services`]: runs one service from this binary (`haishin-local service NAME`).
//! - [`scenario`]: what a run publishes (batch campaigns, realtime events) and on what ESP.
//! - [`run`]: runs a scenario in a fresh stack and reports.
//! - [`demo`]: the demo scenario, with live progress.
//! - [`bench`]: the named benchmark scenarios, a table and JSON of their figures.
//! - [`flood`]: an open-loop realtime load, stepped up until the pipeline no longer keeps up.
//! - [`mixed`]: Haishin against the scheduled workflow it replaces, on the same arrivals.
//! - [`chaos`]: faults injected while a scenario runs.
//! - [`collector`]: the OTLP collector the services export spans and metrics to, and the report's
//!   `traces` section.
//! - [`report`]: a scenario's report, from the ESP simulator's ledger.
//! - [`targets`]: the targets each report is held to, beside its figures.
//! - [`picture`]: a report's SVG: the ESP's slots busy by class, and realtime latency.

pub mod bench;
pub mod bigquery;
pub mod chaos;
pub mod collector;
pub mod demo;
pub mod flood;
pub mod mail_record;
pub mod memory;
pub mod mixed;
pub mod picture;
pub mod report;
pub mod run;
pub mod scenario;
pub mod services;
pub mod stack;
pub mod targets;
