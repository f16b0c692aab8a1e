//! Scenarios: what to publish into a local stack (batch campaigns, realtime events) and on what ESP.
//! The demo and each benchmark are one scenario; [`crate::run`] runs one.

use std::path::PathBuf;
use std::time::Duration;

use haishin_esp_sim::EspSimConfig;

use crate::mail_record::MailRecord;
use crate::stack::MailProvider;
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

/// One batch campaign.
#[derive(Debug, Clone)]
pub struct Campaign {
    pub recipients: u64,
    /// When it is published, counted from the scenario's start.
    pub start_after: Duration,
}

/// When realtime events are published.
#[derive(Debug, Clone, Copy)]
pub enum RealtimeEvents {
    None,
    /// This many, spread evenly over the batches' expected run.
    Spread(u32),
    /// One every interval, for as long as a batch is running.
    Every(Duration),
    /// One every `every`, from the start until `until`, whatever else is going on.
    Until {
        every: Duration,
        until: Duration,
    },
    /// Open-loop, at rates stepped up (see [`crate::flood`]).
    Flood(crate::flood::FloodPlan),
}

/// How requests reach the pipeline once they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// As soon as they arrive (Haishin: every request is published when it comes).
    Immediate,
    /// As the scheduled workflow Haishin replaces took them: a job wakes every `poll_every`
    /// (from the start) and, unless its previous run is still going, takes every request that
    /// arrived since as one run, which goes on to its end (its requests sharing the ESP's
    /// limit) before a later wake-up starts the next one. A wake-up during a run does nothing;
    /// requests that arrive meanwhile, realtime events too, wait for the next run.
    Scheduled { poll_every: Duration },
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub campaigns: Vec<Campaign>,
    pub realtime: RealtimeEvents,
    pub admission: Admission,
    /// The ESP simulator's model, its rate included (`esp.calls_per_second`, which the stack
    /// passes to the list-uploader and the sender as `ESP_CALLS_PER_SECOND`).
    pub esp: EspSimConfig,
    pub chunk_size: u32,
    pub realtime_reserved_slots: u32,
    /// Realtime chunks of at most this many recipients skip the list upload (0: none do).
    pub inline_recipients_max: u32,
    /// Trigger instances running at once.
    pub triggers: u32,
    /// Upload tasks allowed to wait in the queue beyond the ESP's limit.
    pub prefetch: u32,
    pub seed: u64,
    pub timeout: Duration,
    pub run_dir: Option<PathBuf>,
    /// Show progress bars.
    pub progress: bool,
    /// Faults to inject while the scenario runs.
    pub chaos: Option<crate::chaos::ChaosSpec>,
    /// Who delivers the mail: the ESP simulator, or an SMTP or SES server.
    pub provider: MailProvider,
    /// The server's own record of what it received, where the delivery figures come from (the
    /// simulator's ledger when the simulator delivers).
    pub mail_record: Option<MailRecord>,
}

impl Scenario {
    /// The ESP's service time for one chunk upload of `n` recipients.
    pub fn upload_time(&self, n: u64) -> Duration {
        self.esp.upload_call_latency + self.esp.upload_per_recipient * n as u32
    }

    /// The ESP's limit on calls per second over uploads and sends together, when it has one.
    pub fn calls_per_second(&self) -> Option<f64> {
        self.esp.calls_per_second
    }

    /// Chunks of all the batches at the configured chunk size.
    pub fn batch_chunks(&self) -> u64 {
        let size = u64::from(self.chunk_size.max(1));
        self.campaigns.iter().map(|c| c.recipients.div_ceil(size)).sum()
    }

    /// What a perfect scheduler would take for the batches: their uploads at the upload limit,
    /// or, at an ESP with a rate, their upload and send calls at that rate, whichever is longer.
    pub fn expected_makespan(&self) -> Duration {
        let size = u64::from(self.chunk_size.max(1));
        let waves = self.batch_chunks().div_ceil(u64::from(self.esp.upload_limit.max(1)));
        let uploads = self
            .upload_time(size.min(self.campaigns.iter().map(|c| c.recipients).max().unwrap_or(0)))
            * waves as u32;
        uploads.max(self.rate_bound().unwrap_or(Duration::ZERO))
    }

    /// At an ESP with a rate, the least time the batches' calls (one upload and one send a
    /// chunk) take at it.
    pub fn rate_bound(&self) -> Option<Duration> {
        let rate = self.calls_per_second()?.floor().max(1.0);
        Some(Duration::from_secs_f64((2 * self.batch_chunks()) as f64 / rate))
    }
}

/// A generated batch audience.
pub struct Audience {
    pub csv: Vec<u8>,
    pub rows: u64,
}

/// `recipients` rows of `email,name,coupon`, where about one row in a thousand has a bad address
/// and one in a thousand repeats the previous address (both skipped and counted by the trigger).
pub fn generate_audience(campaign: usize, recipients: u64, rng: &mut StdRng) -> Audience {
    let mut csv = Vec::with_capacity(recipients as usize * 40);
    csv.extend_from_slice(b"email,name,coupon\n");
    for i in 0..recipients {
        let roll: u32 = rng.random_range(0..1000);
        let line = match roll {
            0 => format!("not-an-address-{i},Nobody,X\n"),
            1 if i > 0 => format!("c{campaign}-user{}@example.com,Again,Y\n", i - 1),
            _ => format!("c{campaign}-user{i}@example.com,User {i},C{:05}\n", rng.random_range(0..100_000)),
        };
        csv.extend_from_slice(line.as_bytes());
    }
    Audience { csv, rows: recipients }
}

pub(crate) fn template() -> Value {
    json!({ "subject": "{{name}}, something for you", "text": "Hello {{name}}, use {{coupon}}." })
}
