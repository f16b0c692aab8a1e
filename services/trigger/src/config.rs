//! The trigger's configuration, from its environment.

use haishin_shared::config::CommonArgs;
use haishin_shared::esp::ProviderKind;
use secrecy::SecretString;

use crate::feedback::FeedbackArgs;

/// Upload tasks that may wait in the queue beyond the free slots, by default. One hides the
/// dispatch round trip between two uploads (the queue starts it as the slot frees); each more
/// only puts another batch chunk ahead of a realtime event that needs an upload.
pub const DISPATCH_PREFETCH: u32 = 1;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "trigger",
    about = "Takes delivery requests, prepares their audiences and dispatches chunks."
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Region of the Cloud Tasks queues.
    #[arg(long, env = "TASKS_LOCATION", default_value = "us-central1")]
    pub tasks_location: String,
    /// Queue of prepare tasks (targets this service).
    #[arg(long, env = "PREPARE_QUEUE", default_value = "prepare")]
    pub prepare_queue: String,
    /// Queue of upload tasks (targets the list-uploader).
    #[arg(long, env = "UPLOAD_QUEUE", default_value = "upload")]
    pub upload_queue: String,
    /// Service account whose OIDC token the tasks carry.
    #[arg(long, env = "TASKS_INVOKER_SA")]
    pub tasks_invoker: String,
    /// This service's URL, where prepare tasks are delivered (default: the push audience).
    #[arg(long, env = "TRIGGER_URL")]
    pub trigger_url: Option<String>,
    /// The list-uploader's URL, where upload tasks are delivered.
    #[arg(long, env = "LIST_UPLOADER_URL")]
    pub list_uploader_url: String,
    /// Bucket for chunk objects and the exports of BigQuery audiences.
    #[arg(long, env = "BUCKET")]
    pub bucket: String,
    /// Where BigQuery runs the export jobs of BigQuery audiences: the location of the datasets
    /// audiences are read from (`US`, `EU`, a region). BigQuery infers it when unset.
    #[arg(long, env = "BIGQUERY_LOCATION")]
    pub bigquery_location: Option<String>,
    /// Most recipients per chunk.
    #[arg(long, env = "CHUNK_SIZE", default_value_t = 10_000)]
    pub chunk_size: u32,
    /// Which provider delivers the mail: it decides which API is the bottleneck (uploads for a
    /// list-based ESP, sends for SMTP and SES) and where chunks go once dispatched.
    #[arg(long, env = "ESP_PROVIDER", value_enum, default_value = "list-send")]
    pub esp_provider: ProviderKind,
    /// Concurrency limit of the provider's bottleneck API: chunks in flight toward it (being
    /// uploaded for a list-based ESP, being sent for a message-based one) never exceed this.
    #[arg(long, env = "ESP_SLOTS", default_value_t = 8)]
    pub esp_slots: u32,
    /// Topic of chunks ready to send: for message-based providers, dispatched chunks go
    /// straight to the sender (there is no list to upload).
    #[arg(long, env = "DELIVERIES_TOPIC", default_value = "deliveries")]
    pub deliveries_topic: String,
    /// Upload slots that batch chunks never take, kept free for realtime events.
    #[arg(long, env = "REALTIME_RESERVED_SLOTS", default_value_t = 0)]
    pub realtime_reserved_slots: u32,
    /// Realtime chunks of at most this many recipients go to a list-based ESP's send with their
    /// recipients in the call, without a list upload: they never wait for an upload slot. The
    /// ESP must take recipients in a send (the list-send protocol's inline send); the sender
    /// reads the same setting. 0: every chunk is uploaded as a list.
    #[arg(long, env = "ESP_INLINE_RECIPIENTS_MAX", default_value_t = 0)]
    pub esp_inline_recipients_max: u32,
    /// Send calls a list-based ESP runs at once (the sender's slots). Small realtime chunks sent
    /// without a list are handed to the sender in at most this many messages at a time; chunks
    /// that come due while every one is out wait, and go together in the next.
    #[arg(long, env = "ESP_SEND_SLOTS", default_value_t = 8)]
    pub esp_send_slots: u32,
    /// Upload tasks allowed to wait in the queue beyond the limit ([`DISPATCH_PREFETCH`]).
    #[arg(long, env = "DISPATCH_PREFETCH", default_value_t = DISPATCH_PREFETCH)]
    pub dispatch_prefetch: u32,
    /// Inline audiences up to this size are prepared as the request is taken in and stored with
    /// it, without a prepare task (every inline audience by default: at most 10,000 recipients).
    #[arg(long, env = "INLINE_PREPARE_MAX", default_value_t = haishin_shared::domain::MAX_INLINE_RECIPIENTS)]
    pub inline_prepare_max: usize,
    /// How long a prepare step may run before another may take it over, in seconds: the
    /// trigger's request timeout, and so the prepare tasks' dispatch deadline.
    #[arg(long, env = "PREPARE_LEASE_SECS", default_value_t = 900)]
    pub prepare_lease_secs: u64,
    /// Audiences larger than this, in bytes of their files (compressed files counted at four
    /// times their size), are prepared in parts: a task per file spreads its recipients over
    /// partitions of about this size, and a task per partition de-duplicates it and cuts its
    /// chunks, on whichever trigger instances take them. An instance holds one part's recipients
    /// at a time, so this bounds a prepare step's memory, about 70 bytes per 40-byte row.
    #[arg(long, env = "PREPARE_PARTITION_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub prepare_partition_bytes: u64,
    /// Bytes of the partition objects an instance keeps in memory after spreading them, so that
    /// the cuts it runs next, the first chunks of a large audience among them, read them without
    /// a round trip to Cloud Storage (the first three shards, about 2 MB of rows, fit). Only a
    /// request's first shards are kept: a cut reads every shard up to its own. 0: none are kept.
    #[arg(long, env = "PREPARE_KEPT_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub prepare_kept_bytes: usize,
    /// Parts of large audiences one instance prepares at once; further part tasks wait for one to
    /// end. With the partition size, this bounds an instance's memory.
    #[arg(long, env = "PREPARE_PARTS_AT_ONCE", default_value_t = 2)]
    pub prepare_parts_at_once: usize,
    /// The list-uploader's request timeout, in seconds: the upload tasks' dispatch deadline.
    #[arg(long, env = "UPLOAD_TIMEOUT_SECS", default_value_t = 300)]
    pub upload_timeout_secs: u64,
    /// The key the sender signs unsubscribe tokens with (from Secret Manager), at least 32 bytes.
    /// Unset: `/unsubscribe/{token}` answers 404.
    #[arg(long, env = "UNSUBSCRIBE_SECRET", hide_env_values = true)]
    pub unsubscribe_secret: Option<SecretString>,
    #[command(flatten)]
    pub feedback: FeedbackArgs,
}
