//! One delivery request, one trace: the services (in this process) export their spans over OTLP
//! to the local collector, and every completed request's trace holds spans of the trigger, the
//! list-uploader, the sender and the completion job, with the request's ids and never a
//! recipient's address.
//!
//! This binary installs the process's global subscriber, so it holds this one test.

use std::time::Duration;

use haishin_local::collector::{self, Collector};
use haishin_local::stack::{BUCKET, LocalStack};
use haishin_shared::telemetry::Telemetry;
use haishin_shared::telemetry::export::ExportConfig;
use haishin_tests::{TestStack, eventually, finished, request_status};
use serde_json::{Value, json};

fn template() -> Value {
    json!({ "subject": "Hi {{name}}", "text": "Hello {{name}}" })
}

async fn logged(stack: &LocalStack, id: &str) -> bool {
    let logged: Option<bool> = sqlx::query_scalar("SELECT logged_at IS NOT NULL FROM requests WHERE id = $1")
        .bind(id)
        .fetch_optional(stack.store.pool())
        .await
        .expect("query");
    logged == Some(true)
}

/// Chunks sent to the ESP, by list or with their recipients.
async fn chunks_sent(stack: &LocalStack) -> u64 {
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks WHERE delivery_id IS NOT NULL")
        .fetch_one(stack.store.pool())
        .await
        .expect("query");
    sent as u64
}

#[tokio::test]
async fn every_completed_request_is_one_trace_through_the_four_services() {
    let collector = Collector::start().await.expect("collector starts");
    let config = ExportConfig {
        endpoint: collector.endpoint().to_owned(),
        metric_interval: Duration::from_millis(200),
        sample_ratio: 1.0,
        project: None,
    };
    let telemetry = Telemetry::exporting("haishin-tests", &config).expect("exporters built");
    telemetry.install_for_tests();

    let stack = TestStack { chunk_size: 50, inline_recipients_max: 5, ..TestStack::default() }.start().await;
    let mut csv = String::from("email,name\n");
    for i in 0..230 {
        csv.push_str(&format!("traced-{i}@example.com,User {i}\n"));
    }
    stack.blobs.write(BUCKET, "audiences/traced.csv", csv.into_bytes().into()).await.expect("written");
    let mut ids = vec!["traced-batch".to_owned()];
    stack
        .requests_topic
        .publish(
            &json!({"id": "traced-batch", "class": "batch", "template": template(),
                "audience": {"gcs": {"uris": [format!("gs://{BUCKET}/audiences/traced.csv")]}}}),
            &[],
        )
        .await
        .expect("published");
    // Realtime events held back, then let go at once: the next round hands them to the sender in
    // one message, and they go out in one call. Each still gets a trace of its own. More
    // recipients than one send carries make an uploaded event.
    let held = chrono::Utc::now() + chrono::Duration::hours(1);
    for i in 0..4 {
        let id = format!("traced-event-{i}");
        let n = if i == 3 { 6 } else { 1 };
        let recipients: Vec<Value> = (0..n)
            .map(|k| json!({"email": format!("event-{i}-{k}@example.com"), "params": {"name": "R"}}))
            .collect();
        stack
            .requests_topic
            .publish(
                &json!({"id": id, "class": "realtime", "template": template(), "not_before": held,
                    "audience": {"inline": recipients}}),
                &[],
            )
            .await
            .expect("published");
        ids.push(id);
    }
    for id in &ids[1..] {
        eventually(&format!("{id} prepared"), Duration::from_secs(20), || async {
            request_status(&stack, id).await.filter(|s| s["chunks"]["pending"] == 1)
        })
        .await;
    }
    sqlx::query("UPDATE requests SET not_before = now() WHERE id LIKE 'traced-event-%'")
        .execute(stack.store.pool())
        .await
        .expect("released");
    for id in &ids {
        assert_eq!(finished(&stack, id).await["state"], "completed", "{id}");
        eventually(&format!("{id} logged"), Duration::from_secs(30), || async {
            logged(&stack, id).await.then_some(())
        })
        .await;
    }
    // The completion pass that logged the last request may still be announcing it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A flush waits for the collector's answers, which this runtime serves: off its thread.
    let telemetry = tokio::task::spawn_blocking(move || {
        telemetry.flush();
        telemetry
    })
    .await
    .expect("flushed");

    let spans = collector.spans();
    let completed: Vec<collector::Completed> = ids
        .iter()
        .map(|id| match id.as_str() {
            "traced-batch" => collector::Completed::uploaded(id, "batch"),
            "traced-event-3" => collector::Completed::uploaded(id, "realtime"),
            _ => collector::Completed { id: id.clone(), class: "realtime".into(), uploaded: false },
        })
        .collect();
    let sim = stack.esp.report();
    assert_eq!(sim.requests["traced-event-0"].counts.sends, 1);
    assert_eq!(
        sim.send.calls_accepted,
        chunks_sent(&stack).await - 2,
        "the three small events in one call, each other chunk in its own"
    );
    let report = collector::report(&spans, collector.metric_names(), &completed);
    assert_eq!(
        report.requests_with_complete_trace, 5,
        "every request in one trace through the four services: {:?}",
        report.incomplete
    );
    // The batch's trace holds the upload of each of its chunks.
    let batch_trace = spans
        .iter()
        .find(|s| s.attributes.get("request_id").map(String::as_str) == Some("traced-batch"))
        .map(|s| s.trace_id.clone())
        .expect("a span of the batch");
    let chunks_uploaded: std::collections::BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.trace_id == batch_trace && s.service == "list-uploader")
        .filter_map(|s| s.attributes.get("chunk").map(String::as_str))
        .collect();
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM chunks WHERE request_id = 'traced-batch'")
        .fetch_one(stack.store.pool())
        .await
        .expect("query");
    assert!(chunks >= 5, "230 recipients in chunks of 50");
    assert_eq!(chunks_uploaded.len() as i64, chunks, "{chunks_uploaded:?}");
    // Each hop's span names the chunk's class.
    for hop in ["dispatch", "upload_chunk", "send_chunk"] {
        let classes: std::collections::BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.trace_id == batch_trace && s.name == hop)
            .filter_map(|s| s.attributes.get("class").map(String::as_str))
            .collect();
        assert_eq!(classes, ["batch"].into(), "{hop}");
    }
    let slowest = report.slowest_realtime.expect("the slowest realtime request's spans");
    assert!(slowest.spans.iter().any(|s| s.service == "sender"), "{slowest:?}");
    // Spans name requests and chunks, never a recipient.
    for span in &spans {
        for (key, value) in &span.attributes {
            assert!(!value.contains("@example.com"), "span {} carries an address in {key}", span.name);
        }
    }
    stack.stop().await;
    tokio::task::spawn_blocking(move || drop(telemetry)).await.expect("exporters stopped");
}
