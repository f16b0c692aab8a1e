//! `realtime-flood`: realtime events published open-loop at a rate stepped up until the pipeline
//! no longer keeps up.
//!
//! Open loop: each event's publication is due at a fixed moment of its step's schedule and is
//! spawned then, never awaited by the loop, so a pipeline that absorbs events slowly does not
//! slow the arrivals down (a closed-loop generator would measure its own waiting instead). Each
//! event's latency runs from the moment it was due to the ESP accepting its send, so a
//! publication that itself lags counts against the pipeline too.
//!
//! Events have 1 to 3 recipients; one in [`FloodPlan::fanout_every`] fans out to 10,000. A step
//! holds its rate for [`FloodPlan::step`] (60 s in the bench); it is sustained when every event
//! due in it was delivered and their p99 is at most 1 s. The steps stop at the first one whose
//! p99 is already over 1 s when it ends (counting events not delivered yet by how long they have
//! waited so far), and the events published are then left to drain. Between two steps the
//! events of the first are left to drain too, so that each rate is judged on its own arrivals.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::{Instant, MissedTickBehavior};

use crate::report::Submitted;
use crate::scenario::{Scenario, template};
use crate::stack::LocalStack;
use crate::targets::{Cmp, FLOOD_P99_TARGET_MS, FLOOD_RATE_TARGET, Target};

/// How the flood steps its rate up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloodPlan {
    /// Events per second of the first step; each next step multiplies it by `factor`.
    pub first_rate: f64,
    pub factor: f64,
    /// The most steps taken.
    pub steps: u32,
    /// How long each rate is held.
    pub step: Duration,
    /// One event in this many fans out to `fanout_recipients`.
    pub fanout_every: u32,
    pub fanout_recipients: u32,
    /// How long events may take to drain after each step.
    pub drain: Duration,
}

impl FloodPlan {
    pub fn rate(&self, step: u32) -> f64 {
        self.first_rate * self.factor.powi(step as i32)
    }
}

/// One step's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FloodStep {
    /// Events per second due.
    pub rate: f64,
    pub seconds: f64,
    /// Events due in the step, those whose publication failed, and those delivered.
    pub due: u64,
    pub publish_errors: u64,
    pub delivered: u64,
    /// Due to the ESP accepting the send, over the events delivered.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The same over the events of 1 to 3 recipients only, and over the fan-outs.
    pub small_p99_ms: f64,
    pub fanout_p99_ms: Option<f64>,
    /// Every event due was delivered, with a p99 of at most 1 s.
    pub sustained: bool,
}

/// The flood's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FloodReport {
    pub steps: Vec<FloodStep>,
    /// The highest step rate sustained (0 when none was).
    pub highest_sustained_rate: f64,
    pub step_seconds: f64,
    /// Service CPU milliseconds per event (the four services over the whole run ÷ events due).
    pub cpu_ms_per_event: f64,
}

impl FloodReport {
    pub fn targets(&self) -> Vec<Target> {
        let sustained = self.steps.iter().filter(|s| s.sustained).max_by(|a, b| a.rate.total_cmp(&b.rate));
        vec![
            Target::at_least(
                "realtime_flood.highest_sustained_rate",
                self.highest_sustained_rate,
                FLOOD_RATE_TARGET,
            ),
            Target::new(
                "realtime_flood.p99_ms (at the highest sustained rate)",
                sustained.map(|s| s.p99_ms),
                Cmp::AtMost,
                FLOOD_P99_TARGET_MS,
            ),
            Target::at_least("realtime_flood.step_seconds", self.step_seconds, 60.0),
        ]
    }
}

/// One event: when it was due, its step, its size, and whether its publication went through.
#[derive(Debug, Clone)]
struct Event {
    id: String,
    recipients: u64,
    due: DateTime<Utc>,
    step: u32,
    published: bool,
}

/// The percentile (nearest rank) of sorted values, 0 for none.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// A step's figures from its events and when each was first sent (`None`: not delivered).
/// Events not delivered count in the p99 as waiting until `now`: a lower bound on their latency.
fn judge(
    rate: f64,
    seconds: f64,
    events: &[(&Event, Option<DateTime<Utc>>)],
    now: DateTime<Utc>,
    fanout_at: u64,
) -> FloodStep {
    let mut all = Vec::new();
    let (mut small, mut fanout) = (Vec::new(), Vec::new());
    let mut delivered = 0;
    for (event, sent) in events {
        let ms = (sent.unwrap_or(now) - event.due).as_seconds_f64() * 1000.0;
        delivered += u64::from(sent.is_some());
        all.push(ms);
        if event.recipients >= fanout_at { fanout.push(ms) } else { small.push(ms) }
    }
    for v in [&mut all, &mut small, &mut fanout] {
        v.sort_by(f64::total_cmp);
    }
    let due = events.len() as u64;
    let p99 = percentile(&all, 99.0);
    FloodStep {
        rate,
        seconds,
        due,
        publish_errors: events.iter().filter(|(e, _)| !e.published).count() as u64,
        delivered,
        p50_ms: percentile(&all, 50.0),
        p99_ms: p99,
        small_p99_ms: percentile(&small, 99.0),
        fanout_p99_ms: (!fanout.is_empty()).then(|| percentile(&fanout, 99.0)),
        sustained: due > 0 && delivered == due && p99 <= FLOOD_P99_TARGET_MS,
    }
}

/// Waits until every event published so far has reached the ESP, for at most `most`.
async fn drain(stack: &LocalStack, events: &[Event], most: Duration) {
    let until = Instant::now() + most;
    loop {
        let sim = stack.esp.counts();
        let pending = events.iter().filter(|e| e.published && !sim.requests.contains_key(&e.id)).count();
        if pending == 0 || Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn body(id: &str, n: u64, recipients: u64, rng: &mut StdRng) -> Value {
    let list: Vec<Value> = (0..recipients)
        .map(|k| json!({ "email": format!("flood{n}-{k}@example.com"), "params": { "name": format!("Fan {k}"), "coupon": "NOW" } }))
        .collect();
    json!({
        "id": id, "class": "realtime", "priority": rng.random_range(1..=9), "template": template(),
        "audience": { "inline": list }, "labels": { "event": "flood" },
    })
}

/// Publishes the flood, waits for it to drain, and returns what was published and the figures.
pub async fn drive(stack: &LocalStack, scenario: &Scenario, plan: FloodPlan) -> anyhow::Result<Submitted> {
    let mut rng = StdRng::seed_from_u64(scenario.seed);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, bool)>();
    let mut events: Vec<Event> = Vec::new();
    let mut steps = Vec::new();
    let started = (Instant::now(), Utc::now());
    let utc_of = |at: Instant| started.1 + chrono::Duration::from_std(at - started.0).unwrap_or_default();
    for step in 0..plan.steps {
        let rate = plan.rate(step);
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let step_start = Instant::now();
        let step_end = step_start + plan.step;
        loop {
            let due = ticker.tick().await;
            if due >= step_end {
                break;
            }
            let n = events.len() as u64;
            let recipients =
                if n % u64::from(plan.fanout_every.max(1)) == u64::from(plan.fanout_every.max(1)) - 1 {
                    u64::from(plan.fanout_recipients)
                } else {
                    rng.random_range(1..=3)
                };
            let id = format!("flood-{n}-{}", scenario.seed);
            let message = body(&id, n, recipients, &mut rng);
            events.push(Event { id, recipients, due: utc_of(due), step, published: true });
            let (topic, done, index) = (stack.requests_topic.clone(), done_tx.clone(), events.len() - 1);
            tokio::spawn(async move {
                let ok = topic.publish(&message, &[]).await.is_ok();
                let _ = done.send((index, ok));
            });
        }
        steps.push((rate, step_start.elapsed().as_secs_f64()));
        // Judge the step as it stands: if its p99 is over the bound already, stop stepping up.
        let sim = stack.esp.counts();
        let now = Utc::now();
        let of_step: Vec<_> = events
            .iter()
            .filter(|e| e.step == step)
            .map(|e| (e, sim.requests.get(&e.id).map(|r| r.first_send_at)))
            .collect();
        let judged = judge(rate, plan.step.as_secs_f64(), &of_step, now, u64::from(plan.fanout_recipients));
        tracing::warn!(
            rate,
            due = judged.due,
            delivered = judged.delivered,
            p99_ms = judged.p99_ms,
            "Flood step ended."
        );
        if judged.p99_ms > FLOOD_P99_TARGET_MS {
            break;
        }
        // The next rate starts once this one's events are all delivered (or the drain's time is
        // up), so that each step is judged on its own arrivals, not on the backlog of the last.
        while let Ok((index, ok)) = done_rx.try_recv() {
            events[index].published = ok;
        }
        drain(stack, &events, plan.drain).await;
    }
    drop(done_tx);
    // Every publication has ended once every sender is gone.
    while let Some((index, ok)) = done_rx.recv().await {
        events[index].published = ok;
    }
    drain(stack, &events, plan.drain).await;
    // Requests whose send was accepted are then closed by the completion job: wait for that a
    // little, so that the report reads final states.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let sim = stack.esp.counts();
    let now = Utc::now();
    let sent: HashMap<&str, DateTime<Utc>> =
        events.iter().filter_map(|e| Some((e.id.as_str(), sim.requests.get(&e.id)?.first_send_at))).collect();
    let mut report = FloodReport { step_seconds: plan.step.as_secs_f64(), ..FloodReport::default() };
    for (step, (rate, seconds)) in steps.into_iter().enumerate() {
        let of_step: Vec<_> = events
            .iter()
            .filter(|e| e.step == step as u32)
            .map(|e| (e, sent.get(e.id.as_str()).copied()))
            .collect();
        report.steps.push(judge(rate, seconds, &of_step, now, u64::from(plan.fanout_recipients)));
    }
    report.highest_sustained_rate =
        report.steps.iter().filter(|s| s.sustained).map(|s| s.rate).fold(0.0, f64::max);
    Ok(Submitted {
        realtime: events.into_iter().filter(|e| e.published).map(|e| (e.id, e.recipients, e.due)).collect(),
        flood: Some(report),
        ..Submitted::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64, recipients: u64, due_ms: i64) -> Event {
        Event {
            id: format!("e{n}"),
            recipients,
            due: DateTime::from_timestamp_millis(1_700_000_000_000 + due_ms).unwrap(),
            step: 0,
            published: true,
        }
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    #[test]
    fn a_step_is_sustained_when_every_event_came_through_within_the_bound() {
        let events: Vec<Event> = (0..100).map(|n| event(n, 2, n as i64 * 10)).collect();
        let sent: Vec<_> =
            events.iter().map(|e| (e, Some(e.due + chrono::Duration::milliseconds(300)))).collect();
        let step = judge(100.0, 1.0, &sent, at(5_000), 10_000);
        assert_eq!((step.due, step.delivered, step.publish_errors), (100, 100, 0));
        assert_eq!((step.p50_ms, step.p99_ms), (300.0, 300.0));
        assert!(step.sustained);
        assert_eq!(step.fanout_p99_ms, None);
    }

    #[test]
    fn an_event_not_delivered_counts_as_waiting_until_now_and_breaks_the_step() {
        let events: Vec<Event> = (0..100).map(|n| event(n, 1, 0)).collect();
        let mut sent: Vec<_> = events.iter().map(|e| (e, Some(at(200)))).collect();
        sent[7].1 = None;
        sent[8].1 = None;
        let step = judge(100.0, 1.0, &sent, at(4_000), 10_000);
        assert_eq!(step.delivered, 98);
        assert_eq!(step.p99_ms, 4_000.0, "two of 100 still waiting after 4 s: the p99 is theirs");
        assert!(!step.sustained);
    }

    #[test]
    fn fan_outs_are_reported_apart_and_count_in_the_p99() {
        let mut events: Vec<Event> = (0..199).map(|n| event(n, 3, 0)).collect();
        events.push(event(199, 10_000, 0));
        let sent: Vec<_> =
            events.iter().map(|e| (e, Some(at(if e.recipients == 10_000 { 1_900 } else { 150 })))).collect();
        let step = judge(200.0, 1.0, &sent, at(3_000), 10_000);
        assert_eq!(step.fanout_p99_ms, Some(1_900.0));
        assert_eq!(step.small_p99_ms, 150.0);
        assert_eq!(step.p99_ms, 150.0, "one fan-out in 200 is above the 99th percentile");
        assert!(step.sustained);
    }

    #[test]
    fn the_rate_steps_up_by_the_factor() {
        let plan = FloodPlan {
            first_rate: 25.0,
            factor: 2.0,
            steps: 4,
            step: Duration::from_secs(60),
            fanout_every: 200,
            fanout_recipients: 10_000,
            drain: Duration::from_secs(60),
        };
        assert_eq!((0..4).map(|s| plan.rate(s)).collect::<Vec<_>>(), [25.0, 50.0, 100.0, 200.0]);
    }

    #[test]
    fn the_flood_is_held_to_a_thousand_events_a_second_for_a_minute() {
        let report = FloodReport {
            steps: vec![
                FloodStep { rate: 50.0, p99_ms: 400.0, sustained: true, ..FloodStep::default() },
                FloodStep { rate: 100.0, p99_ms: 3_000.0, sustained: false, ..FloodStep::default() },
            ],
            highest_sustained_rate: 50.0,
            step_seconds: 60.0,
            cpu_ms_per_event: 2.0,
        };
        let targets = report.targets();
        assert_eq!(targets.iter().map(|t| t.met).collect::<Vec<_>>(), [false, true, true]);
        assert_eq!(targets[1].figure, Some(400.0), "the p99 of the highest step sustained");
    }
}
