//! The sender: one Pub/Sub push, its chunk (or the few small realtime chunks it carries) handed
//! to the provider, exactly once.
//!
//! A chunk is claimed with a lease before anything is sent. What happens next depends on the
//! provider's shape:
//! - a list-based ESP ([`list`]): one send call for the chunk's uploaded list, or with its
//!   recipients in the call, keyed so that the ESP's history can tell whether an earlier attempt
//!   got through; sends of one template waiting for a slot share a call ([`coalesce`]);
//! - a message-based provider, SMTP or SES ([`messages`]): each recipient's message rendered
//!   and handed over in batches, each batch's outcomes kept before the next, so that no message
//!   is ever handed over twice.
//!
//! Calls hold a slot (a permit of `ESP_SEND_CONCURRENCY`) only while they run, never while
//! reading the database or publishing; a declared rate (`ESP_CALLS_PER_SECOND`,
//! `ESP_MESSAGES_PER_SECOND`) is held across all instances by a schedule in the database.

pub mod coalesce;
pub mod list;
pub mod messages;

use haishin_shared::telemetry::metrics::{Api, metrics};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::post;
use futures::future::join_all;
use haishin_shared::config::CommonArgs;
use haishin_shared::domain::{ChunkId, ChunkState};
use haishin_shared::esp::{EspArgs, EspProvider, MessageArgs};
use haishin_shared::gcp::{Blobs, Topic};
use haishin_shared::messages::{DeliveryMessage, EventKind, PipelineEvent};
use haishin_shared::push::{Delivered, Outcome, PushEnvelope, RetryReason};
use haishin_shared::server::PushService;
use haishin_shared::store::{ChunkRow, Claim, Claimed, RateSchedule, Step, Store};
use haishin_shared::telemetry::{join_trace, parse_traceparent};
use tokio::sync::Semaphore;
use tracing::field::Empty;
use tracing::{Instrument, Span};

pub use list::send_key;
use messages::MessagePath;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "sender", about = "Sends chunks through the provider, exactly once.")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub esp: EspArgs,
    #[command(flatten)]
    pub messages: MessageArgs,
    /// Bucket holding the chunk objects (read for message-based providers, and for chunks sent
    /// to a list-based ESP with their recipients in the call).
    #[arg(long, env = "BUCKET")]
    pub bucket: Option<String>,
    /// Realtime chunks of at most this many recipients reach a list-based ESP without a list: the
    /// trigger (which reads the same setting) hands them on unuploaded, and the send carries
    /// their recipients (the list-send protocol's inline send). 0: every chunk has a list.
    #[arg(long, env = "ESP_INLINE_RECIPIENTS_MAX", default_value_t = 0)]
    pub esp_inline_recipients_max: u32,
    /// Topic of pipeline events (slots freed).
    #[arg(long, env = "EVENTS_TOPIC", default_value = "pipeline-events")]
    pub events_topic: String,
    /// Provider calls this instance may have in progress at once (for SMTP, its connections).
    #[arg(long, env = "ESP_SEND_CONCURRENCY", default_value_t = 8)]
    pub esp_send_concurrency: usize,
    /// How long a send may run before another attempt may take the chunk over, in seconds.
    #[arg(long, env = "SEND_LEASE_SECS", default_value_t = 120)]
    pub send_lease_secs: u64,
}

/// The provider, in its shape.
#[derive(Clone)]
pub enum Provider {
    /// A list-based ESP, its calls per second when it declares a limit, and where the
    /// recipients of chunks sent without a list are read from.
    Lists { esp: Arc<dyn EspProvider>, calls: Option<RateSchedule>, inline: Option<Arc<list::InlineSends>> },
    /// A message-based provider.
    Messages(Arc<MessagePath>),
}

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub provider: Provider,
    pub events: Topic,
    pub slots: Arc<Semaphore>,
    pub lease: Duration,
}

pub struct Application {
    service: PushService,
    state: AppState,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let service = PushService::bind("sender", &config.common).await?;
        let store = config.common.store().await?;
        let gcp = &config.common.gcp;
        let concurrency = config.esp_send_concurrency.max(1);
        metrics().esp_limit(Api::Send, concurrency as u32);
        let lease = Duration::from_secs(config.send_lease_secs.max(1));
        let provider = match config.esp.list_provider()? {
            Some(esp) => {
                let inline = match config.esp_inline_recipients_max {
                    0 => None,
                    max => Some(Arc::new(list::InlineSends {
                        max,
                        blobs: Blobs::connect(gcp).await.context("connecting to Cloud Storage")?,
                        bucket: config
                            .bucket
                            .clone()
                            .context("BUCKET: required when ESP_INLINE_RECIPIENTS_MAX is set")?,
                        batches: coalesce::Coalescer::new(max),
                    })),
                };
                Provider::Lists { esp, calls: config.esp.calls_schedule(&store)?, inline }
            }
            None => {
                // A call must end well inside the lease, or another attempt would take the
                // chunk over while it runs (and count its messages unknown).
                let call_budget = lease / 2;
                let setup = config
                    .messages
                    .setup(&config.esp, concurrency as u32, call_budget, &store)
                    .await?
                    .context("a message-based provider")?;
                let bucket =
                    config.bucket.clone().context("BUCKET: required when the provider is message-based")?;
                let blobs = Blobs::connect(gcp).await.context("connecting to Cloud Storage")?;
                Provider::Messages(Arc::new(MessagePath::new(setup, blobs, bucket)?))
            }
        };
        let state = AppState {
            events: Topic::connect(gcp, &config.events_topic).await.context("connecting to Pub/Sub")?,
            store,
            provider,
            slots: Arc::new(Semaphore::new(concurrency)),
            lease,
        };
        Ok(Self { service, state })
    }

    pub fn port(&self) -> u16 {
        self.service.port()
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let events = self.state.events.clone();
        let routes = Router::new().route("/push/deliveries", post(deliver));
        let router = self.service.router(self.state, routes, Router::new());
        self.service.run(router, shutdown, &[&events]).await
    }
}

async fn deliver(State(state): State<AppState>, Delivered(envelope): Delivered<PushEnvelope>) -> Outcome {
    let envelope = match envelope {
        Ok(envelope) => envelope,
        Err(unreadable) => {
            tracing::warn!(reason = %unreadable.reason, "Unreadable push dropped.");
            return Outcome::done(unreadable.reason);
        }
    };
    let message: DeliveryMessage = match envelope.message.json() {
        Ok(message) => message,
        Err(reason) => {
            tracing::warn!(%reason, message_id = %envelope.message.message_id, "Unreadable delivery message dropped.");
            return Outcome::done(reason);
        }
    };
    // The send runs on its own task: if the push's connection closes (its ack deadline passed),
    // the request future is dropped, but a batch being handed over must still get its outcomes
    // recorded. It stays in the push's span, so its trace goes on.
    let sending = tokio::spawn(async move { send_chunk(&state, &message).await }.in_current_span());
    match sending.await {
        Ok(outcome) => outcome,
        Err(err) => Outcome::unavailable(format!("the send stopped: {err}")),
    }
}

#[tracing::instrument(skip_all, fields(request_id = %message.request_id, chunk = %message.chunk_id, class = %message.class, chunks = 1 + message.with.len()))]
async fn send_chunk(state: &AppState, message: &DeliveryMessage) -> Outcome {
    if !message.with.is_empty() {
        return send_together(state, message).await;
    }
    let claimed = match claim(state, &message.chunk_id).await {
        Ok(claimed) => claimed,
        Err(outcome) => return outcome,
    };
    match &state.provider {
        Provider::Lists { esp, calls, inline } => {
            let sent = inline_sent(std::iter::once(&claimed));
            let outcome = list::send(state, esp.as_ref(), calls.as_ref(), inline.as_deref(), claimed).await;
            announce(state, sent).await;
            outcome
        }
        Provider::Messages(path) => messages::send(state, path, claimed).await,
    }
}

/// The event that tells the trigger a message of chunks sent without a list is done with, when
/// one of `claimed` has no list: it frees one of the send slots the trigger hands such messages
/// out against (see the trigger's `scheduling::inline`).
fn inline_sent<'a>(mut claimed: impl Iterator<Item = &'a Claimed>) -> Option<PipelineEvent> {
    claimed
        .find(|claimed| claimed.chunk.list_id.is_none())
        .map(|claimed| PipelineEvent::chunk(EventKind::InlineSent, &claimed.chunk))
}

async fn announce(state: &AppState, event: Option<PipelineEvent>) {
    if let Some(event) = event
        && let Err(err) = state.events.publish(&event, &[("class", "realtime")]).await
    {
        tracing::warn!(error = %err, "Pipeline event not published; the scheduler tick will cover it.");
    }
}

/// Sends the chunks of one message together (see [`list::send_together`]). The message is
/// acknowledged once every chunk has an outcome; if any asks for a retry, the message is
/// delivered again, and the chunks done by then are skipped.
async fn send_together(state: &AppState, message: &DeliveryMessage) -> Outcome {
    // Each chunk's work runs in a span of its own request's trace: the message's span is the
    // first chunk's, and each companion joins the trace the trigger gave it.
    let companions = message.with.iter().map(|companion| {
        let span = tracing::info_span!(
            "send_chunk",
            request_id = %companion.request_id,
            chunk = %companion.chunk_id,
            class = %message.class,
            trace_id = Empty,
            span_id = Empty,
        );
        join_trace(&span, companion.traceparent.as_deref().and_then(parse_traceparent).as_ref());
        (&companion.chunk_id, span)
    });
    let chunks: Vec<(&ChunkId, Span)> =
        std::iter::once((&message.chunk_id, Span::current())).chain(companions).collect();
    let claims = join_all(chunks.iter().map(|(id, span)| claim(state, id).instrument(span.clone()))).await;
    let (mut claimed, mut outcomes) = (Vec::new(), Vec::new());
    for (claim, (_, span)) in claims.into_iter().zip(chunks) {
        match claim {
            Ok(chunk) => claimed.push((chunk, span)),
            Err(outcome) => outcomes.push(outcome),
        }
    }
    match &state.provider {
        Provider::Lists { esp, calls, inline } => {
            let sent = inline_sent(claimed.iter().map(|(chunk, _)| chunk));
            outcomes.extend(
                list::send_together(state, esp.as_ref(), calls.as_ref(), inline.as_deref(), claimed).await,
            );
            announce(state, sent).await;
        }
        Provider::Messages(path) => {
            for (chunk, span) in claimed {
                outcomes.push(messages::send(state, path, chunk).instrument(span).await);
            }
        }
    }
    combine(outcomes)
}

/// One outcome for a message's chunks: the first retry asked for, or done with what each came to.
fn combine(outcomes: Vec<Outcome>) -> Outcome {
    let mut done: Vec<(String, usize)> = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Retry(reason) => return Outcome::Retry(reason),
            Outcome::Done(what) => match done.iter_mut().find(|(w, _)| *w == what) {
                Some((_, n)) => *n += 1,
                None => done.push((what, 1)),
            },
        }
    }
    let what: Vec<String> = done.into_iter().map(|(what, n)| format!("{n} × {what}")).collect();
    Outcome::done(what.join("; "))
}

/// Claims a chunk for its send; `Err` is the message's outcome when it cannot be taken now.
async fn claim(state: &AppState, id: &ChunkId) -> Result<Claimed, Outcome> {
    match state.store.claim(id, Step::Send, state.lease).await {
        Ok(Claim::Claimed(claimed)) => Ok(claimed),
        Ok(Claim::Busy) => Err(Outcome::Retry(RetryReason::Busy(format!("chunk {id} is being sent")))),
        Ok(Claim::Done(current)) => {
            Err(Outcome::done(format!("chunk {id} is {}", current.map_or("gone", |s| s.as_str()))))
        }
        Err(err) => Err(err.into()),
    }
}

/// Hands the chunk back for a later attempt. `unsure`: the ESP may hold it, so the chunk stays
/// `sending` with its lease dropped, and whoever takes it next checks the ESP's history first.
pub(crate) async fn give_back(state: &AppState, chunk: &ChunkRow, outcome: Outcome, unsure: bool) -> Outcome {
    let result = if unsure {
        drop_lease(&state.store, &chunk.id).await
    } else {
        state.store.transition(&chunk.id, ChunkState::Sending, ChunkState::Uploaded).await.map(drop)
    };
    if let Err(err) = result {
        tracing::warn!(error = %err, "Chunk not handed back; its lease will run out.");
    }
    outcome
}

pub(crate) async fn unknown(state: &AppState, chunk: &ChunkRow, reason: &str) -> Outcome {
    tracing::error!(%reason, recipients = chunk.recipients, "Chunk outcome unknown.");
    finish(state, chunk, ChunkState::Unknown, reason).await
}

pub(crate) async fn fail(state: &AppState, chunk: &ChunkRow, reason: &str) -> Outcome {
    tracing::warn!(%reason, "Chunk failed.");
    finish(state, chunk, ChunkState::Failed, reason).await
}

async fn finish(state: &AppState, chunk: &ChunkRow, to: ChunkState, reason: &str) -> Outcome {
    match state.store.finish_chunk(&chunk.id, ChunkState::Sending, to, reason).await {
        Ok(_) => {
            publish_event(state, chunk, EventKind::ChunkFinished).await;
            Outcome::done(reason.to_owned())
        }
        Err(err) => err.into(),
    }
}

pub(crate) async fn publish_event(state: &AppState, chunk: &ChunkRow, kind: EventKind) {
    let event = PipelineEvent::chunk(kind, chunk);
    if let Err(err) = state.events.publish(&event, &[("class", chunk.class.as_str())]).await {
        tracing::warn!(error = %err, "Pipeline event not published; the scheduler tick will cover it.");
    }
}

/// Ends a send early, unsure whether the ESP took it: the chunk stays `sending` with its lease
/// dropped, so that the next delivery of the message takes over at once and asks the ESP's
/// history before repeating anything.
async fn drop_lease(store: &Store, id: &ChunkId) -> haishin_shared::store::Result<()> {
    sqlx::query(
        "UPDATE chunks SET lease_until = now() - interval '1 second' WHERE id = $1 AND state = 'sending'",
    )
    .bind(id)
    .execute(store.pool())
    .await?;
    Ok(())
}
