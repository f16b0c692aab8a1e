//! The simulator's report: what each API did and what was delivered to whom.
//!
//! Everything here is `Serialize + Deserialize`, so that a report fetched from
//! `GET /_sim/report` (see [`crate::SimClient`]) is the same struct as the one an
//! in-process [`crate::EspSimHandle`] returns.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{Api, Faults};

/// A snapshot of the simulator's ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub started_at: DateTime<Utc>,
    /// When the snapshot was taken; the busy timeline's last step lasts until then.
    pub generated_at: DateTime<Utc>,
    pub upload: ApiReport,
    pub send: ApiReport,
    /// Every recipient of every accepted send.
    pub deliveries: DeliveryCounts,
    /// The same counts per request id, for requests that had at least one send accepted.
    pub requests: BTreeMap<String, RequestReport>,
    /// The faults in effect when the snapshot was taken.
    pub faults: Faults,
    /// The calls-per-second limit and how it was kept, when one is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateReport>,
}

/// The calls-per-second limit over uploads and sends together, and how it was kept.
///
/// Every figure is over the whole run. With the simulator refusing what would go above the
/// limit, the accepted side holds the limit by construction (`windows_above_rate` is 0,
/// `max_calls_in_any_1s_window` at most `floor(limit)`); whether the caller's own pacing
/// kept under the rate shows in `over_rate_attempts` and `attempts_above_rate_share`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RateReport {
    /// Calls per second; `floor(limit)` calls are accepted in any 1-s window.
    pub limit: f64,
    /// Upload and send calls that reached admission: accepted, or refused for the rate, the
    /// concurrency limit or an injected fault (calls refused as invalid are not counted).
    pub attempts: u64,
    /// Calls accepted (both APIs): each one's arrival is in the window arithmetic.
    pub accepted_calls: u64,
    /// Calls refused with 429 because the last second already held `floor(limit)` accepted
    /// calls. They did no work.
    pub over_rate_attempts: u64,
    /// The most accepted calls in any 1-s window (sliding, windows ending at an arrival).
    pub max_calls_in_any_1s_window: u64,
    /// Accepted calls that, counted with the accepted calls of the second before them, are
    /// more than `limit`: 0 when the limit held.
    pub windows_above_rate: u64,
    /// `over_rate_attempts / attempts`: how often the caller had to be refused for the rate.
    pub attempts_above_rate_share: f64,
    /// `accepted_calls / (limit × span_seconds)`: the share of the rate used while calls came.
    /// As the span leaves out the last call's second, it can come out above 1, by up to one
    /// second's worth of calls (`1 / span_seconds`); 0 with fewer than two calls.
    pub utilisation: f64,
    /// Seconds from the first accepted call's arrival to the last one's.
    pub span_seconds: f64,
}

/// The sliding window the rate is counted over, in microseconds.
pub const RATE_WINDOW_US: i64 = 1_000_000;

impl RateReport {
    /// The report of a limit of `limit` calls per second over accepted calls arriving at
    /// `arrivals_us` (microseconds, oldest first), with the attempts and refusals counted at
    /// admission. A window of 1 s ending at an arrival holds the calls that arrived less than
    /// 1 s before it, and the call itself.
    pub fn from_arrivals(limit: f64, arrivals_us: &[i64], attempts: u64, over_rate_attempts: u64) -> Self {
        let mut max_in_window = 0u64;
        let mut above = 0u64;
        let mut oldest = 0;
        for (i, &at) in arrivals_us.iter().enumerate() {
            while at - arrivals_us[oldest] >= RATE_WINDOW_US {
                oldest += 1;
            }
            let in_window = (i - oldest + 1) as u64;
            max_in_window = max_in_window.max(in_window);
            if in_window as f64 > limit {
                above += 1;
            }
        }
        let accepted = arrivals_us.len() as u64;
        let span_seconds = match (arrivals_us.first(), arrivals_us.last()) {
            (Some(first), Some(last)) => (last - first) as f64 / 1e6,
            _ => 0.0,
        };
        let utilisation =
            if span_seconds > 0.0 && limit > 0.0 { accepted as f64 / (limit * span_seconds) } else { 0.0 };
        Self {
            limit,
            attempts,
            accepted_calls: accepted,
            over_rate_attempts,
            max_calls_in_any_1s_window: max_in_window,
            windows_above_rate: above,
            attempts_above_rate_share: if attempts > 0 {
                over_rate_attempts as f64 / attempts as f64
            } else {
                0.0
            },
            utilisation,
            span_seconds,
        }
    }
}

/// What one API (upload or send) did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiReport {
    /// Calls allowed in progress at once, at start.
    pub limit: u32,
    /// Every change of the limit after start, oldest first (see `EspSimHandle::set_limit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limit_changes: Vec<LimitChange>,
    /// Calls that got a slot and did (or are doing) their work.
    pub calls_accepted: u64,
    /// Accepted calls whose work is finished.
    pub calls_completed: u64,
    /// Calls refused with 429 because `limit` calls were in progress. They did no work.
    pub over_limit_attempts: u64,
    /// Calls refused before any work: bad credentials, bad body, unknown list.
    pub invalid_calls: u64,
    /// Faults injected, by kind.
    pub injected: FaultCounts,
    /// Calls in progress when the snapshot was taken.
    pub in_progress: u32,
    /// The most calls ever in progress at once.
    pub peak_concurrency: u32,
    /// Integral of the calls in progress over time, since start.
    pub busy_slot_seconds: f64,
    /// Sum of the latencies of completed calls (spikes included).
    pub service_seconds: f64,
    /// Every change of the calls in progress, oldest first. Empty when the report was
    /// asked for without it (`GET /_sim/report?timeline=false`).
    pub timeline: Vec<TimelinePoint>,
    /// Every accepted call, oldest first: whose it was and when it held its slot. Left out with
    /// the timeline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallSpan>,
}

/// One accepted call of an API: the request it was for and the time it held a slot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallSpan {
    pub request_id: String,
    pub recipients: u64,
    /// Unix time in milliseconds when it took its slot.
    pub start_ms: f64,
    /// When it gave the slot back; `None` while it is still in progress.
    pub end_ms: Option<f64>,
}

/// The limit of an API changed while the simulator ran.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LimitChange {
    /// Unix time in milliseconds (with microsecond fractions).
    pub at_ms: f64,
    pub limit: u32,
}

/// Injected faults by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    /// Answered 500, no work done.
    pub error: u64,
    /// Answered 429, no work done (not over-limit attempts).
    pub rate_limit: u64,
    /// Done and recorded, answer withheld.
    pub timeout_after_accept: u64,
    /// Slowed down by `spike_factor`.
    pub latency_spike: u64,
}

/// The calls in progress of one API from `at_ms` until the next point.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Unix time in milliseconds (with microsecond fractions).
    pub at_ms: f64,
    /// Calls in progress after the change.
    pub in_progress: u32,
}

/// Delivery counts: every recipient of an accepted send counts once in `total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCounts {
    /// Recipients sent to, duplicates and bounces included: `delivered + bounced`.
    pub total: u64,
    /// Distinct (request, address) pairs sent to.
    pub unique: u64,
    /// Sends beyond the first to a (request, address) pair: `total - unique`.
    pub duplicates: u64,
    pub delivered: u64,
    /// Recipients at the bounce domain.
    pub bounced: u64,
    /// Accepted send calls.
    pub sends: u64,
}

/// One request's deliveries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestReport {
    #[serde(flatten)]
    pub counts: DeliveryCounts,
    /// When its first send was accepted.
    pub first_send_at: DateTime<Utc>,
    /// When its last send was accepted.
    pub last_send_at: DateTime<Utc>,
}

/// The recipients one request was delivered to (`GET /_sim/deliveries?request_id=`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestDeliveries {
    pub request_id: String,
    #[serde(flatten)]
    pub counts: DeliveryCounts,
    /// False when some recipients are missing from `recipients` because the request went
    /// beyond `keep_addresses_max` distinct addresses or came in large lists; the counts
    /// above are complete either way.
    pub addresses_complete: bool,
    /// Sorted by address.
    pub recipients: Vec<DeliveredRecipient>,
}

/// One address of a request and how many times it was sent to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredRecipient {
    pub email: String,
    pub count: u32,
    pub bounced: bool,
    /// The parameters its first send carried, when it had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
}

impl SimReport {
    pub fn api(&self, api: Api) -> &ApiReport {
        match api {
            Api::Upload => &self.upload,
            Api::Send => &self.send,
        }
    }

    /// Slot-seconds `api` was busy between `from` and `to`, e.g. over a batch's makespan:
    /// the integral of its calls in progress over that window. Needs the timeline.
    pub fn busy_slot_seconds(&self, api: Api, from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
        self.api(api).busy_slot_seconds_between(unix_ms(from), unix_ms(to), unix_ms(self.generated_at))
    }

    /// The share of `api`'s slots that were busy between `from` and `to` (0 to 1).
    pub fn utilization(&self, api: Api, from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
        let seconds = (to - from).as_seconds_f64();
        let limit = f64::from(self.api(api).limit);
        if seconds <= 0.0 || limit == 0.0 {
            return 0.0;
        }
        self.busy_slot_seconds(api, from, to) / (seconds * limit)
    }
}

impl ApiReport {
    /// Slot-seconds busy between `from_ms` and `to_ms` (unix milliseconds), the last
    /// step of the timeline lasting until `end_ms`.
    pub fn busy_slot_seconds_between(&self, from_ms: f64, to_ms: f64, end_ms: f64) -> f64 {
        let mut slot_ms = 0.0;
        for (i, point) in self.timeline.iter().enumerate() {
            let until = self.timeline.get(i + 1).map_or(end_ms, |next| next.at_ms);
            let start = point.at_ms.max(from_ms);
            let stop = until.min(to_ms);
            if stop > start {
                slot_ms += f64::from(point.in_progress) * (stop - start);
            }
        }
        slot_ms / 1000.0
    }
}

/// Unix milliseconds of a timestamp, with microsecond fractions.
pub fn unix_ms(at: DateTime<Utc>) -> f64 {
    at.timestamp_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    fn point(ms: i64, in_progress: u32) -> TimelinePoint {
        TimelinePoint { at_ms: unix_ms(at(ms)), in_progress }
    }

    fn report(timeline: Vec<TimelinePoint>, generated_ms: i64) -> SimReport {
        SimReport {
            started_at: at(0),
            generated_at: at(generated_ms),
            upload: ApiReport { limit: 4, timeline, ..ApiReport::default() },
            send: ApiReport::default(),
            deliveries: DeliveryCounts::default(),
            requests: BTreeMap::new(),
            faults: Faults::none(),
            rate: None,
        }
    }

    #[test]
    fn busy_slot_seconds_integrate_the_timeline_over_a_window() {
        // 1 slot from 1000 to 2000 ms, 3 from 2000 to 3000, 0 after.
        let r = report(vec![point(1000, 1), point(2000, 3), point(3000, 0)], 10_000);
        assert!((r.busy_slot_seconds(Api::Upload, at(0), at(10_000)) - 4.0).abs() < 1e-9);
        assert!((r.busy_slot_seconds(Api::Upload, at(1500), at(2500)) - 2.0).abs() < 1e-9);
        assert!((r.busy_slot_seconds(Api::Upload, at(3000), at(9000))).abs() < 1e-9);
        assert!((r.utilization(Api::Upload, at(2000), at(3000)) - 0.75).abs() < 1e-9);
        assert_eq!(r.busy_slot_seconds(Api::Send, at(0), at(10_000)), 0.0);
    }

    #[test]
    fn calls_still_in_progress_count_until_the_snapshot() {
        let r = report(vec![point(1000, 2)], 2000);
        assert!((r.busy_slot_seconds(Api::Upload, at(0), at(5000)) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_report_survives_json() {
        let r = report(vec![point(1000, 1), point(1500, 0)], 2000);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("\"rate\""), "no rate section without a rate: {json}");
        let back: SimReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let rated = SimReport { rate: Some(RateReport::from_arrivals(2.0, &[0, 500_000], 4, 1)), ..r };
        let back: SimReport = serde_json::from_str(&serde_json::to_string(&rated).unwrap()).unwrap();
        assert_eq!(back, rated);
    }

    #[test]
    fn calls_survive_json_and_a_report_without_them_still_reads() {
        let mut r = report(vec![point(1000, 1), point(1500, 0)], 2000);
        let plain = serde_json::to_string(&r).unwrap();
        assert!(!plain.contains("\"calls\""), "{plain}");
        r.upload.calls = vec![CallSpan {
            request_id: "r1".into(),
            recipients: 3,
            start_ms: unix_ms(at(1000)),
            end_ms: Some(unix_ms(at(1500))),
        }];
        let back: SimReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let old: SimReport = serde_json::from_str(&plain).unwrap();
        assert!(old.upload.calls.is_empty());
    }

    /// `n` arrivals `gap_us` apart from `from_us`.
    fn evenly(from_us: i64, n: i64, gap_us: i64) -> Vec<i64> {
        (0..n).map(|i| from_us + i * gap_us).collect()
    }

    #[test]
    fn calls_paced_at_the_rate_fill_every_window_and_never_go_above_it() {
        // 20 a second, 50 ms apart, for 10 s: each window ending at a call holds it and the 19
        // before it (the one 1 s earlier is out).
        let r = RateReport::from_arrivals(20.0, &evenly(0, 200, 50_000), 200, 0);
        assert_eq!(r.accepted_calls, 200);
        assert_eq!(r.max_calls_in_any_1s_window, 20);
        assert_eq!(r.windows_above_rate, 0);
        assert_eq!(r.attempts_above_rate_share, 0.0);
        assert!((r.span_seconds - 9.95).abs() < 1e-9);
        assert!((r.utilisation - 200.0 / (20.0 * 9.95)).abs() < 1e-9);
    }

    #[test]
    fn a_burst_above_the_rate_counts_each_call_beyond_the_limit() {
        // 5 calls within 4 ms at a limit of 3: the 4th and 5th windows hold 4 and 5 calls.
        // 1 s after the first call it leaves the window: 2.5 s later the window holds 1.
        let mut arrivals = evenly(0, 5, 1_000);
        arrivals.push(2_500_000);
        let r = RateReport::from_arrivals(3.0, &arrivals, 10, 4);
        assert_eq!(r.max_calls_in_any_1s_window, 5);
        assert_eq!(r.windows_above_rate, 2);
        assert!((r.attempts_above_rate_share - 0.4).abs() < 1e-12);
        assert!((r.utilisation - 6.0 / (3.0 * 2.5)).abs() < 1e-9);
    }

    #[test]
    fn a_window_holds_calls_less_than_one_second_old() {
        // Calls exactly 1 s apart never share a window; 999,999 µs apart they do.
        let apart = RateReport::from_arrivals(1.0, &evenly(0, 4, RATE_WINDOW_US), 4, 0);
        assert_eq!((apart.max_calls_in_any_1s_window, apart.windows_above_rate), (1, 0));
        assert!((apart.utilisation - 4.0 / 3.0).abs() < 1e-9);
        let close = RateReport::from_arrivals(1.0, &evenly(0, 4, RATE_WINDOW_US - 1), 4, 0);
        assert_eq!((close.max_calls_in_any_1s_window, close.windows_above_rate), (2, 3));
    }

    #[test]
    fn a_fractional_limit_allows_its_floor() {
        let r = RateReport::from_arrivals(2.5, &[0, 1, 2], 3, 0);
        assert_eq!((r.max_calls_in_any_1s_window, r.windows_above_rate), (3, 1));
    }

    #[test]
    fn no_calls_or_one_give_zero_figures() {
        let none = RateReport::from_arrivals(20.0, &[], 0, 0);
        assert_eq!(none, RateReport { limit: 20.0, ..RateReport::default() });
        let one = RateReport::from_arrivals(20.0, &[42], 2, 1);
        assert_eq!((one.max_calls_in_any_1s_window, one.utilisation, one.span_seconds), (1, 0.0, 0.0));
        assert_eq!(one.attempts_above_rate_share, 0.5);
    }
}
