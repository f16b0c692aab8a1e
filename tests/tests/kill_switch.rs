//! The kill switch on the local stack: a campaign whose bounce rate crosses the threshold
//! (`KILL_SWITCH_BOUNCE_RATE` 5% after `KILL_SWITCH_MIN_SAMPLE` 200 recipients there) is paused
//! by the completion job with the figures in its status, stops calling the ESP, and completes
//! once resumed; one under the threshold is never paused. The ESP simulator bounces the
//! recipients at `bounce.invalid`.

use std::time::Duration;

use haishin_local::stack::{BUCKET, KILL_SWITCH_MIN_SAMPLE, LocalStack};
use haishin_tests::{TestStack, eventually, finished, request_status};
use serde_json::{Value, json};

/// A slow ESP (one slot, 100 ms a call) and small chunks: a chunk of 20 settles every 100 ms or
/// so, and the completion job (every 200 ms) judges the campaign every few chunks.
fn slow_stack() -> TestStack {
    TestStack {
        esp_limit: 1,
        call_latency: Duration::from_millis(100),
        chunk_size: 20,
        ..TestStack::default()
    }
}

/// A campaign of `n` recipients in a CSV file, published; recipient `i` bounces when `bounces(i)`.
async fn campaign(stack: &LocalStack, id: &str, n: usize, bounces: impl Fn(usize) -> bool) {
    let mut csv = String::from("email,name\n");
    for i in 0..n {
        let domain = if bounces(i) { "bounce.invalid" } else { "example.com" };
        csv.push_str(&format!("{id}-{i}@{domain},User {i}\n"));
    }
    let object = format!("audiences/{id}.csv");
    stack.blobs.write(BUCKET, &object, csv.into_bytes().into()).await.unwrap();
    let body = json!({"id": id, "class": "batch", "template": {"subject": "Hi {{name}}", "text": "Hello"},
        "audience": {"gcs": {"uris": [format!("gs://{BUCKET}/{object}")]}}});
    stack.requests_topic.publish(&body, &[]).await.unwrap();
}

fn count(status: &Value, map: &str, state: &str) -> i64 {
    status[map][state].as_i64().unwrap_or(0)
}

#[tokio::test]
async fn a_campaign_that_bounces_too_much_is_paused_stops_and_once_resumed_completes() {
    let stack = slow_stack().start().await;
    // One in ten of the first 250 recipients bounces (10% until then), none after: the rate stays
    // at or over 5% until 500 recipients have an outcome, and since the resume judges only chunks
    // finished after it (at most 5 bounces among at least 200), it is not paused again.
    campaign(&stack, "stale", 1_200, |i| i < 250 && i % 10 == 0).await;

    let status = eventually("the kill switch to pause the campaign", Duration::from_secs(30), || async {
        let status = request_status(&stack, "stale").await?;
        status["pause_reason"].is_string().then_some(status)
    })
    .await;
    let reason = status["pause_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("kill switch: bounce rate ")
            && reason.contains("% over 5.0% after ")
            && reason.ends_with(" recipients"),
        "{reason}"
    );
    let sample: u64 = reason
        .rsplit(" after ")
        .next()
        .unwrap()
        .trim_end_matches(" recipients")
        .replace(',', "")
        .parse()
        .unwrap();
    assert!(sample >= KILL_SWITCH_MIN_SAMPLE, "{reason}");
    assert!(status["paused_at"].is_string(), "{status}");

    // What was handed on before the pause finishes; then nothing more is uploaded.
    let status = eventually("the chunks handed on to finish", Duration::from_secs(30), || async {
        let status = request_status(&stack, "stale").await?;
        let moving: i64 = ["queued", "uploading", "uploaded", "sending", "sent"]
            .iter()
            .map(|s| count(&status, "chunks", s))
            .sum();
        (moving == 0).then_some(status)
    })
    .await;
    let uploads = stack.esp.report().upload.calls_accepted;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(stack.esp.report().upload.calls_accepted, uploads, "no upload while paused");
    let status = request_status(&stack, "stale").await.unwrap_or(status);
    assert!(count(&status, "recipients", "pending") > 0, "{status}");
    assert_eq!(status["pause_reason"], reason, "still paused, by the kill switch");

    let answer = reqwest::Client::new()
        .post(format!("{}/v1/requests/stale:resume", stack.endpoints.trigger))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let done = finished(&stack, "stale").await;
    assert_eq!(done["state"], "completed", "{done}");
    assert!(done.get("pause_reason").is_none_or(Value::is_null), "not paused again: {done}");
    assert_eq!((done["delivered"].as_i64(), done["bounced"].as_i64()), (Some(1_175), Some(25)), "{done}");
    let sim = stack.esp.report();
    assert_eq!(sim.requests["stale"].counts.unique, 1_200, "every recipient");
    assert_eq!((sim.requests["stale"].counts.total, sim.deliveries.duplicates), (1_200, 0), "once");
    stack.stop().await;
}

#[tokio::test]
async fn a_campaign_under_the_threshold_is_never_paused() {
    let stack = slow_stack().start().await;
    campaign(&stack, "clean", 600, |i| i % 100 == 0).await;

    let done = finished(&stack, "clean").await;

    assert_eq!(done["state"], "completed", "{done}");
    assert!(done.get("pause_reason").is_none_or(Value::is_null), "{done}");
    assert!(done.get("paused_at").is_none_or(Value::is_null), "{done}");
    assert_eq!((done["delivered"].as_i64(), done["bounced"].as_i64()), (Some(594), Some(6)), "{done}");
    stack.stop().await;
}

#[tokio::test]
async fn a_campaign_drawing_complaints_through_the_webhooks_is_paused() {
    let stack = slow_stack().start().await;
    campaign(&stack, "spammy", 1_200, |_| false).await;
    // Ten spam complaints reported for it (as the provider's webhooks record them) are 1% or more
    // of any sample up to 1,000: well over the 0.3% threshold once 200 recipients have an outcome.
    for i in 0..10 {
        sqlx::query(
            "INSERT INTO feedback (provider, event_id, kind, request_id, address, occurred_at)
             VALUES ('ses', $1, 'complaint', 'spammy', $2, now())",
        )
        .bind(format!("c-{i}"))
        .bind(format!("spammy-{i}@example.com"))
        .execute(stack.store.pool())
        .await
        .unwrap();
    }
    let status = eventually("the kill switch to pause the campaign", Duration::from_secs(30), || async {
        let status = request_status(&stack, "spammy").await?;
        status["pause_reason"].is_string().then_some(status)
    })
    .await;
    let reason = status["pause_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("kill switch: complaint rate ") && reason.contains("% over 0.3% after "),
        "{reason}"
    );
    assert_eq!(status["complained"], 10, "{status}");
    assert!(count(&status, "recipients", "pending") > 0, "paused before the end: {status}");
    stack.stop().await;
}
