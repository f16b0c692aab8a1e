//! `haishin-local`: Haishin's whole pipeline on one machine.
//!
//! # Layout
//! - [`stack`]: starts PostgreSQL, the Google Cloud stand-ins, the ESP simulator and the four
//!   services, wired as in production.
//! - [`services`]: runs one service from this binary (`haishin-local service NAME`).
//! - [`scenario`]: what a run publishes (batch campaigns, realtime events) and on what ESP.
//! - [`run`]: runs a scenario in a fresh stack and reports.
//! - [`demo`]: the demo scenario, with live progress.
//! - [`bench`]: the named benchmark scenarios, a table and JSON of their figures.
//! - [`chaos`]: faults injected while a scenario runs.
//! - [`report`]: a scenario's report, from the ESP simulator's ledger.

pub mod bench;
pub mod chaos;
pub mod demo;
pub mod mail_record;
pub mod memory;
pub mod report;
pub mod run;
pub mod scenario;
pub mod services;
pub mod stack;
