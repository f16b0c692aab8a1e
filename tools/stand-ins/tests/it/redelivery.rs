//! At-least-once redelivery of acknowledged pushes and completed tasks.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::Publisher;
use google_cloud_tasks_v2::client::CloudTasks;
use haishin_stand_ins::oidc::TokenSigner;
use haishin_stand_ins::pubsub::{DeadLetterPolicy, PubSubServer, PushSubscription};
use haishin_stand_ins::tasks::{Queue, TasksServer};
use haishin_stand_ins::{Redelivery, StandIns, StandInsConfig};

use crate::common::{PATIENCE, Received, Receiver, anonymous};
use crate::pubsub::{SUBSCRIPTION, TOPIC, message, publisher, subscription};
use crate::tasks::{QUEUE, client, create, http_task, queue};

/// Every acknowledged piece of work again, within a tenth of a second.
fn always() -> Redelivery {
    Redelivery { probability: 1.0, window: Duration::from_millis(100) }
}

fn message_id(push: &Received) -> String {
    push.json()["message"]["messageId"].as_str().unwrap().to_owned()
}

/// Pushes grouped by message id, in arrival order.
fn by_message(pushes: &[Received]) -> BTreeMap<String, Vec<&Received>> {
    let mut groups: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for push in pushes {
        groups.entry(message_id(push)).or_default().push(push);
    }
    groups
}

#[tokio::test]
async fn without_a_redelivery_policy_no_acked_message_is_pushed_twice() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let receiver = Receiver::ok().await;
    server.create_topic(TOPIC).unwrap();
    server.create_push_subscription(subscription(SUBSCRIPTION, &receiver)).unwrap();
    let publisher = publisher(&server, TOPIC).await;

    for i in 0..20 {
        publisher.publish(message(&format!("m{i}"), &[])).await.unwrap();
    }

    assert!(server.wait_idle(PATIENCE).await);
    assert_eq!(receiver.requests().len(), 20);
    let stats = server.subscription_stats(SUBSCRIPTION).unwrap();
    assert_eq!((stats.acked, stats.redelivered), (20, 0));
}

#[tokio::test]
async fn acked_messages_are_pushed_once_more_with_the_same_id_and_the_next_delivery_attempt() {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let receiver = Receiver::ok().await;
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
    server.set_subscription_redelivery(SUBSCRIPTION, Some(always())).unwrap();
    let publisher = publisher(&server, TOPIC).await;

    let mut ids = BTreeSet::new();
    for i in 0..3 {
        ids.insert(publisher.publish(message(&format!("m{i}"), &[])).await.unwrap());
    }

    assert!(server.wait_idle(PATIENCE).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pushes = receiver.requests();
    let groups = by_message(&pushes);
    assert_eq!(groups.keys().cloned().collect::<BTreeSet<_>>(), ids);
    for (id, pushes) in &groups {
        let attempts: Vec<_> = pushes.iter().map(|p| p.json()["deliveryAttempt"].as_u64().unwrap()).collect();
        assert_eq!(attempts, [1, 2], "message {id} is pushed twice, no more");
        assert_eq!(pushes[0].json()["message"], pushes[1].json()["message"], "the same message");
    }
    let stats = server.subscription_stats(SUBSCRIPTION).unwrap();
    assert_eq!((stats.pushed, stats.acked, stats.redelivered, stats.dead_lettered), (6, 6, 3, 0));
}

/// The message data the subscription had pushed twice, after `n` messages were published.
async fn redelivered_with_seed(seed: u64, n: usize) -> BTreeSet<String> {
    let server = PubSubServer::start(TokenSigner::new(), 0).await.unwrap();
    let receiver = Receiver::ok().await;
    server.create_topic(TOPIC).unwrap();
    server.seed_redelivery(seed);
    server.set_redelivery(Redelivery { probability: 0.5, window: Duration::from_millis(20) }).unwrap();
    // One push at a time, so that acknowledgements, and the decisions, come in publish order.
    server
        .create_push_subscription(PushSubscription {
            max_outstanding: 1,
            ..subscription(SUBSCRIPTION, &receiver)
        })
        .unwrap();
    let publisher: Publisher = publisher(&server, TOPIC).await;
    for i in 0..n {
        publisher.publish(message(&format!("m{i}"), &[])).await.unwrap();
    }
    assert!(server.wait_idle(PATIENCE).await);
    let stats = server.subscription_stats(SUBSCRIPTION).unwrap();
    let pushes = receiver.requests();
    let twice: BTreeSet<String> =
        by_message(&pushes).into_iter().filter(|(_, p)| p.len() == 2).map(|(id, _)| id).collect();
    assert_eq!(stats.redelivered as usize, twice.len());
    assert_eq!(pushes.len(), n + twice.len());
    twice
}

#[tokio::test]
async fn a_seeded_share_of_acked_messages_is_redelivered_the_same_way_every_run() {
    let first = redelivered_with_seed(7, 40).await;
    let again = redelivered_with_seed(7, 40).await;

    assert_eq!(first, again);
    assert!((8..=32).contains(&first.len()), "about half of 40: {}", first.len());
}

#[tokio::test]
async fn completed_tasks_are_dispatched_once_more_with_the_same_name() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(queue()).unwrap();
    server.set_queue_redelivery(QUEUE, Some(always())).unwrap();
    let receiver = Receiver::ok().await;
    let client = client(&server).await;
    let names: Vec<String> = (0..3).map(|i| format!("{QUEUE}/tasks/chunk-{i}")).collect();

    for name in &names {
        create(&client, http_task(&receiver.url, "{}").set_name(name)).await.unwrap();
    }

    assert!(server.wait_idle(PATIENCE).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dispatches = receiver.requests();
    assert_eq!(dispatches.len(), 6);
    for name in &names {
        let short = name.rsplit('/').next().unwrap();
        let runs: Vec<_> = dispatches
            .iter()
            .filter(|d| d.header("x-cloudtasks-taskname") == short)
            .map(|d| (d.header("x-cloudtasks-taskretrycount"), d.header("x-cloudtasks-taskexecutioncount")))
            .collect();
        assert_eq!(runs, [("0", "0"), ("1", "1")], "{short} runs twice, as a retry would");
    }
    let stats = server.queue_stats(QUEUE).unwrap();
    assert_eq!((stats.dispatched, stats.succeeded, stats.redelivered, stats.tasks), (6, 6, 3, 0));
    let again = create(&client, http_task(&receiver.url, "{}").set_name(&names[0])).await.unwrap_err();
    assert_eq!(again.status().map(|s| s.code), Some(Code::AlreadyExists), "the name is still taken");
}

/// The names of the tasks the queue dispatched twice, after `n` named tasks were created.
async fn redelivered_tasks_with_seed(seed: u64, n: usize) -> BTreeSet<String> {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.seed_redelivery(seed);
    server.set_redelivery(Redelivery { probability: 0.5, window: Duration::from_millis(20) }).unwrap();
    // One dispatch at a time, so that successes, and the decisions, come in creation order.
    server.create_queue(Queue { max_concurrent_dispatches: 1, ..queue() }).unwrap();
    let receiver = Receiver::ok().await;
    let client: CloudTasks = client(&server).await;
    server.pause();
    for i in 0..n {
        create(&client, http_task(&receiver.url, "{}").set_name(format!("{QUEUE}/tasks/t-{i:02}")))
            .await
            .unwrap();
    }
    server.resume();
    assert!(server.wait_idle(PATIENCE).await);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for dispatch in receiver.requests() {
        *counts.entry(dispatch.header("x-cloudtasks-taskname").to_owned()).or_default() += 1;
    }
    assert_eq!(counts.len(), n);
    let twice: BTreeSet<String> = counts.into_iter().filter(|(_, c)| *c == 2).map(|(name, _)| name).collect();
    assert_eq!(server.queue_stats(QUEUE).unwrap().redelivered as usize, twice.len());
    twice
}

#[tokio::test]
async fn a_seeded_share_of_completed_tasks_is_redelivered_the_same_way_every_run() {
    let first = redelivered_tasks_with_seed(11, 30).await;
    let again = redelivered_tasks_with_seed(11, 30).await;

    assert_eq!(first, again);
    assert!((5..=25).contains(&first.len()), "about half of 30: {}", first.len());
}

#[tokio::test]
async fn the_stand_ins_config_turns_redelivery_on_for_pubsub_and_cloud_tasks() {
    let stand_ins = StandIns::start(StandInsConfig {
        redelivery: always(),
        redelivery_seed: Some(1),
        ..StandInsConfig::default()
    })
    .await
    .unwrap();
    let receiver = Receiver::ok().await;
    stand_ins.pubsub.create_topic(TOPIC).unwrap();
    stand_ins.pubsub.create_push_subscription(subscription(SUBSCRIPTION, &receiver)).unwrap();
    stand_ins.tasks.create_queue(queue()).unwrap();
    let tasks = CloudTasks::builder()
        .with_endpoint(stand_ins.tasks_endpoint())
        .with_credentials(anonymous())
        .build()
        .await
        .unwrap();

    publisher(&stand_ins.pubsub, TOPIC).await.publish(message("event", &[])).await.unwrap();
    create(&tasks, http_task(&format!("{}/tasks/prepare", receiver.url), "{}")).await.unwrap();

    receiver.wait_for(4).await;
    assert!(stand_ins.pubsub.wait_idle(PATIENCE).await && stand_ins.tasks.wait_idle(PATIENCE).await);
    assert_eq!(stand_ins.pubsub.subscription_stats(SUBSCRIPTION).unwrap().redelivered, 1);
    assert_eq!(stand_ins.tasks.queue_stats(QUEUE).unwrap().redelivered, 1);
    stand_ins.set_redelivery(Redelivery::default()).unwrap();
    assert!(stand_ins.pubsub.set_redelivery(Redelivery::with_probability(1.5)).is_err());
    stand_ins.shutdown().await;
}
