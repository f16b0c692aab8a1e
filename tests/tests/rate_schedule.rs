//! A provider's rate held across instances: reservations from several pools (as from several
//! instances) on one schedule never overlap, so the units handed out in any second stay at or
//! below the rate.

use std::time::Duration;

use chrono::{DateTime, Utc};
use haishin_shared::store::{RateSchedule, Store};
use haishin_tests::fresh_database;

#[tokio::test]
async fn reservations_from_several_instances_are_spaced_at_the_rate() {
    let (_, url) = fresh_database().await;
    let rate = 50.0;
    let mut schedules = Vec::new();
    for _ in 0..3 {
        let store = Store::connect(&url, 4).await.unwrap();
        schedules.push(RateSchedule::new(store, "test-calls", rate).unwrap());
    }
    let reservations = futures::future::join_all((0..60).map(|i| {
        let schedule = schedules[i % 3].clone();
        async move { schedule.reserve(1).await.unwrap() }
    }))
    .await;

    // On the schedule's own clock, the database's: exact, whatever the load on this machine.
    let mut starts: Vec<DateTime<Utc>> = reservations.iter().map(|r| r.reserved).collect();
    starts.sort();
    let spacing = chrono::Duration::microseconds((1e6 / rate) as i64);
    for pair in starts.windows(2) {
        assert!(pair[1] - pair[0] >= spacing, "reservations closer than 1/rate: {}", pair[1] - pair[0]);
    }
    for (i, start) in starts.iter().enumerate() {
        let in_window =
            starts[i..].iter().take_while(|s| **s - *start < chrono::Duration::seconds(1)).count();
        assert!(in_window <= rate as usize, "{in_window} reservations within one second");
    }
    assert!(
        *starts.last().unwrap() - starts[0] >= spacing * 59,
        "60 reservations at 50/s span over a second"
    );
}

#[tokio::test]
async fn a_batch_reserves_one_slot_per_unit() {
    let (store, _) = fresh_database().await;
    let schedule = RateSchedule::new(store, "test-messages", 100.0).unwrap();
    let first = schedule.reserve(10).await.unwrap();
    let second = schedule.reserve(1).await.unwrap();
    assert!(first.interval > Duration::from_millis(10), "a little under the rate: {:?}", first.interval);
    let batch_length = chrono::Duration::from_std(first.interval * 10).unwrap();
    assert!(second.reserved - first.reserved >= batch_length, "the next reservation starts after the batch");
    assert!(RateSchedule::new(Store::connect_lazy("postgres://unused", 1).unwrap(), "x", 0.0).is_none());
}
