use clap::Parser;
use haishin_completion::{Config, Job};

/// Services build and drop JSON values all day: jemalloc does that with less CPU than the system
/// allocator, at about the same memory.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs passes until the work is done or the run's time is up, and exits, as a Cloud Run job
/// does each time Cloud Scheduler starts it.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = haishin_shared::telemetry::init("completion")?;
    let job = Job::build(Config::parse()).await?;
    let report = job.run().await?;
    tracing::info!(report = %serde_json::to_string(&report)?, "Completion run done.");
    Ok(())
}
