//! A completion run works through a backlog larger than one pass takes (a batch of each step),
//! pass after pass, and starts no pass once its time is up.

use std::time::Duration;

use haishin_completion::{BATCH, Config, Job};
use haishin_local::services::Service;
use haishin_local::stack::{Instance, LocalStack, parse_env};
use haishin_shared::domain::Class;
use haishin_tests::TestStack;
use haishin_tests::dispatchable::request;
use haishin_trigger::intake::records::insert_request;

/// Stores `count` requests whose chunks are all final (they have none), ready to be closed and
/// logged, with ids from `prefix`.
async fn finished_requests(stack: &LocalStack, prefix: &str, count: i64) {
    for i in 0..count {
        assert!(
            insert_request(&stack.store, &request(&format!("{prefix}-{i}"), Class::Realtime, 1))
                .await
                .unwrap()
        );
    }
    sqlx::query("UPDATE requests SET state = 'dispatching' WHERE id LIKE $1 || '-%'")
        .bind(prefix)
        .execute(stack.store.pool())
        .await
        .unwrap();
}

/// The completion job as the stack runs it, with a run of `run_seconds`.
async fn job(stack: &LocalStack, run_seconds: u64) -> Job {
    let mut env = stack.env_of(Instance::first(Service::Completion)).unwrap().to_vec();
    env.retain(|(name, _)| name != "RUN_SECONDS");
    env.push(("RUN_SECONDS".to_owned(), run_seconds.to_string()));
    Job::build(parse_env::<Config>(Service::Completion, &env).unwrap()).await.unwrap()
}

async fn unlogged(stack: &LocalStack, prefix: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM requests WHERE id LIKE $1 || '-%' AND logged_at IS NULL")
        .bind(prefix)
        .fetch_one(stack.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_run_takes_passes_until_the_backlog_is_done_and_none_once_its_time_is_up() {
    // The stack's own schedule stays out of the way.
    let stack =
        TestStack { completion_every: Duration::from_secs(3_600), ..TestStack::default() }.start().await;
    let backlog = BATCH + 5;

    finished_requests(&stack, "flood", backlog).await;
    let report = job(&stack, 60).await.run().await.unwrap();
    assert_eq!(report.passes, 2, "a whole batch of log rows, then the rest: {report:?}");
    assert_eq!((report.closed_requests, report.request_rows), (backlog as u64, backlog as u64));
    assert_eq!(unlogged(&stack, "flood").await, 0);

    // With no time for a second pass, the rest waits for the next run.
    finished_requests(&stack, "late", backlog).await;
    let report = job(&stack, 0).await.run().await.unwrap();
    assert_eq!((report.passes, report.request_rows), (1, BATCH as u64), "{report:?}");
    assert_eq!(unlogged(&stack, "late").await, 5);
    stack.stop().await;
}
