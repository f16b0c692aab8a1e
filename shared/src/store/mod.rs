//! The PostgreSQL store: the connection, the schema (`migrations/`), the rows every service reads,
//! and the chunk transitions that more than one service makes.
//!
//! Every state change is one guarded `UPDATE ... WHERE state = <expected>`, so a redelivered
//! message or a second worker finds the row already moved on and does nothing. Work in progress
//! holds a lease; a lease that ran out lets another worker take the work over.
//!
//! What only one service does to the database lives in that service, beside the code that needs
//! it (the trigger's intake, prepare step and scheduling rule; the completion job's passes), and
//! reaches the pool through [`Store::pool`].
//!
//! - [`rows`]: [`RequestRow`], [`ChunkRow`] and the reads of them.
//! - [`chunks`]: taking a chunk for a step under a lease, moving it between states, and ending
//!   what a cancel stops.
//! - [`rate`]: [`RateSchedule`], a provider's rate limit held across every instance.
//! - [`feedback`]: [`FeedbackCounts`], the bounces and complaints webhooks reported.

mod chunks;
mod feedback;
mod rate;
mod rows;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub use chunks::{
    CANCELLED_REASON, CancelScope, Claim, Claimed, Step, cancel_waiting_chunks, expire_overdue_chunks,
};
pub use feedback::FeedbackCounts;
pub use rate::{RateSchedule, Reservation};
pub use rows::{
    ChunkRow, ChunkTotals, Outcomes, RequestRow, chunk_columns, request_columns, request_columns_without_body,
};

/// Errors from the store. All of them are worth a retry: the database may come back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// True when the database refused the data itself (SQLSTATE class 22, data exception, or 23,
    /// integrity constraint): no retry can store it, so the caller rejects it with the reason.
    pub fn is_refused_data(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                db.code().is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
            }
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects to PostgreSQL; the pool reconnects on its own after an outage.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let pool = pool_options(max_connections).connect_with(url.parse::<PgConnectOptions>()?).await?;
        Ok(Self { pool })
    }

    /// Connects without touching the database until first use.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self> {
        let pool = pool_options(max_connections).connect_lazy_with(url.parse::<PgConnectOptions>()?);
        Ok(Self { pool })
    }

    /// Opens [`READY_CONNECTIONS`] connections (fewer when the pool allows fewer) and leaves them
    /// idle in the pool, so that the first burst of work after a start does not wait for
    /// connections to be set up one by one. The pool keeps that many open from then on.
    pub async fn open_ready_connections(&self) -> Result<()> {
        let wanted = READY_CONNECTIONS.min(self.pool.options().get_max_connections());
        let opened = futures::future::try_join_all((0..wanted).map(|_| self.pool.acquire())).await?;
        drop(opened);
        Ok(())
    }

    /// Brings the schema up to date. Safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations").run(&self.pool).await?;
        Ok(())
    }

    /// The connection pool, for the queries a single service owns.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Connections each pool keeps open, ready for a burst of work (see
/// [`Store::open_ready_connections`]).
const READY_CONNECTIONS: u32 = 4;

/// A connection idle for this long is checked (a round trip) before it is used again: one the
/// database dropped meanwhile (a restart, a failover) is replaced rather than failing a statement.
const CHECK_IDLE_FOR: Duration = Duration::from_millis(100);

/// Connections in steady use are not pinged before each use (a round trip per statement, about a
/// tenth of the trigger's CPU under a flood of realtime events); only those idle for
/// [`CHECK_IDLE_FOR`] are.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(READY_CONNECTIONS.min(max_connections))
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= CHECK_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}
