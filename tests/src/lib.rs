//! Helpers shared by the workspace-level tests.
//!
//! One throwaway PostgreSQL cluster per test binary (started on first use, stopped when the binary
//! exits) and a fresh database per test.

pub mod dispatchable;

use std::time::Duration;

use haishin_esp_sim::EspSimConfig;
use haishin_local::stack::{LocalStack, MailProvider, ServiceMode, StackConfig};
use haishin_shared::domain::RequestState;
use haishin_shared::store::Store;
use haishin_stand_ins::postgres::PgCluster;
use tokio::sync::OnceCell;

pub mod mail_servers;

static CLUSTER: OnceCell<PgCluster> = OnceCell::const_new();

/// The test binary's cluster.
pub async fn cluster() -> &'static PgCluster {
    CLUSTER.get_or_init(|| async { PgCluster::start().await.expect("PostgreSQL starts") }).await
}

/// A fresh, migrated database and its URL.
pub async fn fresh_database() -> (Store, String) {
    haishin_shared::telemetry::init_for_tests();
    let url = cluster().await.create_database().await.expect("database created");
    let store = Store::connect(&url, 10).await.expect("database reachable");
    store.migrate().await.expect("migrations run");
    (store, url)
}

/// Options of a test stack; the defaults make a fast ESP with a limit of 2 per API.
#[derive(Debug, Clone)]
pub struct TestStack {
    pub esp_limit: u32,
    pub call_latency: Duration,
    pub chunk_size: u32,
    pub realtime_reserved_slots: u32,
    /// Realtime chunks of at most this many recipients skip the list upload (0: none do).
    pub inline_recipients_max: u32,
    /// Trigger instances sharing the database.
    pub triggers: u32,
    /// Who delivers the mail (the ESP simulator by default).
    pub provider: MailProvider,
    /// The trigger's BigQuery (`BIGQUERY_ENDPOINT`), for BigQuery audiences.
    pub bigquery_endpoint: Option<String>,
    /// Audience bytes per prepare partition; larger audiences are prepared in parts.
    pub prepare_partition_bytes: Option<u64>,
    /// The trigger's `PREPARE_KEPT_BYTES`; none: its default.
    pub prepare_kept_bytes: Option<u64>,
    /// How often the completion job runs.
    pub completion_every: Duration,
}

impl Default for TestStack {
    fn default() -> Self {
        Self {
            esp_limit: 2,
            call_latency: Duration::from_millis(5),
            chunk_size: 100,
            realtime_reserved_slots: 0,
            inline_recipients_max: 0,
            triggers: 1,
            provider: MailProvider::Simulator,
            bigquery_endpoint: None,
            prepare_partition_bytes: None,
            prepare_kept_bytes: None,
            completion_every: Duration::from_millis(200),
        }
    }
}

impl TestStack {
    /// Starts the whole pipeline in this process on a fresh database.
    pub async fn start(self) -> LocalStack {
        let (_, url) = fresh_database().await;
        let mut esp = EspSimConfig::fast(self.esp_limit, self.call_latency);
        esp.settle_delay = Duration::from_millis(20);
        let run_dir = std::env::temp_dir().join(format!("haishin-test-{}", uuid_like()));
        LocalStack::start(StackConfig {
            esp,
            chunk_size: self.chunk_size,
            realtime_reserved_slots: self.realtime_reserved_slots,
            inline_recipients_max: self.inline_recipients_max,
            triggers: self.triggers,
            prefetch: 0,
            mode: ServiceMode::InProcess,
            completion_every: self.completion_every,
            run_dir,
            service_log: "warn".into(),
            database_url: Some(url),
            task_name_ttl: haishin_local::stack::TASK_NAME_TTL,
            provider: self.provider,
            bigquery_endpoint: self.bigquery_endpoint,
            prepare_partition_bytes: self.prepare_partition_bytes,
            prepare_kept_bytes: self.prepare_kept_bytes,
        })
        .await
        .expect("local stack starts")
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /v1/requests/{id}` on the trigger, as a caller reads it.
pub async fn request_status(stack: &LocalStack, id: &str) -> Option<serde_json::Value> {
    let response = reqwest::get(format!("{}/v1/requests/{id}", stack.endpoints.trigger)).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

/// Waits until a request reaches a final state and returns its status, once its counts are
/// checked to add up (`rows = recipients + Σ skipped`, `recipients` = those of its final chunks).
pub async fn finished(stack: &LocalStack, id: &str) -> serde_json::Value {
    finished_within(stack, id, Duration::from_secs(60)).await
}

/// [`finished`], waiting up to `within`.
pub async fn finished_within(stack: &LocalStack, id: &str, within: Duration) -> serde_json::Value {
    let status = eventually(&format!("request {id} to finish"), within, || async {
        let status = request_status(stack, id).await?;
        let state: RequestState = status["state"].as_str()?.parse().ok()?;
        state.is_final().then_some(status)
    })
    .await;
    let mut invariants = haishin_local::report::Invariants::default();
    invariants.check(id, &status);
    assert!(invariants.violations.is_empty(), "{}", invariants.summary());
    status
}
