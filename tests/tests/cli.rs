//! The operator's command line against a local stack's trigger: submit, status, list, pause,
//! resume and cancel, as an operator runs them.

use std::time::Duration;

use haishin_cli::progress::Reading;
use haishin_cli::{Client, Control, ListFilter};
use haishin_tests::{TestStack, eventually, finished};
use serde_json::json;

fn request(id: &str, n: usize) -> serde_json::Value {
    let recipients: Vec<_> = (0..n).map(|i| json!({"email": format!("{id}-{i}@example.com")})).collect();
    json!({"id": id, "class": "batch", "template": {"id": "welcome"}, "audience": {"inline": recipients},
           "labels": {"category": "cli"}})
}

#[tokio::test]
async fn an_operator_submits_pauses_resumes_and_lists() {
    let stack = TestStack { call_latency: Duration::from_millis(40), chunk_size: 20, ..TestStack::default() }
        .start()
        .await;
    let cli = Client::unauthenticated(&stack.endpoints.trigger);

    let submitted = cli.submit(&request("cli-batch", 400)).await.unwrap();
    assert_eq!(submitted["id"], "cli-batch");
    let paused = cli.control("cli-batch", Control::Pause, Some("checking the copy")).await.unwrap();
    assert!(paused["paused_at"].is_string(), "{paused}");
    assert!(Reading::of(&paused, chrono::Utc::now()).paused);

    let resumed = cli.control("cli-batch", Control::Resume, None).await.unwrap();
    assert!(resumed["paused_at"].is_null(), "{resumed}");
    let done = finished(&stack, "cli-batch").await;
    assert_eq!(done["state"], "completed");
    let reading = Reading::of(&cli.status("cli-batch").await.unwrap(), chrono::Utc::now());
    assert!(reading.finished() && reading.done == 400 && reading.total == 400, "{reading:?}");

    cli.submit(&request("cli-other", 3)).await.unwrap();
    eventually("the second request to finish", Duration::from_secs(60), || async {
        let status = cli.status("cli-other").await.ok()?;
        (status["state"] == "completed").then_some(())
    })
    .await;
    let filter = ListFilter { labels: vec!["category:cli".into()], limit: 1, ..ListFilter::default() };
    let one = cli.list(&filter).await.unwrap();
    assert_eq!(one.len(), 1, "the limit holds across pages");
    let both = cli.list(&ListFilter { limit: 10, ..filter }).await.unwrap();
    let ids: Vec<_> = both.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["cli-other", "cli-batch"], "newest first");

    let error = cli.control("cli-batch", Control::Resume, None).await.unwrap_err().to_string();
    assert!(error.contains("409"), "a finished request cannot be resumed: {error}");
    let error = cli.status("no-such-request").await.unwrap_err().to_string();
    assert!(error.contains("404"), "{error}");

    let suppressed = cli.suppress("Ann@Example.com", Some("category:cli"), "manual").await.unwrap();
    assert_eq!(suppressed["scope"], "category:cli", "{suppressed}");
    cli.submit(&json!({"id": "cli-suppressed", "class": "batch", "template": {"id": "welcome"},
        "audience": {"inline": [{"email": "ann@example.com"}, {"email": "bob@example.com"}]},
        "labels": {"category": "cli"}}))
        .await
        .unwrap();
    let done = finished(&stack, "cli-suppressed").await;
    assert_eq!(done["audience"]["skipped"]["suppressed"], 1, "{done}");
    cli.unsuppress("ann@example.com", Some("category:cli")).await.unwrap();
    let error = cli.unsuppress("ann@example.com", Some("category:cli")).await.unwrap_err().to_string();
    assert!(error.contains("404"), "already lifted: {error}");
    stack.stop().await;
}

#[tokio::test]
async fn an_operator_cancels_a_running_campaign() {
    let stack = TestStack { call_latency: Duration::from_millis(60), chunk_size: 20, ..TestStack::default() }
        .start()
        .await;
    let cli = Client::unauthenticated(&stack.endpoints.trigger);
    cli.submit(&request("cli-cancel", 600)).await.unwrap();
    eventually("the campaign to start", Duration::from_secs(30), || async {
        (stack.esp.report().upload.calls_accepted > 0).then_some(())
    })
    .await;

    cli.control("cli-cancel", Control::Cancel, Some("wrong audience")).await.unwrap();

    let done = finished(&stack, "cli-cancel").await;
    assert_eq!(done["state"], "cancelled");
    let cancelled = done["recipients"]["cancelled"].as_u64().unwrap_or(0);
    assert!(cancelled > 0, "{done}");
    assert_eq!(stack.esp.report().deliveries.duplicates, 0);
    stack.stop().await;
}
