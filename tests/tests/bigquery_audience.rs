//! BigQuery audiences through the whole pipeline, with bqemulator (PyPI, DuckDB-backed) as
//! BigQuery: the trigger exports the query or table with `EXPORT DATA` and streams the shards
//! into chunks. bqemulator writes its exports into a local folder rather than Cloud Storage; the
//! local BigQuery front copies them into the local Cloud Storage (see `haishin_local::bigquery`).

use std::time::Duration;

use haishin_local::bigquery::{Fault, LocalBigQuery, missing};
use haishin_local::stack::{BUCKET, LocalStack};
use haishin_shared::domain::{RequestId, export_job_id};
use haishin_tests::{TestStack, finished_within};
use serde_json::{Value, json};

/// The emulator and a stack whose trigger uses it; `None` (with the reason printed) when
/// bqemulator is not installed here, except under CI, where it must be.
async fn start(chunk_size: u32) -> Option<(LocalBigQuery, LocalStack)> {
    if let Some(reason) = missing() {
        assert!(std::env::var("CI").is_err(), "{reason}");
        eprintln!("skipping the BigQuery audience tests: {reason}");
        return None;
    }
    let bigquery = LocalBigQuery::start().await.expect("bqemulator starts");
    let stack =
        TestStack { chunk_size, bigquery_endpoint: Some(bigquery.endpoint()), ..TestStack::default() }
            .start()
            .await;
    bigquery.copy_exports_to(&stack.endpoints.storage);
    Some((bigquery, stack))
}

fn request(id: &str, audience: &Value) -> Value {
    json!({
        "id": id,
        "class": "batch",
        "template": { "subject": "Hi {{name}}", "text": "Hello {{name}}" },
        "audience": { "bigquery": audience },
    })
}

async fn publish(stack: &LocalStack, body: &Value) {
    stack.requests_topic.publish(body, &[]).await.expect("published");
}

fn person(email: Option<&str>, name: &str) -> Vec<Option<String>> {
    vec![email.map(str::to_owned), Some(name.to_owned())]
}

#[tokio::test]
async fn a_bigquery_table_of_100000_rows_is_delivered_exactly_once_and_its_bad_rows_counted() {
    let Some((bigquery, stack)) = start(10_000).await else { return };
    let good = 99_996;
    let mut rows: Vec<Vec<Option<String>>> =
        (0..good).map(|i| person(Some(&format!("bq-{i}@example.com")), &format!("User {i}"))).collect();
    rows.push(person(Some("not-an-address"), "Invalid"));
    rows.push(person(Some("two@@example.com"), "Invalid too"));
    rows.push(person(None, "No address"));
    rows.push(person(Some("bq-7@example.com"), "Repeated"));
    assert_eq!(rows.len(), 100_000);
    bigquery.load_table("audiences", "people", &["email", "name"], rows).await.unwrap();

    publish(&stack, &request("spring-sale", &json!({ "table": "audiences.people" }))).await;
    let status = finished_within(&stack, "spring-sale", Duration::from_secs(240)).await;

    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["rows"], 100_000);
    assert_eq!(status["audience"]["recipients"], good);
    assert_eq!(
        status["audience"]["skipped"],
        json!({ "invalid_email": 2, "missing_column": 1, "duplicate": 1 })
    );
    assert_eq!(status["delivered"], good);
    let sim = stack.esp.report();
    assert_eq!(sim.requests["spring-sale"].counts.unique, good as u64);
    assert_eq!(sim.deliveries.duplicates, 0);

    // The export is where the request's own prefix says, as newline-delimited JSON shards.
    let shards = stack.blobs.list(BUCKET, "requests/spring-sale/export/").await.unwrap();
    assert!(!shards.is_empty(), "no export shards");
    assert!(shards.iter().all(|s| s.ends_with(".json")), "{shards:?}");
    let first = stack.blobs.read_all(BUCKET, &shards[0]).await.unwrap();
    let line: Value = serde_json::from_slice(first.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert!(line.get("email").is_some() && line.get("name").is_some(), "{line}");
    // One export job ran, under the request's first job id, and no second.
    let id = RequestId::from("spring-sale");
    let job = |attempt| {
        let url = format!(
            "{}/bigquery/v2/projects/{}/jobs/{}",
            bigquery.emulator,
            haishin_local::bigquery::PROJECT,
            export_job_id(BUCKET, &id, attempt)
        );
        async move { reqwest::get(url).await.unwrap() }
    };
    let first_job: Value = job(0).await.json().await.unwrap();
    assert_eq!(first_job["status"]["state"], "DONE", "{first_job}");
    assert_eq!(job(1).await.status(), 404);

    stack.stop().await;
}

#[tokio::test]
async fn transient_bigquery_failures_are_retried_and_the_next_export_job_delivers_once() {
    let Some((bigquery, stack)) = start(100).await else { return };
    let rows = (0..250).map(|i| person(Some(&format!("retry-{i}@example.com")), &format!("User {i}")));
    bigquery.load_table("audiences", "retried", &["email", "name"], rows).await.unwrap();
    // The first insert is refused as an outage; the job of the second fails with backendError.
    bigquery.inject(&[Fault::Unavailable, Fault::JobFails]);

    publish(&stack, &request("retried", &json!({ "table": "audiences.retried" }))).await;
    let status = finished_within(&stack, "retried", Duration::from_secs(60)).await;

    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["recipients"], 250);
    assert_eq!(status["delivered"], 250);
    let sim = stack.esp.report();
    assert_eq!(sim.requests["retried"].counts.unique, 250);
    assert_eq!(sim.deliveries.duplicates, 0);
    // The failed job stays failed; the one after it, under the next id, exported the audience.
    let id = RequestId::from("retried");
    let job = |attempt| {
        let url = format!(
            "{}/bigquery/v2/projects/{}/jobs/{}",
            bigquery.endpoint(),
            haishin_local::bigquery::PROJECT,
            export_job_id(BUCKET, &id, attempt)
        );
        async move { reqwest::get(url).await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(job(0).await["status"]["errorResult"]["reason"], "backendError");
    let second = job(1).await;
    assert_eq!(second["status"]["state"], "DONE", "{second}");
    assert!(second["status"].get("errorResult").is_none(), "{second}");
    stack.stop().await;
}

#[tokio::test]
async fn query_params_reach_bigquery_as_parameters_never_as_sql() {
    let Some((bigquery, stack)) = start(100).await else { return };
    let tricky = r#"O'Brien "the quote" \ ' OR 1=1 --"#;
    let rows = vec![
        person(Some("a@example.com"), tricky),
        person(Some("b@example.com"), tricky),
        person(Some("c@example.com"), "O'Brien"),
        person(Some("d@example.com"), "Someone else"),
    ];
    bigquery.load_table("audiences", "named", &["email", "name"], rows).await.unwrap();

    let query = "SELECT email, name FROM `haishin-local.audiences.named` WHERE name = @name";
    publish(&stack, &request("params", &json!({ "query": query, "params": { "name": tricky } }))).await;
    let status = finished_within(&stack, "params", Duration::from_secs(60)).await;

    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["audience"]["rows"], 2);
    assert_eq!(status["delivered"], 2);
    assert_eq!(stack.esp.report().requests["params"].counts.unique, 2);
    stack.stop().await;
}

#[tokio::test]
async fn a_query_bigquery_refuses_fails_the_request_with_bigquerys_reason() {
    let Some((bigquery, stack)) = start(100).await else { return };
    bigquery
        .load_table("audiences", "present", &["email", "name"], [person(Some("a@example.com"), "A")])
        .await
        .unwrap();

    publish(&stack, &request("syntax", &json!({ "query": "SELEC email FROM audiences.people" }))).await;
    publish(&stack, &request("no-table", &json!({ "table": "audiences.nowhere" }))).await;
    let syntax = finished_within(&stack, "syntax", Duration::from_secs(60)).await;
    let no_table = finished_within(&stack, "no-table", Duration::from_secs(60)).await;

    assert_eq!(syntax["state"], "failed", "{syntax}");
    let reason = syntax["reason"].as_str().unwrap();
    assert!(reason.starts_with("BigQuery: invalidQuery: Syntax error"), "{reason}");
    assert!(!reason.contains('\u{1b}'), "{reason}");
    assert_eq!(no_table["state"], "failed", "{no_table}");
    let reason = no_table["reason"].as_str().unwrap();
    assert!(reason.starts_with("BigQuery: notFound: ") && reason.contains("nowhere"), "{reason}");
    assert!(stack.esp.report().requests.is_empty(), "nothing was sent");
    stack.stop().await;
}
