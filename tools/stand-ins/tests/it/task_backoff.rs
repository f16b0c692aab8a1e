//! How Cloud Tasks backs off on 429 and 503 (the whole queue, and `Retry-After`) and on other
//! failures (the task, per the queue's retry config).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use haishin_stand_ins::oidc::TokenSigner;
use haishin_stand_ins::tasks::{Queue, TasksServer};

use crate::common::{PATIENCE, Receiver, Reply};
use crate::tasks::{QUEUE, client, create, http_task, queue};

/// What a receiver answers, made when the request comes.
trait MakeReply: Fn() -> Reply + Send + Sync + 'static {}
impl<F: Fn() -> Reply + Send + Sync + 'static> MakeReply for F {}

/// A receiver that answers the first request with what `first` makes then, and every later
/// one 200.
async fn fails_once(first: impl MakeReply) -> Receiver {
    let calls = Arc::new(AtomicUsize::new(0));
    Receiver::start(move |_| if calls.fetch_add(1, Ordering::SeqCst) == 0 { first() } else { Reply::ok() })
        .await
}

/// The time between a single task's first dispatch and its retry.
async fn retry_gap(queue_config: Queue, first: impl MakeReply) -> (Duration, TasksServer) {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(queue_config).unwrap();
    let receiver = fails_once(first).await;

    create(&client(&server).await, http_task(&receiver.url, "{}")).await.unwrap();

    let dispatches = receiver.wait_for(2).await;
    assert!(server.wait_idle(PATIENCE).await);
    assert_eq!(dispatches[1].header("x-cloudtasks-taskretrycount"), "1");
    (dispatches[1].at - dispatches[0].at, server)
}

#[tokio::test]
async fn a_429_with_retry_after_seconds_puts_the_task_off_until_then() {
    let (gap, server) = retry_gap(queue(), || Reply::status(429).header("Retry-After", "1")).await;

    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}, asked for 1 s");
    assert_eq!(server.queue_stats(QUEUE).unwrap().throttled, 1);
}

#[tokio::test]
async fn a_503_with_retry_after_as_an_http_date_puts_the_task_off_until_then() {
    // Two seconds after the answer, at the date's one-second resolution: a second away at least.
    let in_two_seconds = || {
        let at = chrono::Utc::now() + chrono::Duration::seconds(2);
        Reply::status(503).header("Retry-After", &at.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
    };

    let (gap, server) = retry_gap(queue(), in_two_seconds).await;

    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}, asked for 2 s");
    assert_eq!(server.queue_stats(QUEUE).unwrap().throttled, 1);
}

#[tokio::test]
async fn retry_after_never_brings_a_retry_before_the_queues_backoff() {
    let slow = Queue { min_backoff: Duration::from_millis(500), ..queue() };

    let (gap, _server) = retry_gap(slow, || Reply::status(429).header("Retry-After", "0")).await;

    assert!(gap >= Duration::from_millis(500), "retried after {gap:?}, back-off 500 ms");
}

#[tokio::test]
async fn other_failures_keep_the_queues_backoff_and_ignore_retry_after() {
    let (gap, server) = retry_gap(queue(), || Reply::status(500).header("Retry-After", "30")).await;

    assert!(gap >= Duration::from_millis(20) && gap < Duration::from_secs(5), "retried after {gap:?}");
    let stats = server.queue_stats(QUEUE).unwrap();
    assert_eq!(stats.throttled, 0);
    assert!((stats.dispatch_rate - 500.0).abs() < 1e-9, "not slowed: {}", stats.dispatch_rate);
}

#[tokio::test]
async fn a_throttling_answer_slows_every_task_of_the_queue() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    // 20 dispatches per second from a bucket of 2: at full rate, the three healthy tasks behind
    // the two throttled ones would go out 50 ms apart, within about 100 ms.
    server.create_queue(Queue { max_dispatches_per_second: 20.0, max_attempts: 1, ..queue() }).unwrap();
    let throttling = Receiver::start(|_| Reply::status(429)).await;
    let healthy = Receiver::ok().await;
    let client = client(&server).await;
    server.pause();
    for url in [&throttling.url, &throttling.url, &healthy.url, &healthy.url, &healthy.url] {
        create(&client, http_task(url, "{}")).await.unwrap();
    }

    server.resume();

    let dispatches = healthy.wait_for(3).await;
    let spread = dispatches[2].at - dispatches[0].at;
    assert!(spread >= Duration::from_millis(250), "three dispatches within {spread:?} of a slowed queue");
    assert!(server.wait_idle(PATIENCE).await);
    let stats = server.queue_stats(QUEUE).unwrap();
    assert_eq!((stats.throttled, stats.dropped, stats.succeeded), (2, 2, 3));
}
