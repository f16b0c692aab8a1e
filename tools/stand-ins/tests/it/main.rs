//! Tests of the stand-ins against documented behaviour, with the official Google clients as
//! callers.

mod common;
mod gcs;
mod oidc;
mod pubsub;
mod stand_ins;
mod tasks;
