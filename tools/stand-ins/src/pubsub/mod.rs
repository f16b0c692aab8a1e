//! A Pub/Sub stand-in: gRPC `Publish` for the official `Publisher`, and push delivery.
//!
//! Topics and push subscriptions are created through [`PubSubServer`]'s methods. Each
//! subscription has its own delivery loop that pushes the envelope Pub/Sub pushes, signed
//! with an OIDC token when configured, and treats the answer as Pub/Sub does:
//!
//! - 102, 200, 201, 202 and 204 acknowledge; any other status, a connection error or no answer
//!   within the ack deadline is a nack;
//! - a nacked message is pushed again after an exponential back-off between the subscription's
//!   minimum and maximum, and with a dead-letter policy is forwarded to the dead-letter topic
//!   once it has been pushed `max_delivery_attempts` times;
//! - pushes in flight are bounded by a window that starts small, grows by one on every ack
//!   (up to `max_outstanding`) and halves on every nack, so a failing endpoint slows the
//!   whole subscription;
//! - with a [`Redelivery`] policy (off by default), a share of the acknowledged messages is
//!   pushed once more, a random moment later, with the same message id (and the next
//!   `deliveryAttempt`), as Pub/Sub's at-least-once delivery may do;
//! - a message is delivered to the subscriptions that exist when it is published, and only if
//!   it passes their filter. Where Pub/Sub drops the messages of a topic without
//!   subscriptions, the stand-in keeps them, to be inspected with
//!   [`PubSubServer::topic_messages`] (a dead-letter topic, typically).
//!
//! Message ordering, exactly-once delivery, retention limits and pull delivery are not modelled.

mod filter;
mod grpc;
mod push;
mod subscription;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{any, post};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::oidc::TokenSigner;
use crate::redelivery::{Redeliverer, Redelivery, RedeliveryDefaults};
use crate::server::Served;
use filter::Filter;
pub use subscription::{DeadLetterPolicy, PushAuth, PushSubscription, SubscriptionStats};
use subscription::{Delivery, Subscription};

/// A published message, as a topic keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub message_id: String,
    pub data: Bytes,
    pub attributes: HashMap<String, String>,
    pub publish_time: DateTime<Utc>,
    pub ordering_key: String,
}

/// The Pub/Sub stand-in: a gRPC `Publish` endpoint and the push delivery loops.
///
/// Dropping it stops the server and every delivery loop.
#[derive(Debug)]
pub struct PubSubServer {
    broker: Arc<Broker>,
    served: Served,
}

impl PubSubServer {
    /// Starts the stand-in on `port` (0: any free port); pushes are signed by `signer`.
    pub async fn start(signer: TokenSigner, port: u16) -> Result<Self, Error> {
        let cancel = CancellationToken::new();
        let broker = Arc::new(Broker {
            state: Mutex::default(),
            signer,
            http: crate::server::http_client(),
            paused: watch::Sender::new(false),
            cancel: cancel.clone(),
            next_message_id: AtomicU64::new(1),
            redelivery: RedeliveryDefaults::default(),
        });
        let router = Router::new()
            .route(grpc::PUBLISH_PATH, post(grpc::publish))
            .fallback(any(grpc::unimplemented))
            .with_state(broker.clone());
        let served = Served::start(port, router, cancel).await?;
        Ok(Self { broker, served })
    }

    /// The endpoint for `Publisher::builder(..).with_endpoint(..)`: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.served.url()
    }

    /// Creates a topic (`projects/P/topics/T`).
    pub fn create_topic(&self, name: &str) -> Result<(), Error> {
        check_name(name, "topics")?;
        let mut state = self.broker.state.lock().expect("pubsub state lock");
        if state.topics.contains_key(name) {
            return Err(Error::AlreadyExists(name.to_owned()));
        }
        state.topics.insert(name.to_owned(), Topic::default());
        Ok(())
    }

    /// Creates a push subscription and starts its delivery loop (call it inside a Tokio
    /// runtime).
    ///
    /// Messages already published to the topic are not delivered to it.
    pub fn create_push_subscription(&self, config: PushSubscription) -> Result<(), Error> {
        check_name(&config.name, "subscriptions")?;
        let filter = match config.filter.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(Filter::parse(text).map_err(Error::InvalidArgument)?),
        };
        if config.max_outstanding == 0 {
            return Err(Error::InvalidArgument("max_outstanding must be at least 1".into()));
        }
        let url = reqwest::Url::parse(&config.push_endpoint)
            .map_err(|e| Error::InvalidArgument(format!("push endpoint {}: {e}", config.push_endpoint)))?;
        let mut state = self.broker.state.lock().expect("pubsub state lock");
        if state.subscriptions.contains_key(&config.name) {
            return Err(Error::AlreadyExists(config.name));
        }
        for topic in std::iter::once(&config.topic).chain(config.dead_letter.as_ref().map(|d| &d.topic)) {
            if !state.topics.contains_key(topic) {
                return Err(Error::NotFound(topic.clone()));
            }
        }
        let redeliverer = Redeliverer::new(&config.name, None, self.broker.redelivery.seed());
        let subscription = Arc::new(Subscription::new(config, url, filter, redeliverer));
        state.subscriptions.insert(subscription.config.name.clone(), subscription.clone());
        state
            .topics
            .get_mut(&subscription.config.topic)
            .expect("checked above")
            .subscriptions
            .push(subscription.clone());
        tokio::spawn(push::deliver(self.broker.clone(), subscription));
        Ok(())
    }

    /// What a subscription has done so far, or `None` if there is no such subscription.
    pub fn subscription_stats(&self, name: &str) -> Option<SubscriptionStats> {
        let state = self.broker.state.lock().expect("pubsub state lock");
        Some(state.subscriptions.get(name)?.stats())
    }

    /// The messages a topic kept because it had no subscription when they were published
    /// (a dead-letter topic, typically), oldest first; `None` if there is no such topic.
    pub fn topic_messages(&self, topic: &str) -> Option<Vec<Message>> {
        let state = self.broker.state.lock().expect("pubsub state lock");
        Some(state.topics.get(topic)?.retained.clone())
    }

    /// Sets the redelivery policy of every subscription that has none of its own (at start:
    /// off); it applies to acknowledgements from now on.
    pub fn set_redelivery(&self, policy: Redelivery) -> Result<(), Error> {
        policy.check()?;
        self.broker.redelivery.set_policy(policy);
        Ok(())
    }

    /// Gives one subscription its own redelivery policy, or with `None` makes it follow the
    /// server-wide one again.
    pub fn set_subscription_redelivery(&self, name: &str, policy: Option<Redelivery>) -> Result<(), Error> {
        if let Some(policy) = &policy {
            policy.check()?;
        }
        let state = self.broker.state.lock().expect("pubsub state lock");
        let subscription = state.subscriptions.get(name).ok_or_else(|| Error::NotFound(name.to_owned()))?;
        subscription.redeliverer.set_policy(policy);
        Ok(())
    }

    /// Makes redelivery decisions repeatable: every subscription's generator restarts from
    /// `seed` (mixed with its name), and so do those of subscriptions created later.
    pub fn seed_redelivery(&self, seed: u64) {
        self.broker.redelivery.set_seed(seed);
        let state = self.broker.state.lock().expect("pubsub state lock");
        for subscription in state.subscriptions.values() {
            subscription.redeliverer.reseed(seed);
        }
    }

    /// Stops starting pushes (pushes in flight finish); messages wait until [`Self::resume`].
    pub fn pause(&self) {
        self.broker.paused.send_replace(true);
    }

    /// Resumes pushing after [`Self::pause`].
    pub fn resume(&self) {
        self.broker.paused.send_replace(false);
    }

    /// Waits until no subscription has a message waiting or in flight (redeliveries to come
    /// included); `false` on timeout.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let idle = || {
            let state = self.broker.state.lock().expect("pubsub state lock");
            state.subscriptions.values().all(|s| {
                let stats = s.stats();
                stats.backlog == 0 && stats.outstanding == 0
            })
        };
        crate::poll_until(timeout, idle).await
    }

    /// Stops the server and the delivery loops.
    pub async fn shutdown(self) {
        self.served.shutdown().await;
    }
}

/// State shared by the gRPC handler and the delivery loops.
pub(crate) struct Broker {
    state: Mutex<State>,
    signer: TokenSigner,
    http: reqwest::Client,
    paused: watch::Sender<bool>,
    cancel: CancellationToken,
    next_message_id: AtomicU64,
    redelivery: RedeliveryDefaults,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Topic>,
    subscriptions: HashMap<String, Arc<Subscription>>,
}

#[derive(Default)]
struct Topic {
    subscriptions: Vec<Arc<Subscription>>,
    /// Messages published while the topic had no subscription.
    retained: Vec<Message>,
}

impl Broker {
    /// Publishes messages (data, attributes, ordering key) to `topic`; returns their ids.
    fn publish(
        &self,
        topic: &str,
        messages: Vec<(Bytes, HashMap<String, String>, String)>,
    ) -> Result<Vec<String>, Error> {
        if messages.is_empty() {
            return Err(Error::InvalidArgument("the request contains no messages".into()));
        }
        if messages.iter().any(|(data, attributes, _)| data.is_empty() && attributes.is_empty()) {
            return Err(Error::InvalidArgument("a message needs data or attributes".into()));
        }
        let mut state = self.state.lock().expect("pubsub state lock");
        let topic = state.topics.get_mut(topic).ok_or_else(|| Error::NotFound(topic.to_owned()))?;
        let mut ids = Vec::with_capacity(messages.len());
        for (data, attributes, ordering_key) in messages {
            let message = Message {
                message_id: self.next_message_id.fetch_add(1, Ordering::Relaxed).to_string(),
                data,
                attributes,
                publish_time: Utc::now(),
                ordering_key,
            };
            ids.push(message.message_id.clone());
            if topic.subscriptions.is_empty() {
                topic.retained.push(message);
                continue;
            }
            let message = Arc::new(message);
            for subscription in &topic.subscriptions {
                subscription.offer(&message);
            }
        }
        Ok(ids)
    }
}

/// Checks that `name` is `projects/P/{collection}/ID`.
fn check_name(name: &str, collection: &str) -> Result<(), Error> {
    match name.split('/').collect::<Vec<_>>().as_slice() {
        ["projects", project, c, id] if !project.is_empty() && *c == collection && !id.is_empty() => Ok(()),
        _ => {
            Err(Error::InvalidArgument(format!("{name} is not of the form projects/PROJECT/{collection}/ID")))
        }
    }
}
