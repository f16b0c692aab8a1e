//! Running a scenario: start a stack, publish the scenario's requests into it, watch until every
//! request is finished, stop the stack, and report.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use haishin_esp_sim::report::SimReport;
use haishin_shared::domain::{ChunkState, RequestId};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::report::{self, Report, Submitted};
use crate::scenario::{Admission, RealtimeEvents, Scenario, generate_audience, template};
use crate::stack::{BUCKET, LocalStack, MailProvider, ServiceMode, StackConfig, TASK_NAME_TTL};

/// Starts a stack, runs the scenario, stops the stack, and reports.
pub async fn run_scenario(scenario: &Scenario, mode: ServiceMode) -> anyhow::Result<Report> {
    let started = Instant::now();
    let cpu_before = children_cpu_seconds();
    let run_dir = scenario.run_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("haishin-{}-{}", scenario.name, Utc::now().format("%Y%m%d-%H%M%S")))
    });
    let progress = MultiProgress::new();
    if !scenario.progress {
        progress.set_draw_target(ProgressDrawTarget::hidden());
    }
    progress.println(format!("Starting the local stack (logs in {})", run_dir.display()))?;
    let mut stack = LocalStack::start(StackConfig {
        esp: scenario.esp.clone(),
        chunk_size: scenario.chunk_size,
        realtime_reserved_slots: scenario.realtime_reserved_slots,
        inline_recipients_max: scenario.inline_recipients_max,
        triggers: scenario.triggers,
        prefetch: scenario.prefetch,
        mode,
        completion_every: Duration::from_secs(1),
        run_dir,
        service_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        database_url: None,
        task_name_ttl: scenario.chaos.as_ref().and_then(|c| c.tasks_name_ttl).unwrap_or(TASK_NAME_TTL),
        provider: scenario.provider.clone(),
        bigquery_endpoint: crate::bigquery::batch_endpoint(),
        prepare_partition_bytes: None,
        prepare_kept_bytes: None,
    })
    .await?;
    let (stop_chaos, chaos_stopped) = tokio::sync::watch::channel(false);
    let memory = crate::memory::PeakRss::watch(&stack, chaos_stopped.clone());
    let driving = async {
        let result = match scenario.realtime {
            RealtimeEvents::Flood(plan) => crate::flood::drive(&stack, scenario, plan).await,
            _ => drive(&stack, scenario, &progress).await,
        };
        let _ = stop_chaos.send(true);
        result
    };
    let chaos = async {
        match &scenario.chaos {
            Some(spec) => Some(crate::chaos::run(&stack, spec, scenario.seed, chaos_stopped).await),
            None => None,
        }
    };
    let (result, chaos, memory) = tokio::join!(driving, chaos, memory);
    let report = match result {
        Ok(submitted) => report::build(&stack, scenario, &submitted, started.elapsed()).await,
        Err(err) => Err(err),
    };
    // Once the services are stopped and waited for, their CPU time is this process's children's.
    stack.stop_services().await;
    let cpu = children_cpu_seconds() - cpu_before;
    let traces = crate::collector::traces(&stack).await;
    stack.stop().await;
    let mut report = report?;
    report.set_service_cpu(cpu);
    if let Some(flood) = &mut report.realtime_flood {
        let events: u64 = flood.steps.iter().map(|s| s.due).sum();
        flood.cpu_ms_per_event = if events > 0 { cpu * 1000.0 / events as f64 } else { 0.0 };
    }
    report.peak_rss_mb = memory.megabytes();
    report.chaos = chaos;
    report.traces = traces?;
    report.targets = crate::targets::evaluate(scenario, &report);
    Ok(report)
}

/// CPU seconds of this process's waited-for children (the services, once stopped, and every
/// completion pass), from `/proc/self/stat`.
pub fn children_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // cutime and cstime are fields 16 and 17 of the whole line, 14 and 15 after the name.
    let ticks: f64 = [13, 14].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    ticks / 100.0
}

struct Pending {
    id: String,
    body: Value,
    rows: u64,
    arrived: DateTime<Utc>,
}

/// Rows per audience file: a larger audience is written as several files (`campaign-N-K.csv`,
/// named by one wildcard URI), as a platform's exports are, so that its files can be prepared in
/// parallel.
const ROWS_PER_FILE: usize = 1_000_000;

/// Writes a campaign's audience to the bucket and returns its URI.
async fn write_audience(stack: &LocalStack, campaign: usize, csv: Vec<u8>) -> anyhow::Result<String> {
    let header_end = csv.iter().position(|b| *b == b'\n').map_or(csv.len(), |i| i + 1);
    let (header, rows) = csv.split_at(header_end);
    if bytecount_lines(rows) <= ROWS_PER_FILE {
        let object = format!("audiences/campaign-{campaign}.csv");
        stack.blobs.write(BUCKET, &object, csv.into()).await?;
        return Ok(format!("gs://{BUCKET}/{object}"));
    }
    let mut rest = rows;
    let mut file = 0;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(ROWS_PER_FILE - 1)
            .map_or(rest.len(), |(i, _)| i + 1);
        let mut data = header.to_vec();
        data.extend_from_slice(&rest[..end]);
        let object = format!("audiences/campaign-{campaign}-{file:03}.csv");
        stack.blobs.write(BUCKET, &object, data.into()).await?;
        rest = &rest[end..];
        file += 1;
    }
    Ok(format!("gs://{BUCKET}/audiences/campaign-{campaign}-*.csv"))
}

fn bytecount_lines(data: &[u8]) -> usize {
    data.iter().filter(|b| **b == b'\n').count()
}

async fn drive(
    stack: &LocalStack,
    scenario: &Scenario,
    progress: &MultiProgress,
) -> anyhow::Result<Submitted> {
    let mut rng = StdRng::seed_from_u64(scenario.seed);
    let mut submitted = Submitted::default();

    // Audiences are written first, so that writing them does not count toward the run.
    let mut campaigns = Vec::new();
    for (n, campaign) in scenario.campaigns.iter().enumerate() {
        let audience = generate_audience(n, campaign.recipients, &mut rng);
        let in_bigquery = crate::bigquery::batch_audience(stack, n, &audience.csv).await?;
        let uri = write_audience(stack, n, audience.csv).await?;
        let id = format!("campaign-{n}-{}", scenario.seed);
        let mut body = json!({
            "id": id, "class": "batch", "priority": 1, "template": template(),
            "audience": { "gcs": { "uris": [uri] } },
            "labels": { "campaign": format!("campaign-{n}") },
        });
        if let Some(audience) = in_bigquery {
            body["audience"] = audience;
        }
        campaigns
            .push((campaign.start_after, Pending { id, body, rows: audience.rows, arrived: Utc::now() }));
    }
    let start = tokio::time::Instant::now();
    let campaigns: Vec<_> = campaigns
        .into_iter()
        .zip(&scenario.campaigns)
        .map(|((_, p), c)| (start + c.start_after, p))
        .collect();

    let (event_count, gap) = match scenario.realtime {
        RealtimeEvents::None => (Some(0), Duration::MAX),
        RealtimeEvents::Spread(n) => (Some(n), scenario.expected_makespan() / (n + 1)),
        RealtimeEvents::Every(every) => (None, every),
        RealtimeEvents::Flood(_) => unreachable!("a flood has its own driver"),
        RealtimeEvents::Until { every, until } => {
            (Some((until.as_nanos() / every.as_nanos().max(1)) as u32), every)
        }
    };

    let style =
        ProgressStyle::with_template("{prefix:>9} [{bar:40}] {pos}/{len} {msg}")?.progress_chars("=> ");
    let batch_total: u64 = scenario.campaigns.iter().map(|c| c.recipients).sum();
    let batch_bar =
        progress.add(ProgressBar::new(batch_total).with_style(style.clone()).with_prefix("batch"));
    let realtime_bar = progress
        .add(ProgressBar::new(u64::from(event_count.unwrap_or(0))).with_style(style).with_prefix("realtime"));

    let mut next_event = start + gap.min(Duration::from_secs(3600));
    let mut events = 0u32;
    // Requests that arrived and are not published yet (realtime or not), oldest first.
    let mut waiting: Vec<(bool, Pending)> = Vec::new();
    // A scheduled admission's current run, and its next wake-up.
    let mut run: Vec<(String, u64, DateTime<Utc>)> = Vec::new();
    let mut next_wake = start;
    let mut pending_campaigns = campaigns.into_iter().peekable();
    let deadline = start + scenario.timeout;
    loop {
        let now = tokio::time::Instant::now();
        while let Some((at, _)) = pending_campaigns.peek()
            && *at <= now
        {
            let (_, mut campaign) = pending_campaigns.next().expect("peeked");
            campaign.arrived = Utc::now();
            waiting.push((false, campaign));
        }
        let batches_running = pending_campaigns.peek().is_some()
            || waiting.iter().any(|(realtime, _)| !realtime)
            || !all_final(stack, &submitted.batch).await.unwrap_or(false);
        let more_events = match event_count {
            Some(n) => events < n,
            None => batches_running,
        };
        if more_events && now >= next_event {
            let id = format!("event-{events}-{}", scenario.seed);
            let recipients: Vec<Value> = (0..rng.random_range(1..=3))
                .map(|k| json!({ "email": format!("rt{events}-{k}@example.com"), "params": { "name": format!("Fan {k}"), "coupon": "NOW" } }))
                .collect();
            let rows = recipients.len() as u64;
            let body = json!({
                "id": id, "class": "realtime", "priority": rng.random_range(1..=9), "template": template(),
                "audience": { "inline": recipients }, "labels": { "event": "back-in-stock" },
            });
            waiting.push((true, Pending { id, body, rows, arrived: Utc::now() }));
            events += 1;
            next_event += gap;
            if event_count.is_none() {
                realtime_bar.set_length(u64::from(events));
            }
        }
        let admit = match scenario.admission {
            Admission::Immediate => true,
            Admission::Scheduled { poll_every } if now >= next_wake => {
                while next_wake <= now {
                    next_wake += poll_every;
                }
                all_final(stack, &run).await.unwrap_or(false)
            }
            Admission::Scheduled { .. } => false,
        };
        if admit && !waiting.is_empty() {
            run.clear();
            for (realtime, request) in waiting.drain(..) {
                publish(stack, &request.body).await?;
                let entry = (request.id, request.rows, request.arrived);
                run.push(entry.clone());
                if realtime { submitted.realtime.push(entry) } else { submitted.batch.push(entry) }
            }
        }

        let sim = stack.esp.counts();
        let mut per_campaign = Vec::with_capacity(submitted.batch.len());
        for (id, _, _) in &submitted.batch {
            per_campaign.push(progress_of(stack, scenario, &sim, id).await);
        }
        let mut realtime_done = 0;
        for (id, _, _) in &submitted.realtime {
            realtime_done += u64::from(progress_of(stack, scenario, &sim, id).await > 0);
        }
        batch_bar.set_position(per_campaign.iter().sum::<u64>().min(batch_total));
        submitted.samples.push((Utc::now(), per_campaign));
        realtime_bar.set_position(realtime_done);
        if scenario.provider == MailProvider::Simulator {
            batch_bar
                .set_message(format!("upload slots busy {}/{}", sim.upload.in_progress, sim.upload.limit));
        }

        let done_publishing = pending_campaigns.peek().is_none() && waiting.is_empty() && !more_events;
        if done_publishing
            && all_final(stack, &submitted.batch).await.unwrap_or(false)
            && all_final(stack, &submitted.realtime).await.unwrap_or(false)
            && haishin_completion::logs::write::unlogged_requests(&stack.store, 1)
                .await
                .is_ok_and(|rows| rows.is_empty())
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "scenario {} did not finish within {} s",
                scenario.name,
                scenario.timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    batch_bar.finish();
    realtime_bar.finish();
    Ok(submitted)
}

/// A request's recipients delivered so far, for the progress bars: the simulator's ledger, or
/// for a message-based provider Haishin's own count (the server's record is read once, at the end).
async fn progress_of(stack: &LocalStack, scenario: &Scenario, sim: &SimReport, id: &str) -> u64 {
    if scenario.provider == MailProvider::Simulator {
        return sim.requests.get(id).map_or(0, |r| r.counts.unique);
    }
    let Ok(totals) = stack.store.chunk_totals(&RequestId::from(id)).await else { return 0 };
    totals.get(&ChunkState::Completed).map_or(0, |t| t.recipients.max(0) as u64)
}

async fn publish(stack: &LocalStack, request: &Value) -> anyhow::Result<()> {
    stack.requests_topic.publish(request, &[]).await.context("publishing a request")?;
    Ok(())
}

async fn all_final(stack: &LocalStack, requests: &[(String, u64, DateTime<Utc>)]) -> anyhow::Result<bool> {
    for (id, _, _) in requests {
        let state = stack.store.request(&RequestId::from(id.as_str())).await?.map(|r| r.state);
        if !state.is_some_and(|s| s.is_final()) {
            return Ok(false);
        }
    }
    Ok(true)
}
