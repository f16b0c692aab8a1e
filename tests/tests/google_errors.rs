//! Google errors are classified by what a retry can do, on the answers the local stand-ins give
//! as the real services do: what names nothing, or may not be touched, fails for good; what got
//! no answer is retried.

use std::time::Duration;

use haishin_shared::gcp::{Blobs, GcpArgs, GcpError, QueueTarget, TaskQueue};
use haishin_stand_ins::{StandIns, StandInsConfig};

fn args(stand_ins: &StandIns) -> GcpArgs {
    GcpArgs {
        project: "p".into(),
        pubsub_endpoint: Some(stand_ins.pubsub_endpoint()),
        tasks_endpoint: Some(stand_ins.tasks_endpoint()),
        storage_endpoint: Some(stand_ins.storage_endpoint()),
        bigquery_endpoint: None,
    }
}

fn target(queue: &str) -> QueueTarget {
    QueueTarget {
        queue: queue.into(),
        url: "http://127.0.0.1:9/tasks/x".into(),
        service_account: "tasks@p.iam.gserviceaccount.com".into(),
        audience: "http://127.0.0.1:9".into(),
        dispatch_deadline: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn a_bucket_or_object_or_queue_that_does_not_exist_is_a_permanent_error() {
    let stand_ins = StandIns::start(StandInsConfig::default()).await.unwrap();
    let gcp = args(&stand_ins);
    let blobs = Blobs::connect(&gcp).await.unwrap();
    stand_ins.storage.create_bucket("here").unwrap();

    let listed = blobs.list("nowhere", "requests/").await.unwrap_err();
    let read = blobs.read_all("here", "missing.csv").await.unwrap_err();
    let queue = TaskQueue::connect(&gcp, target("projects/p/locations/l/queues/missing")).await.unwrap();
    let enqueued = queue.enqueue(Some("t1"), &serde_json::json!({})).await.unwrap_err();

    assert!(matches!(listed, GcpError::Permanent { .. }), "{listed}");
    assert!(matches!(read, GcpError::Permanent { .. }), "{read}");
    assert!(matches!(enqueued, GcpError::Permanent { .. }), "{enqueued}");
    stand_ins.shutdown().await;
}

#[tokio::test]
async fn a_service_that_does_not_answer_is_a_transient_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gcp = GcpArgs {
        project: "p".into(),
        pubsub_endpoint: None,
        tasks_endpoint: None,
        storage_endpoint: Some(endpoint),
        bigquery_endpoint: None,
    };
    let blobs = Blobs::connect(&gcp).await.unwrap();

    let listed = blobs.list("b", "").await.unwrap_err();

    assert!(matches!(listed, GcpError::Transient { .. }), "{listed}");
}
