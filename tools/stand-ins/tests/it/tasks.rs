use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use google_cloud_gax::error::rpc::Code;
use google_cloud_tasks_v2::client::CloudTasks;
use google_cloud_tasks_v2::model::{HttpMethod, HttpRequest, OidcToken, Task};
use haishin_stand_ins::oidc::{KeySetServer, TokenSigner};
use haishin_stand_ins::tasks::{Queue, TasksServer};

use crate::common::{Receiver, Reply, anonymous, eventually, verify};

pub(crate) const QUEUE: &str = "projects/haishin/locations/asia-northeast1/queues/upload";
const INVOKER: &str = "tasks-invoker@haishin.iam.gserviceaccount.com";

pub(crate) async fn client(server: &TasksServer) -> CloudTasks {
    CloudTasks::builder()
        .with_endpoint(server.endpoint())
        .with_credentials(anonymous())
        .build()
        .await
        .expect("the official client builds")
}

/// A queue with retries tens of milliseconds apart.
pub(crate) fn queue() -> Queue {
    Queue { min_backoff: Duration::from_millis(20), max_backoff: Duration::from_secs(1), ..Queue::new(QUEUE) }
}

/// A POST task to `url` with a JSON body.
pub(crate) fn http_task(url: &str, body: &str) -> Task {
    Task::new().set_http_request(
        HttpRequest::new()
            .set_url(url)
            .set_http_method(HttpMethod::Post)
            .set_headers([("Content-Type", "application/json")])
            .set_body(body.to_owned()),
    )
}

pub(crate) async fn create(client: &CloudTasks, task: Task) -> google_cloud_tasks_v2::Result<Task> {
    client.create_task().set_parent(QUEUE).set_task(task).send().await
}

#[tokio::test]
async fn created_task_is_dispatched_with_cloud_tasks_headers_and_a_token() {
    let signer = TokenSigner::new();
    let key_set = KeySetServer::start(&signer, 0).await.unwrap();
    let server = TasksServer::start(signer, 0).await.unwrap();
    server.create_queue(queue()).unwrap();
    let receiver = Receiver::ok().await;
    let url = format!("{}/tasks/upload", receiver.url);
    let task = Task::new().set_http_request(
        HttpRequest::new()
            .set_url(&url)
            .set_http_method(HttpMethod::Post)
            .set_headers([("Content-Type", "application/json"), ("X-Request-Id", "r-1")])
            .set_body(r#"{"chunk":"c-1"}"#)
            .set_oidc_token(OidcToken::new().set_service_account_email(INVOKER)),
    );

    let created = create(&client(&server).await, task).await.unwrap();

    let (queue_id, task_id) = created.name.rsplit_once("/tasks/").unwrap();
    assert_eq!(queue_id, QUEUE);
    assert!(!task_id.is_empty());
    let dispatch = receiver.wait_for(1).await.remove(0);
    assert_eq!(dispatch.method, "POST");
    assert_eq!(dispatch.path, "/tasks/upload");
    assert_eq!(dispatch.body.as_ref(), br#"{"chunk":"c-1"}"#);
    assert_eq!(dispatch.header("content-type"), "application/json");
    assert_eq!(dispatch.header("x-request-id"), "r-1");
    assert_eq!(dispatch.header("user-agent"), "Google-Cloud-Tasks");
    assert_eq!(dispatch.header("x-cloudtasks-queuename"), "upload");
    assert_eq!(dispatch.header("x-cloudtasks-taskname"), task_id);
    assert_eq!(dispatch.header("x-cloudtasks-taskretrycount"), "0");
    assert_eq!(dispatch.header("x-cloudtasks-taskexecutioncount"), "0");
    let eta: f64 = dispatch.header("x-cloudtasks-tasketa").parse().unwrap();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - eta).abs() < 30.0, "ETA {eta} is now");
    let (claims, _) =
        verify(dispatch.bearer().expect("a bearer token"), &key_set.jwks_url(), &url).await.unwrap();
    assert_eq!(claims["email"], INVOKER);
    assert!(server.wait_idle(Duration::from_secs(5)).await);
    let stats = server.queue_stats(QUEUE).unwrap();
    assert_eq!((stats.created, stats.dispatched, stats.succeeded, stats.tasks), (1, 1, 1, 0));
}

#[tokio::test]
async fn a_task_waits_for_its_schedule_time() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(queue()).unwrap();
    let receiver = Receiver::ok().await;
    let created_at = tokio::time::Instant::now();
    let at = SystemTime::now() + Duration::from_millis(300);
    let task =
        http_task(&receiver.url, "{}").set_schedule_time(google_cloud_wkt::Timestamp::try_from(at).unwrap());

    create(&client(&server).await, task).await.unwrap();

    let dispatch = receiver.wait_for(1).await.remove(0);
    assert!(
        dispatch.at - created_at >= Duration::from_millis(250),
        "dispatched after {:?}",
        dispatch.at - created_at
    );
}

#[tokio::test]
async fn a_failing_target_is_retried_with_backoff_until_max_attempts() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(Queue { max_attempts: 4, ..queue() }).unwrap();
    let receiver = Receiver::start(|_| Reply::status(500)).await;

    create(&client(&server).await, http_task(&receiver.url, "{}")).await.unwrap();

    eventually("the task to be dropped", || server.queue_stats(QUEUE).unwrap().dropped == 1).await;
    let dispatches = receiver.requests();
    assert_eq!(dispatches.len(), 4);
    let retries: Vec<_> =
        dispatches.iter().map(|d| d.header("x-cloudtasks-taskretrycount").to_owned()).collect();
    assert_eq!(retries, ["0", "1", "2", "3"]);
    let executions: Vec<_> =
        dispatches.iter().map(|d| d.header("x-cloudtasks-taskexecutioncount").to_owned()).collect();
    assert_eq!(executions, ["0", "1", "2", "3"]);
    assert_eq!(dispatches[1].header("x-cloudtasks-taskpreviousresponse"), "500");
    for (i, pair) in dispatches.windows(2).enumerate() {
        let backoff = Duration::from_millis(20 << i);
        assert!(
            pair[1].at - pair[0].at >= backoff,
            "retry {i} after {:?}, back-off {backoff:?}",
            pair[1].at - pair[0].at
        );
    }
    let stats = server.queue_stats(QUEUE).unwrap();
    assert_eq!((stats.dispatched, stats.retried, stats.succeeded, stats.tasks), (4, 3, 0, 0));
}

#[tokio::test]
async fn a_task_that_fails_then_succeeds_is_done() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(queue()).unwrap();
    let failed_once = Arc::new(AtomicBool::new(false));
    let failed = failed_once.clone();
    let receiver =
        Receiver::start(
            move |_| if failed.swap(true, Ordering::SeqCst) { Reply::ok() } else { Reply::status(503) },
        )
        .await;

    create(&client(&server).await, http_task(&receiver.url, "{}")).await.unwrap();

    assert!(server.wait_idle(Duration::from_secs(5)).await);
    let stats = server.queue_stats(QUEUE).unwrap();
    assert_eq!((stats.dispatched, stats.retried, stats.succeeded, stats.throttled), (2, 1, 1, 1));
    assert_eq!(receiver.requests()[1].header("x-cloudtasks-taskretrycount"), "1");
}

#[tokio::test]
async fn a_named_task_created_twice_is_refused_and_dispatched_once() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(queue()).unwrap();
    let receiver = Receiver::ok().await;
    let client = client(&server).await;
    let name = format!("{QUEUE}/tasks/chunk-3f2a9c");
    let task = || http_task(&receiver.url, "{}").set_name(&name);

    let first = create(&client, task()).await.unwrap();
    let second = create(&client, task()).await.unwrap_err();

    assert_eq!(first.name, name);
    assert_eq!(second.status().map(|s| s.code), Some(Code::AlreadyExists), "{second:?}");
    assert!(server.wait_idle(Duration::from_secs(5)).await);
    let after_done = create(&client, task()).await.unwrap_err();
    assert_eq!(
        after_done.status().map(|s| s.code),
        Some(Code::AlreadyExists),
        "the name stays taken after the task is done"
    );
    let gone = client.get_task().set_name(&name).send().await.unwrap_err();
    assert_eq!(gone.status().map(|s| s.code), Some(Code::NotFound));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(receiver.requests().len(), 1);
}

#[tokio::test]
async fn a_deleted_task_is_not_dispatched_and_its_name_stays_taken() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(queue()).unwrap();
    let receiver = Receiver::ok().await;
    let client = client(&server).await;
    let name = format!("{QUEUE}/tasks/later");
    let later = SystemTime::now() + Duration::from_secs(60);
    let task = http_task(&receiver.url, "{}")
        .set_name(&name)
        .set_schedule_time(google_cloud_wkt::Timestamp::try_from(later).unwrap());
    create(&client, task.clone()).await.unwrap();

    let fetched = client.get_task().set_name(&name).send().await.unwrap();
    client.delete_task().set_name(&name).send().await.unwrap();

    assert_eq!(fetched.http_request().unwrap().url, receiver.url);
    assert_eq!(server.queue_stats(QUEUE).unwrap().tasks, 0);
    let again = create(&client, task).await.unwrap_err();
    assert_eq!(again.status().map(|s| s.code), Some(Code::AlreadyExists));
    assert!(receiver.requests().is_empty());
}

#[tokio::test]
async fn a_queue_never_exceeds_its_concurrency_limit() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(Queue { max_concurrent_dispatches: 3, ..queue() }).unwrap();
    let receiver = Receiver::start(|_| Reply::ok().after(Duration::from_millis(30))).await;
    let client = client(&server).await;

    for i in 0..20 {
        create(&client, http_task(&receiver.url, &format!("{{\"i\":{i}}}"))).await.unwrap();
    }

    assert!(server.wait_idle(Duration::from_secs(10)).await);
    assert_eq!(receiver.requests().len(), 20);
    assert_eq!(receiver.peak_in_flight(), 3);
    let stats = server.queue_stats(QUEUE).unwrap();
    assert_eq!((stats.succeeded, stats.peak_in_flight, stats.in_flight), (20, 3, 0));
}

#[tokio::test]
async fn a_queue_dispatches_no_faster_than_its_rate() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    // 20 per second with a bucket of 2: ten tasks take at least 8 / 20 s.
    server.create_queue(Queue { max_dispatches_per_second: 20.0, ..queue() }).unwrap();
    let receiver = Receiver::ok().await;
    server.pause();
    let client = client(&server).await;
    for _ in 0..10 {
        create(&client, http_task(&receiver.url, "{}")).await.unwrap();
    }

    server.resume();

    let dispatches = receiver.wait_for(10).await;
    let spread = dispatches[9].at - dispatches[0].at;
    assert!(spread >= Duration::from_millis(350), "10 dispatches within {spread:?}");
}

#[tokio::test]
async fn throttling_answers_slow_the_queue_and_the_rate_recovers() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(Queue { max_dispatches_per_second: 100.0, max_attempts: 1, ..queue() }).unwrap();
    let receiver = Receiver::start(|_| Reply::status(429)).await;

    create(&client(&server).await, http_task(&receiver.url, "{}")).await.unwrap();

    eventually("the 429", || server.queue_stats(QUEUE).unwrap().throttled == 1).await;
    let slowed = server.queue_stats(QUEUE).unwrap().dispatch_rate;
    assert!((50.0..60.0).contains(&slowed), "halved: {slowed}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let recovering = server.queue_stats(QUEUE).unwrap().dispatch_rate;
    assert!(recovering > slowed && recovering < 100.0, "recovering: {recovering}");
}

#[tokio::test]
async fn unknown_queues_and_bad_tasks_get_google_errors() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(queue()).unwrap();
    let client = client(&server).await;

    let unknown = client
        .create_task()
        .set_parent("projects/haishin/locations/asia-northeast1/queues/nope")
        .set_task(http_task("http://127.0.0.1:9/", "{}"))
        .send()
        .await
        .unwrap_err();
    let no_url = create(&client, http_task("", "{}")).await.unwrap_err();
    let misnamed = create(
        &client,
        http_task("http://127.0.0.1:9/", "{}").set_name("projects/x/locations/y/queues/z/tasks/t"),
    )
    .await
    .unwrap_err();
    let queue = client.get_queue().set_name(QUEUE).send().await.unwrap();

    assert_eq!(unknown.status().map(|s| s.code), Some(Code::NotFound), "{unknown:?}");
    assert_eq!(no_url.status().map(|s| s.code), Some(Code::InvalidArgument), "{no_url:?}");
    assert_eq!(misnamed.status().map(|s| s.code), Some(Code::InvalidArgument), "{misnamed:?}");
    assert_eq!(queue.name, QUEUE);
    let limits = queue.rate_limits.unwrap();
    assert_eq!((limits.max_dispatches_per_second, limits.max_concurrent_dispatches), (500.0, 1000));
    assert_eq!(queue.retry_config.unwrap().max_attempts, 100);
}
