//! `haishin-local demo`: one batch campaign (or several) plus realtime events spread over its run,
//! with live progress and a JSON report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use haishin_esp_sim::EspSimConfig;

use crate::report::Report;
use crate::run::run_scenario;
use crate::scenario::{Admission, Campaign, RealtimeEvents, Scenario};
use haishin_shared::esp::ProviderKind;

use crate::mail_record::MailRecord;
use crate::stack::{MailProvider, ServiceMode};

/// `haishin-local demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Print the whole JSON report at the end, not only the summary.
    #[arg(long)]
    pub json: bool,
    /// Recipients in each batch campaign's audience (a generated CSV, with a few bad rows).
    #[arg(long, default_value_t = 1_000_000)]
    pub batch_recipients: u64,
    /// Batch campaigns, published together at the start.
    #[arg(long, default_value_t = 1)]
    pub batches: u32,
    /// Realtime events (1-3 recipients each), spread over the batch's run.
    #[arg(long, default_value_t = 40)]
    pub realtime_events: u32,
    /// The ESP's concurrency limit, for each of its upload and send APIs.
    #[arg(long, default_value_t = 4)]
    pub esp_concurrency: u32,
    /// ESP latency per call, in milliseconds.
    #[arg(long, default_value_t = 150)]
    pub esp_latency_ms: u64,
    /// ESP upload time per recipient, in microseconds.
    #[arg(long, default_value_t = 150)]
    pub esp_per_recipient_us: u64,
    /// The ESP's limit on calls per second, uploads and sends together (none when unset).
    #[arg(long)]
    pub esp_calls_per_second: Option<f64>,
    /// Recipients per chunk.
    #[arg(long, default_value_t = 10_000)]
    pub chunk_size: u32,
    /// Upload slots kept for realtime events.
    #[arg(long, default_value_t = 0)]
    pub realtime_reserved_slots: u32,
    /// Realtime chunks of at most this many recipients are sent with their recipients in the
    /// send call, without a list upload (0: every chunk is uploaded).
    #[arg(long, default_value_t = INLINE_RECIPIENTS_MAX)]
    pub inline_recipients_max: u32,
    /// Trigger instances running at once.
    #[arg(long, default_value_t = 1)]
    pub triggers: u32,
    /// Seed of the generated audiences and of the ESP simulator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where to write the JSON report.
    #[arg(long)]
    pub report: PathBuf,
    /// Where service logs and delivery logs go (default: a new directory under the system's temp dir).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Faults to inject while the demo runs, e.g.
    /// `kill-every=5s,esp-500=0.05,esp-429=0.05,esp-timeout-after-accept=0.02,pg-restart-every=30s`.
    #[arg(long)]
    pub chaos: Option<crate::chaos::ChaosSpec>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
    /// Who delivers the mail: the ESP simulator (`list-send`), an SMTP server (`--smtp-url`) or
    /// Amazon SES's API (`--ses-endpoint`).
    #[arg(long, value_enum, default_value = "list-send")]
    pub provider: haishin_shared::esp::ProviderKind,
    /// The SMTP server, `smtp://HOST:PORT` (with `--provider smtp`).
    #[arg(long, required_if_eq("provider", "smtp"))]
    pub smtp_url: Option<String>,
    /// The file where the SMTP server records what it received (one JSON line per message, as
    /// `tests/smtp_recorder.py` writes it): the report's delivery figures are read from it.
    #[arg(long)]
    pub smtp_record: Option<PathBuf>,
    /// SES's endpoint, e.g. moto in server mode at `http://127.0.0.1:PORT` (with `--provider
    /// ses`); the report's delivery figures are read from moto's sent-message store.
    #[arg(long, required_if_eq("provider", "ses"))]
    pub ses_endpoint: Option<String>,
    /// The provider's limit on messages per second (SMTP, SES), held across the services.
    #[arg(long)]
    pub messages_per_second: Option<f64>,
    /// Where the batch audiences are: a CSV file in Cloud Storage (`gcs`), or a BigQuery table
    /// that the trigger exports (`bigquery`, with bqemulator installed).
    #[arg(long, value_enum, default_value = "gcs")]
    pub audience: crate::bigquery::AudienceSource,
}

/// Realtime chunks of at most this many recipients skip the list upload, locally: the ESP
/// simulator takes up to 1,000 recipients in a send.
pub const INLINE_RECIPIENTS_MAX: u32 = 100;

/// The ESP model shared by the demo and the benchmarks: a fixed cost per call and, for uploads, a
/// cost per recipient (sends to an uploaded list cost little per recipient).
pub fn esp_model(limit: u32, call: Duration, per_recipient: Duration, seed: u64) -> EspSimConfig {
    EspSimConfig {
        upload_limit: limit,
        send_limit: limit,
        upload_call_latency: call,
        upload_per_recipient: per_recipient,
        send_call_latency: call,
        send_per_recipient: per_recipient / 100,
        settle_delay: Duration::from_millis(500),
        seed,
        ..EspSimConfig::default()
    }
}

impl DemoArgs {
    pub fn scenario(&self) -> Scenario {
        Scenario {
            name: "demo".into(),
            campaigns: (0..self.batches)
                .map(|_| Campaign { recipients: self.batch_recipients, start_after: Duration::ZERO })
                .collect(),
            realtime: RealtimeEvents::Spread(self.realtime_events),
            admission: Admission::Immediate,
            esp: EspSimConfig {
                calls_per_second: self.esp_calls_per_second,
                ..esp_model(
                    self.esp_concurrency,
                    Duration::from_millis(self.esp_latency_ms),
                    Duration::from_micros(self.esp_per_recipient_us),
                    self.seed,
                )
            },
            chunk_size: self.chunk_size,
            realtime_reserved_slots: self.realtime_reserved_slots,
            inline_recipients_max: self.inline_recipients_max,
            triggers: self.triggers,
            prefetch: haishin_trigger::config::DISPATCH_PREFETCH,
            seed: self.seed,
            timeout: Duration::from_secs(self.timeout_secs),
            run_dir: self.run_dir.clone(),
            progress: true,
            chaos: self.chaos.clone(),
            provider: self.mail_provider(),
            mail_record: self.mail_record(),
        }
    }

    fn mail_provider(&self) -> MailProvider {
        match self.provider {
            ProviderKind::ListSend => MailProvider::Simulator,
            ProviderKind::Smtp => MailProvider::Smtp {
                url: self.smtp_url.clone().expect("clap requires --smtp-url"),
                messages_per_second: self.messages_per_second,
            },
            ProviderKind::Ses => MailProvider::Ses {
                endpoint: self.ses_endpoint.clone().expect("clap requires --ses-endpoint"),
                messages_per_second: self.messages_per_second,
            },
        }
    }

    fn mail_record(&self) -> Option<MailRecord> {
        match self.provider {
            ProviderKind::ListSend => None,
            ProviderKind::Smtp => self.smtp_record.clone().map(MailRecord::SmtpFile),
            ProviderKind::Ses => self.ses_endpoint.clone().map(|endpoint| MailRecord::Moto { endpoint }),
        }
    }
}

/// Runs the demo and writes its report, and its picture beside it (`demo.report.json` →
/// `demo.report.svg`).
pub async fn run(args: DemoArgs, mode: ServiceMode) -> anyhow::Result<Report> {
    let bigquery = crate::bigquery::for_batches(args.audience).await?;
    let report = run_scenario(&args.scenario(), mode).await;
    drop(bigquery);
    let report = report?;
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.report.display()))?;
    let picture = crate::picture::path_beside(&args.report, None);
    std::fs::write(&picture, crate::picture::svg(&report))
        .with_context(|| format!("writing {}", picture.display()))?;
    Ok(report)
}
