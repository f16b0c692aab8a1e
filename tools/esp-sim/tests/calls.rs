//! Every accepted call is kept with its request and the time it held its slot; refused calls are
//! not.

use std::time::Duration;

use haishin_esp_sim::{EspSim, EspSimConfig};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn every_accepted_call_is_recorded_with_its_request_and_span() {
    let sim = EspSim::start(EspSimConfig::fast(1, Duration::from_millis(20))).await.unwrap();
    let http = reqwest::Client::new();
    let upload = |key: &str, request: &str| json!({"idempotency_key": key, "request_id": request, "recipients": [{"email": "a@x.com"}, {"email": "b@x.com"}]});

    let first =
        http.post(format!("{}/v1/lists", sim.url())).json(&upload("k1", "batch-1")).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let list_id = first.json::<serde_json::Value>().await.unwrap()["list_id"].as_str().unwrap().to_owned();
    let send = json!({"idempotency_key": "s1", "request_id": "batch-1", "list_id": list_id, "template": {}, "class": "batch"});
    let sent = http.post(format!("{}/v1/sends", sim.url())).json(&send).send().await.unwrap();
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    let second =
        http.post(format!("{}/v1/lists", sim.url())).json(&upload("k2", "event-1")).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::CREATED);

    let report = sim.shutdown().await.unwrap();
    let uploads: Vec<(&str, u64)> =
        report.upload.calls.iter().map(|c| (c.request_id.as_str(), c.recipients)).collect();
    assert_eq!(uploads, [("batch-1", 2), ("event-1", 2)]);
    assert_eq!(report.send.calls.len(), 1);
    assert_eq!(report.send.calls[0].request_id, "batch-1");
    for call in report.upload.calls.iter().chain(&report.send.calls) {
        let end = call.end_ms.expect("every call ended before the report");
        assert!(end >= call.start_ms + 19.0, "{call:?}");
    }
    let (first, second) = (&report.upload.calls[0], &report.upload.calls[1]);
    assert!(second.start_ms >= first.end_ms.unwrap(), "one slot: the second upload came after the first");
}

#[tokio::test]
async fn a_report_without_the_timeline_leaves_the_calls_out() {
    let sim = EspSim::start(EspSimConfig::fast(2, Duration::ZERO)).await.unwrap();
    let http = reqwest::Client::new();
    let body = json!({"idempotency_key": "k", "request_id": "r", "recipients": [{"email": "a@x.com"}]});
    http.post(format!("{}/v1/lists", sim.url())).json(&body).send().await.unwrap();
    assert!(sim.counts().upload.calls.is_empty());
    assert_eq!(sim.counts().upload.calls_accepted, 1);
    assert_eq!(sim.report().upload.calls.len(), 1);
}
