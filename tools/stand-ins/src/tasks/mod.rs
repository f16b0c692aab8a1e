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
//! - 429 and 503 also slow the whole queue: they halve its dispatch rate, which then recovers,
//!   doubling every second, and empty its token bucket. A `Retry-After` header on such an answer
//!   (delay-seconds or an HTTP date, honoured up to an hour) sets the task's next attempt, never
//!   earlier than its back-off;
//! - a task's name stays taken for `name_ttl` (Cloud Tasks: about an hour) after it is done or
//!   deleted, so creating it again meanwhile fails with `ALREADY_EXISTS`; afterwards it creates
//!   a new task;
//! - with a [`Redelivery`] policy (off by default), a share of the tasks that succeeded is
//!   dispatched once more, a random moment later, with the same name, as Cloud Tasks'
//!   at-least-once delivery may do. Until then the task is back in the queue, as if its success
//!   had been lost: it is listed and can be deleted.
//!
//! Not modelled: App Engine targets, OAuth tokens, `max_retry_duration`, queue states other
//! than running, and the REST queue administration methods.

mod dispatch;
mod names;
mod queue;
mod rest;
mod retry_after;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::oidc::TokenSigner;
use crate::redelivery::{Redeliverer, Redelivery, RedeliveryDefaults};
use crate::server::Served;
use names::Reservations;
pub use queue::{Queue, QueueStats};

/// The largest task Cloud Tasks accepts, in bytes.
const MAX_TASK_BYTES: usize = 100 * 1024;
/// After a 429 or 503 halves the dispatch rate, the rate doubles back once per this interval.
const RATE_RECOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// The slowest a queue gets after repeated 429s and 503s, as a fraction of its rate.
const MIN_RATE_FACTOR: f64 = 1.0 / 64.0;

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
            redelivery: RedeliveryDefaults::default(),
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
        let redeliverer = Redeliverer::new(&config.name, None, self.service.redelivery.seed());
        let queue = Arc::new(QueueHandle::new(config, redeliverer));
        queues.insert(queue.config.name.clone(), queue.clone());
        tokio::spawn(dispatch::run(self.service.clone(), queue));
        Ok(())
    }

    /// What a queue has done so far, or `None` if there is no such queue.
    pub fn queue_stats(&self, name: &str) -> Option<QueueStats> {
        Some(self.service.queue(name)?.stats())
    }

    /// Sets the redelivery policy of every queue that has none of its own (at start: off); it
    /// applies to tasks that succeed from now on.
    pub fn set_redelivery(&self, policy: Redelivery) -> Result<(), Error> {
        policy.check()?;
        self.service.redelivery.set_policy(policy);
        Ok(())
    }

    /// Gives one queue its own redelivery policy, or with `None` makes it follow the
    /// server-wide one again.
    pub fn set_queue_redelivery(&self, name: &str, policy: Option<Redelivery>) -> Result<(), Error> {
        if let Some(policy) = &policy {
            policy.check()?;
        }
        let queue = self.service.queue(name).ok_or_else(|| Error::NotFound(name.to_owned()))?;
        queue.redeliverer.set_policy(policy);
        Ok(())
    }

    /// Makes redelivery decisions repeatable: every queue's generator restarts from `seed`
    /// (mixed with its name), and so do those of queues created later.
    pub fn seed_redelivery(&self, seed: u64) {
        self.service.redelivery.set_seed(seed);
        let queues = self.service.queues.lock().expect("queues lock");
        for queue in queues.values() {
            queue.redeliverer.reseed(seed);
        }
    }

    /// Stops starting dispatches in every queue (dispatches in flight finish).
    pub fn pause(&self) {
        self.service.paused.send_replace(true);
    }

    /// Resumes dispatching after [`Self::pause`].
    pub fn resume(&self) {
        self.service.paused.send_replace(false);
    }

    /// Waits until every queue is empty (redeliveries to come included); `false` on timeout.
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
    redelivery: RedeliveryDefaults,
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
    /// Already put back once after it succeeded (it is not put back again).
    redelivered: bool,
}

/// One queue: configuration, tasks, and dispatch bookkeeping.
struct QueueHandle {
    config: Queue,
    state: Mutex<QueueState>,
    /// Wakes the dispatch loop: a task arrived or a dispatch finished.
    wake: Notify,
    redeliverer: Redeliverer,
}

struct QueueState {
    /// Tasks not yet done, by short name.
    tasks: HashMap<String, Task>,
    /// Tasks waiting for dispatch, by (due time, arrival order).
    schedule: BTreeMap<(Instant, u64), String>,
    arrivals: u64,
    /// Short names of tasks done or deleted recently, which stay taken for `name_ttl`.
    released: Reservations,
    /// Dispatch tokens available now, and when they were last topped up.
    tokens: f64,
    refilled: Instant,
    /// The rate factor right after the last slow-down, and when that was.
    slow_factor: f64,
    slowed_at: Instant,
    stats: QueueStats,
}

impl QueueHandle {
    fn new(config: Queue, redeliverer: Redeliverer) -> Self {
        let now = Instant::now();
        let tokens = config.burst();
        Self {
            config,
            state: Mutex::new(QueueState {
                tasks: HashMap::new(),
                schedule: BTreeMap::new(),
                arrivals: 0,
                released: Reservations::default(),
                tokens,
                refilled: now,
                slow_factor: 1.0,
                slowed_at: now,
                stats: QueueStats::default(),
            }),
            wake: Notify::new(),
            redeliverer,
        }
    }

    fn stats(&self) -> QueueStats {
        let state = self.state.lock().expect("queue lock");
        let dispatch_rate = state.rate(&self.config, Instant::now());
        QueueStats { tasks: state.tasks.len(), dispatch_rate, ..state.stats }
    }

    /// Adds a task, unless a task of that name is in the queue or finished within `name_ttl`.
    fn add(&self, task: Task) -> Result<Task, Error> {
        let mut state = self.state.lock().expect("queue lock");
        let now = Instant::now();
        state.released.prune(now);
        if state.tasks.contains_key(&task.id) || state.released.is_taken(&task.id, now) {
            return Err(Error::AlreadyExists(task.id));
        }
        state.released.take_over(&task.id);
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

    /// Removes a task that is done, dropped or deleted; its name stays taken for `ttl`.
    fn finish(&mut self, id: &str, ttl: Duration) -> Option<Task> {
        let task = self.tasks.remove(id)?;
        self.released.release(id, Instant::now(), ttl);
        Some(task)
    }

    /// Whether a task of this name finished recently (its name is still taken).
    fn finished_recently(&self, id: &str) -> bool {
        self.released.is_taken(id, Instant::now())
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
    fn queue_names_are_checked() {
        assert!(check_queue_name("projects/p/locations/asia-northeast1/queues/upload").is_ok());
        assert!(check_queue_name("projects/p/queues/upload").is_err());
        assert!(check_queue_name("projects/p/locations/l/queues/a.b").is_err());
    }
}
