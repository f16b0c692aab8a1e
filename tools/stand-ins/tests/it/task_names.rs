//! A named task's name stays taken for `name_ttl` after the task is done or deleted.

use std::time::{Duration, SystemTime};

use google_cloud_gax::error::rpc::Code;
use google_cloud_tasks_v2::client::CloudTasks;
use google_cloud_tasks_v2::model::Task;
use haishin_stand_ins::oidc::TokenSigner;
use haishin_stand_ins::tasks::{Queue, TasksServer};
use tokio::time::Instant;

use crate::common::{PATIENCE, Receiver};
use crate::tasks::{QUEUE, client, create, http_task, queue};

const NAME_TTL: Duration = Duration::from_millis(500);

async fn server() -> TasksServer {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(Queue { name_ttl: NAME_TTL, ..queue() }).unwrap();
    server
}

/// Creates `task` until the name is free again; when that succeeded.
async fn create_once_free(client: &CloudTasks, task: &Task) -> Instant {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match create(client, task.clone()).await {
            Ok(_) => return Instant::now(),
            Err(err) => assert_eq!(err.status().map(|s| s.code), Some(Code::AlreadyExists), "{err:?}"),
        }
        assert!(Instant::now() < deadline, "the name was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_queues_names_stay_taken_for_an_hour_by_default() {
    assert_eq!(Queue::new(QUEUE).name_ttl, Duration::from_secs(3600));
}

#[tokio::test]
async fn a_done_tasks_name_is_refused_until_its_reservation_expires_then_makes_a_new_task() {
    let server = server().await;
    let receiver = Receiver::ok().await;
    let client = client(&server).await;
    let name = format!("{QUEUE}/tasks/chunk-5e1d");
    let task = http_task(&receiver.url, "{}").set_name(&name);
    create(&client, task.clone()).await.unwrap();
    let first = receiver.wait_for(1).await.remove(0);
    assert!(server.wait_idle(PATIENCE).await);

    let refused = create(&client, task.clone()).await.unwrap_err();
    let gone = client.get_task().set_name(&name).send().await.unwrap_err();
    let created_at = create_once_free(&client, &task).await;

    assert_eq!(refused.status().map(|s| s.code), Some(Code::AlreadyExists), "{refused:?}");
    assert_eq!(gone.status().map(|s| s.code), Some(Code::NotFound));
    assert!(created_at - first.at >= NAME_TTL, "freed {:?} after the first run", created_at - first.at);
    let second = receiver.wait_for(2).await.remove(1);
    assert_eq!(second.header("x-cloudtasks-taskname"), "chunk-5e1d");
    assert_eq!(second.header("x-cloudtasks-taskretrycount"), "0", "a new task, not a retry");
    assert_eq!(server.queue_stats(QUEUE).unwrap().created, 2);
}

#[tokio::test]
async fn a_deleted_tasks_name_is_refused_until_its_reservation_expires() {
    let server = server().await;
    let receiver = Receiver::ok().await;
    let client = client(&server).await;
    let name = format!("{QUEUE}/tasks/later");
    let later = SystemTime::now() + Duration::from_secs(60);
    let task = http_task(&receiver.url, "{}")
        .set_name(&name)
        .set_schedule_time(google_cloud_wkt::Timestamp::try_from(later).unwrap());
    create(&client, task.clone()).await.unwrap();

    let before_delete = Instant::now();
    client.delete_task().set_name(&name).send().await.unwrap();
    let refused = create(&client, task.clone()).await.unwrap_err();
    let created_at = create_once_free(&client, &task).await;

    assert_eq!(refused.status().map(|s| s.code), Some(Code::AlreadyExists), "{refused:?}");
    assert!(
        created_at - before_delete >= NAME_TTL,
        "freed {:?} after the delete",
        created_at - before_delete
    );
    let fetched = client.get_task().set_name(&name).send().await.unwrap();
    assert_eq!(fetched.name, name);
    assert!(receiver.requests().is_empty());
}

#[tokio::test]
async fn a_name_taken_by_a_waiting_task_is_refused_whatever_the_ttl() {
    let server = TasksServer::start(TokenSigner::new(), 0).await.unwrap();
    server.create_queue(Queue { name_ttl: Duration::ZERO, ..queue() }).unwrap();
    let client = client(&server).await;
    let later = SystemTime::now() + Duration::from_secs(60);
    let task = http_task("http://127.0.0.1:9/", "{}")
        .set_name(format!("{QUEUE}/tasks/waiting"))
        .set_schedule_time(google_cloud_wkt::Timestamp::try_from(later).unwrap());
    create(&client, task.clone()).await.unwrap();

    let refused = create(&client, task).await.unwrap_err();

    assert_eq!(refused.status().map(|s| s.code), Some(Code::AlreadyExists), "{refused:?}");
}
