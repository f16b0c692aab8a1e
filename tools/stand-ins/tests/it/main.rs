//! Tests of the stand-ins against documented behaviour, with the official Google clients as
//! callers.

mod common;
mod front_door;
mod gcs;
mod oidc;
mod pubsub;
mod redelivery;
mod stand_ins;
mod task_backoff;
mod task_names;
mod tasks;
