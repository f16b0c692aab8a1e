//! `google.pubsub.v1.Publisher/Publish` over gRPC: the messages, written by hand, and the handler.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use tonic::server::{Grpc, UnaryService};
use tonic_prost::ProstCodec;

use super::Broker;

/// The path the official `Publisher` posts to.
pub(super) const PUBLISH_PATH: &str = "/google.pubsub.v1.Publisher/Publish";
/// Pub/Sub accepts publish requests up to 10 MB; leave room for the framing.
const MAX_REQUEST_BYTES: usize = 11 * 1024 * 1024;

/// `google.pubsub.v1.PublishRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PublishRequest {
    #[prost(string, tag = "1")]
    pub(super) topic: String,
    #[prost(message, repeated, tag = "2")]
    pub(super) messages: Vec<PubsubMessage>,
}

/// `google.pubsub.v1.PubsubMessage`, without the fields the server assigns (id, publish time).
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PubsubMessage {
    #[prost(bytes = "bytes", tag = "1")]
    pub(super) data: Bytes,
    #[prost(map = "string, string", tag = "2")]
    pub(super) attributes: HashMap<String, String>,
    #[prost(string, tag = "5")]
    pub(super) ordering_key: String,
}

/// `google.pubsub.v1.PublishResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct PublishResponse {
    #[prost(string, repeated, tag = "1")]
    pub(super) message_ids: Vec<String>,
}

/// The axum handler for [`PUBLISH_PATH`].
pub(super) async fn publish(State(broker): State<Arc<Broker>>, request: Request) -> Response {
    let mut grpc = Grpc::new(ProstCodec::<PublishResponse, PublishRequest>::default())
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    grpc.unary(Publish(broker), request).await.map(axum::body::Body::new)
}

struct Publish(Arc<Broker>);

impl UnaryService<PublishRequest> for Publish {
    type Response = PublishResponse;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<PublishResponse>, tonic::Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<PublishRequest>) -> Self::Future {
        let broker = self.0.clone();
        Box::pin(async move {
            let PublishRequest { topic, messages } = request.into_inner();
            let messages = messages.into_iter().map(|m| (m.data, m.attributes, m.ordering_key)).collect();
            match broker.publish(&topic, messages) {
                Ok(message_ids) => Ok(tonic::Response::new(PublishResponse { message_ids })),
                Err(crate::Error::NotFound(what)) => {
                    Err(tonic::Status::not_found(format!("Resource not found (resource={what}).")))
                }
                Err(err) => Err(tonic::Status::invalid_argument(err.to_string())),
            }
        })
    }
}

/// Any other gRPC method: UNIMPLEMENTED, as a gRPC server answers.
pub(super) async fn unimplemented(request: Request) -> Response {
    tonic::Status::unimplemented(format!("{} is not served by the Pub/Sub stand-in", request.uri().path()))
        .into_http()
}
