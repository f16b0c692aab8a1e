//! The targets a run is held to, each beside the figure it judges.
//!
//! Every report carries `targets`: one entry per target that applies to its scenario, named by
//! the report field it reads (`esp.upload_utilization`, `realtime_latency_ms.p99`, …), with the
//! figure, the bound, which side of it is good, and whether it was met. A figure that could not
//! be measured is `null` and the target is not met: a missing measurement never passes.

use serde::Serialize;

use crate::report::Report;
use crate::scenario::{RealtimeEvents, Scenario};
use crate::stack::MailProvider;

/// The most resident memory any service may reach, in megabytes, at any audience size.
pub const PEAK_RSS_TARGET_MB: f64 = 128.0;
/// Service CPU seconds per million recipients delivered.
pub const CPU_PER_MILLION_TARGET_S: f64 = 30.0;
/// The share of the ESP's upload slots kept busy over the batches' makespan.
pub const UTILISATION_TARGET: f64 = 0.97;
/// The same, in the scenarios that are about something else (fairness, a huge audience).
pub const UTILISATION_FLOOR: f64 = 0.95;
/// The least makespan any schedule could reach over the makespan.
pub const LOWER_BOUND_RATIO_TARGET: f64 = 0.90;
/// Realtime p99 from publication to the ESP accepting the send, with a batch running and no
/// slot reserved for realtime work.
pub const REALTIME_P99_TARGET_MS: f64 = 500.0;
/// The largest gap between two campaigns' progress.
pub const FAIRNESS_GAP_TARGET: f64 = 0.10;
/// At a rate-limited ESP: the share of the rate used.
pub const RATE_UTILISATION_TARGET: f64 = 0.90;
/// Haishin's makespan over the workflow baseline's, on the same mixed arrivals.
pub const MIXED_MAKESPAN_RATIO_TARGET: f64 = 0.6;
/// The realtime rate the pipeline must sustain, events per second, with its p99 bound.
pub const FLOOD_RATE_TARGET: f64 = 1_000.0;
pub const FLOOD_P99_TARGET_MS: f64 = 1_000.0;
/// After the ESP's limit drops: the share of calls refused for the limit, and the utilisation
/// of the new limit.
pub const LIMIT_DROP_REFUSED_SHARE_TARGET: f64 = 0.01;
pub const LIMIT_DROP_UTILISATION_TARGET: f64 = 0.90;

/// Which side of the bound a good figure is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Cmp {
    #[serde(rename = "<=")]
    AtMost,
    #[serde(rename = ">=")]
    AtLeast,
}

impl Cmp {
    fn symbol(self) -> &'static str {
        match self {
            Cmp::AtMost => "<=",
            Cmp::AtLeast => ">=",
        }
    }
}

/// One target beside its figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The report field it reads, e.g. `esp.upload_utilization`.
    pub name: String,
    /// The figure measured; `None` when it could not be.
    pub figure: Option<f64>,
    pub cmp: Cmp,
    pub target: f64,
    pub met: bool,
}

impl Target {
    pub fn new(name: &str, figure: Option<f64>, cmp: Cmp, target: f64) -> Self {
        let met = figure.is_some_and(|f| match cmp {
            Cmp::AtMost => f <= target,
            Cmp::AtLeast => f >= target,
        });
        Self { name: name.to_owned(), figure, cmp, target, met }
    }

    pub fn at_most(name: &str, figure: f64, target: f64) -> Self {
        Self::new(name, Some(figure), Cmp::AtMost, target)
    }

    pub fn at_least(name: &str, figure: f64, target: f64) -> Self {
        Self::new(name, Some(figure), Cmp::AtLeast, target)
    }

    /// One line for a person: `met` or `MISSED`, the name, the figure and the bound.
    pub fn line(&self) -> String {
        let figure = self.figure.map_or("not measured".to_owned(), number);
        let mark = if self.met { "met   " } else { "MISSED" };
        format!("{mark} {:<46} {:>12} {} {}", self.name, figure, self.cmp.symbol(), number(self.target))
    }
}

/// A figure as a person reads it: whole numbers plainly, others with three decimals.
fn number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 { format!("{x:.0}") } else { format!("{x:.3}") }
}

/// `met/all`, with `MISSED` when any was missed.
pub fn tally(targets: &[Target]) -> String {
    let met = targets.iter().filter(|t| t.met).count();
    if met == targets.len() {
        format!("{met}/{}", targets.len())
    } else {
        format!("{met}/{} MISSED", targets.len())
    }
}

/// The targets of a scenario's report: those every run is held to, then its scenario's own.
pub fn evaluate(scenario: &Scenario, report: &Report) -> Vec<Target> {
    let mut targets = correctness(scenario, report);
    let simulator = scenario.provider == MailProvider::Simulator;
    let utilisation =
        |floor: f64| Target::at_least("esp.upload_utilization", report.esp.upload_utilization, floor);
    let lower_bound = || {
        let ratio =
            (report.batch_makespan_s > 0.0).then(|| report.esp.lower_bound_s() / report.batch_makespan_s);
        Target::new("esp.lower_bound_s / batch_makespan_s", ratio, Cmp::AtLeast, LOWER_BOUND_RATIO_TARGET)
    };
    let p99 = |target: f64| {
        let measured = report.realtime_latency_ms.samples > 0;
        Target::new(
            "realtime_latency_ms.p99",
            measured.then_some(report.realtime_latency_ms.p99),
            Cmp::AtMost,
            target,
        )
    };
    match scenario.name.as_str() {
        "steady" => targets.extend([utilisation(UTILISATION_TARGET), lower_bound()]),
        "realtime-under-load" => {
            targets.extend([utilisation(UTILISATION_TARGET), lower_bound(), p99(REALTIME_P99_TARGET_MS)])
        }
        "fairness" => targets.extend([
            utilisation(UTILISATION_FLOOR),
            lower_bound(),
            Target::new("fairness_max_gap", report.fairness_max_gap, Cmp::AtMost, FAIRNESS_GAP_TARGET),
        ]),
        "huge-audience" => targets.extend([utilisation(UTILISATION_FLOOR), lower_bound()]),
        "mixed" => targets.push(Target::new(
            "workflow_baseline.makespan_ratio",
            report.workflow_baseline.as_ref().and_then(|b| b.ratio()),
            Cmp::AtMost,
            MIXED_MAKESPAN_RATIO_TARGET,
        )),
        // The demo is a batch with realtime events over it: held to what `realtime-under-load`
        // is, where the simulator delivers and no fault is injected.
        "demo" if simulator && scenario.chaos.is_none() => {
            targets.push(utilisation(UTILISATION_TARGET));
            if !matches!(scenario.realtime, RealtimeEvents::None | RealtimeEvents::Spread(0)) {
                targets.push(p99(REALTIME_P99_TARGET_MS));
            }
        }
        // `baseline-workflow` is the comparison, held to correctness only; the rate-limited
        // scenario's targets are the rate's, below.
        _ => {}
    }
    if let Some(rate) = &report.esp.rate {
        targets.extend([
            Target::at_most("esp.rate.over_rate_attempts", rate.over_rate_attempts as f64, 0.0),
            Target::at_most(
                "esp.rate.max_calls_in_any_1s_window / limit",
                rate.max_calls_in_any_1s_window as f64 / rate.limit.floor().max(1.0),
                1.0,
            ),
            Target::at_least("esp.rate.utilisation", rate.utilisation, RATE_UTILISATION_TARGET),
        ]);
    }
    if let Some(flood) = &report.realtime_flood {
        targets.extend(flood.targets());
    }
    if scenario.chaos.as_ref().is_some_and(|c| c.limit_drop.is_some()) {
        targets.extend(match report.chaos.as_ref().and_then(|c| c.limit_drop.as_ref()) {
            Some(d) => limit_drop(d.over_limit_attempts, d.accepted_calls, d.upload_utilization_after_drop),
            // The run ended before the drop: nothing measured.
            None => limit_drop(0, 0, 0.0)
                .into_iter()
                .map(|t| Target::new(&t.name, None, t.cmp, t.target))
                .collect(),
        });
    }
    targets
}

/// What every run is held to: every request done, every recipient once, the ESP's limit kept,
/// the counts adding up, memory flat and CPU modest.
fn correctness(scenario: &Scenario, report: &Report) -> Vec<Target> {
    let q = &report.requests;
    let r = &report.recipients;
    let mut targets = vec![
        Target::at_least("requests.completed", q.completed as f64, q.submitted as f64),
        Target::at_most("recipients.duplicates", r.duplicates as f64, 0.0),
        Target::at_most("recipients.lost", r.lost as f64, 0.0),
    ];
    if scenario.provider == MailProvider::Simulator {
        let e = &report.esp;
        let peak = f64::from(e.upload_peak_concurrency.max(e.send_peak_concurrency));
        let limit = f64::from(e.upload_limit.min(e.send_limit).max(1));
        // When the ESP's limit drops mid-run, a few refusals are how the services learn of it:
        // they are judged as a share of the calls instead (see `limit_drop`).
        if scenario.chaos.as_ref().is_none_or(|c| c.limit_drop.is_none()) {
            targets.push(Target::at_most("esp.over_limit_attempts", e.over_limit_attempts as f64, 0.0));
        }
        targets.push(Target::at_most("esp.peak_concurrency / limit", peak / limit, 1.0));
    }
    targets.push(Target::at_least("invariants.hold", f64::from(u8::from(report.invariants.hold)), 1.0));
    // Every completed request is one trace through the services on its path (when exported).
    if let Some(traces) = &report.traces {
        targets.push(Target::at_least(
            "traces.requests_with_complete_trace",
            traces.requests_with_complete_trace as f64,
            traces.requests_completed as f64,
        ));
    }
    if let Some(rss) = report.peak_rss_mb.values().copied().reduce(f64::max) {
        targets.push(Target::at_most("peak_rss_mb (largest)", rss, PEAK_RSS_TARGET_MB));
    }
    // Per million recipients, where there are enough of them for the figure to mean something.
    if report.service_cpu_s > 0.0 && report.recipients.delivered >= 100_000 {
        targets.push(Target::at_most(
            "cpu_s_per_million",
            report.cpu_s_per_million,
            CPU_PER_MILLION_TARGET_S,
        ));
    }
    targets
}

/// The targets of a drop of the ESP's limit mid-run: calls refused for the limit as a share of
/// all calls made (accepted ones and refused ones), and the utilisation of the new limit after
/// the drop.
pub fn limit_drop(over_limit_attempts: u64, accepted_calls: u64, utilisation_after_drop: f64) -> Vec<Target> {
    let attempts = accepted_calls + over_limit_attempts;
    let share = (attempts > 0).then(|| over_limit_attempts as f64 / attempts as f64);
    vec![
        Target::new(
            "esp.over_limit_attempts / attempts",
            share,
            Cmp::AtMost,
            LIMIT_DROP_REFUSED_SHARE_TARGET,
        ),
        Target::at_least(
            "esp.upload_utilization_after_drop",
            utilisation_after_drop,
            LIMIT_DROP_UTILISATION_TARGET,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::scenario;
    use crate::bench::tests::args;
    use crate::report::tests::sample_report;

    /// A run that did everything right: the ESP busy, the makespan near its bound.
    fn good(name: &str) -> Report {
        let mut r = sample_report(name);
        r.esp.upload_utilization = 0.981;
        r.esp.upload_lower_bound_s = 20.0;
        r.peak_rss_mb = [("trigger".to_owned(), 61.0), ("sender".to_owned(), 44.0)].into();
        r
    }

    fn find<'a>(targets: &'a [Target], name: &str) -> &'a Target {
        targets.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no target {name}: {targets:?}"))
    }

    #[test]
    fn a_steady_run_that_keeps_the_esp_busy_meets_every_target() {
        let targets = evaluate(&scenario("steady", &args()), &good("steady"));
        assert!(targets.iter().all(|t| t.met), "{targets:#?}");
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "requests.completed",
                "recipients.duplicates",
                "recipients.lost",
                "esp.over_limit_attempts",
                "esp.peak_concurrency / limit",
                "invariants.hold",
                "peak_rss_mb (largest)",
                "cpu_s_per_million",
                "esp.upload_utilization",
                "esp.lower_bound_s / batch_makespan_s",
            ]
        );
        assert_eq!(find(&targets, "esp.upload_utilization").target, 0.97);
        assert_eq!(find(&targets, "peak_rss_mb (largest)").figure, Some(61.0));
    }

    #[test]
    fn a_completed_request_without_its_whole_trace_misses_the_traces_target() {
        let mut r = good("steady");
        r.traces = Some(crate::collector::TracesReport {
            requests_completed: 4,
            requests_with_complete_trace: 3,
            ..Default::default()
        });
        let targets = evaluate(&scenario("steady", &args()), &r);
        let traces = find(&targets, "traces.requests_with_complete_trace");
        assert!(!traces.met);
        assert_eq!((traces.figure, traces.target), (Some(3.0), 4.0));
    }

    #[test]
    fn utilisation_under_the_target_is_missed() {
        let mut r = good("steady");
        r.esp.upload_utilization = 0.969;
        let targets = evaluate(&scenario("steady", &args()), &r);
        let util = find(&targets, "esp.upload_utilization");
        assert!(!util.met);
        assert!(util.line().starts_with("MISSED esp.upload_utilization"), "{}", util.line());
        assert_eq!(tally(&targets), "9/10 MISSED");
    }

    #[test]
    fn realtime_p99_is_judged_only_when_measured() {
        let s = scenario("realtime-under-load", &args());
        let mut r = good("realtime-under-load");
        let unmeasured = evaluate(&s, &r);
        let p99 = find(&unmeasured, "realtime_latency_ms.p99");
        assert_eq!((p99.figure, p99.met, p99.target), (None, false, 500.0));
        assert!(p99.line().contains("not measured"), "{}", p99.line());
        r.realtime_latency_ms.samples = 300;
        r.realtime_latency_ms.p99 = 420.0;
        assert!(find(&evaluate(&s, &r), "realtime_latency_ms.p99").met);
        r.realtime_latency_ms.p99 = 501.0;
        assert!(!find(&evaluate(&s, &r), "realtime_latency_ms.p99").met);
    }

    #[test]
    fn a_duplicate_a_loss_or_a_call_over_the_limit_is_missed() {
        let s = scenario("fairness", &args());
        let mut r = good("fairness");
        r.recipients.duplicates = 1;
        r.recipients.lost = -2;
        r.esp.upload_peak_concurrency = 9;
        r.esp.over_limit_attempts = 3;
        r.requests.completed = 1;
        let targets = evaluate(&s, &r);
        let missed: Vec<&str> = targets.iter().filter(|t| !t.met).map(|t| t.name.as_str()).collect();
        assert_eq!(
            missed,
            [
                "requests.completed",
                "recipients.duplicates",
                "esp.over_limit_attempts",
                "esp.peak_concurrency / limit",
                "fairness_max_gap",
            ],
            "a negative loss is no loss; fairness without samples is not measured"
        );
    }

    #[test]
    fn memory_over_the_bound_is_missed_and_no_measurement_gives_no_target() {
        let s = scenario("huge-audience", &args());
        let mut r = good("huge-audience");
        r.peak_rss_mb.insert("list-uploader".into(), 130.5);
        assert!(!find(&evaluate(&s, &r), "peak_rss_mb (largest)").met);
        r.peak_rss_mb.clear();
        assert!(evaluate(&s, &r).iter().all(|t| t.name != "peak_rss_mb (largest)"));
    }

    #[test]
    fn mixed_is_held_to_its_makespan_against_the_workflow() {
        let s = scenario("mixed", &args());
        let mut haishin = good("mixed");
        assert_eq!(find(&evaluate(&s, &haishin), "workflow_baseline.makespan_ratio").figure, None);
        haishin.makespan_s = 35.0;
        let mut workflow = good("mixed-workflow");
        workflow.makespan_s = 70.0;
        haishin.workflow_baseline = Some(crate::mixed::WorkflowBaseline::new(&haishin, workflow.clone()));
        let ratio = evaluate(&s, &haishin).into_iter().find(|t| t.name == "workflow_baseline.makespan_ratio");
        assert_eq!(ratio.as_ref().map(|t| (t.figure, t.met)), Some((Some(0.5), true)));
        workflow.makespan_s = 50.0;
        haishin.workflow_baseline = Some(crate::mixed::WorkflowBaseline::new(&haishin, workflow));
        assert!(!find(&evaluate(&s, &haishin), "workflow_baseline.makespan_ratio").met);
    }

    #[test]
    fn a_rate_limited_run_is_held_to_the_rate() {
        let s = scenario("rate-limited", &args());
        let mut r = good("rate-limited");
        let arrivals: Vec<i64> = (0..400).map(|i| i * 50_000).collect();
        r.esp.rate = Some(haishin_esp_sim::RateReport::from_arrivals(20.0, &arrivals, 400, 0));
        let targets = evaluate(&s, &r);
        assert!(find(&targets, "esp.rate.over_rate_attempts").met);
        assert_eq!(find(&targets, "esp.rate.max_calls_in_any_1s_window / limit").figure, Some(1.0));
        assert!(find(&targets, "esp.rate.utilisation").met);
        assert!(targets.iter().all(|t| t.name != "esp.upload_utilization"), "the rate, not the slots");
    }

    #[test]
    fn targets_read_as_json_a_script_can_check() {
        let json = serde_json::to_value([
            Target::at_least("esp.upload_utilization", 0.98, 0.97),
            Target::new("realtime_latency_ms.p99", None, Cmp::AtMost, 500.0),
        ])
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"name": "esp.upload_utilization", "figure": 0.98, "cmp": ">=", "target": 0.97, "met": true},
                {"name": "realtime_latency_ms.p99", "figure": null, "cmp": "<=", "target": 500.0, "met": false},
            ])
        );
    }

    #[test]
    fn a_limit_drop_is_judged_on_refusals_and_the_new_limit_s_use() {
        let held = limit_drop(5, 995, 0.93);
        assert!(held.iter().all(|t| t.met), "{held:?}");
        assert_eq!(held[0].figure, Some(0.005));
        let refused = limit_drop(20, 980, 0.95);
        assert!(!refused[0].met && refused[1].met);
        assert_eq!(limit_drop(0, 0, 0.0)[0].figure, None);
    }

    #[test]
    fn the_limit_drop_scenario_judges_refusals_as_a_share_and_the_new_limit_s_use() {
        let s = scenario("esp-limit-drop", &args());
        let mut r = good("esp-limit-drop");
        r.esp.over_limit_attempts = 3;
        let unmeasured = evaluate(&s, &r);
        assert!(unmeasured.iter().all(|t| t.name != "esp.over_limit_attempts"), "{unmeasured:?}");
        assert_eq!(find(&unmeasured, "esp.upload_utilization_after_drop").figure, None);

        r.chaos = Some(crate::chaos::ChaosLog {
            limit_drop: Some(crate::chaos::LimitDropLog {
                from: 8,
                to: 5,
                at_s: 10.0,
                over_limit_attempts: 3,
                accepted_calls: 417,
                upload_utilization_after_drop: 0.94,
            }),
            ..Default::default()
        });
        let targets = evaluate(&s, &r);
        assert!(find(&targets, "esp.over_limit_attempts / attempts").met);
        assert!(find(&targets, "esp.upload_utilization_after_drop").met);
        assert!(targets.iter().all(|t| t.met), "{targets:?}");
        assert!(
            find(&evaluate(&scenario("steady", &args()), &r), "esp.over_limit_attempts").figure == Some(3.0)
        );
    }
}
