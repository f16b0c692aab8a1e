//! Mail servers nobody here wrote, each started for one test on 127.0.0.1 and stopped when
//! dropped: aiosmtpd (SMTP, through `tests/smtp_recorder.py`) and moto (Amazon SES), from the
//! venv that `scripts/install-test-deps` fills.
//!
//! When a server is not installed, `start` prints why and returns `None` so that the test
//! skips, except under CI (`CI` set), where the server must be there and the test fails.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The venv's Python (`HAISHIN_TEST_PYTHON` overrides it).
fn python() -> String {
    std::env::var("HAISHIN_TEST_PYTHON").unwrap_or_else(|_| "/var/tmp/haishin-venv/bin/python".into())
}

/// True when `module` imports in the venv; otherwise prints the reason the test skips (and
/// panics under CI).
fn installed(module: &str, what: &str) -> bool {
    let python = python();
    let ok = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let reason = format!("{what} is not installed for {python}: run scripts/install-test-deps");
        assert!(std::env::var("CI").is_err(), "{reason}");
        eprintln!("skipping: {reason}");
    }
    ok
}

/// What the SMTP recorder should do besides accepting mail.
#[derive(Debug, Clone, Default)]
pub struct SmtpBehaviour {
    /// Addresses answered `550` at RCPT.
    pub refuse: Vec<String>,
    /// Addresses answered `451` after DATA.
    pub defer: Vec<String>,
    /// Addresses whose message is recorded and then never answered.
    pub hang: Vec<String>,
    /// `(user, password)` that AUTH must present.
    pub auth: Option<(String, String)>,
    /// How long the server takes over each message before it answers (a slow relay).
    pub delay: Option<Duration>,
}

/// aiosmtpd recording every message it accepts.
pub struct SmtpRecorder {
    /// `smtp://127.0.0.1:PORT`.
    pub url: String,
    pub port: u16,
    records: PathBuf,
    _process: Child,
}

impl SmtpRecorder {
    /// Starts the recorder on a free port; `None` when aiosmtpd is missing (outside CI).
    pub async fn start(behaviour: SmtpBehaviour) -> Option<Self> {
        if !installed("aiosmtpd", "aiosmtpd") {
            return None;
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("smtp_recorder.py");
        let records = std::env::temp_dir().join(format!("haishin-smtp-{}.jsonl", unique()));
        let mut command = Command::new(python());
        command.arg(&script).arg("--records").arg(&records);
        for (flag, addresses) in
            [("--refuse", &behaviour.refuse), ("--defer", &behaviour.defer), ("--hang", &behaviour.hang)]
        {
            for address in addresses {
                command.args([flag, address]);
            }
        }
        if let Some(delay) = behaviour.delay {
            command.args(["--delay-ms", &delay.as_millis().to_string()]);
        }
        if let Some((user, password)) = &behaviour.auth {
            command.args(["--auth", &format!("{user}:{password}")]);
        }
        let mut process = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the SMTP recorder");
        let stdout = process.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the SMTP recorder says where it listens within 30 s")
            .expect("reading the SMTP recorder's output")
            .expect("the SMTP recorder prints its port");
        let port: u16 = line.strip_prefix("listening ").and_then(|p| p.parse().ok()).expect("listening PORT");
        Some(Self { url: format!("smtp://127.0.0.1:{port}"), port, records, _process: process })
    }

    /// Every message accepted so far, in order: envelope, raw message and what Python's email
    /// parser read in it (see `tests/smtp_recorder.py`).
    pub fn received(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.records).unwrap_or_default();
        text.lines().map(|line| serde_json::from_str(line).expect("a JSON record")).collect()
    }
}

impl Drop for SmtpRecorder {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.records);
    }
}

/// moto's server, standing in for AWS (SES v1 and v2).
pub struct MotoServer {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _process: Child,
}

impl MotoServer {
    /// Starts moto on a free port; `None` when it is missing (outside CI).
    pub async fn start() -> Option<Self> {
        if !installed("moto.server", "moto[server]") {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let process = Command::new(python())
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting moto");
        let endpoint = format!("http://127.0.0.1:{port}");
        for _ in 0..600 {
            if reqwest::get(format!("{endpoint}/moto-api/data.json"))
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Some(Self { endpoint, _process: process });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("moto did not start listening on {endpoint}");
    }

    /// Every raw message SES was asked to send, as moto stores them (`id`, `source`,
    /// `destinations`, `raw_data`).
    pub async fn sent_raw_messages(&self) -> Vec<Value> {
        let data: Value = reqwest::get(format!("{}/moto-api/data.json", self.endpoint))
            .await
            .expect("moto answers")
            .json()
            .await
            .expect("moto's data is JSON");
        data["ses"]["RawMessage"].as_array().cloned().unwrap_or_default()
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
