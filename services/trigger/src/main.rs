use clap::Parser;
use haishin_trigger::{Application, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    haishin_shared::telemetry::init("trigger");
    let config = Config::parse();
    let app = Application::build(config).await?;
    app.run_until_stopped(haishin_shared::server::shutdown_signal()).await
}
