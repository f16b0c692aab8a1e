use std::time::Duration;

use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::model::Message;
use google_cloud_tasks_v2::client::CloudTasks;
use google_cloud_tasks_v2::model::{HttpRequest, OidcToken, Task};
use haishin_stand_ins::pubsub::{PushAuth, PushSubscription};
use haishin_stand_ins::tasks::Queue;
use haishin_stand_ins::{StandIns, StandInsConfig};

use crate::common::{Receiver, anonymous, verify};

const INVOKER: &str = "haishin-invoker@haishin.iam.gserviceaccount.com";

#[tokio::test]
async fn all_stand_ins_share_one_signer_and_stop_together() {
    let stand_ins = StandIns::start(StandInsConfig::default()).await.unwrap();
    let receiver = Receiver::ok().await;
    let push_url = format!("{}/push/events", receiver.url);
    let task_url = format!("{}/tasks/prepare", receiver.url);
    stand_ins.pubsub.create_topic("projects/p/topics/pipeline-events").unwrap();
    stand_ins
        .pubsub
        .create_push_subscription(PushSubscription {
            oidc: Some(PushAuth { service_account_email: INVOKER.into(), audience: Some("trigger".into()) }),
            ..PushSubscription::new(
                "projects/p/subscriptions/trigger-events",
                "projects/p/topics/pipeline-events",
                &push_url,
            )
        })
        .unwrap();
    stand_ins.tasks.create_queue(Queue::new("projects/p/locations/l/queues/prepare")).unwrap();
    stand_ins.storage.create_bucket("haishin-chunks").unwrap();

    let publisher = Publisher::builder("projects/p/topics/pipeline-events")
        .with_endpoint(stand_ins.pubsub_endpoint())
        .with_credentials(anonymous())
        .build()
        .await
        .unwrap();
    publisher.publish(Message::new().set_data("slot freed")).await.unwrap();
    let tasks = CloudTasks::builder()
        .with_endpoint(stand_ins.tasks_endpoint())
        .with_credentials(anonymous())
        .build()
        .await
        .unwrap();
    tasks
        .create_task()
        .set_parent("projects/p/locations/l/queues/prepare")
        .set_task(
            Task::new().set_http_request(
                HttpRequest::new().set_url(&task_url).set_oidc_token(
                    OidcToken::new().set_service_account_email(INVOKER).set_audience("trigger"),
                ),
            ),
        )
        .send()
        .await
        .unwrap();

    let received = receiver.wait_for(2).await;
    for request in &received {
        let (claims, _) = verify(request.bearer().unwrap(), &stand_ins.jwks_url(), "trigger").await.unwrap();
        assert_eq!(claims["email"], INVOKER, "{}", request.path);
    }
    let bucket =
        reqwest::get(format!("{}/storage/v1/b/haishin-chunks", stand_ins.storage_endpoint())).await.unwrap();
    assert_eq!(bucket.status(), 200);
    let endpoints = [
        stand_ins.pubsub_endpoint(),
        stand_ins.tasks_endpoint(),
        stand_ins.storage_endpoint(),
        stand_ins.jwks_url(),
    ];

    stand_ins.shutdown().await;

    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
    for endpoint in endpoints {
        assert!(client.get(&endpoint).send().await.is_err(), "{endpoint} still answers");
    }
}
