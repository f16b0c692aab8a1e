//! The demo scenario: batch campaigns plus a stream of realtime events, watched live, with a
//! report whose delivery figures come from the ESP simulator's own ledger.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use haishin_esp_sim::EspSimConfig;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::report::{self, Report, Submitted};
use crate::stack::{BUCKET, LocalStack, ServiceMode, StackConfig};

/// `haishin-local demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Recipients in each batch campaign's audience (a generated CSV, with a few bad rows).
    #[arg(long, default_value_t = 300_000)]
    pub batch_recipients: u64,
    /// Batch campaigns, published together at the start.
    #[arg(long, default_value_t = 1)]
    pub batches: u32,
    /// Realtime events (1-3 recipients each), spread over the batch's run.
    #[arg(long, default_value_t = 30)]
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
    /// Recipients per chunk.
    #[arg(long, default_value_t = 10_000)]
    pub chunk_size: u32,
    /// Upload slots kept for realtime events.
    #[arg(long, default_value_t = 0)]
    pub realtime_reserved_slots: u32,
    /// Seed of the generated audiences and of the ESP simulator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where to write the JSON report.
    #[arg(long)]
    pub report: PathBuf,
    /// Where service logs and delivery logs go (default: a new directory under the system's temp dir).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
}

impl DemoArgs {
    pub fn esp_config(&self) -> EspSimConfig {
        EspSimConfig {
            upload_limit: self.esp_concurrency,
            send_limit: self.esp_concurrency,
            upload_call_latency: Duration::from_millis(self.esp_latency_ms),
            upload_per_recipient: Duration::from_micros(self.esp_per_recipient_us),
            send_call_latency: Duration::from_millis(self.esp_latency_ms),
            send_per_recipient: Duration::from_nanos(self.esp_per_recipient_us * 10),
            settle_delay: Duration::from_millis(500),
            seed: self.seed,
            ..EspSimConfig::default()
        }
    }

    /// The ESP's service time for one chunk upload of `n` recipients.
    pub fn upload_time(&self, n: u64) -> Duration {
        Duration::from_millis(self.esp_latency_ms) + Duration::from_micros(self.esp_per_recipient_us * n)
    }
}

/// A generated batch audience: header, rows, and which rows are bad on purpose.
pub struct Audience {
    pub csv: Vec<u8>,
    pub rows: u64,
}

/// `recipients` rows of `email,name,coupon`, where about one row in a thousand has a bad address
/// and one in a thousand repeats an earlier address (both skipped and counted by the trigger).
pub fn generate_audience(campaign: u32, recipients: u64, rng: &mut StdRng) -> Audience {
    let mut csv = Vec::with_capacity(recipients as usize * 40);
    csv.extend_from_slice(b"email,name,coupon\n");
    for i in 0..recipients {
        let roll: u32 = rng.random_range(0..1000);
        let line = match roll {
            0 => format!("not-an-address-{i},Nobody,X\n"),
            1 if i > 0 => format!("c{campaign}-user{}@example.com,Again,Y\n", i - 1),
            _ => format!("c{campaign}-user{i}@example.com,User {i},C{:05}\n", rng.random_range(0..100_000)),
        };
        csv.extend_from_slice(line.as_bytes());
    }
    Audience { csv, rows: recipients }
}

fn template() -> Value {
    json!({ "subject": "{{name}}, something for you", "text": "Hello {{name}}, use {{coupon}}." })
}

/// Runs the demo and writes its report.
pub async fn run(args: DemoArgs, mode: ServiceMode) -> anyhow::Result<Report> {
    let started = std::time::Instant::now();
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("haishin-demo-{}", Utc::now().format("%Y%m%d-%H%M%S")))
    });
    let progress = MultiProgress::new();
    progress.println(format!("Starting the local stack (logs in {})", run_dir.display()))?;
    let stack = LocalStack::start(StackConfig {
        esp: args.esp_config(),
        chunk_size: args.chunk_size,
        realtime_reserved_slots: args.realtime_reserved_slots,
        mode,
        completion_every: Duration::from_secs(1),
        run_dir: run_dir.clone(),
        service_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        database_url: None,
    })
    .await?;
    let result = drive(&stack, &args, &progress).await;
    let report = match result {
        Ok(submitted) => report::build(&stack, &args, &submitted, started.elapsed()).await,
        Err(err) => Err(err),
    };
    stack.stop().await;
    let report = report?;
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.report.display()))?;
    Ok(report)
}

async fn drive(stack: &LocalStack, args: &DemoArgs, progress: &MultiProgress) -> anyhow::Result<Submitted> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut submitted = Submitted::default();

    for campaign in 0..args.batches {
        let audience = generate_audience(campaign, args.batch_recipients, &mut rng);
        let object = format!("audiences/campaign-{campaign}.csv");
        stack.blobs.write(BUCKET, &object, audience.csv.into()).await?;
        let id = format!("campaign-{campaign}-{}", args.seed);
        let request = json!({
            "id": id, "class": "batch", "priority": 1, "template": template(),
            "audience": { "gcs": { "uris": [format!("gs://{BUCKET}/{object}")] } },
            "labels": { "campaign": format!("campaign-{campaign}") },
        });
        publish(stack, &request).await?;
        submitted.batch.push((id, audience.rows, Utc::now()));
    }

    // Spread realtime events over the batch's expected run.
    let chunks = (args.batch_recipients * args.batches as u64).div_ceil(args.chunk_size.max(1) as u64);
    let waves = chunks.div_ceil(args.esp_concurrency.max(1) as u64);
    let expected = args.upload_time((args.chunk_size as u64).min(args.batch_recipients)) * waves as u32;
    let gap = if args.realtime_events > 0 { expected / (args.realtime_events + 1) } else { Duration::ZERO };

    let style =
        ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} {msg}")?.progress_chars("=> ");
    let batch_total: u64 = submitted.batch.iter().map(|b| b.1).sum();
    let batch_bar =
        progress.add(ProgressBar::new(batch_total).with_style(style.clone()).with_prefix("batch"));
    let realtime_bar =
        progress.add(ProgressBar::new(args.realtime_events as u64).with_style(style).with_prefix("realtime"));

    let mut next_event = tokio::time::Instant::now() + gap;
    let mut sent_events = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    loop {
        if sent_events < args.realtime_events && tokio::time::Instant::now() >= next_event {
            let id = format!("event-{sent_events}-{}", args.seed);
            let recipients: Vec<Value> = (0..rng.random_range(1..=3))
                .map(|k| json!({ "email": format!("rt{sent_events}-{k}@example.com"), "params": { "name": format!("Fan {k}"), "coupon": "NOW" } }))
                .collect();
            let count = recipients.len() as u64;
            let request = json!({
                "id": id, "class": "realtime", "priority": rng.random_range(1..=9), "template": template(),
                "audience": { "inline": recipients }, "labels": { "event": "back-in-stock" },
            });
            let at = Utc::now();
            publish(stack, &request).await?;
            submitted.realtime.push((id, count, at));
            sent_events += 1;
            next_event += gap;
        }

        let sim = stack.esp.report();
        let delivered = |ids: &[(String, u64, DateTime<Utc>)]| -> u64 {
            ids.iter().filter_map(|(id, _, _)| sim.requests.get(id)).map(|r| r.counts.unique).sum()
        };
        batch_bar.set_position(delivered(&submitted.batch).min(batch_total));
        realtime_bar.set_position(
            submitted
                .realtime
                .iter()
                .filter(|(id, _, _)| sim.requests.get(id).is_some_and(|r| r.counts.unique > 0))
                .count() as u64,
        );
        batch_bar.set_message(format!("upload slots busy {}/{}", sim.upload.in_progress, sim.upload.limit));

        if sent_events == args.realtime_events && all_final(stack, &submitted).await? {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the demo did not finish within {} s", args.timeout_secs);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    batch_bar.finish();
    realtime_bar.finish();
    Ok(submitted)
}

async fn publish(stack: &LocalStack, request: &Value) -> anyhow::Result<()> {
    stack.requests_topic.publish(request, &[]).await.context("publishing a request")?;
    Ok(())
}

async fn all_final(stack: &LocalStack, submitted: &Submitted) -> anyhow::Result<bool> {
    for (id, _, _) in submitted.batch.iter().chain(&submitted.realtime) {
        let state = stack.store.request(id).await?.map(|r| r.state());
        if !state.is_some_and(|s| s.is_final()) {
            return Ok(false);
        }
    }
    // Every finished request is also summarised in the logs.
    Ok(stack.store.unlogged_requests(1).await?.is_empty())
}
