//! The completion job: passes until the work is done or its run's time is up, then exit (a Cloud
//! Run job started by Cloud Scheduler).
//!
//! A pass takes at most [`BATCH`] rows in each step. When it took a whole batch of sent chunks
//! and settled some of them, or a whole batch of log rows, another pass follows at once, as long
//! as the run's time ([`Config::run_seconds`]) allows: a backlog (a flood of realtime requests,
//! each with its chunk to poll and its log row to write) is worked through in one run, not a
//! batch a minute.
//!
//! Each pass:
//! 1. expires what passed its deadline before it could be dispatched;
//! 2. polls a list-based ESP for sent chunks and completes those whose delivery settled
//!    (a message-based provider's chunks are completed by the sender), then pauses the open
//!    requests whose bounce or complaint rate crossed the kill switch's threshold;
//! 3. reconciles stuck work: uploads whose lease ran out go back to `queued`, chunks that sat in
//!    `queued` too long go back to `pending` (re-dispatched under a new task name), and chunks
//!    that sat in `uploaded`, or in `sending` with a dead lease, are published to the sender again
//!    (which checks the ESP's history before sending anything twice);
//! 4. ends `cancelled` what waits in a cancelled request (chunks that came back to a waiting
//!    state after the cancel), and closes requests whose chunks are all final (`cancelled` for a
//!    cancelled one);
//! 5. writes one delivery-log row per finished chunk and one summary row per finished request, and
//!    publishes `request-completed`;
//! 6. records the backlog's gauges (chunks by state, the oldest waiting chunk's age);
//! 7. publishes a tick on `pipeline-events`, the scheduler's safety net.
//!
//! Every step is a guarded state change, so two passes at once, or a pass killed half-way, leave
//! nothing inconsistent.
//!
//! # Layout
//! - this module: the configuration and the pass, step by step;
//! - [`close`]: expiring requests never prepared in time, cancelling what waits in cancelled
//!   requests, closing requests whose chunks are final;
//! - `poll`: the ESP's delivery status of sent chunks;
//! - [`kill_switch`]: pausing requests that bounce or draw complaints too much;
//! - `reconcile`: stuck uploads and sends;
//! - `gauges`: the backlog as metrics;
//! - [`logs`]: the delivery and request log rows, their sinks (BigQuery, files), and writing them.

pub mod close;
mod gauges;
pub mod kill_switch;
pub mod logs;
mod poll;
mod reconcile;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use haishin_shared::esp::{EspArgs, EspProvider};
use haishin_shared::gcp::{GcpArgs, Topic};
use haishin_shared::messages::PipelineEvent;
use haishin_shared::store::{Store, expire_overdue_chunks};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::kill_switch::KillSwitch;
use crate::logs::{BigQuerySink, FileSink, LogSink};
use crate::reconcile::Timeouts;

/// Most rows one pass handles per step; the next pass takes the rest.
pub const BATCH: i64 = 1_000;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "completion", about = "One completion pass: poll the ESP, write logs, close requests.")]
pub struct Config {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: SecretString,
    /// Largest number of database connections the job opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 4)]
    pub database_max_connections: u32,
    #[command(flatten)]
    pub gcp: GcpArgs,
    #[command(flatten)]
    pub esp: EspArgs,
    /// Topic of pipeline events.
    #[arg(long, env = "EVENTS_TOPIC", default_value = "pipeline-events")]
    pub events_topic: String,
    /// Topic of chunks ready to send (for re-publishing stuck chunks).
    #[arg(long, env = "DELIVERIES_TOPIC", default_value = "deliveries")]
    pub deliveries_topic: String,
    /// Topic told about each finished request.
    #[arg(long, env = "COMPLETED_TOPIC", default_value = "request-completed")]
    pub completed_topic: String,
    /// Where logs go: `bigquery`, or `file:DIR` for NDJSON files.
    #[arg(long, env = "LOG_SINK", default_value = "bigquery")]
    pub log_sink: String,
    /// BigQuery dataset of the logs.
    #[arg(long, env = "BIGQUERY_DATASET", default_value = "haishin")]
    pub bigquery_dataset: String,
    /// A chunk in `queued` longer than this (seconds) is dispatched again.
    #[arg(long, env = "QUEUED_TIMEOUT_SECS", default_value_t = 900)]
    pub queued_timeout_secs: u64,
    /// A chunk in `uploaded` longer than this (seconds) is published to the sender again.
    #[arg(long, env = "UPLOADED_TIMEOUT_SECS", default_value_t = 120)]
    pub uploaded_timeout_secs: u64,
    /// The kill switch: a request whose bounce rate (0 to 1) reaches this is paused; 0 turns it off.
    #[arg(long, env = "KILL_SWITCH_BOUNCE_RATE", default_value_t = 0.05, value_parser = kill_switch::parse_rate)]
    pub kill_switch_bounce_rate: f64,
    /// The kill switch: a request whose spam-complaint rate (0 to 1, from the provider's webhooks)
    /// reaches this is paused; 0 turns it off. Mailbox providers start rejecting at about 0.3%.
    #[arg(long, env = "KILL_SWITCH_COMPLAINT_RATE", default_value_t = 0.003, value_parser = kill_switch::parse_rate)]
    pub kill_switch_complaint_rate: f64,
    /// Recipients with an outcome a request needs (since its last resume) before the kill switch
    /// judges it.
    #[arg(long, env = "KILL_SWITCH_MIN_SAMPLE", default_value_t = 1_000)]
    pub kill_switch_min_sample: u64,
    /// How long one run keeps taking passes while work is left, in seconds: no pass starts after
    /// that. Below the schedule's interval, so that runs seldom overlap (they may: every step is
    /// a guarded state change).
    #[arg(long, env = "RUN_SECONDS", default_value_t = 50)]
    pub run_seconds: u64,
}

/// What one pass did (or a run's passes together).
#[derive(Debug, Default, Clone, Serialize)]
pub struct PassReport {
    /// Passes taken.
    pub passes: u32,
    /// Sent chunks polled.
    pub polled_chunks: u64,
    pub expired_requests: u64,
    pub expired_chunks: u64,
    pub completed_chunks: u64,
    pub still_processing: u64,
    /// Requests the kill switch paused.
    pub killed_requests: u64,
    pub requeued_uploads: u64,
    pub redispatched: u64,
    pub republished: u64,
    pub cancelled_chunks: u64,
    pub closed_requests: u64,
    pub delivery_rows: u64,
    pub request_rows: u64,
}

impl PassReport {
    /// Whether the pass left work that another one can get on with now: it took a whole batch of
    /// sent chunks and settled some (chunks still processing at the ESP are polled again by the
    /// next run), or a whole batch of log rows.
    fn left_more(&self) -> bool {
        let batch = BATCH as u64;
        (self.polled_chunks >= batch && self.completed_chunks > 0)
            || self.delivery_rows >= batch
            || self.request_rows >= batch
    }

    /// Adds a later pass's counts to these.
    fn add(&mut self, pass: &PassReport) {
        self.passes += pass.passes;
        self.polled_chunks += pass.polled_chunks;
        self.expired_requests += pass.expired_requests;
        self.expired_chunks += pass.expired_chunks;
        self.completed_chunks += pass.completed_chunks;
        self.still_processing += pass.still_processing;
        self.killed_requests += pass.killed_requests;
        self.requeued_uploads += pass.requeued_uploads;
        self.redispatched += pass.redispatched;
        self.republished += pass.republished;
        self.cancelled_chunks += pass.cancelled_chunks;
        self.closed_requests += pass.closed_requests;
        self.delivery_rows += pass.delivery_rows;
        self.request_rows += pass.request_rows;
    }
}

pub struct Job {
    store: Store,
    /// The list-based ESP whose sends settle later; `None` for a message-based provider, whose
    /// chunks the sender completes with each message's outcome.
    esp: Option<Arc<dyn EspProvider>>,
    sink: Arc<dyn LogSink>,
    events: Topic,
    deliveries: Topic,
    completed: Topic,
    timeouts: Timeouts,
    kill_switch: KillSwitch,
    /// No pass starts once a run has taken this long.
    run_for: Duration,
}

impl Job {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let store = Store::connect(config.database_url.expose_secret(), config.database_max_connections)
            .await
            .context("connecting to the database")?;
        store.migrate().await?;
        let sink: Arc<dyn LogSink> = match (config.log_sink.as_str(), config.log_sink.strip_prefix("file:")) {
            ("bigquery", _) => Arc::new(BigQuerySink::new(&config.gcp, &config.bigquery_dataset)?),
            (_, Some(dir)) if !dir.is_empty() => Arc::new(FileSink::new(dir)),
            (other, _) => anyhow::bail!("LOG_SINK `{other}` is not a log sink: use `bigquery` or `file:DIR`"),
        };
        Ok(Self {
            store,
            esp: config.esp.list_provider()?,
            sink,
            events: Topic::connect(&config.gcp, &config.events_topic).await?,
            deliveries: Topic::connect(&config.gcp, &config.deliveries_topic).await?,
            completed: Topic::connect(&config.gcp, &config.completed_topic).await?,
            timeouts: Timeouts {
                queued: Duration::from_secs(config.queued_timeout_secs),
                uploaded: Duration::from_secs(config.uploaded_timeout_secs),
            },
            kill_switch: KillSwitch {
                bounce_rate: config.kill_switch_bounce_rate,
                complaint_rate: config.kill_switch_complaint_rate,
                min_sample: config.kill_switch_min_sample,
            },
            run_for: Duration::from_secs(config.run_seconds),
        })
    }

    /// One run: passes while the last one left more to do and the run's time allows.
    pub async fn run(&self) -> anyhow::Result<PassReport> {
        let started = tokio::time::Instant::now();
        let mut report = self.run_once().await?;
        let mut last = report.clone();
        while last.left_more() && started.elapsed() < self.run_for {
            last = self.run_once().await?;
            report.add(&last);
        }
        Ok(report)
    }

    /// One pass over everything; see the crate doc for the steps.
    async fn run_once(&self) -> anyhow::Result<PassReport> {
        let mut report = PassReport {
            passes: 1,
            expired_requests: close::expire_unprepared(&self.store).await?,
            expired_chunks: expire_overdue_chunks(self.store.pool()).await?,
            ..PassReport::default()
        };
        if let Some(esp) = &self.esp {
            poll::poll_sent(&self.store, esp.as_ref(), &mut report).await?;
        }
        kill_switch::check(&self.store, self.kill_switch, &mut report).await?;
        reconcile::reconcile(&self.store, &self.deliveries, self.timeouts, &mut report).await?;
        report.cancelled_chunks = close::cancel_stragglers(&self.store).await?;
        report.closed_requests = close::close_finished_requests(&self.store).await?;
        logs::write::write_logs(&self.store, self.sink.as_ref(), &self.completed, &mut report).await?;
        gauges::record(&self.store).await?;
        if let Err(err) = self.events.publish(&PipelineEvent::tick(), &[]).await {
            tracing::warn!(error = %err, "Tick not published.");
        }
        for topic in [&self.events, &self.deliveries, &self.completed] {
            topic.flush().await;
        }
        Ok(report)
    }
}
