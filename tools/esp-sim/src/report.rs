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
}

/// What one API (upload or send) did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiReport {
    /// Calls allowed in progress at once.
    pub limit: u32,
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
        let back: SimReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
