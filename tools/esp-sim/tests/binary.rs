//! The `esp-sim` binary: flags in, URL out, report written on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use haishin_esp_sim::SimReport;
use serde_json::json;

#[tokio::test]
async fn the_binary_serves_with_its_flags_and_writes_its_report_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("esp-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report_path = dir.join("report.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_esp-sim"))
        .args(["--port", "0", "--upload-limit", "3", "--upload-call-latency", "1ms"])
        .arg("--report-out")
        .arg(&report_path)
        .env("ESP_SIM_API_KEY", "k3y")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut url).unwrap();
    let url = url.trim().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let upload = json!({"idempotency_key": "k", "request_id": "r", "recipients": [{"email": "a@x.com"}]});
    let http = reqwest::Client::new();
    let lists = format!("{url}/v1/lists");

    let listed = http.post(&lists).bearer_auth("k3y").json(&upload).send().await.unwrap().status();
    let anonymous = http.post(&lists).json(&upload).send().await.unwrap().status();
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();

    assert_eq!(listed, reqwest::StatusCode::CREATED);
    assert_eq!(anonymous, reqwest::StatusCode::UNAUTHORIZED);
    assert!(killed.success());
    assert!(exit.success(), "{exit:?}");
    let report: SimReport = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report.upload.limit, 3);
    assert_eq!(report.upload.calls_completed, 1);
    assert_eq!(report.upload.invalid_calls, 1);
    assert!(report.upload.service_seconds < Duration::from_millis(100).as_secs_f64());
    std::fs::remove_dir_all(&dir).unwrap();
}
