//! `haishin-local`: Haishin's whole pipeline on one machine.
//!
//! # Layout
//! - [`stack`]: starts PostgreSQL, the Google Cloud stand-ins, the ESP simulator and the four
//!   services, wired as in production.
//! - [`services`]: runs one service from this binary (`haishin-local service NAME`).
//! - [`demo`]: the demo scenario (batch campaigns plus realtime events) with live progress.
//! - [`report`]: the demo's JSON report, from the ESP simulator's ledger.

pub mod demo;
pub mod report;
pub mod services;
pub mod stack;
