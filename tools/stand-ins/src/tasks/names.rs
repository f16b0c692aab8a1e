//! Task names that stay taken for a while after their task is done or deleted.
//!
//! Cloud Tasks keeps a named task's name for about an hour after the task completes or is
//! deleted, and refuses to create the same name meanwhile (`ALREADY_EXISTS`); after that the
//! name can be used again. Each queue keeps its released names here until they expire.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// Names of finished tasks, each with the moment it becomes free again.
#[derive(Debug, Default)]
pub(super) struct Reservations {
    /// When each name becomes free.
    until: HashMap<String, Instant>,
    /// The same, in order of release (and so of expiry: one queue has one lifetime).
    order: VecDeque<(Instant, String)>,
}

impl Reservations {
    /// Keeps `name` taken for `ttl` from `now`.
    pub(super) fn release(&mut self, name: &str, now: Instant, ttl: Duration) {
        let until = now + ttl;
        self.until.insert(name.to_owned(), until);
        self.order.push_back((until, name.to_owned()));
    }

    /// Whether a finished task's `name` is still taken at `now`.
    pub(super) fn is_taken(&self, name: &str, now: Instant) -> bool {
        self.until.get(name).is_some_and(|until| *until > now)
    }

    /// Frees a name before it expires (a new task took it up; it is tracked there now).
    pub(super) fn take_over(&mut self, name: &str) {
        self.until.remove(name);
    }

    /// Forgets the names that expired by `now`.
    pub(super) fn prune(&mut self, now: Instant) {
        while let Some((until, _)) = self.order.front()
            && *until <= now
        {
            let (until, name) = self.order.pop_front().expect("not empty");
            // A name released again later has a later expiry; keep that one.
            if self.until.get(&name) == Some(&until) {
                self.until.remove(&name);
            }
        }
    }

    /// How many names are held now (expired ones not yet pruned included).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_released_name_stays_taken_for_its_lifetime_then_is_free() {
        let t0 = Instant::now();
        let mut names = Reservations::default();
        names.release("chunk-1", t0, HOUR);

        assert!(names.is_taken("chunk-1", t0 + HOUR - secs(1)));
        assert!(!names.is_taken("chunk-1", t0 + HOUR));
        assert!(!names.is_taken("chunk-2", t0), "never used");
    }

    #[test]
    fn pruning_forgets_expired_names_only() {
        let t0 = Instant::now();
        let mut names = Reservations::default();
        names.release("early", t0, HOUR);
        names.release("late", t0 + secs(600), HOUR);

        names.prune(t0 + secs(3600));

        assert_eq!(names.len(), 1);
        assert!(names.is_taken("late", t0 + secs(3600)));
    }

    #[test]
    fn a_name_released_again_keeps_its_later_expiry_through_pruning() {
        let t0 = Instant::now();
        let mut names = Reservations::default();
        names.release("again", t0, HOUR);
        names.take_over("again");
        names.release("again", t0 + secs(1800), HOUR);

        names.prune(t0 + secs(3600));

        assert!(names.is_taken("again", t0 + secs(3600)), "the second release lasts until 5400 s");
        assert!(!names.is_taken("again", t0 + secs(5400)));
    }
}
