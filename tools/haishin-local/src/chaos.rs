//! Faults injected while a scenario runs (`--chaos SPEC`): services killed with SIGKILL and
//! restarted, the stand-ins' delivery loops stalled, PostgreSQL restarted as after a crash, and
//! the ESP failing a share of its calls.
//!
//! SPEC is a comma-separated list:
//! - `kill-every=DUR`: every DUR, kill -9 one of the services (trigger, list-uploader, sender, or
//!   the completion job's running pass) or stall one of the delivery loops (Pub/Sub push, Cloud
//!   Tasks dispatch) for a second, picked at random;
//! - `pg-restart-every=DUR`: every DUR, restart PostgreSQL with an immediate shutdown;
//! - `esp-500=P`, `esp-429=P`, `esp-timeout-after-accept=P`, `esp-spike=P`: the share of ESP calls
//!   answered 500, answered 429, accepted but never answered, or ten times slower;
//! - `redeliver=P`: the share of acknowledged Pub/Sub pushes and completed Cloud Tasks tasks
//!   delivered once more, at a random later time (both services are at-least-once);
//! - `tasks-name-ttl=DUR`: how long a done task's name stays taken (Cloud Tasks: about an hour),
//!   so that a re-dispatch under a reused name is created again once it has expired;
//! - `esp-limit-drop=N@DUR`: DUR after the start, the simulator's real limit of both APIs drops
//!   to N calls at once, while the services stay configured for the limit at start (an ESP
//!   shared with another system). The log then says how many calls were refused for the limit
//!   and how busy the new limit was kept ([`LimitDropLog`]).
//!
//! Durations are written `500ms`, `5s`, `2m`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use haishin_esp_sim::{Api, ApiReport, FaultRates, Faults, SimReport};
use haishin_stand_ins::Redelivery;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::watch;

use crate::services::Service;
use crate::stack::{Instance, LocalStack};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChaosSpec {
    pub kill_every: Option<Duration>,
    pub pg_restart_every: Option<Duration>,
    pub esp: FaultRates,
    pub redeliver: Option<f64>,
    pub tasks_name_ttl: Option<Duration>,
    pub limit_drop: Option<LimitDrop>,
    pub text: String,
}

/// The ESP's real limit dropping mid-run (`esp-limit-drop=N@DUR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitDrop {
    /// Calls allowed in progress at once after the drop, per API.
    pub to: u32,
    /// When, from the start.
    pub at: Duration,
}

impl FromStr for LimitDrop {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (to, at) =
            text.split_once('@').ok_or_else(|| format!("esp-limit-drop: `{text}` is not N@DURATION"))?;
        let to: u32 = to.parse().map_err(|_| format!("esp-limit-drop: `{to}` is not a number of calls"))?;
        if to == 0 {
            return Err("esp-limit-drop: the limit must be at least 1".into());
        }
        Ok(Self { to, at: duration(at)? })
    }
}

impl FromStr for ChaosSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut spec = ChaosSpec { text: text.to_owned(), ..ChaosSpec::default() };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("`{part}` is not KEY=VALUE"))?;
            let share = || -> Result<f64, String> {
                let p: f64 = value.parse().map_err(|_| format!("{key}: `{value}` is not a number"))?;
                if (0.0..=1.0).contains(&p) {
                    Ok(p)
                } else {
                    Err(format!("{key}: {p} is not between 0 and 1"))
                }
            };
            match key {
                "kill-every" => spec.kill_every = Some(duration(value)?),
                "pg-restart-every" => spec.pg_restart_every = Some(duration(value)?),
                "esp-500" => spec.esp.error = share()?,
                "esp-429" => spec.esp.rate_limit = share()?,
                "esp-timeout-after-accept" => spec.esp.timeout_after_accept = share()?,
                "esp-spike" => spec.esp.latency_spike = share()?,
                "redeliver" => spec.redeliver = Some(share()?),
                "tasks-name-ttl" => spec.tasks_name_ttl = Some(duration(value)?),
                "esp-limit-drop" => spec.limit_drop = Some(value.parse()?),
                other => return Err(format!("unknown chaos setting `{other}`")),
            }
        }
        Ok(spec)
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    let (number, unit) =
        text.split_at(text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len()));
    let n: f64 = number.parse().map_err(|_| format!("`{text}` is not a duration"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}`")),
    };
    if seconds <= 0.0 {
        return Err(format!("`{text}` must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// What chaos did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChaosLog {
    pub spec: String,
    /// SIGKILLs (and restarts) per service, and stalls per delivery loop.
    pub kills: BTreeMap<String, u32>,
    pub pg_restarts: u32,
    /// Acknowledged work delivered again: Pub/Sub pushes and Cloud Tasks tasks.
    pub redelivered: BTreeMap<String, u64>,
    /// Faults the ESP injected, by kind, over both APIs.
    pub esp_injected: BTreeMap<String, u64>,
    /// The ESP's limit dropping mid-run, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_drop: Option<LimitDropLog>,
    /// Chaos actions that failed (a restart that did not come back, say).
    pub errors: Vec<String>,
}

/// What a drop of the ESP's limit cost: calls refused for the limit, and how busy the new limit
/// was kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LimitDropLog {
    pub from: u32,
    pub to: u32,
    /// Seconds from the start.
    pub at_s: f64,
    /// Calls the ESP refused for its limit, uploads and sends, over the whole run.
    pub over_limit_attempts: u64,
    /// Calls the ESP accepted, uploads and sends, over the whole run.
    pub accepted_calls: u64,
    /// Upload slots busy from the drop to the last upload's end, each moment counted up to the
    /// new limit, over the new limit times that span.
    pub upload_utilization_after_drop: f64,
}

impl LimitDropLog {
    /// The figures of a drop to `to` at `at_ms` (unix milliseconds), from the simulator's report.
    fn new(report: &SimReport, to: u32, at_ms: f64, at: Duration) -> Self {
        let apis = [&report.upload, &report.send];
        let end_ms = report.upload.calls.iter().filter_map(|c| c.end_ms).fold(at_ms, f64::max);
        Self {
            from: report.upload.limit,
            to,
            at_s: at.as_secs_f64(),
            over_limit_attempts: apis.iter().map(|a| a.over_limit_attempts).sum(),
            accepted_calls: apis.iter().map(|a| a.calls_accepted).sum(),
            upload_utilization_after_drop: capped_utilisation(&report.upload, to, at_ms, end_ms),
        }
    }
}

/// The share of `limit` slots busy between `from_ms` and `to_ms`, calls in progress beyond the
/// limit not counted.
fn capped_utilisation(api: &ApiReport, limit: u32, from_ms: f64, to_ms: f64) -> f64 {
    if to_ms <= from_ms || limit == 0 {
        return 0.0;
    }
    let mut busy_ms = 0.0;
    let mut in_progress = 0;
    let mut at = from_ms;
    for point in &api.timeline {
        if point.at_ms > at {
            let until = point.at_ms.min(to_ms);
            busy_ms += f64::from(in_progress.min(limit)) * (until - at).max(0.0);
            at = until;
        }
        if point.at_ms >= to_ms {
            break;
        }
        in_progress = point.in_progress;
    }
    busy_ms += f64::from(in_progress.min(limit)) * (to_ms - at).max(0.0);
    busy_ms / (f64::from(limit) * (to_ms - from_ms))
}

/// Turns the ESP's faults on and runs kills and restarts until `stop` turns true.
pub async fn run(
    stack: &LocalStack,
    spec: &ChaosSpec,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) -> ChaosLog {
    let mut log = ChaosLog { spec: spec.text.clone(), ..ChaosLog::default() };
    let faults = Faults { upload: spec.esp, send: spec.esp, ..stack.esp.faults() };
    if let Err(err) = stack.esp.set_faults(faults) {
        log.errors.push(format!("setting ESP faults: {err}"));
    }
    if let Some(share) = spec.redeliver {
        stack.stand_ins.pubsub.seed_redelivery(seed);
        stack.stand_ins.tasks.seed_redelivery(seed);
        if let Err(err) = stack.stand_ins.set_redelivery(Redelivery::with_probability(share)) {
            log.errors.push(format!("setting redelivery: {err}"));
        }
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC4A05);
    let far = Duration::from_secs(24 * 3600);
    let mut next_kill = tokio::time::Instant::now() + spec.kill_every.unwrap_or(far);
    let mut next_pg = tokio::time::Instant::now() + spec.pg_restart_every.unwrap_or(far);
    let mut drop_at =
        spec.limit_drop.map_or(tokio::time::Instant::now() + far, |d| tokio::time::Instant::now() + d.at);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            () = tokio::time::sleep_until(next_kill) => {
                next_kill += spec.kill_every.unwrap_or(far);
                let targets: Vec<String> = stack
                    .instances()
                    .await
                    .into_iter()
                    .map(|i| format!("{}-{}", i.service.name(), i.index))
                    .chain(["completion".to_owned(), "pubsub-push".to_owned(), "tasks-dispatch".to_owned()])
                    .collect();
                let target = targets[rng.random_range(0..targets.len())].clone();
                if let Err(err) = strike(stack, &target).await {
                    log.errors.push(format!("{target}: {err}"));
                }
                *log.kills.entry(target).or_default() += 1;
            }
            () = tokio::time::sleep_until(next_pg) => {
                next_pg += spec.pg_restart_every.unwrap_or(far);
                match stack.restart_postgres().await {
                    Ok(true) => log.pg_restarts += 1,
                    Ok(false) => {}
                    Err(err) => log.errors.push(format!("postgres: {err}")),
                }
            }
            () = tokio::time::sleep_until(drop_at) => {
                drop_at += far;
                let to = spec.limit_drop.map_or(0, |d| d.to);
                for api in Api::ALL {
                    if let Err(err) = stack.esp.set_limit(api, to) {
                        log.errors.push(format!("lowering the ESP's {api} limit: {err}"));
                    }
                }
            }
        }
    }
    let (pushes, tasks) = stack.redelivered();
    log.redelivered = BTreeMap::from([("pubsub".to_owned(), pushes), ("tasks".to_owned(), tasks)]);
    let report = stack.esp.report();
    if let Some(drop) = spec.limit_drop
        && let Some(change) = report.upload.limit_changes.first()
    {
        log.limit_drop = Some(LimitDropLog::new(&report, drop.to, change.at_ms, drop.at));
    }
    for api in [&report.upload, &report.send] {
        for (kind, n) in [
            ("500", api.injected.error),
            ("429", api.injected.rate_limit),
            ("timeout_after_accept", api.injected.timeout_after_accept),
            ("latency_spike", api.injected.latency_spike),
        ] {
            *log.esp_injected.entry(kind.to_owned()).or_default() += n;
        }
    }
    log
}

async fn strike(stack: &LocalStack, target: &str) -> anyhow::Result<()> {
    match target {
        "pubsub-push" => {
            stack.stand_ins.pubsub.pause();
            tokio::time::sleep(Duration::from_secs(1)).await;
            stack.stand_ins.pubsub.resume();
            Ok(())
        }
        "completion" => {
            // A pass starts every second or so; kill the one running or the next.
            if stack.kill_completion(Duration::from_secs(5)).await {
                Ok(())
            } else {
                anyhow::bail!("no completion pass ran to be killed")
            }
        }
        "tasks-dispatch" => {
            stack.stand_ins.tasks.pause();
            tokio::time::sleep(Duration::from_secs(1)).await;
            stack.stand_ins.tasks.resume();
            Ok(())
        }
        instance => {
            let (name, index) = instance.rsplit_once('-').unwrap_or((instance, "0"));
            let service = match name {
                "trigger" => Service::Trigger,
                "list-uploader" => Service::ListUploader,
                "sender" => Service::Sender,
                other => anyhow::bail!("no service {other}"),
            };
            stack.restart(Instance { service, index: index.parse()? }).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acceptance_spec_parses() {
        let spec: ChaosSpec =
            "kill-every=5s,esp-500=0.05,esp-429=0.05,esp-timeout-after-accept=0.02,pg-restart-every=30s"
                .parse()
                .unwrap();
        assert_eq!(spec.kill_every, Some(Duration::from_secs(5)));
        assert_eq!(spec.pg_restart_every, Some(Duration::from_secs(30)));
        assert_eq!((spec.esp.error, spec.esp.rate_limit, spec.esp.timeout_after_accept), (0.05, 0.05, 0.02));
    }

    #[test]
    fn redelivery_and_task_name_expiry_are_chaos_settings() {
        let spec: ChaosSpec = "redeliver=0.1,kill-every=5s,tasks-name-ttl=30s".parse().unwrap();
        assert_eq!(spec.redeliver, Some(0.1));
        assert_eq!(spec.tasks_name_ttl, Some(Duration::from_secs(30)));
        assert!("redeliver=1.5".parse::<ChaosSpec>().is_err());
    }

    #[test]
    fn a_limit_drop_is_a_limit_and_a_time() {
        let spec: ChaosSpec = "esp-limit-drop=5@10s".parse().unwrap();
        assert_eq!(spec.limit_drop, Some(LimitDrop { to: 5, at: Duration::from_secs(10) }));
        assert!("esp-limit-drop=5".parse::<ChaosSpec>().unwrap_err().contains("N@DURATION"));
        assert!("esp-limit-drop=0@1s".parse::<ChaosSpec>().unwrap_err().contains("at least 1"));
    }

    #[test]
    fn utilisation_after_a_drop_counts_calls_up_to_the_new_limit() {
        use haishin_esp_sim::TimelinePoint;
        let point = |at_ms: f64, in_progress: u32| TimelinePoint { at_ms, in_progress };
        // 8 calls until 1 s, then 5 until 3 s, then 2 until 4 s.
        let api = ApiReport {
            timeline: vec![point(0.0, 8), point(1000.0, 5), point(3000.0, 2), point(4000.0, 0)],
            ..ApiReport::default()
        };
        // From the drop at 0.5 s to 4 s: 0.5 s at 5 (8 capped), 2 s at 5, 1 s at 2, of 3.5 s × 5.
        let share = capped_utilisation(&api, 5, 500.0, 4000.0);
        assert!((share - (2.5 * 5.0 + 2.0) / (3.5 * 5.0)).abs() < 1e-9, "{share}");
        assert_eq!(capped_utilisation(&api, 5, 4000.0, 4000.0), 0.0);
    }

    #[test]
    fn bad_specs_name_the_problem() {
        assert!("kill-every=soon".parse::<ChaosSpec>().unwrap_err().contains("soon"));
        assert!("esp-500=2".parse::<ChaosSpec>().unwrap_err().contains("between 0 and 1"));
        assert!("explode=1".parse::<ChaosSpec>().unwrap_err().contains("explode"));
        assert_eq!(duration("500ms").unwrap(), Duration::from_millis(500));
    }
}
