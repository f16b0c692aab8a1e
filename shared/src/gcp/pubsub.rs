//! Publishing JSON messages to a Pub/Sub topic.

use std::collections::HashMap;
use std::time::Duration;

use google_cloud_pubsub::builder::publisher::PublisherBuilder;
use google_cloud_pubsub::client::Publisher;
use serde::Serialize;

use super::{GcpArgs, GcpError, anonymous};
use crate::telemetry::{TRACEPARENT, current_traceparent};

/// A Pub/Sub topic to publish JSON messages to.
#[derive(Clone, Debug)]
pub struct Topic {
    publisher: Publisher,
}

impl Topic {
    /// A publisher for `projects/<project>/topics/<topic>`, which batches what is published
    /// within 2 ms.
    pub async fn connect(args: &GcpArgs, topic: &str) -> anyhow::Result<Self> {
        Self::connect_with(args, topic, |builder| builder.set_delay_threshold(Duration::from_millis(2))).await
    }

    /// A publisher that sends each message at once: for a service that publishes a few at a
    /// time, each the next step of something waiting (the list-uploader's chunk uploaded, whose
    /// slot the trigger refills), where a batching delay would be all latency.
    pub async fn connect_unbatched(args: &GcpArgs, topic: &str) -> anyhow::Result<Self> {
        Self::connect_with(args, topic, |builder| builder.set_message_count_threshold(1)).await
    }

    async fn connect_with(
        args: &GcpArgs,
        topic: &str,
        batching: impl FnOnce(PublisherBuilder) -> PublisherBuilder,
    ) -> anyhow::Result<Self> {
        let name = format!("projects/{}/topics/{topic}", args.project);
        let mut builder = batching(Publisher::builder(name));
        if let Some(endpoint) = &args.pubsub_endpoint {
            builder = builder.with_endpoint(endpoint.clone()).with_credentials(anonymous());
        }
        let publisher = builder.build().await?;
        Ok(Self { publisher })
    }

    /// Publishes `message` as JSON with `attributes`, and the `traceparent` of the current span
    /// unless `attributes` has one; returns the message id.
    pub async fn publish<T: Serialize>(
        &self,
        message: &T,
        attributes: &[(&str, &str)],
    ) -> Result<String, GcpError> {
        let data = serde_json::to_vec(message)
            .map_err(|e| GcpError::Permanent { what: "encoding a message", detail: e.to_string() })?;
        let attributes = message_attributes(attributes);
        let message = google_cloud_pubsub::model::Message::new().set_data(data).set_attributes(attributes);
        self.publisher.publish(message).await.map_err(|e| match &e {
            // A topic that does not exist, or may not be published to, stays so.
            google_cloud_pubsub::error::PublishError::Rpc(rpc) => GcpError::from_gax("publishing", rpc),
            _ => GcpError::Transient { what: "publishing", detail: e.to_string() },
        })
    }

    /// Sends whatever is batched.
    pub async fn flush(&self) {
        self.publisher.flush().await;
    }
}

/// A message's attributes: `attributes`, and the trace context of the current span unless they
/// carry one (the publisher's batching task runs outside the caller's span, so it travels here).
fn message_attributes(attributes: &[(&str, &str)]) -> HashMap<String, String> {
    let mut all: HashMap<String, String> =
        attributes.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    if !all.contains_key(TRACEPARENT)
        && let Some(traceparent) = current_traceparent()
    {
        all.insert(TRACEPARENT.to_owned(), traceparent);
    }
    all
}

#[cfg(test)]
mod tests {
    use tracing::field::Empty;

    use super::*;
    use crate::telemetry::testing::{TRACE, in_remote_trace, traced, traceparent};
    use crate::telemetry::{join_trace, parse_traceparent};

    #[test]
    fn a_message_carries_the_trace_of_the_span_that_publishes_it() {
        let attributes = in_remote_trace(|| message_attributes(&[("class", "batch")]));

        assert_eq!(attributes["class"], "batch");
        let sent = parse_traceparent(&attributes[TRACEPARENT]).expect("a valid traceparent");
        assert_eq!(sent.trace_id().to_string(), TRACE);
        assert_ne!(attributes[TRACEPARENT], traceparent(), "the publishing span's own id");
    }

    #[test]
    fn a_traceparent_given_by_the_caller_is_kept() {
        let given = traceparent();
        let attributes = tracing::subscriber::with_default(traced(), || {
            let span = tracing::info_span!("chunk", trace_id = Empty, span_id = Empty);
            join_trace(&span, None);
            span.in_scope(|| message_attributes(&[(TRACEPARENT, &given)]))
        });

        assert_eq!(attributes[TRACEPARENT], given);
    }

    #[test]
    fn outside_a_span_a_message_carries_only_its_own_attributes() {
        let attributes = message_attributes(&[("class", "realtime")]);
        assert_eq!(attributes.len(), 1);
    }
}
