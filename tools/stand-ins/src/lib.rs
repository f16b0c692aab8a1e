//! Local stand-ins for the Google Cloud services Haishin uses, for tests and the demo.
//!
//! The services run the same code locally as in production, with only endpoints and
//! credentials changed, so each stand-in speaks the real wire protocol to the official Google
//! Rust client crates (built with `.with_endpoint("http://127.0.0.1:PORT")` and anonymous
//! credentials) and keeps the behaviour Haishin relies on: push with back-off and
//! dead-lettering, queue rate and concurrency limits, retries, named-task de-duplication,
//! at-least-once redelivery and OIDC tokens signed by a key that a verifier can fetch; and a
//! front door does in front of each service what Cloud Run's front end does. Every server
//! listens on 127.0.0.1, on a given port or on any free one.
//!
//! # Layout
//!
//! - [`oidc`]: [`TokenSigner`] signs Google-style ID tokens with an RSA key made for the run;
//!   [`KeySetServer`] serves its key set where a verifier expects Google's.
//! - [`pubsub`]: [`PubSubServer`], gRPC `Publish` for the official `Publisher`, topics and push
//!   subscriptions (filters, OIDC, back-off, dead-lettering, push window), with counters.
//! - [`tasks`]: [`TasksServer`], the Cloud Tasks REST v2 subset of the official `CloudTasks`
//!   client, and HTTP dispatch within each queue's rate, concurrency and retry settings (slower
//!   on 429 and 503, honouring `Retry-After`), with task names that stay taken for `name_ttl`.
//! - [`redelivery`]: [`Redelivery`], the at-least-once redelivery of acknowledged pushes and
//!   completed tasks that both of the above can do (off by default), with seedable decisions.
//! - [`front_door`]: [`FrontDoor`], Cloud Run's front end for one local service: it checks the
//!   caller's ID token and invoker binding (401, 403) and forwards the rest with the token's
//!   signature removed.
//! - [`gcs`]: [`GcsServer`], the Cloud Storage JSON API subset of the official `Storage`
//!   client (multipart and resumable uploads, ranged reads) plus metadata, listing and delete,
//!   with objects in files under a temporary directory.
//! - [`postgres`]: a throwaway PostgreSQL cluster.
//! - [`StandIns`]: the key-set server, Pub/Sub, Cloud Tasks and Cloud Storage, started together
//!   with one signer (front doors are started per service, with [`FrontDoor::start`]).
//! - `server` (private): the HTTP server under each stand-in and Google's JSON error body.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), haishin_stand_ins::Error> {
//! use haishin_stand_ins::{StandIns, StandInsConfig};
//! use haishin_stand_ins::pubsub::PushSubscription;
//!
//! let stand_ins = StandIns::start(StandInsConfig::default()).await?;
//! stand_ins.pubsub.create_topic("projects/p/topics/deliveries")?;
//! stand_ins.pubsub.create_push_subscription(PushSubscription::new(
//!     "projects/p/subscriptions/sender",
//!     "projects/p/topics/deliveries",
//!     "http://127.0.0.1:8082/push/deliveries",
//! ))?;
//! println!("Pub/Sub at {}, key set at {}", stand_ins.pubsub_endpoint(), stand_ins.jwks_url());
//! stand_ins.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod front_door;
pub mod gcs;
pub mod oidc;
pub mod postgres;
pub mod pubsub;
pub mod redelivery;
pub mod tasks;

mod server;

use std::path::PathBuf;
use std::time::Duration;

pub use front_door::{FrontDoor, FrontDoorConfig};
pub use gcs::GcsServer;
pub use oidc::{KeySetServer, TokenSigner};
pub use pubsub::PubSubServer;
pub use redelivery::Redelivery;
pub use tasks::TasksServer;

/// Why a stand-in refused an operation or could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Ports and storage for [`StandIns::start`]; the default takes any free ports and a fresh
/// temporary directory.
#[derive(Debug, Clone, Default)]
pub struct StandInsConfig {
    /// Port of the key-set server (0: any).
    pub jwks_port: u16,
    /// Port of the Pub/Sub stand-in (0: any).
    pub pubsub_port: u16,
    /// Port of the Cloud Tasks stand-in (0: any).
    pub tasks_port: u16,
    /// Port of the Cloud Storage stand-in (0: any).
    pub storage_port: u16,
    /// Where the Cloud Storage stand-in makes the directory holding its objects (removed when
    /// it stops); the system's temporary directory when `None`.
    pub storage_dir: Option<PathBuf>,
    /// At-least-once redelivery of acknowledged pushes and completed tasks, server-wide for
    /// Pub/Sub and Cloud Tasks (default off).
    pub redelivery: Redelivery,
    /// Seed of the redelivery decisions, for a repeatable run (default: random).
    pub redelivery_seed: Option<u64>,
}

/// The key-set server, Pub/Sub, Cloud Tasks and Cloud Storage, sharing one [`TokenSigner`].
///
/// Everything stops when this is dropped or on [`StandIns::shutdown`].
#[derive(Debug)]
pub struct StandIns {
    /// Signs the tokens of Pub/Sub pushes and Cloud Tasks dispatches.
    pub signer: TokenSigner,
    pub key_set: KeySetServer,
    pub pubsub: PubSubServer,
    pub tasks: TasksServer,
    pub storage: GcsServer,
}

impl StandIns {
    /// Starts every stand-in on the configured ports.
    pub async fn start(config: StandInsConfig) -> Result<Self, Error> {
        let signer = TokenSigner::new();
        let stand_ins = Self {
            key_set: KeySetServer::start(&signer, config.jwks_port).await?,
            pubsub: PubSubServer::start(signer.clone(), config.pubsub_port).await?,
            tasks: TasksServer::start(signer.clone(), config.tasks_port).await?,
            storage: GcsServer::start(config.storage_port, config.storage_dir).await?,
            signer,
        };
        if let Some(seed) = config.redelivery_seed {
            stand_ins.pubsub.seed_redelivery(seed);
            stand_ins.tasks.seed_redelivery(seed);
        }
        stand_ins.set_redelivery(config.redelivery)?;
        Ok(stand_ins)
    }

    /// Sets the server-wide redelivery policy of both Pub/Sub and Cloud Tasks (a chaos run
    /// turns it on and off while the stack runs).
    pub fn set_redelivery(&self, policy: Redelivery) -> Result<(), Error> {
        self.pubsub.set_redelivery(policy)?;
        self.tasks.set_redelivery(policy)
    }

    /// Endpoint for the official Pub/Sub `Publisher`.
    pub fn pubsub_endpoint(&self) -> String {
        self.pubsub.endpoint()
    }

    /// Endpoint for the official `CloudTasks` client.
    pub fn tasks_endpoint(&self) -> String {
        self.tasks.endpoint()
    }

    /// Endpoint for the official `Storage` client and for JSON API calls.
    pub fn storage_endpoint(&self) -> String {
        self.storage.endpoint()
    }

    /// Key-set URL for OIDC verifiers, in place of `https://www.googleapis.com/oauth2/v3/certs`.
    pub fn jwks_url(&self) -> String {
        self.key_set.jwks_url()
    }

    /// Stops every stand-in and removes temporary storage.
    pub async fn shutdown(self) {
        self.pubsub.shutdown().await;
        self.tasks.shutdown().await;
        self.storage.shutdown().await;
        self.key_set.shutdown().await;
    }
}

/// Polls `done` every few milliseconds until it holds (`true`) or `timeout` passes (`false`).
async fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
