use clap::Parser;
use haishin_list_uploader::{Application, Config};

/// Services build and drop JSON values all day: jemalloc does that with less CPU than the system
/// allocator, at about the same memory.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = haishin_shared::telemetry::init("list-uploader")?;
    let app = Application::build(Config::parse()).await?;
    app.run_until_stopped(haishin_shared::server::shutdown_signal()).await
}
