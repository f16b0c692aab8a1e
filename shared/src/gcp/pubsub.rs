//! Publishing JSON messages to a Pub/Sub topic.

use std::collections::HashMap;
use std::time::Duration;

use google_cloud_pubsub::client::Publisher;
use serde::Serialize;

use super::{GcpArgs, GcpError, anonymous};

/// A Pub/Sub topic to publish JSON messages to.
#[derive(Clone, Debug)]
pub struct Topic {
    publisher: Publisher,
}

impl Topic {
    /// A publisher for `projects/<project>/topics/<topic>`.
    pub async fn connect(args: &GcpArgs, topic: &str) -> anyhow::Result<Self> {
        let name = format!("projects/{}/topics/{topic}", args.project);
        let mut builder = Publisher::builder(name).set_delay_threshold(Duration::from_millis(2));
        if let Some(endpoint) = &args.pubsub_endpoint {
            builder = builder.with_endpoint(endpoint.clone()).with_credentials(anonymous());
        }
        let publisher = builder.build().await?;
        Ok(Self { publisher })
    }

    /// Publishes `message` as JSON with `attributes`; returns the message id.
    pub async fn publish<T: Serialize>(
        &self,
        message: &T,
        attributes: &[(&str, &str)],
    ) -> Result<String, GcpError> {
        let data = serde_json::to_vec(message)
            .map_err(|e| GcpError::Permanent { what: "encoding a message", detail: e.to_string() })?;
        let attributes: HashMap<String, String> =
            attributes.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
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
