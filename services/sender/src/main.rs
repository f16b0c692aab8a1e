use clap::Parser;
use haishin_sender::{Application, Config};

/// Services parse and build JSON all day: mimalloc keeps that cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = haishin_shared::telemetry::init("sender")?;
    let app = Application::build(Config::parse()).await?;
    app.run_until_stopped(haishin_shared::server::shutdown_signal()).await
}
