//! The dispatch loop of a queue, and the dispatch itself.

use std::sync::Arc;
use std::time::Duration;

use axum::http::header::{RETRY_AFTER, USER_AGENT};
use chrono::Utc;
use tokio::time::{Instant, sleep_until};

use super::{MIN_RATE_FACTOR, QueueHandle, Service, Task, retry_after};
use crate::redelivery::Redelivery;

/// The user agent of Cloud Tasks' dispatches.
const DISPATCH_USER_AGENT: &str = "Google-Cloud-Tasks";

/// What a dispatch got back.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Answer {
    status: u16,
    /// The wait a 429 or 503 asked for with `Retry-After` (read on those answers only).
    retry_after: Option<Duration>,
}

impl Answer {
    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// 429 and 503: the target asks the whole queue to slow down.
    fn is_throttling(&self) -> bool {
        matches!(self.status, 429 | 503)
    }
}

/// What the dispatch loop does next.
enum Next {
    Dispatch(Box<Task>),
    /// Nothing can be dispatched before this time (or before a wake-up, when `None`).
    Wait(Option<Instant>),
}

/// Dispatches `queue`'s tasks until the service is cancelled.
pub(super) async fn run(service: Arc<Service>, queue: Arc<QueueHandle>) {
    let mut paused = service.paused.subscribe();
    loop {
        let next = if *paused.borrow_and_update() { Next::Wait(None) } else { queue.next(Instant::now()) };
        match next {
            Next::Dispatch(task) => {
                tokio::spawn(dispatch(service.clone(), queue.clone(), task));
            }
            Next::Wait(until) => {
                let due = async {
                    match until {
                        Some(at) => sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = service.cancel.cancelled() => return,
                    () = queue.wake.notified() => {}
                    _ = paused.changed() => {}
                    () = due => {}
                }
            }
        }
    }
}

/// Sends one dispatch and settles the task with its outcome.
async fn dispatch(service: Arc<Service>, queue: Arc<QueueHandle>, task: Box<Task>) {
    let answer = tokio::select! {
        () = service.cancel.cancelled() => return,
        answer = send(&service, &queue, &task) => answer,
    };
    queue.settle(&task.id, answer, service.redelivery.policy());
    queue.wake.notify_one();
}

/// Sends the task's request; what came back, or `None` when there was no answer.
async fn send(service: &Service, queue: &QueueHandle, task: &Task) -> Option<Answer> {
    let queue_id = queue.config.name.rsplit('/').next().unwrap_or_default();
    let eta = task.schedule_time.timestamp_micros() as f64 / 1e6;
    let mut request =
        service.http.request(task.method.clone(), task.url.clone()).timeout(task.dispatch_deadline);
    for (name, value) in &task.headers {
        request = request.header(name, value);
    }
    request = request
        .header(USER_AGENT, DISPATCH_USER_AGENT)
        .header("X-CloudTasks-QueueName", queue_id)
        .header("X-CloudTasks-TaskName", &task.id)
        .header("X-CloudTasks-TaskRetryCount", task.dispatch_count.saturating_sub(1))
        .header("X-CloudTasks-TaskExecutionCount", task.response_count)
        .header("X-CloudTasks-TaskETA", format!("{eta:.6}"));
    if let Some(status) = task.last_status {
        request = request.header("X-CloudTasks-TaskPreviousResponse", status);
    }
    if let Some((email, audience)) = &task.oidc {
        request = request.bearer_auth(service.signer.sign(audience, email));
    }
    if !task.body.is_empty() {
        request = request.body(task.body.clone());
    }
    let queue = queue.config.name.as_str();
    let task = task.id.as_str();
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let mut answer = Answer { status, retry_after: None };
            if answer.is_throttling() {
                answer.retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after::parse(v, Utc::now()));
            }
            if !answer.is_success() {
                tracing::debug!(queue, task, status, retry_after = ?answer.retry_after, "Dispatch failed.");
            }
            Some(answer)
        }
        Err(err) => {
            tracing::debug!(queue, task, error = %err, "Dispatch got no answer.");
            None
        }
    }
}

impl QueueHandle {
    /// Takes the next due task if concurrency and rate allow.
    fn next(&self, now: Instant) -> Next {
        let mut state = self.state.lock().expect("queue lock");
        let state = &mut *state;
        if state.stats.in_flight >= self.config.max_concurrent_dispatches {
            return Next::Wait(None);
        }
        // Drop entries of tasks deleted since they were scheduled.
        while let Some((_, id)) = state.schedule.first_key_value()
            && !state.tasks.contains_key(id)
        {
            state.schedule.pop_first();
        }
        let Some(&(due, _)) = state.schedule.first_key_value().map(|(key, _)| key) else {
            return Next::Wait(None);
        };
        if due > now {
            return Next::Wait(Some(due));
        }
        let rate = state.rate(&self.config, now);
        let refill = rate * now.duration_since(state.refilled).as_secs_f64();
        state.tokens = (state.tokens + refill).min(self.config.burst());
        state.refilled = now;
        if state.tokens < 1.0 {
            return Next::Wait(Some(now + Duration::from_secs_f64((1.0 - state.tokens) / rate)));
        }
        state.tokens -= 1.0;
        let (_, id) = state.schedule.pop_first().expect("not empty");
        let task = state.tasks.get_mut(&id).expect("checked above");
        let at = Utc::now();
        task.dispatch_count += 1;
        task.first_attempt.get_or_insert(at);
        task.last_attempt = Some(at);
        state.stats.dispatched += 1;
        state.stats.in_flight += 1;
        state.stats.peak_in_flight = state.stats.peak_in_flight.max(state.stats.in_flight);
        Next::Dispatch(Box::new(task.clone()))
    }

    /// Records a dispatch's outcome: done (or put back once, per the redelivery policy, this
    /// queue's own or else `redelivery`), retried later, or dropped.
    fn settle(&self, id: &str, answer: Option<Answer>, redelivery: Redelivery) {
        let mut state = self.state.lock().expect("queue lock");
        let state = &mut *state;
        state.stats.in_flight -= 1;
        let Some(task) = state.tasks.get_mut(id) else {
            return; // Deleted while in flight.
        };
        if let Some(answer) = answer {
            task.response_count += 1;
            task.last_status = Some(answer.status);
        }
        let attempts = task.dispatch_count;
        let now = Instant::now();
        if answer.is_some_and(|a| a.is_success()) {
            state.stats.succeeded += 1;
            if !task.redelivered
                && let Some(delay) = self.redeliverer.roll(redelivery)
            {
                tracing::debug!(queue = self.config.name, task = id, ?delay, "Done task to be redelivered.");
                task.redelivered = true;
                task.schedule_time = Utc::now() + delay;
                state.stats.redelivered += 1;
                state.schedule_task(now + delay, id.to_owned());
            } else {
                state.finish(id, self.config.name_ttl);
            }
            return;
        }
        let mut delay = self.config.backoff(attempts);
        if let Some(answer) = answer.filter(Answer::is_throttling) {
            state.stats.throttled += 1;
            let factor = state.rate(&self.config, now) / self.config.max_dispatches_per_second;
            state.slow_factor = (factor / 2.0).max(MIN_RATE_FACTOR);
            state.slowed_at = now;
            // The slower rate applies from the next dispatch, not after a burst.
            state.tokens = 0.0;
            state.refilled = now;
            delay = delay.max(answer.retry_after.unwrap_or_default());
        }
        if self.config.max_attempts != -1 && i64::from(attempts) >= i64::from(self.config.max_attempts) {
            state.finish(id, self.config.name_ttl);
            state.stats.dropped += 1;
            tracing::info!(
                queue = self.config.name,
                task = id,
                attempts,
                "Task dropped after its last attempt."
            );
            return;
        }
        if let Some(task) = state.tasks.get_mut(id) {
            task.schedule_time = Utc::now() + delay;
        }
        state.schedule_task(now + delay, id.to_owned());
        state.stats.retried += 1;
    }
}
