//! The calls-per-second limit over HTTP: uploads and sends share one window, and a call over it
//! gets 429 with `Retry-After` and does nothing.
//!
//! The window arithmetic is tested with fixed timestamps in the crate; here the calls run on a
//! real clock, so the strict checks apply only when every call came within well under a second
//! (a machine that stalls longer gets more calls accepted, never fewer).

use std::time::{Duration, Instant};

use haishin_esp_sim::{EspSim, EspSimConfig};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn uploads_and_sends_share_one_rate_and_calls_over_it_get_429_without_work() {
    let config = EspSimConfig { calls_per_second: Some(3.5), ..EspSimConfig::fast(10, Duration::ZERO) };
    let sim = EspSim::start(config).await.unwrap();
    let http = reqwest::Client::new();
    let upload =
        |key: &str| json!({"idempotency_key": key, "request_id": "r", "recipients": [{"email": "a@x.com"}]});
    let started = Instant::now();

    let first = http.post(format!("{}/v1/lists", sim.url())).json(&upload("k1")).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let list_id = first.json::<serde_json::Value>().await.unwrap()["list_id"].as_str().unwrap().to_owned();
    let send = json!({"idempotency_key": "s1", "request_id": "r", "list_id": list_id, "template": {}, "class": "batch"});
    let sent = http.post(format!("{}/v1/sends", sim.url())).json(&send).send().await.unwrap().status();
    let second_upload =
        http.post(format!("{}/v1/lists", sim.url())).json(&upload("k2")).send().await.unwrap();
    let third_upload = http.post(format!("{}/v1/lists", sim.url())).json(&upload("k3")).send().await.unwrap();
    let lookup =
        http.get(format!("{}/v1/sends?idempotency_key=s1", sim.url())).send().await.unwrap().status();
    let elapsed = started.elapsed();

    assert_eq!(sent, StatusCode::ACCEPTED);
    assert_eq!(lookup, StatusCode::OK, "lookups are not rate-limited");
    let report = sim.shutdown().await.unwrap();
    let rate = report.rate.expect("a rate section when a rate is set");
    assert_eq!(rate.limit, 3.5);
    assert_eq!(rate.attempts, 4);
    assert_eq!(rate.accepted_calls + rate.over_rate_attempts, 4);
    assert_eq!(rate.windows_above_rate, 0);
    assert!(rate.max_calls_in_any_1s_window <= 3);
    if elapsed < Duration::from_millis(900) {
        assert_eq!(second_upload.status(), StatusCode::CREATED);
        assert_eq!(third_upload.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(third_upload.headers()["retry-after"], "1");
        let body: serde_json::Value = third_upload.json().await.unwrap();
        assert_eq!(body["error"], "over_rate");
        assert_eq!((rate.accepted_calls, rate.over_rate_attempts), (3, 1));
        assert_eq!(report.upload.calls_accepted, 2);
        assert_eq!(report.upload.over_limit_attempts, 0, "a call over the rate is not over the limit");
    } else {
        eprintln!("calls took {elapsed:?}: only the invariants were checked");
    }
}

#[tokio::test]
async fn without_a_rate_the_report_has_no_rate_section() {
    let sim = EspSim::start(EspSimConfig::fast(2, Duration::ZERO)).await.unwrap();
    let report = sim.shutdown().await.unwrap();
    assert!(report.rate.is_none());
    assert!(!serde_json::to_string(&report).unwrap().contains("\"rate\""));
}
