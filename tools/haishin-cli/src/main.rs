//! `haishin`: submit, watch and steer delivery requests on a Haishin trigger.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use haishin_cli::progress::Reading;
use haishin_cli::{Client, Control, ListFilter};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "haishin", about = "Submit, watch and steer delivery requests on a Haishin trigger.")]
struct Cli {
    /// The deployed trigger's URL; calls carry an ID token from Application Default Credentials.
    #[arg(long, env = "HAISHIN_URL", conflicts_with = "local")]
    url: Option<String>,
    /// The endpoints file `haishin-local up` wrote: talk to the local stack's trigger.
    #[arg(long, env = "HAISHIN_LOCAL")]
    local: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Submits the delivery request in FILE (JSON; `-` reads standard input).
    Submit { file: PathBuf },
    /// Prints a request's status.
    Status { id: String },
    /// Shows a live progress bar per request until each has finished.
    Watch {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Seconds between two readings.
        #[arg(long, default_value_t = 2)]
        every: u64,
    },
    /// Pauses a request: nothing more of it is dispatched until it is resumed.
    Pause {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resumes a paused request where it stopped.
    Resume { id: String },
    /// Cancels a request: what was not yet handed to the provider is not sent.
    Cancel {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lists requests, newest first.
    List {
        #[arg(long)]
        state: Vec<String>,
        #[arg(long)]
        class: Vec<String>,
        /// `key:value`; repeat to require several.
        #[arg(long)]
        label: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Suppresses an address: it is never sent again (in the scope given).
    Suppress {
        address: String,
        /// `global`, or a label `key:value` such as `category:promotions`.
        #[arg(long)]
        scope: Option<String>,
        #[arg(long, default_value = "manual")]
        reason: String,
    },
    /// Lifts an address's suppression in one scope.
    Unsuppress {
        address: String,
        #[arg(long)]
        scope: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = match (&cli.url, &cli.local) {
        (Some(url), _) => Client::deployed(url)?,
        (None, Some(endpoints)) => Client::local(endpoints)?,
        (None, None) => {
            anyhow::bail!("say where the trigger is: --url URL (or HAISHIN_URL), or --local endpoints.json")
        }
    };
    let answer = match cli.command {
        Command::Submit { file } => client.submit(&read_request(&file)?).await?,
        Command::Status { id } => client.status(&id).await?,
        Command::Watch { ids, every } => {
            return watch(&client, &ids, Duration::from_secs(every.max(1))).await;
        }
        Command::Pause { id, reason } => client.control(&id, Control::Pause, reason.as_deref()).await?,
        Command::Resume { id } => client.control(&id, Control::Resume, None).await?,
        Command::Cancel { id, reason } => client.control(&id, Control::Cancel, reason.as_deref()).await?,
        Command::List { state, class, label, limit } => {
            let filter = ListFilter { states: state, classes: class, labels: label, limit };
            for request in client.list(&filter).await? {
                println!("{}", list_line(&request));
            }
            return Ok(());
        }
        Command::Suppress { address, scope, reason } => {
            client.suppress(&address, scope.as_deref(), &reason).await?
        }
        Command::Unsuppress { address, scope } => client.unsuppress(&address, scope.as_deref()).await?,
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

fn read_request(file: &PathBuf) -> anyhow::Result<Value> {
    let mut text = String::new();
    if file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).context("reading standard input")?;
    } else {
        text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    serde_json::from_str(&text).context("the request is not JSON")
}

fn list_line(request: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let recipients = &request["recipients"];
    format!(
        "{:<32} {:<8} {:<11} {:>9} recipients, {:>9} sent  {}",
        text(&request["id"]),
        text(&request["class"]),
        text(&request["state"]),
        recipients["total"].as_u64().unwrap_or(0),
        recipients["sent"].as_u64().unwrap_or(0),
        text(&request["received_at"]),
    )
}

/// A bar per request, labelled with its class, until each has finished.
async fn watch(client: &Client, ids: &[String], every: Duration) -> anyhow::Result<()> {
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>24} [{bar:40}] {pos}/{len} {msg}")?.progress_chars("=> ");
    let mut watched: BTreeMap<&str, (ProgressBar, Option<Reading>)> = BTreeMap::new();
    for id in ids {
        let bar = bars.add(ProgressBar::new(0).with_style(style.clone()).with_prefix(id.clone()));
        watched.insert(id, (bar, None));
    }
    loop {
        let mut running = 0;
        for (id, (bar, last)) in watched.iter_mut() {
            if last.as_ref().is_some_and(Reading::finished) {
                continue;
            }
            let reading = Reading::of(&client.status(id).await?, chrono::Utc::now());
            let rate = last.as_ref().and_then(|l| reading.rate_since(l));
            bar.set_length(reading.total);
            bar.set_position(reading.done);
            bar.set_prefix(format!("{id} ({})", reading.class));
            bar.set_message(reading.message(rate));
            if reading.finished() {
                bar.finish();
            } else {
                running += 1;
            }
            *last = Some(reading);
        }
        if running == 0 {
            return Ok(());
        }
        tokio::time::sleep(every).await;
    }
}
