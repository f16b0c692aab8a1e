use clap::Parser;
use haishin_trigger::public::{PublicConfig, PublicEntry};
use haishin_trigger::{Application, Config};

/// Services parse and build JSON all day: mimalloc keeps that cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
