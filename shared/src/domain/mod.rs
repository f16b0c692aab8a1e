//! The units of work: delivery requests, their audiences and templates, and chunks.
//!
//! - [`request`]: [`DeliveryRequest`] as the marketing platform sends it, and its validation.
//! - [`state`]: the class of a request and the states of requests and chunks, stored as text.
//! - [`ids`]: [`RequestId`] and [`ChunkId`], and where a chunk's recipients are kept.
//! - `bigquery`: a [`BigqueryAudience`] (query and named parameters, or a table) and its checks.
//! - [`template`]: checking an inline template's syntax and the placeholders it needs.

mod bigquery;
mod ids;
mod request;
mod state;
pub mod template;

pub use bigquery::{
    BigqueryAudience, EXPORT_SUFFIX, MAX_PARAMETERS, MAX_QUERY_BYTES, TableName, export_job_id, export_prefix,
};
pub use ids::{ChunkId, RequestId, chunk_object};
pub use request::{
    Audience, DeliveryRequest, FileFormat, GcsAudience, GcsUri, MAX_ID_LEN, MAX_INLINE_RECIPIENTS,
    MAX_REQUEST_BYTES, Recipient, Rejection, Template,
};
pub use state::{ChunkState, Class, RequestState, UnknownValue};
