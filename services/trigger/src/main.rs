use clap::Parser;
use haishin_trigger::public::{PublicConfig, PublicEntry};
use haishin_trigger::{Application, Config};

/// Services build and drop JSON values all day: jemalloc does that with less CPU than the system
/// allocator, at about the same memory.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `trigger unsubscribe`: the public entry, serving the one-click unsubscribe links alone.
    if std::env::args().nth(1).as_deref() == Some("unsubscribe") {
        let _telemetry = haishin_shared::telemetry::init("unsubscribe")?;
        let config = PublicConfig::parse_from(std::env::args_os().skip(1));
        let entry = PublicEntry::build(config).await?;
        return entry.run_until_stopped(haishin_shared::server::shutdown_signal()).await;
    }
    let _telemetry = haishin_shared::telemetry::init("trigger")?;
    let config = Config::parse();
    let app = Application::build(config).await?;
    app.run_until_stopped(haishin_shared::server::shutdown_signal()).await
}
