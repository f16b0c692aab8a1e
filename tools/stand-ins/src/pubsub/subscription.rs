//! A push subscription: its configuration, its counters, and its queue of deliveries.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Message;
use super::filter::Filter;
use crate::redelivery::Redeliverer;

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
    /// Acknowledged messages scheduled to be pushed once more (at-least-once redelivery).
    pub redelivered: u64,
    /// Pushes in flight now.
    pub outstanding: usize,
    /// Messages waiting for a push (including those waiting out a back-off).
    pub backlog: usize,
    /// Pushes allowed in flight now.
    pub push_window: usize,
}

/// One push subscription: its configuration and its queue of deliveries.
pub(super) struct Subscription {
    pub(super) config: PushSubscription,
    /// The parsed push endpoint.
    pub(super) endpoint: reqwest::Url,
    pub(super) filter: Option<Filter>,
    pub(super) queue: Mutex<Queue>,
    /// Wakes the delivery loop: a message arrived or a push finished.
    pub(super) wake: Notify,
    pub(super) redeliverer: Redeliverer,
}

/// A message waiting to be pushed, and how often it has been pushed.
pub(super) struct Delivery {
    pub(super) message: Arc<Message>,
    pub(super) attempts: u32,
    /// Already chosen once for redelivery after an ack (it is not chosen again).
    pub(super) redelivered: bool,
}

/// A subscription's deliveries and push bookkeeping.
pub(super) struct Queue {
    /// Deliveries by (due time, arrival order).
    pub(super) pending: BTreeMap<(Instant, u64), Delivery>,
    arrivals: u64,
    pub(super) outstanding: usize,
    pub(super) window: usize,
    pub(super) stats: SubscriptionStats,
}

impl Subscription {
    pub(super) fn new(
        mut config: PushSubscription,
        endpoint: reqwest::Url,
        filter: Option<Filter>,
        redeliverer: Redeliverer,
    ) -> Self {
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
            redeliverer,
        }
    }

    /// Queues a newly published message for immediate delivery, if it passes the filter.
    pub(super) fn offer(&self, message: &Arc<Message>) {
        let mut queue = self.queue.lock().expect("subscription queue lock");
        if self.filter.as_ref().is_some_and(|f| !f.matches(&message.attributes)) {
            queue.stats.filtered += 1;
            return;
        }
        queue
            .schedule(Instant::now(), Delivery { message: message.clone(), attempts: 0, redelivered: false });
        drop(queue);
        self.wake.notify_one();
    }

    pub(super) fn stats(&self) -> SubscriptionStats {
        let queue = self.queue.lock().expect("subscription queue lock");
        SubscriptionStats {
            outstanding: queue.outstanding,
            backlog: queue.pending.len(),
            push_window: queue.window,
            ..queue.stats
        }
    }

    /// The delay before pushing again a message that failed `attempts` times.
    pub(super) fn backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        self.config.min_backoff.saturating_mul(1 << doublings).min(self.config.max_backoff)
    }
}

impl Queue {
    pub(super) fn schedule(&mut self, due: Instant, delivery: Delivery) {
        self.arrivals += 1;
        self.pending.insert((due, self.arrivals), delivery);
    }
}
