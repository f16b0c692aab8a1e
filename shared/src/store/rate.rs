//! Rate schedules: a provider's rate limit (calls or messages per second) held across every
//! instance of every service.
//!
//! A schedule is one row holding the next free moment. Each caller reserves `units` by moving
//! that moment on by `units / rate`, and starts when its reservation begins. Reservations never
//! overlap, so however many instances call, the units handed out in any second never exceed
//! the rate. The database's clock is the only clock, so instances need not agree on theirs.
//!
//! The schedule runs [`HEADROOM`] under the declared rate: a call reaches the provider a few
//! milliseconds after its reserved moment, and not always the same few, so calls spaced exactly
//! 1/rate apart could still arrive `rate + 1` within one of the provider's seconds.
//!
//! A reservation that is never used (its caller crashed, or the call was refused before it
//! went out) leaves a gap in the schedule: the rate is then undershot, never exceeded.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::{Result, Store};

/// The share of the declared rate the schedule keeps free: 3% of every second (30 ms), which
/// absorbs that much variation in how long calls take to reach the provider.
const HEADROOM: f64 = 0.03;

/// One rate, shared by every caller that names the same schedule.
#[derive(Clone, Debug)]
pub struct RateSchedule {
    store: Store,
    name: &'static str,
    /// How long one unit occupies the schedule: 1 / rate.
    per_unit: Duration,
}

/// A reservation: `units` starting at `start`, one every `interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// When the first unit may go out, on this instance's clock.
    pub start: Instant,
    pub interval: Duration,
    /// The same moment on the database's clock, the schedule's own.
    pub reserved: DateTime<Utc>,
}

impl Reservation {
    /// A reservation that waits for nothing (no rate is declared).
    pub fn now() -> Self {
        Self { start: Instant::now(), interval: Duration::ZERO, reserved: Utc::now() }
    }

    /// When unit `index` of the reservation may go out.
    pub fn at(&self, index: usize) -> Instant {
        self.start + self.interval * index as u32
    }

    /// Waits until unit `index` may go out.
    pub async fn ready(&self, index: usize) {
        tokio::time::sleep_until(self.at(index)).await;
    }
}

impl RateSchedule {
    /// A schedule of `per_second` units a second; `None` when the rate is not a positive number.
    pub fn new(store: Store, name: &'static str, per_second: f64) -> Option<Self> {
        (per_second.is_finite() && per_second > 0.0).then(|| Self {
            store,
            name,
            // Whole microseconds, PostgreSQL's precision, rounded up so as never to run fast.
            per_unit: Duration::from_micros((1e6 / (per_second * (1.0 - HEADROOM))).ceil() as u64),
        })
    }

    /// The schedule's name (`esp-calls`, `esp-messages`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Reserves `units` consecutive slots and says when the first begins.
    pub async fn reserve(&self, units: u32) -> Result<Reservation> {
        let length = self.per_unit * units.max(1);
        let (reserved, wait_us): (DateTime<Utc>, f64) = sqlx::query_as(
            "INSERT INTO rate_schedules AS s (name, next_at) VALUES ($1, clock_timestamp() + $2)
             ON CONFLICT (name) DO UPDATE SET next_at = greatest(s.next_at, clock_timestamp()) + $2
             RETURNING s.next_at - $2, (extract(epoch FROM s.next_at - $2 - clock_timestamp()) * 1e6)::float8",
        )
        .bind(self.name)
        .bind(length)
        .fetch_one(self.store.pool())
        .await?;
        let wait = Duration::from_micros(wait_us.max(0.0) as u64);
        Ok(Reservation { start: Instant::now() + wait, interval: self.per_unit, reserved })
    }

    /// Reserves `units` and waits until the reservation begins.
    pub async fn wait(&self, units: u32) -> Result<Reservation> {
        let reservation = self.reserve(units).await?;
        reservation.ready(0).await;
        Ok(reservation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_spaces_its_units_by_the_interval() {
        let start = Instant::now();
        let reservation = Reservation { start, interval: Duration::from_millis(50), reserved: Utc::now() };
        assert_eq!(reservation.at(0), start);
        assert_eq!(reservation.at(3), start + Duration::from_millis(150));
        assert_eq!(Reservation::now().interval, Duration::ZERO);
    }
}
