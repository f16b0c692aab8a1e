//! The BigQuery log sink against bqemulator (a DuckDB-backed BigQuery emulator from PyPI, started
//! through `scripts/bqemulator-launcher.py`), with the tables created from Terraform's schemas.

use haishin_shared::domain::{Class, RequestState};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use haishin_completion::logs::{
    BigQuerySink, DELIVERIES_SCHEMA, DeliveryLog, LogSink, REQUESTS_SCHEMA, RequestLog,
};
use haishin_shared::gcp::GcpArgs;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

const PROJECT: &str = "haishin-test";

/// A bqemulator process on free ports, killed on drop.
struct Emulator {
    api: String,
    _process: Child,
}

impl Emulator {
    /// Starts the emulator; `None` (with the reason printed) when it is not installed here,
    /// except under CI, where it must be.
    async fn start() -> Option<Self> {
        let python =
            std::env::var("BQEMULATOR_PYTHON").unwrap_or_else(|_| "/var/tmp/haishin-venv/bin/python".into());
        let launcher = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/bqemulator-launcher.py");
        let installed = std::process::Command::new(&python)
            .args(["-c", "import bqemulator"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            let reason = format!("bqemulator is not installed for {python}: run scripts/install-test-deps");
            assert!(std::env::var("CI").is_err(), "{reason}");
            eprintln!("skipping the BigQuery sink tests: {reason}");
            return None;
        }
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (rest, grpc) = (free(), free());
        let process = Command::new(&python)
            .arg(&launcher)
            .args(["start", "--rest-host", "127.0.0.1", "--grpc-host", "127.0.0.1", "--project", PROJECT])
            .args([
                "--rest-port",
                &rest.to_string(),
                "--grpc-port",
                &grpc.to_string(),
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting bqemulator");
        let endpoint = format!("http://127.0.0.1:{rest}");
        let api = format!("{endpoint}/bigquery/v2/projects/{PROJECT}");
        for _ in 0..600 {
            if reqwest::get(format!("{api}/datasets")).await.is_ok_and(|r| r.status().is_success()) {
                return Some(Self { api: endpoint, _process: process });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("bqemulator did not start listening on {endpoint}");
    }

    fn projects(&self) -> String {
        format!("{}/bigquery/v2/projects/{PROJECT}", self.api)
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let answer: Value = reqwest::Client::new()
            .post(format!("{}/{path}", self.projects()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(answer.get("error").is_none() && answer.get("errors").is_none(), "{path}: {answer}");
        answer
    }

    /// The dataset and both tables, created from the schema files Terraform uses.
    async fn create_tables(&self) {
        self.post(
            "datasets",
            json!({ "datasetReference": { "projectId": PROJECT, "datasetId": "haishin" } }),
        )
        .await;
        for (table, schema) in [("deliveries", DELIVERIES_SCHEMA), ("requests", REQUESTS_SCHEMA)] {
            let fields: Value = serde_json::from_str(schema).unwrap();
            self.post(
                "datasets/haishin/tables",
                json!({
                    "tableReference": { "projectId": PROJECT, "datasetId": "haishin", "tableId": table },
                    "schema": { "fields": fields },
                }),
            )
            .await;
        }
    }

    /// The rows of a query, each as its column values (strings or null).
    async fn rows(&self, sql: &str) -> Vec<Vec<Value>> {
        let answer = self.post("queries", json!({ "query": sql, "useLegacySql": false })).await;
        answer["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["f"].as_array().unwrap().iter().map(|cell| cell["v"].clone()).collect())
            .collect()
    }

    fn sink(&self, dataset: &str) -> BigQuerySink {
        let gcp = GcpArgs {
            project: PROJECT.into(),
            pubsub_endpoint: None,
            tasks_endpoint: None,
            storage_endpoint: None,
            bigquery_endpoint: Some(self.api.clone()),
        };
        BigQuerySink::new(&gcp, dataset).unwrap()
    }
}

fn at(seconds: i64) -> Option<chrono::DateTime<Utc>> {
    Some(Utc.timestamp_opt(1_795_000_000 + seconds, 0).unwrap())
}

fn delivery(chunk: u32, state: &str, recipients: i64, delivered: i64) -> DeliveryLog {
    DeliveryLog {
        request_id: "spring-sale".into(),
        chunk_id: format!("spring-sale~{chunk:06}").into(),
        class: Class::Batch,
        labels: json!({ "campaign": "spring" }),
        state: state.parse().unwrap(),
        recipients,
        delivered,
        bounced: 0,
        failed: 0,
        unknown: if state == "unknown" { recipients } else { 0 },
        suppressed: 0,
        reason: (state == "expired").then(|| "deadline passed before dispatch".into()),
        uploaded_at: (state != "expired").then(|| at(1)).flatten(),
        sent_at: (state == "completed").then(|| at(2)).flatten(),
        completed_at: at(3),
    }
}

fn summary() -> RequestLog {
    RequestLog {
        request_id: "spring-sale".into(),
        class: Class::Batch,
        priority: 3,
        labels: json!({ "campaign": "spring" }),
        state: RequestState::Completed,
        reason: None,
        audience_rows: 27,
        recipients: 25,
        skipped: BTreeMap::from([("invalid_email".to_owned(), 2)]),
        sent: 19,
        delivered: 19,
        bounced: 1,
        complained: 1,
        failed: 0,
        expired: 3,
        cancelled: 0,
        unknown: 2,
        suppressed: 1,
        received_at: at(0).unwrap(),
        finished_at: at(4),
    }
}

#[tokio::test]
async fn rows_written_twice_land_once_and_add_up() {
    let Some(bq) = Emulator::start().await else { return };
    bq.create_tables().await;
    let sink = bq.sink("haishin");
    let deliveries = [
        delivery(0, "completed", 10, 10),
        DeliveryLog { suppressed: 1, ..delivery(1, "completed", 10, 9) },
        delivery(2, "expired", 3, 0),
        delivery(3, "unknown", 2, 0),
    ];

    // A pass that wrote its rows and was killed before recording it: the next pass writes them again.
    for _ in 0..2 {
        sink.write_deliveries(&deliveries).await.unwrap();
        sink.write_requests(&[summary()]).await.unwrap();
    }

    let chunks = bq
        .rows(
            "SELECT count(*), sum(recipients), sum(delivered), sum(unknown), sum(suppressed), count(sent_at)
             FROM haishin.deliveries",
        )
        .await;
    assert_eq!(chunks, [vec![json!("4"), json!("25"), json!("19"), json!("2"), json!("1"), json!("2")]]);
    let requests = bq
        .rows(
            "SELECT request_id, priority, audience_rows, recipients, sent, failed, expired, cancelled, unknown,
                    suppressed, JSON_VALUE(labels, '$.campaign'), JSON_VALUE(skipped, '$.invalid_email'), reason
             FROM haishin.requests",
        )
        .await;
    assert_eq!(
        requests,
        [vec![
            json!("spring-sale"),
            json!("3"),
            json!("27"),
            json!("25"),
            json!("19"),
            json!("0"),
            json!("3"),
            json!("0"),
            json!("2"),
            json!("1"),
            json!("spring"),
            json!("2"),
            Value::Null,
        ]]
    );
    // The summary adds up in the table, and agrees with the chunk rows.
    let checks = bq
        .rows(
            "SELECT r.recipients = r.sent + r.failed + r.expired + r.cancelled + r.unknown + r.suppressed,
                    r.recipients = (SELECT sum(recipients) FROM haishin.deliveries d WHERE d.request_id = r.request_id),
                    r.received_at < r.finished_at
             FROM haishin.requests r",
        )
        .await;
    assert_eq!(checks, [vec![json!("true"), json!("true"), json!("true")]]);
}

#[tokio::test]
async fn a_write_bigquery_refuses_names_the_table_and_what_bigquery_said() {
    let Some(bq) = Emulator::start().await else { return };

    let err = bq.sink("nowhere").write_deliveries(&[delivery(0, "completed", 1, 1)]).await.unwrap_err();

    assert!(err.0.contains("BigQuery table nowhere.deliveries"), "{err}");
    assert!(err.0.to_lowercase().contains("not found"), "{err}");
}

#[test]
fn the_table_schemas_hold_exactly_the_fields_of_the_rows() {
    fn keys(row: &Value) -> Vec<String> {
        let mut keys: Vec<String> = row.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }
    fn names(schema: &str) -> Vec<String> {
        let mut names: Vec<String> =
            haishin_completion::logs::columns(schema).unwrap().into_iter().map(|c| c.name).collect();
        names.sort();
        names
    }
    assert_eq!(
        keys(&serde_json::to_value(delivery(0, "completed", 1, 1)).unwrap()),
        names(DELIVERIES_SCHEMA)
    );
    assert_eq!(keys(&serde_json::to_value(summary()).unwrap()), names(REQUESTS_SCHEMA));
}
