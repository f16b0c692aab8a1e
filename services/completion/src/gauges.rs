//! The backlog as metrics, read once a pass: chunks not yet final by state and class, and the age
//! of the oldest chunk waiting for a slot in each class (see `haishin_shared::telemetry::metrics`).

use std::collections::HashMap;

use haishin_shared::domain::{ChunkState, Class};
use haishin_shared::store::{Result, Store};
use haishin_shared::telemetry::metrics::{KeyValue, metrics};

/// Records the backlog gauges. A state or class with nothing in it is recorded as zero, so that a
/// drained backlog shows as drained rather than as its last value.
pub(crate) async fn record(store: &Store) -> Result<()> {
    let counts: Vec<(ChunkState, Class, i64)> = sqlx::query_as(
        "SELECT state, class, count(*) FROM chunks WHERE state <> ALL($1) GROUP BY state, class",
    )
    .bind(ChunkState::FINAL)
    .fetch_all(store.pool())
    .await?;
    let counts: HashMap<(ChunkState, Class), i64> =
        counts.into_iter().map(|(state, class, n)| ((state, class), n)).collect();
    let oldest: Vec<(Class, f64)> = sqlx::query_as(
        "SELECT c.class, extract(epoch FROM now() - min(c.created_at))::float8
         FROM chunks c JOIN requests r ON r.id = c.request_id
         WHERE c.state = 'pending' AND r.paused_at IS NULL
         GROUP BY c.class",
    )
    .fetch_all(store.pool())
    .await?;
    let oldest: HashMap<Class, f64> = oldest.into_iter().collect();

    let m = metrics();
    for class in Class::ALL {
        for state in ChunkState::ALL.iter().filter(|s| !ChunkState::FINAL.contains(s)) {
            let n = counts.get(&(*state, *class)).copied().unwrap_or(0);
            m.chunks.record(
                n.max(0) as u64,
                &[KeyValue::new("state", state.as_str()), KeyValue::new("class", class.as_str())],
            );
        }
        let age = oldest.get(class).copied().unwrap_or(0.0);
        m.oldest_pending.record(age.max(0.0), &[KeyValue::new("class", class.as_str())]);
    }
    Ok(())
}
