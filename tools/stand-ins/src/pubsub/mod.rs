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
//! - a message is delivered to the subscriptions that exist when it is published, and only if
//!   it passes their filter. Where Pub/Sub drops the messages of a topic without
//!   subscriptions, the stand-in keeps them, to be inspected with
//!   [`PubSubServer::topic_messages`] (a dead-letter topic, typically).
//!
//! Message ordering, exactly-once delivery, retention limits and pull delivery are not modelled.

mod filter;
mod grpc;
mod push;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::{any, post};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::oidc::TokenSigner;
use crate::server::Served;
use filter::Filter;

/// Pushes in flight when a subscription starts (Pub/Sub starts with "a small single-digit window").
const INITIAL_PUSH_WINDOW: usize = 3;
/// Pub/Sub's `max_delivery_attempts` when a dead-letter policy gives 0.
const DEFAULT_MAX_DELIVERY_ATTEMPTS: u32 = 5;

/// A push subscription, with Pub/Sub's defaults from [`PushSubscription::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushSubscription {
    /// `projects/P/subscriptions/S`.
    pub name: String,
    /// `projects/P/topics/T`; it must exist.
    pub topic: String,
    /// The URL messages are POSTed to.
    pub push_endpoint: String,
    /// A filter on attributes; messages that do not pass are acknowledged without a push.
    pub filter: Option<String>,
    /// Sign every push with an ID token for this service account.
    pub oidc: Option<PushAuth>,
    /// How long a push may take before it counts as a nack (Pub/Sub: 10 s to 600 s, default 10 s).
    pub ack_deadline: Duration,
    /// Retry policy: the first redelivery delay (Pub/Sub: 0 to 600 s, default 10 s).
    pub min_backoff: Duration,
    /// Retry policy: the longest redelivery delay (Pub/Sub: up to 600 s, default 600 s).
    pub max_backoff: Duration,
    /// Forward messages that keep failing to another topic.
    pub dead_letter: Option<DeadLetterPolicy>,
    /// The most pushes in flight at once (the top of the push window).
    pub max_outstanding: usize,
}

impl PushSubscription {
    /// A subscription with Pub/Sub's defaults: no filter, no token, ack deadline 10 s,
    /// back-off 10 s to 600 s, no dead-lettering, up to 1,000 pushes in flight.
    pub fn new(name: impl Into<String>, topic: impl Into<String>, push_endpoint: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            topic: topic.into(),
            push_endpoint: push_endpoint.into(),
            filter: None,
            oidc: None,
            ack_deadline: Duration::from_secs(10),
            min_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(600),
            dead_letter: None,
            max_outstanding: 1000,
        }
    }
}

/// The service account a push subscription signs its pushes as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushAuth {
    pub service_account_email: String,
    /// The token's audience; the push endpoint URL when `None`, as in Pub/Sub.
    pub audience: Option<String>,
}

/// Where messages go after too many failed pushes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPolicy {
    /// `projects/P/topics/T`; it must exist.
    pub topic: String,
    /// Pushes before a message is forwarded (Pub/Sub: 5 to 100; 0 means 5).
    pub max_delivery_attempts: u32,
}

/// A published message, as a topic keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub message_id: String,
    pub data: Bytes,
    pub attributes: HashMap<String, String>,
    pub publish_time: DateTime<Utc>,
    pub ordering_key: String,
}

/// What a subscription has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Push attempts started.
    pub pushed: u64,
    /// Pushes answered with an acknowledging status.
    pub acked: u64,
    /// Pushes that failed (status, timeout or connection error).
    pub nacked: u64,
    /// Messages forwarded to the dead-letter topic.
    pub dead_lettered: u64,
    /// Messages acknowledged without a push because they did not pass the filter.
    pub filtered: u64,
    /// Pushes in flight now.
    pub outstanding: usize,
    /// Messages waiting for a push (including those waiting out a back-off).
    pub backlog: usize,
    /// Pushes allowed in flight now.
    pub push_window: usize,
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
        let subscription = Arc::new(Subscription::new(config, url, filter));
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

    /// Stops starting pushes (pushes in flight finish); messages wait until [`Self::resume`].
    pub fn pause(&self) {
        self.broker.paused.send_replace(true);
    }

    /// Resumes pushing after [`Self::pause`].
    pub fn resume(&self) {
        self.broker.paused.send_replace(false);
    }

    /// Waits until no subscription has a message waiting or in flight; `false` on timeout.
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

/// One push subscription: its configuration and its queue of deliveries.
struct Subscription {
    config: PushSubscription,
    /// The parsed push endpoint.
    endpoint: reqwest::Url,
    filter: Option<Filter>,
    queue: Mutex<Queue>,
    /// Wakes the delivery loop: a message arrived or a push finished.
    wake: Notify,
}

/// A message waiting to be pushed, and how often it has been pushed.
struct Delivery {
    message: Arc<Message>,
    attempts: u32,
}

struct Queue {
    /// Deliveries by (due time, arrival order).
    pending: BTreeMap<(Instant, u64), Delivery>,
    arrivals: u64,
    outstanding: usize,
    window: usize,
    stats: SubscriptionStats,
}

impl Subscription {
    fn new(mut config: PushSubscription, endpoint: reqwest::Url, filter: Option<Filter>) -> Self {
        if let Some(policy) = config.dead_letter.as_mut().filter(|p| p.max_delivery_attempts == 0) {
            policy.max_delivery_attempts = DEFAULT_MAX_DELIVERY_ATTEMPTS;
        }
        let window = INITIAL_PUSH_WINDOW.min(config.max_outstanding);
        Self {
            config,
            endpoint,
            filter,
            queue: Mutex::new(Queue {
                pending: BTreeMap::new(),
                arrivals: 0,
                outstanding: 0,
                window,
                stats: SubscriptionStats::default(),
            }),
            wake: Notify::new(),
        }
    }

    /// Queues a newly published message for immediate delivery, if it passes the filter.
    fn offer(&self, message: &Arc<Message>) {
        let mut queue = self.queue.lock().expect("subscription queue lock");
        if self.filter.as_ref().is_some_and(|f| !f.matches(&message.attributes)) {
            queue.stats.filtered += 1;
            return;
        }
        queue.schedule(Instant::now(), Delivery { message: message.clone(), attempts: 0 });
        drop(queue);
        self.wake.notify_one();
    }

    fn stats(&self) -> SubscriptionStats {
        let queue = self.queue.lock().expect("subscription queue lock");
        SubscriptionStats {
            outstanding: queue.outstanding,
            backlog: queue.pending.len(),
            push_window: queue.window,
            ..queue.stats
        }
    }

    /// The delay before pushing again a message that failed `attempts` times.
    fn backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        self.config.min_backoff.saturating_mul(1 << doublings).min(self.config.max_backoff)
    }
}

impl Queue {
    fn schedule(&mut self, due: Instant, delivery: Delivery) {
        self.arrivals += 1;
        self.pending.insert((due, self.arrivals), delivery);
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
