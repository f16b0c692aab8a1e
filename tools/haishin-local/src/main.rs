use clap::{Parser, Subcommand};
use haishin_local::bench::{self, BenchArgs};
use haishin_local::demo::{self, DemoArgs};
use haishin_local::services::{self, Service};
use haishin_local::stack::{LocalStack, ServiceMode, StackConfig};

/// The local stack runs every service from this binary: the same allocator as their own.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Haishin's whole pipeline on one machine.
#[derive(Debug, Parser)]
#[command(name = "haishin-local", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a sample campaign with realtime events through the whole local stack and writes a report.
    Demo(Box<DemoArgs>),
    /// Runs the benchmark scenarios (build with --release) and prints their figures next to the targets.
    Bench(BenchArgs),
    /// Starts the whole local stack, writes every URL to a JSON file, and runs until SIGTERM or Ctrl-C.
    Up(UpArgs),
    /// Runs one service, configured by its environment (used by the local stack).
    #[command(hide = true)]
    Service {
        #[arg(value_enum)]
        name: Service,
    },
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Where to write the endpoints (JSON).
    #[arg(long)]
    endpoints: std::path::PathBuf,
    /// The ESP's concurrency limit, for each of its upload and send APIs.
    #[arg(long, default_value_t = 4)]
    esp_concurrency: u32,
    /// Recipients per chunk.
    #[arg(long, default_value_t = 10_000)]
    chunk_size: u32,
    /// Where service logs and delivery logs go.
    #[arg(long, default_value = "haishin-local-run")]
    run_dir: std::path::PathBuf,
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let esp = haishin_esp_sim::EspSimConfig {
        upload_limit: args.esp_concurrency,
        send_limit: args.esp_concurrency,
        ..haishin_esp_sim::EspSimConfig::default()
    };
    let stack = LocalStack::start(StackConfig {
        esp,
        chunk_size: args.chunk_size,
        realtime_reserved_slots: 0,
        inline_recipients_max: demo::INLINE_RECIPIENTS_MAX,
        triggers: 1,
        prefetch: haishin_trigger::config::DISPATCH_PREFETCH,
        mode: ServiceMode::Processes { exe: std::env::current_exe()? },
        completion_every: std::time::Duration::from_secs(2),
        run_dir: args.run_dir.clone(),
        service_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        database_url: None,
        task_name_ttl: haishin_local::stack::TASK_NAME_TTL,
        provider: Default::default(),
        bigquery_endpoint: None,
        prepare_partition_bytes: None,
        prepare_kept_bytes: None,
    })
    .await?;
    std::fs::write(&args.endpoints, serde_json::to_vec_pretty(&stack.endpoints)?)?;
    eprintln!(
        "Local stack up; endpoints in {}, logs in {}",
        args.endpoints.display(),
        args.run_dir.display()
    );
    haishin_shared::server::shutdown_signal().await;
    stack.stop().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Service { name } => {
            let _telemetry = haishin_shared::telemetry::init(name.name())?;
            services::run(name).await
        }
        Command::Bench(args) => {
            let _telemetry = haishin_shared::telemetry::init_with_default("haishin-local", "warn")?;
            let path = args.json.clone();
            bench::run(args, ServiceMode::Processes { exe: std::env::current_exe()? }).await?;
            eprintln!(
                "Reports written to {}, pictures beside it ({})",
                path.display(),
                haishin_local::picture::path_beside(&path, Some("SCENARIO")).display()
            );
            Ok(())
        }
        Command::Up(args) => {
            let _telemetry = haishin_shared::telemetry::init("haishin-local")?;
            up(args).await
        }
        Command::Demo(args) => {
            let _telemetry = haishin_shared::telemetry::init_with_default("haishin-local", "warn")?;
            let exe = std::env::current_exe()?;
            let (path, json) = (args.report.clone(), args.json);
            let report = demo::run(*args, ServiceMode::Processes { exe }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            let picture = haishin_local::picture::path_beside(&path, None);
            println!(
                "{}\nReport written to {}, its picture to {}",
                report.summary(),
                path.display(),
                picture.display()
            );
            Ok(())
        }
    }
}
