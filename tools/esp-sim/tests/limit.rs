//! A limit lowered while the simulator runs: calls in progress finish, new calls beyond the new
//! limit get 429, and the report keeps the limit at start beside every change.

use std::time::Duration;

use haishin_esp_sim::{Api, EspSim, EspSimConfig};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_lowered_limit_refuses_calls_beyond_it_and_is_reported_with_its_time() {
    let sim = EspSim::start(EspSimConfig::fast(3, Duration::from_millis(300))).await.unwrap();
    let http = reqwest::Client::new();
    let upload = |i: usize| {
        let body = json!({"idempotency_key": format!("k{i}"), "request_id": "r", "recipients": [{"email": "a@x.com"}]});
        http.post(format!("{}/v1/lists", sim.url())).json(&body).send()
    };

    // Two uploads in progress under a limit of 3; the limit drops to 2 meanwhile.
    let (first, second) = (upload(1), upload(2));
    let running = tokio::spawn(async move {
        let (first, second) = tokio::join!(first, second);
        (first.unwrap().status(), second.unwrap().status())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    sim.set_limit(Api::Upload, 2).unwrap();
    let third = upload(3).await.unwrap();
    let (first, second) = running.await.unwrap();
    let fourth = upload(4).await.unwrap();

    assert_eq!((first, second), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS, "2 in progress at a limit of 2");
    assert_eq!(fourth.status(), StatusCode::CREATED, "the slots freed");
    assert!(sim.set_limit(Api::Upload, 0).is_err());
    let report = sim.shutdown().await.unwrap();
    assert_eq!(report.upload.limit, 3, "the limit at start");
    assert_eq!(report.upload.over_limit_attempts, 1);
    let changes: Vec<u32> = report.upload.limit_changes.iter().map(|c| c.limit).collect();
    assert_eq!(changes, [2]);
    let at = report.upload.limit_changes[0].at_ms;
    assert!(at > report.upload.calls[0].start_ms && at < report.upload.calls[0].end_ms.unwrap());
    assert!(report.send.limit_changes.is_empty());
}
