//! The local stack: a throwaway PostgreSQL, the Google Cloud stand-ins, the ESP simulator and the
//! four services, wired as Terraform wires them in production (same topics, queues, push
//! subscriptions with OIDC tokens and dead-letter topics, same environment variables).
//!
//! Each service sits behind a front door that does what Cloud Run's front end does with IAM
//! invoker checks on: it answers 401 or 403 itself, and forwards accepted requests with the
//! token's signature removed. The services run with `PUSH_AUTH=cloud-run-iam`, as deployed, so
//! the tests and the demo exercise the production path. Two differences are on purpose: the
//! trigger's `/v1` API needs no token locally (in production its callers hold `roles/run.invoker`),
//! and the trigger serves the unsubscribe links itself (in production the public entry, the
//! trigger's image run as `trigger unsubscribe`, serves them).
//!
//! Services run either as separate processes of this binary (`haishin-local service NAME`: the
//! demo, so that one can be killed) or inside this process (the tests). Both read the same
//! environment-variable configuration.

use crate::collector::Collector;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches};
use haishin_esp_sim::{EspSim, EspSimConfig, EspSimHandle};
use haishin_shared::gcp::{Blobs, GcpArgs, Topic};
use haishin_shared::store::Store;
use haishin_stand_ins::front_door::{FrontDoor, FrontDoorConfig};
use haishin_stand_ins::postgres::PgCluster;
use haishin_stand_ins::pubsub::{DeadLetterPolicy, PushAuth, PushSubscription};
use haishin_stand_ins::tasks::Queue;
use haishin_stand_ins::{StandIns, StandInsConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::services::Service;

pub const PROJECT: &str = "haishin-local";
pub const LOCATION: &str = "local";
pub const BUCKET: &str = "haishin-local-data";
/// The account Pub/Sub signs push tokens as.
pub const PUSH_ACCOUNT: &str = "pubsub-push@haishin-local.iam.gserviceaccount.com";
/// The account Cloud Tasks signs task tokens as.
pub const TASKS_ACCOUNT: &str = "tasks-invoker@haishin-local.iam.gserviceaccount.com";
pub const ESP_API_KEY: &str = "local-esp-key";
/// How long a done task's name stays taken, as in Cloud Tasks.
pub const TASK_NAME_TTL: Duration = Duration::from_secs(3600);

/// Topic names, as in Terraform.
pub mod topics {
    pub const REQUESTS: &str = "delivery-requests";
    pub const DELIVERIES: &str = "deliveries";
    pub const EVENTS: &str = "pipeline-events";
    pub const COMPLETED: &str = "request-completed";
}

/// How the services run.
#[derive(Debug, Clone)]
pub enum ServiceMode {
    /// Each service is a process of this executable (`EXE service NAME`), logging to `log_dir`.
    Processes { exe: PathBuf },
    /// Each service runs inside this process.
    InProcess,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub esp: EspSimConfig,
    pub chunk_size: u32,
    pub realtime_reserved_slots: u32,
    /// Realtime chunks of at most this many recipients are sent with their recipients in the
    /// call, without a list upload (`ESP_INLINE_RECIPIENTS_MAX`, list-send only); 0: none.
    pub inline_recipients_max: u32,
    /// Trigger instances; each gets every pipeline event, so they race to dispatch.
    pub triggers: u32,
    /// Upload tasks allowed to wait in the queue beyond the ESP's limit (`DISPATCH_PREFETCH`).
    pub prefetch: u32,
    pub mode: ServiceMode,
    /// How often the completion job runs (Cloud Scheduler's schedule).
    pub completion_every: Duration,
    /// Where service logs and delivery logs go.
    pub run_dir: PathBuf,
    /// `RUST_LOG` of the services.
    pub service_log: String,
    /// A database to use instead of starting a throwaway cluster.
    pub database_url: Option<String>,
    /// How long a done task's name stays taken (Cloud Tasks: about an hour).
    pub task_name_ttl: Duration,
    /// Who delivers the mail.
    pub provider: MailProvider,
    /// BigQuery for the trigger's BigQuery audiences (a [`crate::bigquery::LocalBigQuery`]'s
    /// endpoint); none: such audiences fail.
    pub bigquery_endpoint: Option<String>,
    /// Audience bytes per prepare partition (`PREPARE_PARTITION_BYTES`); none: the trigger's
    /// default. Audiences larger than one partition are prepared in parts.
    pub prepare_partition_bytes: Option<u64>,
    /// Bytes of partition objects the trigger keeps for its cuts (`PREPARE_KEPT_BYTES`); none:
    /// the trigger's default.
    pub prepare_kept_bytes: Option<u64>,
}

/// The provider the local services deliver through.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum MailProvider {
    /// The ESP simulator, a list-based ESP (`ESP_PROVIDER=list-send`).
    #[default]
    Simulator,
    /// An SMTP server at `url` (`smtp://127.0.0.1:PORT`), and the messages per second it takes.
    Smtp { url: String, messages_per_second: Option<f64> },
    /// Amazon SES's API at `endpoint` (moto in server mode), and the account's sending rate.
    Ses { endpoint: String, messages_per_second: Option<f64> },
}

impl MailProvider {
    /// The value of `ESP_PROVIDER`.
    pub fn kind(&self) -> &'static str {
        match self {
            MailProvider::Simulator => "list-send",
            MailProvider::Smtp { .. } => "smtp",
            MailProvider::Ses { .. } => "ses",
        }
    }
}

/// The `From` of the messages the local stack renders.
pub const MAIL_FROM: &str = "Haishin Demo <news@haishin.example>";
/// The AWS region the local stack's SES client names.
pub const SES_REGION: &str = "us-east-1";
/// The unsubscribe endpoint the local stack's messages point at.
pub const UNSUBSCRIBE_URL: &str = "https://haishin.example/unsubscribe";
/// The local completion job's kill switch: the bounce rate that pauses a request, and the
/// recipients with an outcome it needs first.
pub const KILL_SWITCH_BOUNCE_RATE: f64 = 0.05;
pub const KILL_SWITCH_MIN_SAMPLE: u64 = 200;
/// The complaint rate at which the completion job pauses a request (as in production).
pub const KILL_SWITCH_COMPLAINT_RATE: f64 = 0.003;
/// The key the local sender signs unsubscribe tokens with, and the local trigger checks them with.
pub const UNSUBSCRIBE_SECRET: &str = "haishin-local-unsubscribe-secret-0123456789";

/// URLs of everything running, as `haishin-local up` writes them. A service's URL is its front
/// door's, as a Cloud Run service's URL is its front end's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Endpoints {
    pub trigger: String,
    /// Further trigger instances, sharing the database with the first.
    pub more_triggers: Vec<String>,
    pub list_uploader: String,
    pub sender: String,
    /// Where each service instance listens behind its front door (`trigger-0`, `sender-0`, …).
    pub backends: BTreeMap<String, String>,
    pub esp: String,
    pub pubsub: String,
    pub tasks: String,
    pub storage: String,
    pub jwks: String,
    pub database_url: String,
    /// The collector's OTLP endpoint.
    pub otlp: String,
}

/// One running copy of a service: the trigger may run several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instance {
    pub service: Service,
    pub index: u32,
}

impl Instance {
    pub fn first(service: Service) -> Self {
        Self { service, index: 0 }
    }
}

enum Running {
    Process { child: tokio::process::Child },
    Task { stop: watch::Sender<bool>, task: JoinHandle<anyhow::Result<()>> },
}

/// A running local stack. Stop it with [`LocalStack::stop`].
pub struct LocalStack {
    pub config: StackConfig,
    pub endpoints: Endpoints,
    pub store: Store,
    pub esp: EspSimHandle,
    pub stand_ins: StandIns,
    pub blobs: Blobs,
    pub requests_topic: Topic,
    front_doors: Vec<FrontDoor>,
    /// The push subscriptions, for their counters.
    subscriptions: Vec<String>,
    pg: Option<PgCluster>,
    services: tokio::sync::Mutex<Vec<(Instance, Running)>>,
    env: BTreeMap<Instance, Vec<(String, String)>>,
    scheduler: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// Process id of the completion pass running now (0: none).
    completion_pid: Arc<AtomicU32>,
    /// Where the services export their spans and metrics.
    pub collector: Collector,
}

/// A port that was free a moment ago.
///
/// A service's port must be known before it starts (its front door and its peers are told it),
/// so it cannot bind port 0. Ports are handed out from below Linux's ephemeral range
/// (32768–60999), where the kernel never places a port-0 bind, and each at most once per
/// process, so that two stacks started at once (parallel tests) never pick the same one.
fn free_port() -> anyhow::Result<u16> {
    const FIRST: u32 = 20_000;
    const LAST: u32 = 32_000;
    // Where this process starts, spread by its id, so that two processes rarely share a stretch.
    static NEXT: std::sync::LazyLock<AtomicU32> =
        std::sync::LazyLock::new(|| AtomicU32::new(std::process::id().wrapping_mul(7_919) % (LAST - FIRST)));
    for _ in FIRST..LAST {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % (LAST - FIRST)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between {FIRST} and {LAST}")
}

impl LocalStack {
    /// Starts everything and waits until the services answer.
    pub async fn start(config: StackConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.run_dir).context("creating the run directory")?;
        let (pg, database_url) = match &config.database_url {
            Some(url) => (None, url.clone()),
            None => {
                let pg = PgCluster::start().await.context("starting PostgreSQL")?;
                let url = pg.create_database().await?;
                (Some(pg), url)
            }
        };
        let store = Store::connect(&database_url, 5).await?;
        store.migrate().await?;

        if let MailProvider::Ses { endpoint, .. } = &config.provider {
            verify_ses_sender(endpoint).await?;
        }
        let stand_ins = StandIns::start(StandInsConfig::default()).await.context("starting the stand-ins")?;
        let collector = Collector::start().await.context("starting the trace collector")?;
        let mut esp_config = config.esp.clone();
        esp_config.api_key = Some(ESP_API_KEY.to_owned());
        let esp = EspSim::start(esp_config).await.context("starting the ESP simulator")?;

        let mut backends = BTreeMap::new();
        let mut front_doors = Vec::new();
        let mut instances = vec![Instance::first(Service::ListUploader), Instance::first(Service::Sender)];
        instances
            .extend((0..config.triggers.max(1)).map(|index| Instance { service: Service::Trigger, index }));
        let backend_urls: BTreeMap<Instance, String> = instances
            .iter()
            .map(|&i| Ok((i, format!("http://127.0.0.1:{}", free_port()?))))
            .collect::<anyhow::Result<_>>()?;
        // The trigger's URL is one door in front of all its instances, which takes them in turn,
        // as Cloud Run spreads a service's requests; each further instance also has a door of its
        // own, so that every instance can be pushed every pipeline event. Tokens for the
        // service's URL pass every door of it, as all instances are one service.
        let mut trigger_url = None;
        for instance in instances {
            let backend = backend_urls[&instance].clone();
            let mut config = front_door(instance.service, &backend);
            if instance == Instance::first(Service::Trigger) {
                config.more_backends = backend_urls
                    .iter()
                    .filter(|(i, _)| i.service == Service::Trigger && i.index > 0)
                    .map(|(_, url)| url.clone())
                    .collect();
            } else if instance.service == Service::Trigger {
                config.audiences.extend(trigger_url.clone());
            }
            let door = FrontDoor::start(config, &stand_ins.signer).await.context("starting a front door")?;
            if instance == Instance::first(Service::Trigger) {
                trigger_url = Some(door.url());
            }
            backends.insert(instance, (door.url(), backend));
            front_doors.push(door);
        }
        let door_of = |instance: Instance| backends[&instance].0.clone();
        let endpoints = Endpoints {
            trigger: door_of(Instance::first(Service::Trigger)),
            more_triggers: (1..config.triggers.max(1))
                .map(|index| door_of(Instance { service: Service::Trigger, index }))
                .collect(),
            list_uploader: door_of(Instance::first(Service::ListUploader)),
            sender: door_of(Instance::first(Service::Sender)),
            backends: backends
                .iter()
                .map(|(i, (_, backend))| (format!("{}-{}", i.service.name(), i.index), backend.clone()))
                .collect(),
            esp: esp.url(),
            pubsub: stand_ins.pubsub_endpoint(),
            tasks: stand_ins.tasks_endpoint(),
            storage: stand_ins.storage_endpoint(),
            jwks: stand_ins.jwks_url(),
            database_url: database_url.clone(),
            otlp: collector.endpoint().to_owned(),
        };
        let gcp = GcpArgs {
            project: PROJECT.into(),
            pubsub_endpoint: Some(endpoints.pubsub.clone()),
            tasks_endpoint: Some(endpoints.tasks.clone()),
            storage_endpoint: Some(endpoints.storage.clone()),
            bigquery_endpoint: None,
        };
        provision(&stand_ins, &config)?;
        let blobs = Blobs::connect(&gcp).await?;
        let requests_topic = Topic::connect(&gcp, topics::REQUESTS).await?;
        let env = service_env(&config, &endpoints, config.esp.send_limit);

        let mut stack = Self {
            config,
            endpoints,
            store,
            esp,
            stand_ins,
            blobs,
            requests_topic,
            front_doors,
            subscriptions: Vec::new(),
            pg,
            services: tokio::sync::Mutex::new(Vec::new()),
            env,
            scheduler: None,
            completion_pid: Arc::new(AtomicU32::new(0)),
            collector,
        };
        let instances: Vec<Instance> =
            stack.env.keys().copied().filter(|i| i.service != Service::Completion).collect();
        for instance in instances {
            let running = stack.spawn(instance).await?;
            stack.services.get_mut().push((instance, running));
        }
        for instance in stack.env.keys() {
            if let Some(base) = stack.endpoints.url_of(*instance) {
                wait_healthy(base).await?;
            }
        }
        stack.subscriptions = subscribe(&stack.stand_ins, &stack.endpoints)?;
        stack.start_scheduler();
        Ok(stack)
    }

    async fn spawn(&self, instance: Instance) -> anyhow::Result<Running> {
        let env = &self.env[&instance];
        let service = instance.service;
        match &self.config.mode {
            ServiceMode::Processes { exe } => {
                let log = self.config.run_dir.join(format!("{}-{}.log", service.name(), instance.index));
                let child = spawn_service(exe, service, env, &log)?;
                Ok(Running::Process { child })
            }
            ServiceMode::InProcess => {
                let (stop, mut stopped) = watch::channel(false);
                let shutdown = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                let task = match service {
                    Service::Trigger => {
                        let app = haishin_trigger::Application::build(parse_env(service, env)?).await?;
                        tokio::spawn(app.run_until_stopped(shutdown))
                    }
                    Service::ListUploader => {
                        let app = haishin_list_uploader::Application::build(parse_env(service, env)?).await?;
                        tokio::spawn(app.run_until_stopped(shutdown))
                    }
                    Service::Sender => {
                        let app = haishin_sender::Application::build(parse_env(service, env)?).await?;
                        tokio::spawn(app.run_until_stopped(shutdown))
                    }
                    Service::Completion => bail!("the completion job is run by the scheduler"),
                };
                Ok(Running::Task { stop, task })
            }
        }
    }

    /// Runs Cloud Scheduler's part: one completion run every `completion_every`.
    fn start_scheduler(&mut self) {
        let (stop, mut stopped) = watch::channel(false);
        let every = self.config.completion_every;
        let env = self.env[&Instance::first(Service::Completion)].clone();
        let mode = self.config.mode.clone();
        let log_path = self.config.run_dir.join("completion.log");
        let pid = self.completion_pid.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(every) => {}
                }
                if let Err(err) = run_completion(&mode, &env, &log_path, &pid).await {
                    tracing::warn!(error = %err, "Completion run failed.");
                }
            }
        });
        self.scheduler = Some((stop, task));
    }

    /// The environment a service instance is started with (its configuration).
    pub fn env_of(&self, instance: Instance) -> Option<&[(String, String)]> {
        self.env.get(&instance).map(Vec::as_slice)
    }

    /// Kills the completion pass that runs next (or now) with SIGKILL, as a crashed job.
    /// Returns false when none started within `wait`.
    pub async fn kill_completion(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            let pid = self.completion_pid.load(Ordering::SeqCst);
            if pid != 0 {
                return std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Kills a service instance the hard way (SIGKILL or task abort) and starts it again.
    pub async fn restart(&self, instance: Instance) -> anyhow::Result<()> {
        let mut services = self.services.lock().await;
        if let Some(i) = services.iter().position(|(s, _)| *s == instance) {
            let (_, running) = services.remove(i);
            match running {
                Running::Process { mut child } => {
                    let _ = child.kill().await;
                }
                Running::Task { task, .. } => task.abort(),
            }
        }
        let running = self.spawn(instance).await?;
        services.push((instance, running));
        drop(services);
        match self.endpoints.url_of(instance) {
            Some(base) => wait_healthy(base).await,
            None => Ok(()),
        }
    }

    /// Restarts PostgreSQL (immediate shutdown, as a crash would), when this stack started it.
    pub async fn restart_postgres(&self) -> anyhow::Result<bool> {
        match &self.pg {
            Some(pg) => pg.restart().await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Acknowledged work the stand-ins delivered again: (Pub/Sub pushes, Cloud Tasks tasks).
    pub fn redelivered(&self) -> (u64, u64) {
        let pushes = self
            .subscriptions
            .iter()
            .filter_map(|name| self.stand_ins.pubsub.subscription_stats(name))
            .map(|stats| stats.redelivered)
            .sum();
        let tasks = ["prepare", "upload"]
            .iter()
            .filter_map(|name| self.stand_ins.tasks.queue_stats(&queue(name)))
            .map(|stats| stats.redelivered)
            .sum();
        (pushes, tasks)
    }

    /// The instances running.
    pub async fn instances(&self) -> Vec<Instance> {
        self.services.lock().await.iter().map(|(i, _)| *i).collect()
    }

    /// Stops the completion schedule and the services (SIGTERM, then waits for them).
    /// The process id of each service process running now (the completion pass's, while one
    /// runs); none in in-process mode.
    pub async fn service_pids(&self) -> Vec<(Service, u32)> {
        let mut pids: Vec<(Service, u32)> = self
            .services
            .lock()
            .await
            .iter()
            .filter_map(|(instance, running)| match running {
                Running::Process { child } => Some((instance.service, child.id()?)),
                Running::Task { .. } => None,
            })
            .collect();
        let completion = self.completion_pid.load(Ordering::SeqCst);
        if completion != 0 {
            pids.push((Service::Completion, completion));
        }
        pids
    }

    pub async fn stop_services(&mut self) {
        if let Some((stop, task)) = self.scheduler.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        for (_, running) in self.services.get_mut().drain(..) {
            match running {
                Running::Process { mut child } => {
                    if let Some(pid) = child.id() {
                        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                    }
                    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                        let _ = child.kill().await;
                    }
                }
                Running::Task { stop, task } => {
                    let _ = stop.send(true);
                    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
                }
            }
        }
    }

    /// Stops everything: the services, their front doors, the stand-ins, the ESP simulator and
    /// PostgreSQL.
    pub async fn stop(mut self) {
        self.stop_services().await;
        for door in self.front_doors.drain(..) {
            door.shutdown().await;
        }
        self.stand_ins.shutdown().await;
        let _ = self.esp.shutdown().await;
        if let Some(pg) = self.pg.take() {
            pg.stop().await;
        }
    }
}

/// Starts `EXE service NAME` with only the service's environment (plus PATH and HOME), its
/// output appended to `log`. The process is killed if its handle is dropped.
fn spawn_service(
    exe: &Path,
    service: Service,
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    tokio::process::Command::new(exe)
        .args(["service", service.name()])
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| k == "PATH" || k == "HOME"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", service.name()))
}

async fn run_completion(
    mode: &ServiceMode,
    env: &[(String, String)],
    log_path: &Path,
    running: &AtomicU32,
) -> anyhow::Result<()> {
    match mode {
        ServiceMode::Processes { exe } => {
            let mut child = spawn_service(exe, Service::Completion, env, log_path)?;
            running.store(child.id().unwrap_or(0), Ordering::SeqCst);
            let status = child.wait().await;
            running.store(0, Ordering::SeqCst);
            let status = status?;
            if !status.success() {
                bail!("completion pass exited with {status}");
            }
            Ok(())
        }
        ServiceMode::InProcess => {
            let job = haishin_completion::Job::build(parse_env(Service::Completion, env)?).await?;
            job.run().await.map(drop)
        }
    }
}

/// Parses a service's clap configuration from environment-variable pairs, without touching the
/// process environment: each pair is matched to the argument that reads that variable.
pub fn parse_env<C: CommandFactory + FromArgMatches>(
    service: Service,
    env: &[(String, String)],
) -> anyhow::Result<C> {
    let command = C::command();
    let mut args = vec![service.name().to_owned()];
    for (key, value) in env {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == key.as_str()))
            .and_then(|a| a.get_long());
        if let Some(long) = arg {
            args.push(format!("--{long}={value}"));
        }
    }
    let matches = command.try_get_matches_from(args)?;
    Ok(C::from_arg_matches(&matches)?)
}

/// The environment variables a service reads (from its clap definition).
pub fn env_names<C: CommandFactory>() -> Vec<String> {
    C::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect()
}

/// Whether the services export spans and metrics to the collector: unless
/// `HAISHIN_LOCAL_TELEMETRY=off`, which leaves the export out to measure what it costs.
pub fn telemetry_exported() -> bool {
    std::env::var("HAISHIN_LOCAL_TELEMETRY").map_or(true, |v| v != "off")
}

fn service_env(
    config: &StackConfig,
    endpoints: &Endpoints,
    send_limit: u32,
) -> BTreeMap<Instance, Vec<(String, String)>> {
    let pairs =
        |list: &[(&str, String)]| list.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect::<Vec<_>>();
    let port = |url: &str| url.rsplit(':').next().unwrap_or_default().to_owned();
    let backend_of = |instance: Instance| {
        endpoints.backends[&format!("{}-{}", instance.service.name(), instance.index)].clone()
    };
    let gcp = [
        ("GOOGLE_CLOUD_PROJECT", PROJECT.to_owned()),
        ("PUBSUB_ENDPOINT", endpoints.pubsub.clone()),
        ("TASKS_ENDPOINT", endpoints.tasks.clone()),
        ("STORAGE_ENDPOINT", endpoints.storage.clone()),
        ("DATABASE_URL", endpoints.database_url.clone()),
        ("RUST_LOG", config.service_log.clone()),
    ];
    // Spans and metrics go to the local collector, as they go to Google's Telemetry API in
    // production; metrics every second, so that a short run still exports several times.
    let exporting = telemetry_exported();
    let telemetry = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoints.otlp.clone()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000".to_owned()),
    ];
    let gcp: Vec<(&str, String)> =
        gcp.into_iter().chain(telemetry.into_iter().filter(|_| exporting)).collect();
    // A service listens behind its front door; its URL (the tokens' audience) is the door's.
    let serving = |instance: Instance, url: &String| {
        let mut list = gcp.to_vec();
        list.extend([
            ("PORT", port(&backend_of(instance))),
            ("LISTEN_HOST", "127.0.0.1".to_owned()),
            ("OIDC_JWKS_URL", endpoints.jwks.clone()),
            ("PUSH_AUTH", "cloud-run-iam".to_owned()),
            ("PUSH_AUDIENCE", url.clone()),
            ("PUSH_INVOKERS", invokers(instance.service).join(",")),
            ("DATABASE_MAX_CONNECTIONS", "20".to_owned()),
        ]);
        list
    };
    let esp = [
        ("ESP_PROVIDER", config.provider.kind().to_owned()),
        ("ESP_URL", endpoints.esp.clone()),
        ("ESP_API_KEY", ESP_API_KEY.to_owned()),
        // Leases outlast the ESP timeout, so that work is only taken over once its ESP call has ended.
        ("ESP_TIMEOUT_SECS", "20".to_owned()),
    ];
    // A message-based provider's send is the bottleneck: the trigger's slots are the sender's.
    let slots = match config.provider {
        MailProvider::Simulator => config.esp.upload_limit,
        _ => send_limit,
    };
    // Every trigger instance is the one service at the trigger's URL.
    let trigger_env = |index: u32| {
        let url = &endpoints.trigger;
        let mut trigger = serving(Instance { service: Service::Trigger, index }, url);
        trigger.extend([
            ("TASKS_LOCATION", LOCATION.to_owned()),
            ("TASKS_INVOKER_SA", TASKS_ACCOUNT.to_owned()),
            ("TRIGGER_URL", url.clone()),
            ("LIST_UPLOADER_URL", endpoints.list_uploader.clone()),
            ("BUCKET", BUCKET.to_owned()),
            ("CHUNK_SIZE", config.chunk_size.to_string()),
            ("ESP_PROVIDER", config.provider.kind().to_owned()),
            ("ESP_SLOTS", slots.to_string()),
            ("REALTIME_RESERVED_SLOTS", config.realtime_reserved_slots.to_string()),
            ("ESP_INLINE_RECIPIENTS_MAX", config.inline_recipients_max.to_string()),
            ("ESP_SEND_SLOTS", send_limit.to_string()),
            ("DISPATCH_PREFETCH", config.prefetch.to_string()),
            ("PREPARE_LEASE_SECS", "30".to_owned()),
            ("UPLOAD_TIMEOUT_SECS", "25".to_owned()),
            ("UNSUBSCRIBE_SECRET", UNSUBSCRIBE_SECRET.to_owned()),
        ]);
        trigger.extend(config.bigquery_endpoint.iter().map(|url| ("BIGQUERY_ENDPOINT", url.clone())));
        trigger.extend(config.prepare_partition_bytes.map(|b| ("PREPARE_PARTITION_BYTES", b.to_string())));
        trigger.extend(config.prepare_kept_bytes.map(|b| ("PREPARE_KEPT_BYTES", b.to_string())));
        pairs(&trigger)
    };
    let mut uploader = serving(Instance::first(Service::ListUploader), &endpoints.list_uploader);
    uploader.extend(esp.clone());
    uploader.extend([("BUCKET", BUCKET.to_owned()), ("UPLOAD_LEASE_SECS", "25".to_owned())]);
    let mut sender = serving(Instance::first(Service::Sender), &endpoints.sender);
    sender.extend(esp.clone());
    sender.extend([
        // Chunk objects: read for message-based providers and for chunks sent without a list.
        ("BUCKET", BUCKET.to_owned()),
        ("ESP_SEND_CONCURRENCY", send_limit.to_string()),
        ("SEND_LEASE_SECS", "25".to_owned()),
        ("ESP_INLINE_RECIPIENTS_MAX", config.inline_recipients_max.to_string()),
    ]);
    sender.extend(message_provider_env(&config.provider));
    // The ESP's calls-per-second limit, over uploads and sends together: both pace their calls to it.
    if let Some(rate) = config.esp.calls_per_second {
        uploader.push(("ESP_CALLS_PER_SECOND", rate.to_string()));
        sender.push(("ESP_CALLS_PER_SECOND", rate.to_string()));
    }
    let mut completion = gcp.to_vec();
    completion.extend(esp);
    completion.extend([
        ("LOG_SINK", format!("file:{}", config.run_dir.join("logs").display())),
        ("QUEUED_TIMEOUT_SECS", "40".to_owned()),
        ("UPLOADED_TIMEOUT_SECS", "15".to_owned()),
        // The kill switch at its default rate, on a sample small enough for a local campaign.
        ("KILL_SWITCH_BOUNCE_RATE", KILL_SWITCH_BOUNCE_RATE.to_string()),
        ("KILL_SWITCH_MIN_SAMPLE", KILL_SWITCH_MIN_SAMPLE.to_string()),
        ("KILL_SWITCH_COMPLAINT_RATE", KILL_SWITCH_COMPLAINT_RATE.to_string()),
        // A run no longer than the schedule's interval, as in production.
        ("RUN_SECONDS", config.completion_every.as_secs().max(1).to_string()),
    ]);
    let mut env = BTreeMap::from([
        (Instance::first(Service::Trigger), trigger_env(0)),
        (Instance::first(Service::ListUploader), pairs(&uploader)),
        (Instance::first(Service::Sender), pairs(&sender)),
        (Instance::first(Service::Completion), pairs(&completion)),
    ]);
    for index in 1..=endpoints.more_triggers.len() as u32 {
        env.insert(Instance { service: Service::Trigger, index }, trigger_env(index));
    }
    env
}

/// Verifies the local stack's `From` domain at SES's endpoint: SES, and moto as it does, refuses
/// mail from an identity it has not verified (a deployment verifies its domain once, by DNS).
async fn verify_ses_sender(endpoint: &str) -> anyhow::Result<()> {
    use haishin_shared::esp::{SesConfig, SesCredentials, SesProvider};
    let mut config = SesConfig::new(SES_REGION);
    config.endpoint_url = Some(endpoint.to_owned());
    config.credentials = Some(SesCredentials {
        access_key_id: "testing".into(),
        secret_access_key: "testing".to_owned().into(),
        session_token: None,
    });
    let domain = MAIL_FROM.rsplit_once('@').map(|(_, d)| d.trim_end_matches('>')).unwrap_or(MAIL_FROM);
    let ses = SesProvider::new(&config).await?;
    ses.client()
        .create_email_identity()
        .email_identity(domain)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("verifying {domain} at {endpoint}: {}", aws_error(&e)))?;
    Ok(())
}

fn aws_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// What the sender needs to render and hand over messages itself, for SMTP and SES.
fn message_provider_env(provider: &MailProvider) -> Vec<(&'static str, String)> {
    let (mut env, rate) = match provider {
        MailProvider::Simulator => return Vec::new(),
        MailProvider::Smtp { url, messages_per_second } => {
            (vec![("SMTP_URL", url.clone())], messages_per_second)
        }
        // moto accepts any key; the SDK still signs every request with it, as AWS requires.
        MailProvider::Ses { endpoint, messages_per_second } => (
            vec![
                ("SES_REGION", SES_REGION.to_owned()),
                ("SES_ENDPOINT", endpoint.clone()),
                ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
                ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ],
            messages_per_second,
        ),
    };
    if let Some(rate) = rate {
        env.push(("ESP_MESSAGES_PER_SECOND", rate.to_string()));
    }
    env.extend([
        ("MAIL_FROM", MAIL_FROM.to_owned()),
        ("UNSUBSCRIBE_URL", UNSUBSCRIBE_URL.to_owned()),
        ("UNSUBSCRIBE_SECRET", UNSUBSCRIBE_SECRET.to_owned()),
    ]);
    env
}

/// The accounts with the invoker binding on a service, as in Terraform (`local.push_invokers`).
fn invokers(service: Service) -> Vec<&'static str> {
    match service {
        Service::Trigger => vec![PUSH_ACCOUNT, TASKS_ACCOUNT],
        Service::ListUploader => vec![TASKS_ACCOUNT],
        Service::Sender => vec![PUSH_ACCOUNT],
        Service::Completion => vec![],
    }
}

/// The front door of a service listening at `backend`: its invokers, and the paths that need no
/// token (`/healthz`, which Cloud Run's own probes reach from inside; the unsubscribe links, which
/// recipients follow from their mail, and the provider webhooks, both served in production by the
/// public entry; and locally the API).
fn front_door(service: Service, backend: &str) -> FrontDoorConfig {
    let mut config = FrontDoorConfig::new(backend);
    config.invokers = invokers(service).into_iter().map(str::to_owned).collect();
    config.public_paths = vec!["/healthz".to_owned()];
    if service == Service::Trigger {
        config.public_paths.extend([
            "/v1/".to_owned(),
            "/openapi.json".to_owned(),
            "/unsubscribe/".to_owned(),
            "/webhooks/".to_owned(),
        ]);
    }
    config
}

fn topic(name: &str) -> String {
    format!("projects/{PROJECT}/topics/{name}")
}

fn queue(name: &str) -> String {
    format!("projects/{PROJECT}/locations/{LOCATION}/queues/{name}")
}

/// Topics, queues and the bucket; subscriptions come once the services listen.
fn provision(stand_ins: &StandIns, config: &StackConfig) -> anyhow::Result<()> {
    for name in [topics::REQUESTS, topics::DELIVERIES, topics::EVENTS, topics::COMPLETED] {
        stand_ins.pubsub.create_topic(&topic(name))?;
        stand_ins.pubsub.create_topic(&topic(&format!("{name}-dead-letter")))?;
    }
    let mut prepare = Queue::new(queue("prepare"));
    prepare.name_ttl = config.task_name_ttl;
    prepare.max_concurrent_dispatches = 10;
    prepare.min_backoff = Duration::from_millis(200);
    prepare.max_backoff = Duration::from_secs(5);
    stand_ins.tasks.create_queue(prepare)?;
    let mut upload = Queue::new(queue("upload"));
    upload.name_ttl = config.task_name_ttl;
    // As in Terraform: the queue never dispatches more at once than the ESP's upload limit.
    upload.max_concurrent_dispatches = config.esp.upload_limit;
    upload.max_dispatches_per_second = 500.0;
    upload.min_backoff = Duration::from_millis(200);
    upload.max_backoff = Duration::from_secs(5);
    stand_ins.tasks.create_queue(upload)?;
    stand_ins.storage.create_bucket(BUCKET)?;
    Ok(())
}

/// Creates the push subscriptions, and returns their names.
fn subscribe(stand_ins: &StandIns, endpoints: &Endpoints) -> anyhow::Result<Vec<String>> {
    let push = |name: &str, topic_name: &str, endpoint: String, filter: Option<&str>| {
        let mut sub = PushSubscription::new(
            format!("projects/{PROJECT}/subscriptions/{name}"),
            topic(topic_name),
            endpoint,
        );
        sub.filter = filter.map(str::to_owned);
        sub.oidc = Some(PushAuth { service_account_email: PUSH_ACCOUNT.to_owned(), audience: None });
        sub.min_backoff = Duration::from_millis(200);
        sub.max_backoff = Duration::from_secs(5);
        sub.ack_deadline = Duration::from_secs(60);
        sub.dead_letter = Some(DeadLetterPolicy {
            topic: topic(&format!("{topic_name}-dead-letter")),
            max_delivery_attempts: 20,
        });
        sub
    };
    let mut subs = vec![
        push("trigger-requests", topics::REQUESTS, format!("{}/push/requests", endpoints.trigger), None),
        push("trigger-events", topics::EVENTS, format!("{}/push/events", endpoints.trigger), None),
    ];
    for (i, url) in endpoints.more_triggers.iter().enumerate() {
        subs.push(push(
            &format!("trigger-events-{}", i + 1),
            topics::EVENTS,
            format!("{url}/push/events"),
            None,
        ));
    }
    subs.extend([
        push(
            "sender-realtime",
            topics::DELIVERIES,
            format!("{}/push/deliveries", endpoints.sender),
            Some(r#"attributes.class = "realtime""#),
        ),
        push(
            "sender-batch",
            topics::DELIVERIES,
            format!("{}/push/deliveries", endpoints.sender),
            Some(r#"attributes.class != "realtime""#),
        ),
    ]);
    // Audience must match the pushed service's URL, as Terraform sets it (the trigger's, for an
    // instance's own door).
    for sub in &mut subs {
        let mut base = sub.push_endpoint.rsplit_once("/push/").map(|(b, _)| b.to_owned()).unwrap_or_default();
        if endpoints.more_triggers.contains(&base) {
            base = endpoints.trigger.clone();
        }
        if let Some(auth) = &mut sub.oidc {
            auth.audience = Some(base);
        }
    }
    // Every dead-letter topic pushes to the trigger, which keeps each message against its request.
    let dead_letters: Vec<PushSubscription> = [topics::REQUESTS, topics::DELIVERIES, topics::EVENTS]
        .iter()
        .map(|name| {
            let mut sub = push(
                &format!("{name}-dead-letter"),
                &format!("{name}-dead-letter"),
                format!("{}/push/dead-letters", endpoints.trigger),
                None,
            );
            sub.dead_letter = None;
            sub.oidc = Some(PushAuth {
                service_account_email: PUSH_ACCOUNT.to_owned(),
                audience: Some(endpoints.trigger.clone()),
            });
            sub
        })
        .collect();
    let mut names = Vec::new();
    for sub in subs.into_iter().chain(dead_letters) {
        names.push(sub.name.clone());
        stand_ins.pubsub.create_push_subscription(sub)?;
    }
    Ok(names)
}

impl Endpoints {
    /// The URL a service instance listens on (the completion job listens on none).
    pub fn url_of(&self, instance: Instance) -> Option<&String> {
        match instance.service {
            Service::Trigger if instance.index == 0 => Some(&self.trigger),
            Service::Trigger => self.more_triggers.get(instance.index as usize - 1),
            Service::ListUploader => Some(&self.list_uploader),
            Service::Sender => Some(&self.sender),
            Service::Completion => None,
        }
    }
}

async fn wait_healthy(base: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.get(format!("{base}/healthz")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{base} did not become healthy within a minute");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
