//! A Cloud Tasks stand-in: the REST v2 subset of the official `CloudTasks` client, and HTTP
//! dispatch.
//!
//! Queues are created through [`TasksServer::create_queue`]; tasks through the client
//! (`create_task`, `get_task`, `list_tasks` as one page, `delete_task`; also `get_queue`).
//! Each queue has a dispatch loop that keeps Cloud Tasks' rules:
//!
//! - a task is dispatched at its `scheduleTime`, to its URL with its method, headers and body,
//!   plus the `X-CloudTasks-*` headers and, when it has an `oidcToken`, a signed ID token;
//! - at most `max_concurrent_dispatches` at once, and at most `max_dispatches_per_second`
//!   (a token bucket holding a tenth of a second's worth, at least one);
//! - 2xx is success; anything else (or no answer within the dispatch deadline) is retried
//!   after the queue's back-off (doubling `max_doublings` times from `min_backoff`, then growing
//!   linearly, up to `max_backoff`), until `max_attempts` dispatches have failed;
//! - 429 and 503 also halve the queue's dispatch rate, which then recovers, doubling every
//!   second;
//! - a task's name stays taken after it is done or deleted (for the run; Cloud Tasks keeps it
//!   about an hour), so creating it again fails with `ALREADY_EXISTS`.
//!
//! Not modelled: App Engine targets, OAuth tokens, `max_retry_duration`, queue states other
//! than running, and the REST queue administration methods.

mod dispatch;
mod rest;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::oidc::TokenSigner;
use crate::server::Served;

/// The largest task Cloud Tasks accepts, in bytes.
const MAX_TASK_BYTES: usize = 100 * 1024;
/// After a 429 or 503 halves the dispatch rate, the rate doubles back once per this interval.
const RATE_RECOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// The slowest a queue gets after repeated 429s and 503s, as a fraction of its rate.
const MIN_RATE_FACTOR: f64 = 1.0 / 64.0;

/// A queue's limits and retry settings, with Cloud Tasks' defaults from [`Queue::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    /// `projects/P/locations/L/queues/Q`.
    pub name: String,
    /// Dispatches started per second, at most (Cloud Tasks: up to 500, default 500).
    pub max_dispatches_per_second: f64,
    /// Dispatches in flight, at most (Cloud Tasks: up to 5,000, default 1,000).
    pub max_concurrent_dispatches: u32,
    /// Dispatches of one task, at most; -1 for unlimited (default 100).
    pub max_attempts: i32,
    /// The first retry delay (default 0.1 s).
    pub min_backoff: Duration,
    /// The longest retry delay (default 3,600 s).
    pub max_backoff: Duration,
    /// How many times the retry delay doubles before it grows linearly (default 16).
    pub max_doublings: u32,
}

impl Queue {
    /// A queue with Cloud Tasks' defaults.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            max_dispatches_per_second: 500.0,
            max_concurrent_dispatches: 1000,
            max_attempts: 100,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(3600),
            max_doublings: 16,
        }
    }

    /// The delay before the next dispatch of a task whose dispatch failed `failures` times.
    fn backoff(&self, failures: u32) -> Duration {
        let failures = failures.max(1);
        let doublings = (failures - 1).min(self.max_doublings).min(30);
        let doubled = self.min_backoff.saturating_mul(1 << doublings);
        let linear_steps = failures - 1 - doublings;
        doubled.saturating_add(doubled.saturating_mul(linear_steps)).min(self.max_backoff)
    }

    /// The token bucket's size: a tenth of a second's worth of dispatches, at least one.
    fn burst(&self) -> f64 {
        (self.max_dispatches_per_second / 10.0).ceil().max(1.0)
    }
}

/// What a queue has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueStats {
    /// Tasks created.
    pub created: u64,
    /// Dispatches started.
    pub dispatched: u64,
    /// Dispatches answered with 2xx.
    pub succeeded: u64,
    /// Failed dispatches that will be retried.
    pub retried: u64,
    /// Tasks dropped after `max_attempts` failed dispatches.
    pub dropped: u64,
    /// Dispatches answered 429 or 503, each of which slowed the queue down.
    pub throttled: u64,
    /// Dispatches in flight now.
    pub in_flight: u32,
    /// The most dispatches ever in flight at once.
    pub peak_in_flight: u32,
    /// Tasks in the queue (waiting, in back-off or in flight).
    pub tasks: usize,
    /// Dispatches per second allowed now: the queue's rate, less while a 429 or 503 slows it.
    pub dispatch_rate: f64,
}

/// The Cloud Tasks stand-in.
///
/// Dropping it stops the server and every dispatch loop.
#[derive(Debug)]
pub struct TasksServer {
    service: Arc<Service>,
    served: Served,
}

impl TasksServer {
    /// Starts the stand-in on `port` (0: any free port); tokens are signed by `signer`.
    pub async fn start(signer: TokenSigner, port: u16) -> Result<Self, Error> {
        let cancel = CancellationToken::new();
        let service = Arc::new(Service {
            queues: Mutex::default(),
            signer,
            http: crate::server::http_client(),
            paused: watch::Sender::new(false),
            cancel: cancel.clone(),
        });
        let served = Served::start(port, rest::router(service.clone()), cancel).await?;
        Ok(Self { service, served })
    }

    /// The endpoint for `CloudTasks::builder().with_endpoint(..)`: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        self.served.url()
    }

    /// Creates a queue and starts its dispatch loop (call it inside a Tokio runtime).
    pub fn create_queue(&self, config: Queue) -> Result<(), Error> {
        check_queue_name(&config.name)?;
        let rate = config.max_dispatches_per_second;
        if !rate.is_finite() || rate <= 0.0 || config.max_concurrent_dispatches == 0 {
            return Err(Error::InvalidArgument("a queue's rate and concurrency must be positive".into()));
        }
        if config.max_attempts == 0 || config.max_attempts < -1 {
            return Err(Error::InvalidArgument("max_attempts must be positive, or -1 for unlimited".into()));
        }
        let mut queues = self.service.queues.lock().expect("queues lock");
        if queues.contains_key(&config.name) {
            return Err(Error::AlreadyExists(config.name));
        }
        let queue = Arc::new(QueueHandle::new(config));
        queues.insert(queue.config.name.clone(), queue.clone());
        tokio::spawn(dispatch::run(self.service.clone(), queue));
        Ok(())
    }

    /// What a queue has done so far, or `None` if there is no such queue.
    pub fn queue_stats(&self, name: &str) -> Option<QueueStats> {
        Some(self.service.queue(name)?.stats())
    }

    /// Stops starting dispatches in every queue (dispatches in flight finish).
    pub fn pause(&self) {
        self.service.paused.send_replace(true);
    }

    /// Resumes dispatching after [`Self::pause`].
    pub fn resume(&self) {
        self.service.paused.send_replace(false);
    }

    /// Waits until every queue is empty; `false` on timeout.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        crate::poll_until(timeout, || {
            let queues = self.service.queues.lock().expect("queues lock");
            queues.values().all(|q| q.stats().tasks == 0)
        })
        .await
    }

    /// Stops the server and the dispatch loops.
    pub async fn shutdown(self) {
        self.served.shutdown().await;
    }
}

/// State shared by the REST handlers and the dispatch loops.
pub(crate) struct Service {
    queues: Mutex<HashMap<String, Arc<QueueHandle>>>,
    signer: TokenSigner,
    http: reqwest::Client,
    paused: watch::Sender<bool>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

impl Service {
    fn queue(&self, name: &str) -> Option<Arc<QueueHandle>> {
        self.queues.lock().expect("queues lock").get(name).cloned()
    }
}

/// A task as the queue holds it.
#[derive(Debug, Clone)]
struct Task {
    /// The short name (the last segment of the full name).
    id: String,
    method: reqwest::Method,
    url: reqwest::Url,
    /// The URL as the client gave it, for the API's answers.
    url_text: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    /// (service account, audience) of the OIDC token to attach.
    oidc: Option<(String, String)>,
    schedule_time: DateTime<Utc>,
    create_time: DateTime<Utc>,
    dispatch_deadline: Duration,
    dispatch_count: u32,
    response_count: u32,
    /// Status of the last answered dispatch.
    last_status: Option<u16>,
    first_attempt: Option<DateTime<Utc>>,
    last_attempt: Option<DateTime<Utc>>,
}

/// One queue: configuration, tasks, and dispatch bookkeeping.
struct QueueHandle {
    config: Queue,
    state: Mutex<QueueState>,
    /// Wakes the dispatch loop: a task arrived or a dispatch finished.
    wake: Notify,
}

struct QueueState {
    /// Tasks not yet done, by short name.
    tasks: HashMap<String, Task>,
    /// Tasks waiting for dispatch, by (due time, arrival order).
    schedule: BTreeMap<(Instant, u64), String>,
    arrivals: u64,
    /// Every short name ever used in this queue.
    taken: HashSet<String>,
    /// Dispatch tokens available now, and when they were last topped up.
    tokens: f64,
    refilled: Instant,
    /// The rate factor right after the last slow-down, and when that was.
    slow_factor: f64,
    slowed_at: Instant,
    stats: QueueStats,
}

impl QueueHandle {
    fn new(config: Queue) -> Self {
        let now = Instant::now();
        let tokens = config.burst();
        Self {
            config,
            state: Mutex::new(QueueState {
                tasks: HashMap::new(),
                schedule: BTreeMap::new(),
                arrivals: 0,
                taken: HashSet::new(),
                tokens,
                refilled: now,
                slow_factor: 1.0,
                slowed_at: now,
                stats: QueueStats::default(),
            }),
            wake: Notify::new(),
        }
    }

    fn stats(&self) -> QueueStats {
        let state = self.state.lock().expect("queue lock");
        let dispatch_rate = state.rate(&self.config, Instant::now());
        QueueStats { tasks: state.tasks.len(), dispatch_rate, ..state.stats }
    }

    /// Adds a task, unless its name was ever taken.
    fn add(&self, task: Task) -> Result<Task, Error> {
        let mut state = self.state.lock().expect("queue lock");
        if !state.taken.insert(task.id.clone()) {
            return Err(Error::AlreadyExists(task.id));
        }
        let due = instant_of(task.schedule_time);
        state.schedule_task(due, task.id.clone());
        state.tasks.insert(task.id.clone(), task.clone());
        state.stats.created += 1;
        drop(state);
        self.wake.notify_one();
        Ok(task)
    }
}

impl QueueState {
    fn schedule_task(&mut self, due: Instant, id: String) {
        self.arrivals += 1;
        self.schedule.insert((due, self.arrivals), id);
    }

    /// The dispatch rate now, after slow-downs and their recovery.
    fn rate(&self, config: &Queue, now: Instant) -> f64 {
        let recovered =
            now.duration_since(self.slowed_at).as_secs_f64() / RATE_RECOVERY_INTERVAL.as_secs_f64();
        let factor = (self.slow_factor * recovered.exp2()).min(1.0);
        config.max_dispatches_per_second * factor
    }
}

/// The `Instant` at which a wall-clock time arrives (now, if it has passed).
fn instant_of(at: DateTime<Utc>) -> Instant {
    let wait = (at - Utc::now()).to_std().unwrap_or_default();
    Instant::now() + wait
}

/// Checks that `name` is `projects/P/locations/L/queues/Q`.
fn check_queue_name(name: &str) -> Result<(), Error> {
    match name.split('/').collect::<Vec<_>>().as_slice() {
        ["projects", p, "locations", l, "queues", q] if [p, l, q].iter().all(|s| valid_id(s)) => Ok(()),
        _ => {
            Err(Error::InvalidArgument(format!("{name} is not of the form projects/P/locations/L/queues/Q")))
        }
    }
}

/// Letters, digits, hyphens and underscores, 1 to 500 of them (task and queue ids).
fn valid_id(id: &str) -> bool {
    (1..=500).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_grows_linearly_then_caps() {
        let queue = Queue {
            min_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            max_doublings: 3,
            ..Queue::new("projects/p/locations/l/queues/q")
        };
        let delays: Vec<u64> = (1..=8).map(|n| queue.backoff(n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 240, 300, 300]);
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(check_queue_name("projects/p/locations/asia-northeast1/queues/upload").is_ok());
        assert!(check_queue_name("projects/p/queues/upload").is_err());
        assert!(check_queue_name("projects/p/locations/l/queues/a.b").is_err());
    }
}
