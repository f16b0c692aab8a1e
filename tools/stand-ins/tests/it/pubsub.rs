use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::Message;
use haishin_stand_ins::oidc::{KeySetServer, TokenSigner};
use haishin_stand_ins::pubsub::{DeadLetterPolicy, PubSubServer, PushAuth, PushSubscription};

use crate::common::{Receiver, Reply, anonymous, eventually, verify};

pub(crate) const TOPIC: &str = "projects/haishin/topics/deliveries";
pub(crate) const SUBSCRIPTION: &str = "projects/haishin/subscriptions/sender";
const PUSHER: &str = "pubsub-push@haishin.iam.gserviceaccount.com";

pub(crate) async fn publisher(server: &PubSubServer, topic: &str) -> Publisher {
    Publisher::builder(topic)
        .with_endpoint(server.endpoint())
        .with_credentials(anonymous())
        .set_delay_threshold(Duration::from_millis(1))
        .build()
        .await
        .expect("the official publisher builds")
}

/// A subscription on [`TOPIC`] pushing to `receiver` with back-offs of tens of milliseconds.
pub(crate) fn subscription(name: &str, receiver: &Receiver) -> PushSubscription {
    PushSubscription {
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_secs(1),
        ..PushSubscription::new(name, TOPIC, format!("{}/push/deliveries", receiver.url))
    }
}

pub(crate) fn message(data: &str, attributes: &[(&str, &str)]) -> Message {
    Message::new().set_data(data.to_owned()).set_attributes(attributes.iter().map(|(k, v)| (*k, *v)))
}

#[tokio::test]
async fn published_message_is_pushed_with_the_envelope_and_a_verifiable_token() {
    let signer = TokenSigner::new();
    let key_set = KeySetServer::start(&signer, 0).await.unwrap();
    let server = PubSubServer::start(signer, 0).await.unwrap();
    let receiver = Receiver::ok().await;
    server.create_topic(TOPIC).unwrap();
    let endpoint = format!("{}/push/deliveries", receiver.url);
    server
        .create_push_subscription(PushSubscription {
            oidc: Some(PushAuth { service_account_email: PUSHER.into(), audience: None }),
            ..subscription(SUBSCRIPTION, &receiver)
        })
        .unwrap();
    let publisher = publisher(&server, TOPIC).await;

    let id =
        publisher.publish(message("chunk 7", &[("request_id", "r-1"), ("class", "batch")])).await.unwrap();

    let push = receiver.wait_for(1).await.remove(0);
    assert_eq!(push.method, "POST");
    assert_eq!(push.path, "/push/deliveries");
    assert_eq!(push.header("content-type"), "application/json");
    let envelope = push.json();
    let sent = &envelope["message"];
    assert_eq!(STANDARD.decode(sent["data"].as_str().unwrap()).unwrap(), b"chunk 7");
    assert_eq!(sent["attributes"], serde_json::json!({ "request_id": "r-1", "class": "batch" }));
    assert_eq!(sent["messageId"], id.as_str());
    assert_eq!(sent["orderingKey"], "");
    let published = chrono::DateTime::parse_from_rfc3339(sent["publishTime"].as_str().unwrap()).unwrap();
    assert!((chrono::Utc::now() - published.to_utc()).num_seconds().abs() < 60);
    assert_eq!(envelope["subscription"], SUBSCRIPTION);
    assert!(envelope.get("deliveryAttempt").is_none(), "only with a dead-letter policy");
    let (claims, _) =
        verify(push.bearer().expect("a bearer token"), &key_set.jwks_url(), &endpoint).await.unwrap();
    assert_eq!(claims["email"], PUSHER);
    server.wait_idle(Duration::from_secs(5)).await;
    let stats = server.subscription_stats(SUBSCRIPTION).unwrap();
    assert_eq!((stats.pushed, stats.acked, stats.nacked, stats.backlog), (1, 1, 0, 0));
}

#[tokio::test]
async fn publishing_to_an_unknown_topic_fails_with_not_found() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let publisher = publisher(&server, "projects/haishin/topics/missing").await;

    let err = publisher.publish(message("x", &[])).await.unwrap_err();

    let PublishError::Rpc(rpc) = err else { panic!("expected an RPC error, got {err:?}") };
    assert_eq!(rpc.status().map(|s| s.code), Some(Code::NotFound), "{rpc:?}");
}

#[tokio::test]
async fn nacked_message_is_redelivered_with_growing_delays_then_dead_lettered() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let receiver = Receiver::start(|_| Reply::status(503)).await;
    server.create_topic(TOPIC).unwrap();
    server.create_topic("projects/haishin/topics/dead").unwrap();
    server
        .create_push_subscription(PushSubscription {
            dead_letter: Some(DeadLetterPolicy {
                topic: "projects/haishin/topics/dead".into(),
                max_delivery_attempts: 5,
            }),
            ..subscription(SUBSCRIPTION, &receiver)
        })
        .unwrap();
    let publisher = publisher(&server, TOPIC).await;

    publisher.publish(message("doomed", &[("request_id", "r-9")])).await.unwrap();

    eventually("dead-lettering", || server.subscription_stats(SUBSCRIPTION).unwrap().dead_lettered == 1)
        .await;
    let pushes = receiver.requests();
    assert_eq!(pushes.len(), 5);
    let attempts: Vec<_> = pushes.iter().map(|p| p.json()["deliveryAttempt"].as_u64().unwrap()).collect();
    assert_eq!(attempts, [1, 2, 3, 4, 5]);
    let gaps: Vec<Duration> = pushes.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (i, gap) in gaps.iter().enumerate() {
        let backoff = Duration::from_millis(20 << i);
        assert!(*gap >= backoff, "gap {i} was {gap:?}, back-off {backoff:?}");
    }
    assert!(gaps.windows(2).all(|w| w[1] > w[0]), "delays grow: {gaps:?}");
    let dead = server.topic_messages("projects/haishin/topics/dead").unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].data.as_ref(), b"doomed");
    let attributes = &dead[0].attributes;
    assert_eq!(attributes["request_id"], "r-9");
    assert_eq!(attributes["CloudPubSubDeadLetterSourceSubscription"], "sender");
    assert_eq!(attributes["CloudPubSubDeadLetterSourceSubscriptionProject"], "haishin");
    assert_eq!(attributes["CloudPubSubDeadLetterSourceDeliveryCount"], "5");
    let stats = server.subscription_stats(SUBSCRIPTION).unwrap();
    assert_eq!((stats.pushed, stats.acked, stats.nacked, stats.backlog), (5, 0, 5, 0));
}

#[tokio::test]
async fn filters_route_realtime_to_its_own_subscription() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let realtime = Receiver::ok().await;
    let batch = Receiver::ok().await;
    server.create_topic(TOPIC).unwrap();
    server
        .create_push_subscription(PushSubscription {
            filter: Some(r#"attributes.class = "realtime""#.into()),
            ..subscription("projects/haishin/subscriptions/sender-realtime", &realtime)
        })
        .unwrap();
    server
        .create_push_subscription(PushSubscription {
            filter: Some(r#"attributes.class != "realtime""#.into()),
            ..subscription("projects/haishin/subscriptions/sender-batch", &batch)
        })
        .unwrap();
    let publisher = publisher(&server, TOPIC).await;

    let mut handles = Vec::new();
    for (i, class) in ["realtime", "batch", "realtime", "batch", "batch", "realtime"].into_iter().enumerate()
    {
        handles.push(publisher.publish(message(&format!("m{i}"), &[("class", class)])));
    }
    handles.push(publisher.publish(message("unclassified", &[("request_id", "r-3")])));
    for handle in handles {
        handle.await.unwrap();
    }

    assert!(server.wait_idle(Duration::from_secs(5)).await);
    let bodies = |r: &Receiver| {
        let mut data: Vec<String> = r
            .requests()
            .iter()
            .map(|p| {
                String::from_utf8(STANDARD.decode(p.json()["message"]["data"].as_str().unwrap()).unwrap())
                    .unwrap()
            })
            .collect();
        data.sort();
        data
    };
    assert_eq!(bodies(&realtime), ["m0", "m2", "m5"]);
    assert_eq!(bodies(&batch), ["m1", "m3", "m4", "unclassified"]);
    assert_eq!(
        server.subscription_stats("projects/haishin/subscriptions/sender-realtime").unwrap().filtered,
        4
    );
    assert_eq!(server.subscription_stats("projects/haishin/subscriptions/sender-batch").unwrap().filtered, 3);
}

#[tokio::test]
async fn messages_published_before_a_subscription_exists_are_not_delivered_to_it() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let receiver = Receiver::ok().await;
    server.create_topic(TOPIC).unwrap();
    let publisher = publisher(&server, TOPIC).await;
    publisher.publish(message("early", &[])).await.unwrap();
    assert_eq!(
        server.topic_messages(TOPIC).unwrap().len(),
        1,
        "a topic without subscriptions keeps its messages"
    );

    server.create_push_subscription(subscription(SUBSCRIPTION, &receiver)).unwrap();
    publisher.publish(message("late", &[])).await.unwrap();

    assert!(server.wait_idle(Duration::from_secs(5)).await);
    let pushes = receiver.requests();
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0].json()["message"]["data"], STANDARD.encode("late"));
}

#[tokio::test]
async fn the_push_window_bounds_concurrency_and_halves_on_nacks() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let failing = Arc::new(AtomicBool::new(true));
    let fail = failing.clone();
    let receiver = Receiver::start(move |_| {
        if fail.load(Ordering::SeqCst) {
            Reply::status(429)
        } else {
            Reply::ok().after(Duration::from_millis(20))
        }
    })
    .await;
    server.create_topic(TOPIC).unwrap();
    server
        .create_push_subscription(PushSubscription {
            max_outstanding: 4,
            ..subscription(SUBSCRIPTION, &receiver)
        })
        .unwrap();
    let publisher = publisher(&server, TOPIC).await;

    publisher.publish(message("first", &[])).await.unwrap();
    eventually("a nack", || server.subscription_stats(SUBSCRIPTION).unwrap().nacked >= 1).await;
    assert_eq!(server.subscription_stats(SUBSCRIPTION).unwrap().push_window, 1, "halved from the initial 3");

    failing.store(false, Ordering::SeqCst);
    let handles: Vec<_> = (0..40).map(|i| publisher.publish(message(&format!("m{i}"), &[]))).collect();
    for handle in handles {
        handle.await.unwrap();
    }

    assert!(server.wait_idle(Duration::from_secs(5)).await);
    let stats = server.subscription_stats(SUBSCRIPTION).unwrap();
    assert_eq!(stats.acked, 41);
    assert_eq!(stats.push_window, 4, "grown back to max_outstanding");
    assert_eq!(receiver.peak_in_flight(), 4);
}

#[tokio::test]
async fn a_push_unanswered_within_the_ack_deadline_is_redelivered() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let slow_once = Arc::new(AtomicBool::new(true));
    let slow = slow_once.clone();
    let receiver = Receiver::start(move |_| {
        if slow.swap(false, Ordering::SeqCst) {
            Reply::ok().after(Duration::from_secs(2))
        } else {
            Reply::ok()
        }
    })
    .await;
    server.create_topic(TOPIC).unwrap();
    server
        .create_push_subscription(PushSubscription {
            ack_deadline: Duration::from_millis(100),
            ..subscription(SUBSCRIPTION, &receiver)
        })
        .unwrap();
    let publisher = publisher(&server, TOPIC).await;

    publisher.publish(message("slow", &[])).await.unwrap();

    assert!(server.wait_idle(Duration::from_secs(5)).await);
    let stats = server.subscription_stats(SUBSCRIPTION).unwrap();
    assert_eq!((stats.pushed, stats.nacked, stats.acked), (2, 1, 1));
    let pushes = receiver.requests();
    assert_eq!(pushes[0].json()["message"]["messageId"], pushes[1].json()["message"]["messageId"]);
}

#[tokio::test]
async fn paused_delivery_holds_messages_until_resumed() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let receiver = Receiver::ok().await;
    server.create_topic(TOPIC).unwrap();
    server.create_push_subscription(subscription(SUBSCRIPTION, &receiver)).unwrap();
    let publisher = publisher(&server, TOPIC).await;

    server.pause();
    publisher.publish(message("held", &[])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(receiver.requests().is_empty());
    assert_eq!(server.subscription_stats(SUBSCRIPTION).unwrap().backlog, 1);
    server.resume();

    receiver.wait_for(1).await;
    assert!(server.wait_idle(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn invalid_subscriptions_are_refused() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let receiver = Receiver::ok().await;
    server.create_topic(TOPIC).unwrap();

    let unknown_topic =
        PushSubscription::new(SUBSCRIPTION, "projects/haishin/topics/nope", receiver.url.clone());
    let bad_filter = PushSubscription {
        filter: Some("attributes.class = batch".into()),
        ..subscription(SUBSCRIPTION, &receiver)
    };
    let bad_name = subscription("sender", &receiver);

    assert!(matches!(
        server.create_push_subscription(unknown_topic),
        Err(haishin_stand_ins::Error::NotFound(_))
    ));
    assert!(matches!(
        server.create_push_subscription(bad_filter),
        Err(haishin_stand_ins::Error::InvalidArgument(_))
    ));
    assert!(matches!(
        server.create_push_subscription(bad_name),
        Err(haishin_stand_ins::Error::InvalidArgument(_))
    ));
    server.create_push_subscription(subscription(SUBSCRIPTION, &receiver)).unwrap();
    assert!(matches!(
        server.create_push_subscription(subscription(SUBSCRIPTION, &receiver)),
        Err(haishin_stand_ins::Error::AlreadyExists(_))
    ));
    assert!(matches!(server.create_topic(TOPIC), Err(haishin_stand_ins::Error::AlreadyExists(_))));
}
