//! The demo's report. Delivery figures come from the ESP simulator's ledger; request states come
//! from the trigger's API, as a caller would read them.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use haishin_esp_sim::RateReport;
use haishin_esp_sim::config::Api;
use haishin_esp_sim::report::{SimReport, unix_ms};
use serde::Serialize;

use crate::mail_record::MailServerReport;
use crate::picture::{Activity, Class, Span};
use crate::scenario::Scenario;
use crate::stack::{LocalStack, MailProvider};
use crate::targets::Target;

/// What the scenario published: (request id, audience rows, arrival time), and samples of each
/// campaign's delivered count over time.
#[derive(Debug, Default, Clone)]
pub struct Submitted {
    pub batch: Vec<(String, u64, DateTime<Utc>)>,
    pub realtime: Vec<(String, u64, DateTime<Utc>)>,
    pub samples: Vec<(DateTime<Utc>, Vec<u64>)>,
    /// The figures of an open-loop flood, when the scenario was one.
    pub flood: Option<crate::flood::FloodReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub requests: Requests,
    pub recipients: Recipients,
    pub esp: Esp,
    pub realtime_latency_ms: Latency,
    pub batch_makespan_s: f64,
    /// From the first request's arrival, batch or realtime, to the last send accepted for any
    /// of them: the time to get everything that arrived delivered.
    pub makespan_s: f64,
    /// From the first batch's publication to the first upload at the ESP.
    pub first_upload_s: f64,
    /// The longest a batch request took from its arrival to its whole audience being in chunks
    /// (its chunks are dispatched as they are stored, long before).
    pub prepare_s: f64,
    /// From the last upload's end to the batch's last send.
    pub after_last_upload_s: f64,
    pub wall_s: f64,
    /// CPU seconds of the four services' processes over the run (process mode only).
    pub service_cpu_s: f64,
    /// `service_cpu_s` per million recipients delivered.
    pub cpu_s_per_million: f64,
    /// The most each service's processes had resident over the run, in megabytes (process mode
    /// only; see `memory`).
    pub peak_rss_mb: BTreeMap<String, f64>,
    /// With two or more campaigns: the largest relative gap between what each delivered since the
    /// last of them started, while all of them were running (see `fairness_gap`).
    pub fairness_max_gap: Option<f64>,
    /// What chaos did, when the scenario ran with faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos: Option<crate::chaos::ChaosLog>,
    /// On SMTP or SES: what the mail server recorded, where `recipients.delivered` and
    /// `recipients.duplicates` come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mail_server: Option<MailServerReport>,
    /// Requests by final state, as `GET /v1/requests/{id}` shows them.
    pub states: BTreeMap<String, String>,
    /// Whether every finished request's counts add up.
    pub invariants: Invariants,
    /// In `mixed`: the same arrivals run by the scheduled workflow Haishin replaces, and the
    /// ratio of the makespans.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_baseline: Option<crate::mixed::WorkflowBaseline>,
    /// In `realtime-flood`: each rate step's figures and the highest rate sustained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realtime_flood: Option<crate::flood::FloodReport>,
    /// The targets that apply to the scenario, each beside its figure (see [`crate::targets`]).
    pub targets: Vec<Target>,
    /// What the collector received of the services' traces (see [`crate::collector`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traces: Option<crate::collector::TracesReport>,
    /// What the picture draws (see [`crate::picture`]); not in the JSON.
    #[serde(skip)]
    pub activity: Activity,
}

impl Report {
    /// What a person reads at the end of a run: requests, recipients, the ESP, realtime latency,
    /// and whether the counts add up.
    pub fn summary(&self) -> String {
        let q = &self.requests;
        let r = &self.recipients;
        let e = &self.esp;
        let mut lines = vec![
            format!(
                "Requests:   {}/{} completed ({} failed, {} expired, {} rejected)",
                q.completed, q.submitted, q.failed, q.expired, q.rejected
            ),
            format!(
                "Recipients: {} delivered, {} skipped, {} duplicates, {} lost, {} unknown",
                r.delivered, r.skipped, r.duplicates, r.lost, r.unknown
            ),
            format!(
                "ESP:        upload utilisation {:.3} (peak {}/{}), {} calls refused for the limit",
                e.upload_utilization, e.upload_peak_concurrency, e.upload_limit, e.over_limit_attempts
            ),
        ];
        if let Some(mail) = &self.mail_server {
            lines[2] = format!("Server:     {}", mail.summary());
            if self.batch_makespan_s > 0.0 {
                lines.push(format!(
                    "Throughput: {:.0} messages/s over the batch's {:.1} s",
                    r.delivered as f64 / self.batch_makespan_s,
                    self.batch_makespan_s
                ));
            }
        }
        if let Some(rate) = &e.rate {
            lines.push(format!(
                "ESP rate:   {}/s: {} calls refused for the rate ({:.1}% of attempts), at most {} calls in any 1 s, utilisation {:.3}",
                rate.limit,
                rate.over_rate_attempts,
                rate.attempts_above_rate_share * 100.0,
                rate.max_calls_in_any_1s_window,
                rate.utilisation
            ));
        }
        let realtime = if self.realtime_latency_ms.max > 0.0 {
            format!(
                "Realtime:   p50 {:.0} ms, p99 {:.0} ms (publish to the provider accepting the message)",
                self.realtime_latency_ms.p50, self.realtime_latency_ms.p99
            )
        } else {
            "Realtime:   not measured (no realtime event, or a server record without times)".to_owned()
        };
        lines.push(realtime);
        if !self.peak_rss_mb.is_empty() {
            let peaks: Vec<String> =
                self.peak_rss_mb.iter().map(|(service, mb)| format!("{service} {mb:.0}")).collect();
            lines.push(format!(
                "Memory:     peak MB {}; longest batch prepare {:.1} s",
                peaks.join(", "),
                self.prepare_s
            ));
        }
        if let Some(traces) = &self.traces {
            lines.push(traces.summary());
        }
        lines.push(self.invariants.summary());
        if !self.targets.is_empty() {
            lines.push(format!("Targets:    {}", crate::targets::tally(&self.targets)));
            lines.extend(self.targets.iter().map(|t| format!("  {}", t.line())));
        }
        lines.join("\n")
    }
}

/// The counts every finished request's status must add up to:
/// `rows = recipients + Σ skipped`, and
/// `recipients = sent + failed + expired + cancelled + unknown + suppressed`
/// (the recipients of its chunks, all in final states); and, at an ESP with a rate, that no call
/// was refused for it (Haishin paces its calls to the rate).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Invariants {
    pub requests_checked: u64,
    /// One line per request whose counts do not add up.
    pub violations: Vec<String>,
    /// At an ESP with a rate: the calls it refused for the rate (the invariant: 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over_rate_attempts: Option<u64>,
    /// On SMTP or SES: every recipient got one well-formed message, rendered, with the RFC 8058
    /// headers (from the server's record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mail_server_clean: Option<bool>,
    pub hold: bool,
}

impl Invariants {
    /// One line for a person: the invariants held, or where they did not.
    pub fn summary(&self) -> String {
        let mut counts = self.counts_summary();
        match self.mail_server_clean {
            Some(true) => {
                counts.push_str("; the mail server holds one well-formed, rendered message per recipient")
            }
            Some(false) => {
                counts.push_str("; the mail server's record BROKEN: see mail_server in the report")
            }
            None => {}
        }
        match self.over_rate_attempts {
            None => counts,
            Some(0) => format!("{counts}; the ESP's rate held: no call refused for it"),
            Some(n) => format!(
                "{counts}; the ESP's rate BROKEN: {n} calls refused for it (Haishin's pacing should keep under it)"
            ),
        }
    }

    /// Whether the counts add up and, at an ESP with a rate, no call was refused for it.
    pub fn held(&self) -> bool {
        self.violations.is_empty()
            && self.over_rate_attempts.unwrap_or(0) == 0
            && self.mail_server_clean != Some(false)
    }

    fn counts_summary(&self) -> String {
        if self.violations.is_empty() {
            format!(
                "invariants: rows = recipients + skipped, recipients = sent + failed + expired + cancelled + unknown + suppressed: hold for all {} requests",
                self.requests_checked
            )
        } else {
            format!(
                "invariants BROKEN for {} requests: {}",
                self.violations.len(),
                self.violations.join("; ")
            )
        }
    }

    /// Checks one request's status as the API shows it.
    pub fn check(&mut self, id: &str, status: &serde_json::Value) {
        let audience = &status["audience"];
        if audience.is_null() {
            return;
        }
        self.requests_checked += 1;
        let number = |v: &serde_json::Value| v.as_i64().unwrap_or(0);
        let skipped: i64 = audience["skipped"].as_object().map_or(0, |m| m.values().map(number).sum());
        let (rows, recipients) = (number(&audience["rows"]), number(&audience["recipients"]));
        if rows != recipients + skipped {
            self.violations.push(format!("{id}: rows {rows} != recipients {recipients} + skipped {skipped}"));
        }
        let by_state = status["recipients"].as_object().cloned().unwrap_or_default();
        let ended: i64 = ["completed", "sent", "failed", "expired", "cancelled", "unknown"]
            .iter()
            .map(|state| by_state.get(*state).map_or(0, number))
            .sum();
        let all: i64 = by_state.values().map(number).sum();
        if ended != recipients || all != recipients {
            self.violations
                .push(format!("{id}: recipients {recipients} != {ended} in final chunks ({all} in all)"));
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Requests {
    pub submitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub expired: u64,
    pub rejected: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Recipients {
    /// Rows in all audiences, valid or not.
    pub audience: u64,
    /// Distinct (request, recipient) pairs the ESP sent to.
    pub delivered: u64,
    /// Sends beyond the first to a (request, recipient) pair.
    pub duplicates: u64,
    /// Over completed requests: audience − skipped − delivered.
    pub lost: i64,
    /// Rows skipped by the trigger (bad address, repeated address, …).
    pub skipped: u64,
    /// Recipients whose outcome could not be established (chunks ended `unknown`).
    pub unknown: u64,
    pub skipped_by_reason: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Esp {
    pub upload_limit: u32,
    pub send_limit: u32,
    pub upload_peak_concurrency: u32,
    pub send_peak_concurrency: u32,
    pub over_limit_attempts: u64,
    pub upload_utilization: f64,
    pub send_utilization: f64,
    pub upload_calls: u64,
    pub send_calls: u64,
    /// The least batch makespan any schedule could reach at this upload limit: the batches'
    /// uploads at the configured chunk size, plus the uploads of the realtime requests sent while
    /// the batches ran (realtime goes first, so their slot time is not the batches' to have),
    /// divided by the limit.
    pub upload_lower_bound_s: f64,
    /// Of the slot time in the lower bound, what the realtime uploads take (seconds).
    pub realtime_upload_s: f64,
    /// At an ESP with a rate, the least time its accepted calls take at it:
    /// `accepted_calls / floor(limit)` seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_lower_bound_s: Option<f64>,
    /// At an ESP with a rate (uploads and sends together): the calls it refused for the rate,
    /// the most calls in any 1-s window, and the rate's utilisation, over the whole run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateReport>,
}

impl Esp {
    /// The least batch makespan any schedule could reach: the upload bound, or at an ESP with
    /// a rate the rate bound, whichever is longer.
    pub fn lower_bound_s(&self) -> f64 {
        self.upload_lower_bound_s.max(self.rate_lower_bound_s.unwrap_or(0.0))
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// Realtime requests measured.
    pub samples: u64,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

impl Report {
    pub fn set_service_cpu(&mut self, seconds: f64) {
        self.service_cpu_s = seconds;
        let millions = self.recipients.delivered as f64 / 1e6;
        self.cpu_s_per_million = if millions > 0.0 { seconds / millions } else { 0.0 };
    }
}

/// Fairness among campaigns: the largest relative gap between what each delivered since all of
/// them were under way (each had a send accepted), sampled while all of them were running. Samples where either had
/// delivered less than a tenth of the smallest audience since then are too coarse to judge
/// (deliveries arrive a chunk at a time) and are left out.
fn fairness_gap(submitted: &Submitted) -> Option<f64> {
    let sizes: Vec<u64> = submitted.batch.iter().map(|b| b.1).collect();
    if sizes.len() < 2 {
        return None;
    }
    let floor = sizes.iter().min().copied().unwrap_or(0) / 10;
    // From the first moment every campaign has had a send accepted: before that, the earlier ones
    // were alone and their head start is not a question of fairness.
    let all_started = submitted
        .samples
        .iter()
        .filter(|(_, counts)| counts.len() == sizes.len() && counts.iter().all(|c| *c > 0));
    let mut base: Option<&Vec<u64>> = None;
    let mut worst: Option<f64> = None;
    for (_, counts) in all_started {
        let base = *base.get_or_insert(counts);
        let running = counts.iter().zip(&sizes).all(|(c, size)| c * 100 < size * 98);
        let progress: Vec<u64> = counts.iter().zip(base).map(|(c, b)| c - b).collect();
        if !running || progress.iter().any(|p| *p < floor) {
            continue;
        }
        let max = *progress.iter().max().unwrap_or(&0) as f64;
        let min = *progress.iter().min().unwrap_or(&0) as f64;
        let gap = (max - min) / max;
        worst = Some(worst.map_or(gap, |w: f64| w.max(gap)));
    }
    worst
}

pub async fn build(
    stack: &LocalStack,
    scenario: &Scenario,
    submitted: &Submitted,
    wall: Duration,
) -> anyhow::Result<Report> {
    let sim = stack.esp.report();
    let mail = match &scenario.mail_record {
        Some(record) => Some(record.read(scenario.seed).await?),
        None => None,
    };
    let message_based = scenario.provider != MailProvider::Simulator;
    let api = reqwest::Client::new();
    let mut requests = Requests::default();
    let mut recipients = Recipients::default();
    let mut states = BTreeMap::new();
    let mut invariants = Invariants {
        over_rate_attempts: sim.rate.as_ref().map(|rate| rate.over_rate_attempts),
        mail_server_clean: mail.as_ref().map(MailServerReport::clean),
        ..Invariants::default()
    };
    let mut upload_service = Duration::ZERO;
    let mut closed_at: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    let mut realtime_uploads = Vec::new();

    let realtime_ids: std::collections::HashSet<&str> =
        submitted.realtime.iter().map(|(id, _, _)| id.as_str()).collect();
    for (id, rows, _) in submitted.batch.iter().chain(&submitted.realtime) {
        let status: serde_json::Value = api
            .get(format!("{}/v1/requests/{id}", stack.endpoints.trigger))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let state = status["state"].as_str().unwrap_or("unknown").to_owned();
        if let Some(finished) = status["finished_at"].as_str().and_then(|t| t.parse::<DateTime<Utc>>().ok()) {
            closed_at.insert(id.clone(), finished);
        }
        invariants.check(id, &status);
        requests.submitted += 1;
        match state.as_str() {
            "completed" => requests.completed += 1,
            "failed" => requests.failed += 1,
            "expired" => requests.expired += 1,
            "rejected" => requests.rejected += 1,
            _ => {}
        }
        let skipped: BTreeMap<String, u64> =
            serde_json::from_value(status["audience"]["skipped"].clone()).unwrap_or_default();
        let skipped_total: u64 = skipped.values().sum();
        for (reason, n) in skipped {
            *recipients.skipped_by_reason.entry(reason).or_default() += n;
        }
        let delivered = match &mail {
            Some(mail) => mail.per_request.get(id).copied().unwrap_or(0),
            None => sim.requests.get(id).map_or(0, |r| r.counts.unique),
        };
        let unknown =
            status["recipients"]["unknown"].as_u64().unwrap_or(0) + status["unknown"].as_u64().unwrap_or(0);
        recipients.unknown += unknown;
        recipients.audience += rows;
        recipients.skipped += skipped_total;
        recipients.delivered += delivered;
        // Recipients suppressed just before the send are accounted for, as are a message-based
        // provider's refusals and unknown messages; a list-based ESP's failures are among the
        // recipients it was sent to.
        let suppressed = status["suppressed"].as_u64().unwrap_or(0);
        let accounted =
            suppressed + if message_based { status["failed"].as_u64().unwrap_or(0) + unknown } else { 0 };
        if state == "completed" && (mail.is_some() || !message_based) {
            recipients.lost += *rows as i64 - skipped_total as i64 - delivered as i64 - accounted as i64;
        }
        let kept = status["audience"]["recipients"].as_u64().unwrap_or(0);
        let size = scenario.chunk_size.max(1) as u64;
        let mut service = scenario.upload_time(size) * (kept / size) as u32;
        if !kept.is_multiple_of(size) {
            service += scenario.upload_time(kept % size);
        }
        if realtime_ids.contains(id.as_str()) {
            if let Some(sent) = sim.requests.get(id) {
                realtime_uploads.push((sent.first_send_at, service));
            }
        } else {
            upload_service += service;
        }
        states.insert(id.clone(), state);
    }
    recipients.duplicates = mail.as_ref().map_or(sim.deliveries.duplicates, |m| m.duplicates);

    let last_send = |id: &String| match &mail {
        // A server that keeps no times (moto): until the request closed, a little later.
        Some(mail) => mail.last_at.get(id).or(closed_at.get(id)).copied(),
        None => sim.requests.get(id).map(|r| r.last_send_at),
    };
    let batch_start = submitted.batch.iter().map(|b| b.2).min();
    let batch_end = submitted.batch.iter().filter_map(|(id, _, _)| last_send(id)).max();
    let everything = || submitted.batch.iter().chain(&submitted.realtime);
    let makespan_s =
        match (everything().map(|r| r.2).min(), everything().filter_map(|r| last_send(&r.0)).max()) {
            (Some(from), Some(to)) if to > from => (to - from).as_seconds_f64(),
            _ => 0.0,
        };
    let (makespan, upload_utilization, send_utilization) = match (batch_start, batch_end) {
        (Some(from), Some(to)) if to > from => (
            (to - from).as_seconds_f64(),
            sim.utilization(Api::Upload, from, to),
            sim.utilization(Api::Send, from, to),
        ),
        _ => (0.0, 0.0, 0.0),
    };
    let realtime_upload: Duration = match (batch_start, batch_end) {
        (Some(from), Some(to)) => {
            realtime_uploads.iter().filter(|(at, _)| *at >= from && *at <= to).map(|(_, s)| *s).sum()
        }
        _ => Duration::ZERO,
    };
    // Where the makespan goes beyond the uploads themselves: before the first upload started,
    // and after the last one ended (the final sends).
    let (first_upload_s, after_last_upload_s) = match (batch_start, batch_end) {
        (Some(from), Some(to)) => {
            let (from_ms, to_ms) =
                (haishin_esp_sim::report::unix_ms(from), haishin_esp_sim::report::unix_ms(to));
            let points = &sim.upload.timeline;
            let first = points.iter().find(|p| p.at_ms >= from_ms && p.in_progress > 0).map(|p| p.at_ms);
            let last = points.iter().rev().find(|p| p.at_ms <= to_ms && p.in_progress == 0).map(|p| p.at_ms);
            (first.map_or(0.0, |f| (f - from_ms) / 1000.0), last.map_or(0.0, |l| (to_ms - l) / 1000.0))
        }
        _ => (0.0, 0.0),
    };

    let mut latencies: Vec<f64> = submitted
        .realtime
        .iter()
        .filter_map(|(id, _, at)| {
            let first = match &mail {
                Some(mail) => *mail.first_at.get(id)?,
                None => sim.requests.get(id)?.first_send_at,
            };
            Some((first - *at).as_seconds_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let activity = activity(&sim, submitted, latencies.clone());

    Ok(Report {
        scenario: scenario.name.clone(),
        requests,
        recipients,
        esp: Esp {
            upload_limit: sim.upload.limit,
            send_limit: sim.send.limit,
            upload_peak_concurrency: sim.upload.peak_concurrency,
            send_peak_concurrency: sim.send.peak_concurrency,
            over_limit_attempts: sim.upload.over_limit_attempts + sim.send.over_limit_attempts,
            upload_utilization,
            send_utilization,
            upload_calls: sim.upload.calls_accepted,
            send_calls: sim.send.calls_accepted,
            upload_lower_bound_s: (upload_service + realtime_upload).as_secs_f64()
                / f64::from(sim.upload.limit.max(1)),
            realtime_upload_s: realtime_upload.as_secs_f64(),
            rate_lower_bound_s: sim
                .rate
                .as_ref()
                .map(|rate| rate.accepted_calls as f64 / rate.limit.floor().max(1.0)),
            rate: sim.rate.clone(),
        },
        realtime_latency_ms: Latency {
            p50: percentile(&latencies, 50.0),
            p99: percentile(&latencies, 99.0),
            max: latencies.last().copied().unwrap_or(0.0),
            samples: latencies.len() as u64,
        },
        batch_makespan_s: makespan,
        makespan_s,
        first_upload_s,
        prepare_s: longest_prepare(stack).await?,
        after_last_upload_s,
        wall_s: wall.as_secs_f64(),
        service_cpu_s: 0.0,
        cpu_s_per_million: 0.0,
        peak_rss_mb: BTreeMap::new(),
        fairness_max_gap: fairness_gap(submitted),
        chaos: None,
        mail_server: mail,
        states,
        invariants: Invariants { hold: invariants.held(), ..invariants },
        workflow_baseline: None,
        realtime_flood: submitted.flood.clone(),
        targets: Vec::new(),
        traces: None,
        activity,
    })
}

/// The longest a batch request took to be prepared, in seconds.
async fn longest_prepare(stack: &LocalStack) -> anyhow::Result<f64> {
    let longest: Option<f64> = sqlx::query_scalar(
        "SELECT max(extract(epoch FROM prepared_at - received_at))::float8 FROM requests
         WHERE class = 'batch' AND prepared_at IS NOT NULL",
    )
    .fetch_one(stack.store.pool())
    .await?;
    Ok(longest.unwrap_or(0.0))
}

/// The ESP's calls by class over the run, for the picture: from the first arrival to the last
/// call's end (or the snapshot, for a call still in progress).
fn activity(sim: &SimReport, submitted: &Submitted, latencies: Vec<f64>) -> Activity {
    let realtime: std::collections::HashSet<&str> =
        submitted.realtime.iter().map(|(id, _, _)| id.as_str()).collect();
    let snapshot_ms = unix_ms(sim.generated_at);
    let spans = |calls: &[haishin_esp_sim::CallSpan]| -> Vec<Span> {
        calls
            .iter()
            .map(|c| Span {
                start_ms: c.start_ms,
                end_ms: c.end_ms.unwrap_or(snapshot_ms),
                class: if realtime.contains(c.request_id.as_str()) { Class::Realtime } else { Class::Batch },
            })
            .collect()
    };
    let (upload, send) = (spans(&sim.upload.calls), spans(&sim.send.calls));
    let first_arrival = submitted.batch.iter().chain(&submitted.realtime).map(|(_, _, at)| unix_ms(*at));
    let first_call = upload.iter().chain(&send).map(|s| s.start_ms);
    let start_ms = first_arrival.chain(first_call.clone()).reduce(f64::min).unwrap_or(snapshot_ms);
    let end_ms = upload.iter().chain(&send).map(|s| s.end_ms).reduce(f64::max).unwrap_or(start_ms);
    Activity {
        start_ms,
        end_ms,
        upload_limit: sim.upload.limit,
        send_limit: sim.send.limit,
        upload,
        send,
        realtime_latencies_ms: latencies,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report with a little of everything and no faults, for the tests of what reads reports.
    pub(crate) fn sample_report(name: &str) -> Report {
        Report {
            scenario: name.into(),
            requests: Requests { submitted: 2, completed: 2, ..Requests::default() },
            recipients: Recipients {
                audience: 200_000,
                delivered: 199_800,
                skipped: 200,
                ..Recipients::default()
            },
            esp: Esp {
                upload_limit: 8,
                send_limit: 8,
                upload_peak_concurrency: 7,
                send_peak_concurrency: 3,
                upload_utilization: 0.41,
                upload_lower_bound_s: 7.5,
                ..Esp::default()
            },
            realtime_latency_ms: Latency::default(),
            batch_makespan_s: 21.4,
            makespan_s: 22.0,
            first_upload_s: 0.3,
            prepare_s: 1.5,
            after_last_upload_s: 0.2,
            wall_s: 25.0,
            service_cpu_s: 3.0,
            cpu_s_per_million: 15.0,
            peak_rss_mb: Default::default(),
            fairness_max_gap: None,
            chaos: None,
            mail_server: None,
            states: Default::default(),
            invariants: Invariants { requests_checked: 2, hold: true, ..Invariants::default() },
            workflow_baseline: None,
            realtime_flood: None,
            targets: Vec::new(),
            traces: None,
            activity: Activity::default(),
        }
    }

    #[test]
    fn calls_refused_for_the_esp_rate_break_the_invariants() {
        let counts_only = Invariants { requests_checked: 2, ..Invariants::default() };
        assert!(counts_only.held());
        assert!(!counts_only.summary().contains("rate"));
        let held = Invariants { over_rate_attempts: Some(0), ..counts_only.clone() };
        assert!(held.held());
        assert!(held.summary().contains("rate held"), "{}", held.summary());
        let broken = Invariants { over_rate_attempts: Some(7), ..counts_only };
        assert!(!broken.held());
        assert!(broken.summary().contains("rate BROKEN: 7 calls"), "{}", broken.summary());
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
