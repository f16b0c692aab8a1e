//! `mixed`: Haishin against the scheduled workflow it replaces, on the same arrivals.
//!
//! A dozen batch requests of very different sizes (5,000 to 400,000 recipients) arrive one every
//! 2 s, with a realtime event every 500 ms over the same stretch. The scenario runs twice, each
//! time on a fresh stack with the same ESP:
//! - **Haishin**: every request is published as it arrives, and the trigger shares the ESP
//!   among whatever is open;
//! - **the workflow**: a scheduled job wakes every 20 s (every few minutes in production, scaled
//!   to the bench's sizes) and, unless its previous run is still going, takes every request that
//!   arrived since as one run, which goes to its end before a later wake-up starts the next one
//!   ([`Admission::Scheduled`]). Within a run its requests share the ESP's limit as Haishin
//!   would share it, so the comparison measures the admission alone: the wait for the next
//!   wake-up, and new work kept out while a run finishes.
//!
//! Both makespans run from the first arrival to the last send accepted for any request, realtime
//! events included; the target is Haishin's at most 0.6 of the workflow's.

use std::time::Duration;

use serde::Serialize;

use crate::report::Report;
use crate::scenario::{Admission, Campaign, RealtimeEvents, Scenario};

/// How often the workflow's scheduled job wakes.
pub const POLL_EVERY: Duration = Duration::from_secs(20);
/// The batch requests' sizes, in the order they arrive.
pub const SIZES: [u64; 12] =
    [400_000, 5_000, 150_000, 20_000, 250_000, 8_000, 100_000, 60_000, 300_000, 10_000, 30_000, 15_000];
/// Between two batch arrivals.
pub const ARRIVAL_GAP: Duration = Duration::from_secs(2);
/// Between two realtime events, which come for as long as batch requests arrive.
pub const REALTIME_EVERY: Duration = Duration::from_millis(500);

/// Makes `s` the mixed arrivals, admitted as they come.
pub fn configure(s: &mut Scenario) {
    s.campaigns = SIZES
        .iter()
        .enumerate()
        .map(|(i, &recipients)| Campaign { recipients, start_after: ARRIVAL_GAP * i as u32 })
        .collect();
    s.realtime = RealtimeEvents::Until { every: REALTIME_EVERY, until: ARRIVAL_GAP * SIZES.len() as u32 };
    s.admission = Admission::Immediate;
}

/// The same arrivals, admitted as the scheduled workflow admitted them.
pub fn workflow(haishin: &Scenario) -> Scenario {
    Scenario {
        name: format!("{}-workflow", haishin.name),
        admission: Admission::Scheduled { poll_every: POLL_EVERY },
        ..haishin.clone()
    }
}

/// The workflow's run of the same arrivals, beside Haishin's.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowBaseline {
    pub poll_every_s: f64,
    /// First arrival to last send accepted, all requests: Haishin's run (the report's
    /// `makespan_s`) and the workflow's.
    pub haishin_makespan_s: f64,
    pub workflow_makespan_s: f64,
    /// `haishin_makespan_s / workflow_makespan_s`.
    pub makespan_ratio: f64,
    /// Realtime p99 from arrival to the ESP accepting the send.
    pub haishin_realtime_p99_ms: f64,
    pub workflow_realtime_p99_ms: f64,
    /// The workflow run's whole report.
    pub workflow: Box<Report>,
}

impl WorkflowBaseline {
    pub fn new(haishin: &Report, workflow: Report) -> Self {
        let ratio =
            if workflow.makespan_s > 0.0 { haishin.makespan_s / workflow.makespan_s } else { f64::NAN };
        Self {
            poll_every_s: POLL_EVERY.as_secs_f64(),
            haishin_makespan_s: haishin.makespan_s,
            workflow_makespan_s: workflow.makespan_s,
            makespan_ratio: ratio,
            haishin_realtime_p99_ms: haishin.realtime_latency_ms.p99,
            workflow_realtime_p99_ms: workflow.realtime_latency_ms.p99,
            workflow: Box::new(workflow),
        }
    }

    /// The ratio, when both runs delivered something.
    pub fn ratio(&self) -> Option<f64> {
        self.makespan_ratio.is_finite().then_some(self.makespan_ratio)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn the_workflow_variant_differs_only_in_admission() {
        let haishin = crate::bench::scenario("mixed", &crate::bench::tests::args());
        let workflow = workflow(&haishin);
        assert_eq!(workflow.name, "mixed-workflow");
        assert_eq!(workflow.admission, Admission::Scheduled { poll_every: POLL_EVERY });
        assert_eq!(haishin.admission, Admission::Immediate);
        let arrivals =
            |s: &Scenario| s.campaigns.iter().map(|c| (c.recipients, c.start_after)).collect::<Vec<_>>();
        assert_eq!(arrivals(&workflow), arrivals(&haishin));
        assert_eq!(haishin.campaigns.len(), 12);
        assert_eq!(haishin.campaigns[11].start_after, Duration::from_secs(22));
        assert_eq!(haishin.campaigns.iter().map(|c| c.recipients).sum::<u64>(), 1_348_000);
    }

    #[test]
    fn the_ratio_is_haishin_s_makespan_over_the_workflow_s() {
        let mut haishin = sample_report("mixed");
        haishin.makespan_s = 30.0;
        let mut workflow = sample_report("mixed-workflow");
        workflow.makespan_s = 60.0;
        let baseline = WorkflowBaseline::new(&haishin, workflow.clone());
        assert_eq!(baseline.ratio(), Some(0.5));
        workflow.makespan_s = 0.0;
        assert_eq!(WorkflowBaseline::new(&haishin, workflow).ratio(), None);
    }
}
