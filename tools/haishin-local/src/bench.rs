//! `haishin-local bench`: named scenarios, run one after another on a fresh stack each, with a
//! table of their figures next to the targets and the full reports as JSON.

use std::time::Duration;

use anyhow::Context;

use crate::demo::esp_model;
use crate::report::Report;
use crate::run::run_scenario;
use crate::scenario::{Admission, Campaign, RealtimeEvents, Scenario};
use crate::stack::ServiceMode;

/// The scenarios `bench` knows, in the order it runs them.
pub const SCENARIOS: [&str; 9] = [
    "steady",
    "realtime-under-load",
    "fairness",
    "baseline-workflow",
    "mixed",
    "rate-limited",
    "esp-limit-drop",
    "realtime-flood",
    "huge-audience",
];

/// The scenarios run only when named: `huge-audience` takes a quarter of an hour and a few
/// gigabytes of disk, `realtime-flood` a minute per rate step. The others run when none is named.
pub const ON_REQUEST: [&str; 2] = ["realtime-flood", "huge-audience"];

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run (default: all of them).
    #[arg(long = "scenario", value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS))]
    pub scenarios: Vec<String>,
    /// Trigger instances running at once in every scenario.
    #[arg(long, default_value_t = 1)]
    pub triggers: u32,
    /// Upload tasks allowed to wait in the queue beyond the ESP's limit.
    #[arg(long, default_value_t = haishin_trigger::config::DISPATCH_PREFETCH)]
    pub prefetch: u32,
    /// Where to write the reports (a JSON array).
    #[arg(long, default_value = "bench.report.json")]
    pub json: std::path::PathBuf,
    /// Seed of audiences and ESP faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Recipients of the `huge-audience` campaign (a file audience).
    #[arg(long, default_value_t = 10_000_000)]
    pub huge_recipients: u64,
    /// How long `realtime-flood` holds each rate, in seconds (its target is judged over 60).
    #[arg(long, default_value_t = 60)]
    pub flood_step_secs: u64,
    /// Events per second of `realtime-flood`'s first step (each next step doubles it): by default
    /// 125, so that the steps pass through the target, 1,000 a second.
    #[arg(long, default_value_t = 125.0)]
    pub flood_from: f64,
}

/// In `esp-limit-drop`: the ESP's real limit drops from 8 to this, 10 s after the start.
pub const LIMIT_DROP: &str = "esp-limit-drop=5@10s";

/// The ESP's rate in the `rate-limited` scenario, in calls per second.
pub const RATE_LIMITED_CALLS_PER_SECOND: f64 = 20.0;

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
        inline_recipients_max: crate::demo::INLINE_RECIPIENTS_MAX,
        triggers: args.triggers,
        prefetch: args.prefetch,
        seed: args.seed,
        timeout: Duration::from_secs(600),
        run_dir: None,
        progress: false,
        chaos: None,
        provider: Default::default(),
        mail_record: None,
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
                s.admission = Admission::Scheduled { poll_every: crate::mixed::POLL_EVERY };
            }
        }
        "mixed" => crate::mixed::configure(&mut s),
        "fairness" => {
            s.campaigns =
                vec![now(1_000_000), Campaign { recipients: 1_000_000, start_after: Duration::from_secs(10) }]
        }
        // The ESP also takes at most 20 calls a second, uploads and sends together. Chunks of 1,000
        // upload in 300 ms and send in 152 ms, so 8 slots per API could make about 53 calls a
        // second (26.7 chunks): the rate, not the concurrency, is the bottleneck. 200 chunks are
        // 400 calls, about 20 s at the rate.
        "rate-limited" => {
            s.esp.calls_per_second = Some(RATE_LIMITED_CALLS_PER_SECOND);
            s.chunk_size = 1_000;
            s.campaigns = vec![now(100_000); 2];
        }
        // The ESP's real limit drops from 8 to 5 calls at once 10 s in, the services still
        // configured for 8: 200 chunks, about 45 uploaded before the drop and 50 s of uploads
        // after it.
        "esp-limit-drop" => {
            s.campaigns = vec![now(2_000_000)];
            s.chaos = Some(LIMIT_DROP.parse().expect("the scenario's chaos spec parses"));
        }
        // Realtime events only, open-loop, 125 a second and doubling each step, on the usual ESP
        // model: 8 send calls at once of 150 ms each pass about 53 calls a second, so the events
        // that share a template must go out together, many to a call (a send batch).
        "realtime-flood" => {
            s.realtime = RealtimeEvents::Flood(crate::flood::FloodPlan {
                first_rate: args.flood_from,
                factor: 2.0,
                steps: 7,
                step: Duration::from_secs(args.flood_step_secs),
                fanout_every: 200,
                fanout_recipients: 10_000,
                drain: Duration::from_secs(300),
            });
            s.timeout = Duration::from_secs(3_600);
        }
        // One file audience of tens of millions: every service's memory must stay flat.
        "huge-audience" => {
            s.campaigns = vec![now(args.huge_recipients)];
            s.timeout = Duration::from_secs(3_600);
        }
        other => unreachable!("unknown scenario {other}"),
    }
    s
}

/// Runs the chosen scenarios, prints the table, writes the JSON.
pub async fn run(args: BenchArgs, mode: ServiceMode) -> anyhow::Result<Vec<Report>> {
    let names: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS.iter().filter(|s| !ON_REQUEST.contains(s)).map(|s| (*s).to_owned()).collect()
    } else {
        args.scenarios.clone()
    };
    let mut reports = Vec::new();
    for name in &names {
        let scenario = scenario(name, &args);
        eprintln!("Running {name}…");
        let mut report = run_scenario(&scenario, mode.clone()).await?;
        if name == "mixed" {
            let workflow = crate::mixed::workflow(&scenario);
            eprintln!("Running {} (the same arrivals, taken by a scheduled workflow)…", workflow.name);
            let baseline = run_scenario(&workflow, mode.clone()).await?;
            eprintln!("{}", row(&baseline));
            let picture = crate::picture::path_beside(&args.json, Some(&workflow.name));
            std::fs::write(&picture, crate::picture::svg(&baseline))
                .with_context(|| format!("writing {}", picture.display()))?;
            report.workflow_baseline = Some(crate::mixed::WorkflowBaseline::new(&report, baseline));
            report.targets = crate::targets::evaluate(&scenario, &report);
        }
        eprintln!("{}", row(&report));
        eprintln!("  {}", report.invariants.summary());
        eprintln!("{}", target_lines(&report));
        let picture = crate::picture::path_beside(&args.json, Some(name));
        std::fs::write(&picture, crate::picture::svg(&report))
            .with_context(|| format!("writing {}", picture.display()))?;
        reports.push(report);
        std::fs::write(&args.json, serde_json::to_vec_pretty(&reports)?)
            .with_context(|| format!("writing {}", args.json.display()))?;
    }
    println!("{}", table(&reports));
    for report in &reports {
        println!("{}\n{}", report.scenario, target_lines(report));
    }
    Ok(reports)
}

/// Every target of a report, one a line, beside its figure; a missed one says MISSED.
fn target_lines(report: &Report) -> String {
    report.targets.iter().map(|t| format!("  {}", t.line())).collect::<Vec<_>>().join("\n")
}

fn row(r: &Report) -> String {
    let ratio = if r.batch_makespan_s > 0.0 { r.esp.lower_bound_s() / r.batch_makespan_s } else { 0.0 };
    // At an ESP with a rate: calls it refused for the rate, the most calls in any 1 s against the
    // rate, and the rate's utilisation.
    let (over_rate, in_1s, rate_use) = match &r.esp.rate {
        Some(rate) => (
            rate.over_rate_attempts.to_string(),
            format!("{:>5}/{:<3}", rate.max_calls_in_any_1s_window, rate.limit),
            format!("{:.3}", rate.utilisation),
        ),
        None => ("-".to_owned(), format!("{:>5} {:<3}", "-", ""), "-".to_owned()),
    };
    format!(
        "{:<20} {:>9} {:>8.1} {:>6.3} {:>6.3} {:>8.0} {:>8} {:>5}/{:<3} {:>4} {:>7.1} {:>9} {:>7} {} {:>7} {:>7} {}",
        r.scenario,
        format!("{}/{}", r.requests.completed, r.requests.submitted),
        r.batch_makespan_s,
        r.esp.upload_utilization,
        ratio,
        r.realtime_latency_ms.p99,
        r.esp.over_limit_attempts,
        r.esp.upload_peak_concurrency.max(r.esp.send_peak_concurrency),
        r.esp.upload_limit,
        r.recipients.duplicates,
        r.cpu_s_per_million,
        r.fairness_max_gap.map_or("-".to_owned(), |g| format!("{:.1}%", g * 100.0)),
        over_rate,
        in_1s,
        rate_use,
        r.peak_rss_mb.values().copied().reduce(f64::max).map_or("-".to_owned(), |mb| format!("{mb:.0}")),
        crate::targets::tally(&r.targets),
    )
}

fn table(reports: &[Report]) -> String {
    let mut out = format!(
        "{:<20} {:>9} {:>8} {:>6} {:>6} {:>8} {:>8} {:>9} {:>4} {:>7} {:>9} {:>7} {:>9} {:>7} {:>7} {}\n",
        "scenario",
        "done",
        "make_s",
        "util",
        "lb/mk",
        "rt_p99",
        "overlim",
        "peak/lim",
        "dup",
        "cpu/M",
        "fair_gap",
        "ovrate",
        "1s/rate",
        "rate_ut",
        "rss_MB",
        "targets"
    );
    for report in reports {
        out.push_str(&row(report));
        out.push('\n');
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use haishin_esp_sim::RateReport;
    use haishin_esp_sim::config::Api;

    use super::*;
    use crate::report::tests::sample_report;

    pub(crate) fn args() -> BenchArgs {
        BenchArgs {
            scenarios: Vec::new(),
            triggers: 1,
            prefetch: haishin_trigger::config::DISPATCH_PREFETCH,
            json: "bench.json".into(),
            seed: 1,
            huge_recipients: 10_000_000,
            flood_step_secs: 60,
            flood_from: 125.0,
        }
    }

    #[test]
    fn every_scenario_bench_names_is_one_it_can_build() {
        for name in SCENARIOS {
            assert_eq!(scenario(name, &args()).name, name);
        }
        assert!(ON_REQUEST.iter().all(|name| SCENARIOS.contains(name)));
        let flood = scenario("realtime-flood", &args());
        assert!(
            matches!(flood.realtime, RealtimeEvents::Flood(plan) if plan.step == Duration::from_secs(60))
        );
        assert!(flood.campaigns.is_empty());
    }

    #[test]
    fn the_rate_limited_scenario_is_bound_by_the_rate_not_the_concurrency() {
        let s = scenario("rate-limited", &args());
        let rate = s.calls_per_second().unwrap();
        let size = u64::from(s.chunk_size);
        let uploads_per_s = f64::from(s.esp.upload_limit) / s.upload_time(size).as_secs_f64();
        let sends_per_s = f64::from(s.esp.send_limit) / s.esp.latency(Api::Send, size as usize).as_secs_f64();
        // A chunk is one upload and one send: the calls a second the slots alone would allow.
        let by_concurrency = 2.0 * uploads_per_s.min(sends_per_s);
        assert!(by_concurrency > 2.5 * rate, "{by_concurrency} calls/s");
        assert_eq!(s.batch_chunks(), 200);
        assert_eq!(s.rate_bound(), Some(Duration::from_secs(20)));
        assert_eq!(s.expected_makespan(), Duration::from_secs(20));
        assert_eq!(scenario("steady", &args()).calls_per_second(), None);
    }

    fn report(name: &str, rate: Option<RateReport>) -> Report {
        let mut r = sample_report(name);
        r.esp.rate_lower_bound_s = rate.as_ref().map(|r| r.accepted_calls as f64 / r.limit);
        r.esp.rate = rate;
        r.targets = crate::targets::evaluate(&scenario(name, &args()), &r);
        r
    }

    #[test]
    fn the_table_shows_the_rate_figures_and_how_many_targets_were_met() {
        let arrivals: Vec<i64> = (0..400).map(|i| i * 52_000).collect();
        let rated = report("rate-limited", Some(RateReport::from_arrivals(20.0, &arrivals, 412, 12)));
        let table = table(&[report("steady", None), rated]);
        println!("{table}");
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].ends_with("ovrate   1s/rate rate_ut  rss_MB targets"), "{}", lines[0]);
        // Steady's utilisation of 0.41 misses its target; the rate-limited run refused 12 calls.
        assert!(lines[1].ends_with("-     -           -       - 7/9 MISSED"), "{}", lines[1]);
        assert!(lines[2].ends_with("12    20/20    0.964       - 9/10 MISSED"), "{}", lines[2]);
        // The lower bound of the rate-limited run is the rate's: 400 calls at 20/s.
        assert!(lines[2].contains(&format!(" {:.3} ", 20.0 / 21.4)), "{}", lines[2]);
    }

    #[test]
    fn every_target_is_printed_and_a_missed_one_says_so() {
        let lines = target_lines(&report("steady", None));
        println!("{lines}");
        assert_eq!(lines.lines().count(), 9);
        let missed: Vec<&str> = lines.lines().filter(|l| l.contains("MISSED")).collect();
        assert_eq!(missed.len(), 2, "{lines}");
        assert!(
            missed[0].contains("esp.upload_utilization") && missed[0].contains("0.410 >= 0.970"),
            "{lines}"
        );
        assert!(missed[1].contains("esp.lower_bound_s / batch_makespan_s"), "{lines}");
    }
}
