use clap::Parser;
use haishin_completion::{Config, Job};

/// Services parse and build JSON all day: mimalloc keeps that cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
