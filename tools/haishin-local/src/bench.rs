//! `haishin-local bench`: named scenarios, run one after another on a fresh stack each, with a
//! table of their figures next to the targets and the full reports as JSON.

use std::time::Duration;

use crate::demo::esp_model;
use crate::report::Report;
use crate::run::run_scenario;
use crate::scenario::{Admission, Campaign, RealtimeEvents, Scenario};
use crate::stack::ServiceMode;

/// The scenarios `bench` knows, in the order it runs them.
pub const SCENARIOS: [&str; 4] = ["steady", "realtime-under-load", "fairness", "baseline-workflow"];

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run (default: all of them).
    #[arg(long = "scenario", value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS))]
    pub scenarios: Vec<String>,
    /// Trigger instances running at once in every scenario.
    #[arg(long, default_value_t = 1)]
    pub triggers: u32,
    /// Upload tasks allowed to wait in the queue beyond the ESP's limit.
    #[arg(long, default_value_t = 0)]
    pub prefetch: u32,
    /// Where to write the reports (a JSON array).
    #[arg(long, default_value = "bench.report.json")]
    pub json: std::path::PathBuf,
    /// Seed of audiences and ESP faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The ESP model of every scenario: 150 ms per call plus 150 µs per uploaded recipient, so a
/// full 10,000-recipient chunk takes 1.65 s to upload, at a limit of 8 per API.
fn base(name: &str, args: &BenchArgs) -> Scenario {
    Scenario {
        name: name.into(),
        campaigns: Vec::new(),
        realtime: RealtimeEvents::None,
        admission: Admission::Immediate,
        esp: esp_model(8, Duration::from_millis(150), Duration::from_micros(150), args.seed),
        chunk_size: 10_000,
        realtime_reserved_slots: 0,
        triggers: args.triggers,
        prefetch: args.prefetch,
        seed: args.seed,
        timeout: Duration::from_secs(600),
        run_dir: None,
        progress: false,
        chaos: None,
    }
}

pub fn scenario(name: &str, args: &BenchArgs) -> Scenario {
    let now = |recipients| Campaign { recipients, start_after: Duration::ZERO };
    let mut s = base(name, args);
    match name {
        "steady" => s.campaigns = vec![now(250_000); 4],
        "realtime-under-load" | "baseline-workflow" => {
            s.campaigns = vec![now(1_000_000)];
            s.realtime = RealtimeEvents::Every(Duration::from_millis(200));
            if name == "baseline-workflow" {
                s.admission = Admission::Waves;
            }
        }
        "fairness" => {
            s.campaigns =
                vec![now(1_000_000), Campaign { recipients: 1_000_000, start_after: Duration::from_secs(10) }]
        }
        other => unreachable!("unknown scenario {other}"),
    }
    s
}

/// Runs the chosen scenarios, prints the table, writes the JSON.
pub async fn run(args: BenchArgs, mode: ServiceMode) -> anyhow::Result<Vec<Report>> {
    let names: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.scenarios.clone()
    };
    let mut reports = Vec::new();
    for name in &names {
        let scenario = scenario(name, &args);
        eprintln!("Running {name}…");
        let report = run_scenario(&scenario, mode.clone()).await?;
        eprintln!("{}", row(&scenario, &report));
        eprintln!("  {}", report.invariants.summary());
        reports.push(report);
        std::fs::write(&args.json, serde_json::to_vec_pretty(&reports)?)?;
    }
    println!("{}", table(&names, &args, &reports));
    Ok(reports)
}

fn row(scenario: &Scenario, r: &Report) -> String {
    let ratio = if r.batch_makespan_s > 0.0 { r.esp.upload_lower_bound_s / r.batch_makespan_s } else { 0.0 };
    let full_chunk = scenario.upload_time(u64::from(scenario.chunk_size)).as_secs_f64();
    let send = scenario.esp.send_call_latency.as_secs_f64();
    let p99_target = (full_chunk + send + 1.0) * 1000.0;
    format!(
        "{:<20} {:>9} {:>8.1} {:>6.3} {:>6.3} {:>8.0} {:>8.0} {:>8} {:>5}/{:<3} {:>4} {:>7.1} {:>9}",
        r.scenario,
        format!("{}/{}", r.requests.completed, r.requests.submitted),
        r.batch_makespan_s,
        r.esp.upload_utilization,
        ratio,
        r.realtime_latency_ms.p99,
        p99_target,
        r.esp.over_limit_attempts,
        r.esp.upload_peak_concurrency.max(r.esp.send_peak_concurrency),
        r.esp.upload_limit,
        r.recipients.duplicates,
        r.cpu_s_per_million,
        r.fairness_max_gap.map_or("-".to_owned(), |g| format!("{:.1}%", g * 100.0)),
    )
}

fn table(names: &[String], args: &BenchArgs, reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<20} {:>9} {:>8} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>4} {:>7} {:>9}\n",
        "scenario",
        "done",
        "make_s",
        "util",
        "lb/mk",
        "rt_p99",
        "p99_tgt",
        "overlim",
        "peak/lim",
        "dup",
        "cpu/M",
        "fair_gap"
    ));
    out.push_str(&format!(
        "{:<20} {:>9} {:>8} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>4} {:>7} {:>9}\n",
        "targets", "all", "", ">=.95", ">=.90", "<=tgt", "", "0", "<=1", "0", "<=30", "<=10%"
    ));
    for (name, report) in names.iter().zip(reports) {
        out.push_str(&row(&scenario(name, args), report));
        out.push('\n');
    }
    out
}
