//! A provider's rate held across instances: reservations from several pools (as from several
//! instances) on one schedule never overlap, so the units handed out in any second stay at or
//! below the rate.

use std::time::Duration;

use haishin_shared::store::{RateSchedule, Store};
use haishin_tests::fresh_database;
use tokio::time::Instant;

#[tokio::test]
async fn reservations_from_several_instances_are_spaced_at_the_rate() {
    let (_, url) = fresh_database().await;
    let rate = 50.0;
    let mut schedules = Vec::new();
    for _ in 0..3 {
        let store = Store::connect(&url, 4).await.unwrap();
        schedules.push(RateSchedule::new(store, "test-calls", rate).unwrap());
    }
    let started = Instant::now();
    let reservations = futures::future::join_all((0..60).map(|i| {
        let schedule = schedules[i % 3].clone();
        async move { schedule.reserve(1).await.unwrap() }
    }))
    .await;

    let mut starts: Vec<Instant> = reservations.iter().map(|r| r.start).collect();
    starts.sort();
    let spacing = Duration::from_secs_f64(1.0 / rate);
    // Each instance measures from its own clock: allow the time a reservation's answer takes.
    let slack = Duration::from_millis(5);
    for pair in starts.windows(2) {
        assert!(
            pair[1] - pair[0] + slack >= spacing,
            "reservations closer than 1/rate: {:?}",
            pair[1] - pair[0]
        );
    }
    for (i, start) in starts.iter().enumerate() {
        let in_window =
            starts[i..].iter().take_while(|s| **s - *start + slack < Duration::from_secs(1)).count();
        assert!(in_window <= rate as usize, "{in_window} reservations within one second");
    }
    let span = starts.last().unwrap().duration_since(started);
    assert!(span >= spacing * 58, "60 reservations at 50/s span over a second, not {span:?}");
}

#[tokio::test]
async fn a_batch_reserves_one_slot_per_unit() {
    let (store, _) = fresh_database().await;
    let schedule = RateSchedule::new(store, "test-messages", 100.0).unwrap();
    let first = schedule.reserve(10).await.unwrap();
    let second = schedule.reserve(1).await.unwrap();
    assert!(first.interval > Duration::from_millis(10), "a little under the rate: {:?}", first.interval);
    assert!(
        second.start >= first.at(9) + first.interval - Duration::from_millis(5),
        "the next reservation starts after the batch"
    );
    assert!(RateSchedule::new(Store::connect_lazy("postgres://unused", 1).unwrap(), "x", 0.0).is_none());
}
