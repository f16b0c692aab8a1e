//! `esp-sim`: the ESP simulator as a process, for the local stack and benchmarks.
//! Prints its URL on stdout once it listens, and runs until SIGTERM or ctrl-c.

use anyhow::Context;
use clap::Parser;
use haishin_esp_sim::EspSim;
use haishin_esp_sim::cli::Cli;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .compact()
        .init();
    let cli = Cli::parse();
    let sim = EspSim::start(cli.config()).await?;
    println!("{}", sim.url());
    stopped().await?;
    tracing::info!("ESP simulator stopping.");
    let report = sim.shutdown().await?;
    tracing::info!(
        delivered = report.deliveries.delivered,
        duplicates = report.deliveries.duplicates,
        upload_over_limit = report.upload.over_limit_attempts,
        send_over_limit = report.send.over_limit_attempts,
        over_rate = report.rate.as_ref().map_or(0, |r| r.over_rate_attempts),
        "ESP simulator stopped."
    );
    if let Some(path) = &cli.report_out {
        let json = serde_json::to_vec_pretty(&report).context("encoding the report")?;
        std::fs::write(path, json).with_context(|| format!("writing the report to {}", path.display()))?;
    }
    Ok(())
}

/// Resolves on SIGTERM (what Cloud Run and process supervisors send) or ctrl-c.
async fn stopped() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("listening for ctrl-c"),
        _ = term.recv() => Ok(()),
    }
}
