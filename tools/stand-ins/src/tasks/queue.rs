//! A queue's settings, with Cloud Tasks' defaults, and its counters.

use std::time::Duration;

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
    /// How long a task's name stays taken after the task is done or deleted (Cloud Tasks:
    /// about an hour; default 1 h).
    pub name_ttl: Duration,
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
            name_ttl: Duration::from_secs(3600),
        }
    }

    /// The delay before the next dispatch of a task whose dispatch failed `failures` times.
    pub(super) fn backoff(&self, failures: u32) -> Duration {
        let failures = failures.max(1);
        let doublings = (failures - 1).min(self.max_doublings).min(30);
        let doubled = self.min_backoff.saturating_mul(1 << doublings);
        let linear_steps = failures - 1 - doublings;
        doubled.saturating_add(doubled.saturating_mul(linear_steps)).min(self.max_backoff)
    }

    /// The token bucket's size: a tenth of a second's worth of dispatches, at least one.
    pub(super) fn burst(&self) -> f64 {
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
    /// Tasks that succeeded and were put back to be dispatched once more (at-least-once
    /// redelivery).
    pub redelivered: u64,
    /// Dispatches in flight now.
    pub in_flight: u32,
    /// The most dispatches ever in flight at once.
    pub peak_in_flight: u32,
    /// Tasks in the queue (waiting, in back-off or in flight).
    pub tasks: usize,
    /// Dispatches per second allowed now: the queue's rate, less while a 429 or 503 slows it.
    pub dispatch_rate: f64,
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
}
