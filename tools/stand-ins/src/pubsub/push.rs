//! The delivery loop of a push subscription, and the push itself.

use std::sync::Arc;

use axum::http::header::{CONTENT_TYPE, USER_AGENT};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::SecondsFormat;
use tokio::time::{Instant, sleep_until};

use super::{Broker, Delivery, Message, Subscription};
use crate::redelivery::Redelivery;

/// The user agent of Pub/Sub's pushes.
const PUSH_USER_AGENT: &str = "APIs-Google; (+https://developers.google.com/webmasters/APIs-Google.html)";

/// What the delivery loop does next.
enum Next {
    Push(Delivery),
    /// Nothing can be pushed before this time (or before a wake-up, when `None`).
    Wait(Option<Instant>),
}

/// Pushes `subscription`'s messages until the broker is cancelled.
pub(super) async fn deliver(broker: Arc<Broker>, subscription: Arc<Subscription>) {
    let mut paused = broker.paused.subscribe();
    loop {
        let next =
            if *paused.borrow_and_update() { Next::Wait(None) } else { subscription.next(Instant::now()) };
        match next {
            Next::Push(delivery) => {
                tokio::spawn(push(broker.clone(), subscription.clone(), delivery));
            }
            Next::Wait(until) => {
                let due = async {
                    match until {
                        Some(at) => sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = broker.cancel.cancelled() => return,
                    () = subscription.wake.notified() => {}
                    _ = paused.changed() => {}
                    () = due => {}
                }
            }
        }
    }
}

/// Pushes one delivery and settles it: ack, retry later, or forward to the dead-letter topic.
async fn push(broker: Arc<Broker>, subscription: Arc<Subscription>, delivery: Delivery) {
    let acked = tokio::select! {
        () = broker.cancel.cancelled() => return,
        acked = send(&broker, &subscription, &delivery) => acked,
    };
    let dead = subscription.settle(delivery, acked, broker.redelivery.policy());
    subscription.wake.notify_one();
    if let Some(delivery) = dead {
        forward_to_dead_letter(&broker, &subscription, &delivery);
    }
}

/// POSTs the push envelope; `true` when the endpoint acknowledged it.
async fn send(broker: &Broker, subscription: &Subscription, delivery: &Delivery) -> bool {
    let config = &subscription.config;
    let message = &delivery.message;
    let publish_time = message.publish_time.to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut envelope = serde_json::json!({
        "message": {
            "data": STANDARD.encode(&message.data),
            "attributes": message.attributes,
            "messageId": message.message_id,
            "message_id": message.message_id,
            "publishTime": publish_time,
            "publish_time": publish_time,
            "orderingKey": message.ordering_key,
        },
        "subscription": config.name,
    });
    if config.dead_letter.is_some() {
        envelope["deliveryAttempt"] = delivery.attempts.into();
    }
    let mut request = broker
        .http
        .post(subscription.endpoint.clone())
        .timeout(config.ack_deadline)
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, PUSH_USER_AGENT)
        .body(envelope.to_string());
    if let Some(auth) = &config.oidc {
        let audience = auth.audience.as_deref().unwrap_or(&config.push_endpoint);
        request = request.bearer_auth(broker.signer.sign(audience, &auth.service_account_email));
    }
    let subscription = config.name.as_str();
    let message_id = message.message_id.as_str();
    match request.send().await {
        Ok(response) if matches!(response.status().as_u16(), 102 | 200 | 201 | 202 | 204) => true,
        Ok(response) => {
            tracing::debug!(subscription, message_id, status = response.status().as_u16(), "Push nacked.");
            false
        }
        Err(err) => {
            tracing::debug!(subscription, message_id, error = %err, "Push failed.");
            false
        }
    }
}

/// Publishes a message that failed too often to the dead-letter topic, with the attributes
/// Pub/Sub adds.
fn forward_to_dead_letter(broker: &Broker, subscription: &Subscription, delivery: &Delivery) {
    let Some(policy) = &subscription.config.dead_letter else { return };
    let Message { data, attributes, publish_time, ordering_key, .. } = delivery.message.as_ref();
    let (project, id) = split_name(&subscription.config.name);
    let mut attributes = attributes.clone();
    attributes.extend([
        ("CloudPubSubDeadLetterSourceDeliveryCount".to_owned(), delivery.attempts.to_string()),
        ("CloudPubSubDeadLetterSourceSubscription".to_owned(), id.to_owned()),
        ("CloudPubSubDeadLetterSourceSubscriptionProject".to_owned(), project.to_owned()),
        (
            "CloudPubSubDeadLetterSourceTopicPublishTime".to_owned(),
            publish_time.to_rfc3339_opts(SecondsFormat::Millis, true),
        ),
    ]);
    if let Err(err) = broker.publish(&policy.topic, vec![(data.clone(), attributes, ordering_key.clone())]) {
        tracing::warn!(subscription = subscription.config.name, error = %err, "Dead-lettering failed.");
    }
}

/// (`P`, `S`) of `projects/P/subscriptions/S`.
fn split_name(name: &str) -> (&str, &str) {
    let mut parts = name.split('/');
    let project = parts.nth(1).unwrap_or_default();
    (project, parts.nth(1).unwrap_or_default())
}

impl Subscription {
    /// Takes the next due delivery if the push window has room.
    fn next(&self, now: Instant) -> Next {
        let mut queue = self.queue.lock().expect("subscription queue lock");
        if queue.outstanding >= queue.window {
            return Next::Wait(None);
        }
        match queue.pending.first_key_value() {
            None => Next::Wait(None),
            Some(((due, _), _)) if *due > now => Next::Wait(Some(*due)),
            Some(_) => {
                let (_, mut delivery) = queue.pending.pop_first().expect("not empty");
                delivery.attempts += 1;
                queue.outstanding += 1;
                queue.stats.pushed += 1;
                Next::Push(delivery)
            }
        }
    }

    /// Records a push's outcome and adjusts the window; returns the delivery if it is to be
    /// dead-lettered.
    ///
    /// An acked message may be scheduled once more, per this subscription's redelivery policy
    /// or else `redelivery`.
    fn settle(&self, mut delivery: Delivery, acked: bool, redelivery: Redelivery) -> Option<Delivery> {
        let mut queue = self.queue.lock().expect("subscription queue lock");
        queue.outstanding -= 1;
        if acked {
            queue.stats.acked += 1;
            queue.window = (queue.window + 1).min(self.config.max_outstanding);
            if !delivery.redelivered
                && let Some(delay) = self.redeliverer.roll(redelivery)
            {
                tracing::debug!(
                    subscription = self.config.name,
                    message_id = delivery.message.message_id,
                    ?delay,
                    "Acked message to be redelivered."
                );
                delivery.redelivered = true;
                queue.stats.redelivered += 1;
                queue.schedule(Instant::now() + delay, delivery);
            }
            return None;
        }
        queue.stats.nacked += 1;
        queue.window = (queue.window / 2).max(1);
        if self.config.dead_letter.as_ref().is_some_and(|p| delivery.attempts >= p.max_delivery_attempts) {
            queue.stats.dead_lettered += 1;
            return Some(delivery);
        }
        let due = Instant::now() + self.backoff(delivery.attempts);
        queue.schedule(due, delivery);
        None
    }
}
