//! The calls-per-second limit: one sliding window of 1 s over the calls that change something,
//! uploads and sends together. The window arithmetic of its report is
//! [`RateReport::from_arrivals`].

use crate::report::{RATE_WINDOW_US, RateReport};

/// Accepted calls' arrival times, attempts and refusals, for one limit.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limit: f64,
    /// `floor(limit)`: accepted calls allowed in any window of 1 s.
    per_window: usize,
    /// Arrival times (unix µs) of accepted calls, oldest first.
    accepted_us: Vec<i64>,
    /// Index of the oldest accepted call that is less than 1 s older than the latest arrival.
    window_start: usize,
    attempts: u64,
    over_rate: u64,
}

impl RateLimiter {
    /// A limit of `limit` calls per second (at least 1: see `EspSimConfig::validate`).
    pub(crate) fn new(limit: f64) -> Self {
        Self {
            limit,
            per_window: limit.floor() as usize,
            accepted_us: Vec::new(),
            window_start: 0,
            attempts: 0,
            over_rate: 0,
        }
    }

    /// Counts a call that reached admission, whatever becomes of it.
    pub(crate) fn attempt(&mut self) {
        self.attempts += 1;
    }

    /// Whether a call arriving at `now_us` finds room: fewer than `floor(limit)` accepted calls
    /// arrived less than 1 s before it. Arrivals must come oldest first.
    pub(crate) fn has_room(&mut self, now_us: i64) -> bool {
        while self.window_start < self.accepted_us.len()
            && now_us - self.accepted_us[self.window_start] >= RATE_WINDOW_US
        {
            self.window_start += 1;
        }
        self.accepted_us.len() - self.window_start < self.per_window
    }

    /// Counts a call refused for the rate.
    pub(crate) fn refuse(&mut self) {
        self.over_rate += 1;
    }

    /// Records an accepted call's arrival.
    pub(crate) fn accept(&mut self, now_us: i64) {
        self.accepted_us.push(now_us);
    }

    pub(crate) fn report(&self) -> RateReport {
        RateReport::from_arrivals(self.limit, &self.accepted_us, self.attempts, self.over_rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offers a call at each time; accepts it when there is room. Returns what was accepted.
    fn offer(limiter: &mut RateLimiter, arrivals_us: &[i64]) -> Vec<bool> {
        arrivals_us
            .iter()
            .map(|&at| {
                limiter.attempt();
                let room = limiter.has_room(at);
                if room {
                    limiter.accept(at);
                } else {
                    limiter.refuse();
                }
                room
            })
            .collect()
    }

    #[test]
    fn a_burst_gets_the_floor_of_the_rate_then_refusals_until_the_first_call_is_a_second_old() {
        let mut limiter = RateLimiter::new(3.5);
        let accepted =
            offer(&mut limiter, &[0, 10, 20, 30, 999_999, 1_000_000, 1_000_005, 1_000_010, 1_000_020]);
        // 3 accepted at 0, 10 and 20 µs; at 1 s the call at 0 has left the window, at 1 s + 10 µs
        // the one at 10 µs, at 1 s + 20 µs the one at 20 µs.
        assert_eq!(accepted, [true, true, true, false, false, true, false, true, true]);
        let report = limiter.report();
        assert_eq!((report.attempts, report.accepted_calls, report.over_rate_attempts), (9, 6, 3));
        assert_eq!((report.max_calls_in_any_1s_window, report.windows_above_rate), (3, 0));
        assert!((report.attempts_above_rate_share - 3.0 / 9.0).abs() < 1e-12);
    }

    #[test]
    fn calls_at_the_rate_are_all_accepted() {
        let mut limiter = RateLimiter::new(20.0);
        let arrivals: Vec<i64> = (0..100).map(|i| 1_700_000_000_000_000 + i * 50_000).collect();
        assert!(offer(&mut limiter, &arrivals).iter().all(|a| *a));
        let report = limiter.report();
        assert_eq!((report.over_rate_attempts, report.max_calls_in_any_1s_window), (0, 20));
        assert!((report.utilisation - 100.0 / (20.0 * 4.95)).abs() < 1e-9);
    }

    #[test]
    fn calls_faster_than_the_rate_are_held_to_it() {
        // One call every 10 ms for 3 s at 20/s: 20 in each second, the rest refused.
        let mut limiter = RateLimiter::new(20.0);
        let arrivals: Vec<i64> = (0..300).map(|i| i * 10_000).collect();
        let accepted = offer(&mut limiter, &arrivals).iter().filter(|a| **a).count();
        let report = limiter.report();
        assert_eq!(accepted, 60);
        assert_eq!((report.over_rate_attempts, report.max_calls_in_any_1s_window), (240, 20));
        assert_eq!(report.windows_above_rate, 0);
        assert!((report.attempts_above_rate_share - 0.8).abs() < 1e-12);
    }
}
