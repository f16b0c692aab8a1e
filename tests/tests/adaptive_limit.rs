//! An ESP whose real limit is lower than the configured one: the trigger lowers the slots it
//! grants after the first refusals, so that few calls are refused, and every recipient still gets
//! one mail.

use std::time::Duration;

use haishin_esp_sim::Api;
use haishin_local::stack::{BUCKET, LocalStack};
use haishin_shared::domain::Class;
use haishin_shared::esp::Shape;
use haishin_shared::store::Store;
use haishin_tests::dispatchable::{ready, request};
use haishin_tests::{TestStack, finished, fresh_database};
use haishin_trigger::scheduling::{SlotLimits, dispatch_round};
use serde_json::json;

const LIMITS: SlotLimits = SlotLimits {
    shape: Shape::Lists,
    limit: 8,
    realtime_reserved: 0,
    prefetch: 2,
    min_part: 0,
    inline_max: 0,
    send_slots: 8,
};

async fn report_refusal(store: &Store, others: i32) {
    sqlx::query("UPDATE dispatch_slots SET refused_in_flight = $1 WHERE api = 'upload'")
        .bind(others)
        .execute(store.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_reported_refusal_lowers_the_slots_the_next_round_grants_and_stops_the_prefetch() {
    let (store, _) = fresh_database().await;
    ready(&store, &request("big", Class::Batch, 0), 30).await;
    let first = dispatch_round(&store, LIMITS).await.unwrap();
    assert_eq!((first.dispatched.len(), first.slots.effective), (10, 8), "8 slots and 2 prefetched");

    // Three chunks go back in line after a refusal with 7 other uploads in progress.
    sqlx::query("UPDATE chunks SET state = 'pending' WHERE id IN (SELECT id FROM chunks WHERE state = 'queued' LIMIT 3)")
        .execute(store.pool())
        .await
        .unwrap();
    report_refusal(&store, 7).await;
    let lowered = dispatch_round(&store, LIMITS).await.unwrap();

    assert_eq!(lowered.slots.effective, 6);
    assert_eq!(
        (lowered.dispatched.len(), lowered.in_flight),
        (0, 7),
        "7 in flight over 6 slots, no prefetch"
    );
    let (stored, pending): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT effective_limit, refused_in_flight FROM dispatch_slots WHERE api = 'upload'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!((stored, pending), (Some(6), None), "the refusal is taken into account once");
    // A refusal explained by the uploads granted before the decrease changes nothing.
    report_refusal(&store, 6).await;
    assert_eq!(dispatch_round(&store, LIMITS).await.unwrap().slots.effective, 6);
}

async fn csv_audience(stack: &LocalStack, name: &str, n: usize) -> String {
    let mut csv = String::from("email,name\n");
    for i in 0..n {
        csv.push_str(&format!("{name}-{i}@example.com,User {i}\n"));
    }
    let object = format!("audiences/{name}.csv");
    stack.blobs.write(BUCKET, &object, csv.into_bytes().into()).await.expect("audience written");
    format!("gs://{BUCKET}/{object}")
}

#[tokio::test]
async fn slots_drop_to_an_esp_limit_lower_than_configured_and_refused_calls_stay_few() {
    // Configured for 6 calls at once; the ESP takes only 2.
    let stack = TestStack {
        esp_limit: 6,
        call_latency: Duration::from_millis(100),
        chunk_size: 10,
        ..TestStack::default()
    }
    .start()
    .await;
    stack.esp.set_limit(Api::Upload, 2).unwrap();
    let uri = csv_audience(&stack, "lowered", 400).await;

    stack
        .requests_topic
        .publish(
            &json!({"id": "lowered", "class": "batch", "template": {"subject": "Hi", "text": "Hello {{name}}"},
                "audience": {"gcs": {"uris": [uri]}}}),
            &[],
        )
        .await
        .expect("published");
    let status = finished(&stack, "lowered").await;

    assert_eq!(status["state"], "completed");
    assert_eq!(status["delivered"], 400);
    let sim = stack.esp.report();
    assert_eq!(sim.requests["lowered"].counts.unique, 400);
    assert_eq!(sim.deliveries.duplicates, 0);
    let effective: Option<i32> =
        sqlx::query_scalar("SELECT effective_limit FROM dispatch_slots WHERE api = 'upload'")
            .fetch_one(stack.store.pool())
            .await
            .unwrap();
    assert_eq!(effective, Some(2), "the slots granted came down to the ESP's real limit");
    // From 6 to 2 takes four decreases; the first round's calls, all sent at once, are refused
    // together. Some 40 uploads were accepted.
    let refused = sim.upload.over_limit_attempts;
    assert!(refused <= 8, "{refused} uploads refused for the limit of {}", sim.upload.calls_accepted);
    assert!(sim.upload.calls_accepted >= 40);
    assert_eq!(sim.upload.calls_accepted as usize, sim.upload.calls.len());
    stack.stop().await;
}
