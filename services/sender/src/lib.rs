//! The sender: one Pub/Sub push, one uploaded chunk sent through the ESP, exactly once.
//!
//! It calls the ESP's send API and does nothing else. A chunk is claimed with a lease before it is
//! sent; the send carries an idempotency key derived from the chunk, and the ESP's delivery history
//! is checked under that key before any chunk whose earlier attempt has no recorded outcome is sent
//! again. When the history cannot tell, the chunk ends `unknown`: never re-sent blindly.
//!
//! Sends hold an ESP slot (a permit of `ESP_SEND_CONCURRENCY`) only for the ESP call itself,
//! never while reading the database or publishing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::post;
use haishin_shared::config::CommonArgs;
use haishin_shared::domain::{ChunkId, ChunkState};
use haishin_shared::esp::{DeliveryId, EspArgs, EspError, EspProvider, ListId, SendRequest};
use haishin_shared::gcp::Topic;
use haishin_shared::messages::{DeliveryMessage, EventKind, PipelineEvent};
use haishin_shared::push::{Delivered, Outcome, PushEnvelope, RetryReason};
use haishin_shared::server::PushService;
use haishin_shared::store::{ChunkRow, Claim, Step, Store};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "sender", about = "Sends uploaded chunks through the ESP, exactly once.")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub esp: EspArgs,
    /// Topic of pipeline events (slots freed).
    #[arg(long, env = "EVENTS_TOPIC", default_value = "pipeline-events")]
    pub events_topic: String,
    /// ESP send calls this instance may have in progress at once.
    #[arg(long, env = "ESP_SEND_CONCURRENCY", default_value_t = 8)]
    pub esp_send_concurrency: usize,
    /// How long a send may run before another attempt may take the chunk over, in seconds.
    #[arg(long, env = "SEND_LEASE_SECS", default_value_t = 120)]
    pub send_lease_secs: u64,
}

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub esp: Arc<dyn EspProvider>,
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
        let state = AppState {
            store: config.common.store().await?,
            esp: config.esp.provider()?,
            events: Topic::connect(&config.common.gcp, &config.events_topic)
                .await
                .context("connecting to Pub/Sub")?,
            slots: Arc::new(Semaphore::new(config.esp_send_concurrency.max(1))),
            lease: Duration::from_secs(config.send_lease_secs),
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

/// The ESP's idempotency key for a chunk's send: the same for every attempt.
pub fn send_key(chunk_id: &ChunkId) -> String {
    format!("send:{chunk_id}")
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
    send_chunk(&state, &message).await
}

#[tracing::instrument(skip_all, fields(request_id = %message.request_id, chunk = %message.chunk_id))]
async fn send_chunk(state: &AppState, message: &DeliveryMessage) -> Outcome {
    let claimed = match state.store.claim(&message.chunk_id, Step::Send, state.lease).await {
        Ok(Claim::Claimed(claimed)) => claimed,
        Ok(Claim::Busy) => {
            return Outcome::Retry(RetryReason::Busy(format!("chunk {} is being sent", message.chunk_id)));
        }
        Ok(Claim::Done(current)) => {
            return Outcome::done(format!(
                "chunk {} is {}",
                message.chunk_id,
                current.map_or("gone", |s| s.as_str())
            ));
        }
        Err(err) => return err.into(),
    };
    let chunk = claimed.chunk;
    let key = send_key(&chunk.id);
    // An earlier attempt may have reached the ESP: its history decides.
    if claimed.takeover || chunk.send_attempts > 1 {
        match state.esp.find_delivery(&key).await {
            Ok(Some(delivery)) => {
                return record_sent(state, &chunk, &delivery, "found in the ESP's history").await;
            }
            Ok(None) => {}
            Err(err) if err.is_retryable() => {
                return give_back(state, &chunk, Outcome::unavailable(&err), true).await;
            }
            Err(err) => {
                return unknown(
                    state,
                    &chunk,
                    &format!("the ESP's history cannot tell whether it was sent: {err}"),
                )
                .await;
            }
        }
    }
    let request = match state.store.request(&chunk.request_id).await.map(|r| r.map(|r| r.request())) {
        Ok(Some(Ok(request))) => request,
        Ok(_) => return unknown(state, &chunk, "the chunk's request is missing").await,
        Err(err) => return give_back(state, &chunk, err.into(), false).await,
    };
    let Some(list_id) = chunk.list_id.clone() else {
        return fail(state, &chunk, "chunk has no uploaded list").await;
    };
    let send = SendRequest {
        idempotency_key: key.clone(),
        request_id: chunk.request_id.clone(),
        list_id: ListId(list_id),
        template: request.template,
        class: chunk.class,
    };
    let result = {
        let _slot = state.slots.acquire().await.expect("the semaphore is never closed");
        state.esp.send(&send).await
    };
    match result {
        Ok(delivery) => record_sent(state, &chunk, &delivery, "sent").await,
        Err(err) if err.maybe_accepted() => {
            // The ESP may have taken it: only its history can say.
            match state.esp.find_delivery(&key).await {
                Ok(Some(delivery)) => {
                    record_sent(state, &chunk, &delivery, "accepted despite the error").await
                }
                Ok(None) => give_back(state, &chunk, Outcome::unavailable(&err), false).await,
                Err(_) => give_back(state, &chunk, Outcome::unavailable(&err), true).await,
            }
        }
        Err(err @ EspError::RateLimited { .. }) => {
            tracing::warn!(api = "send", "ESP rate limited the call.");
            give_back(state, &chunk, Outcome::Retry(RetryReason::Throttled(err.to_string())), false).await
        }
        Err(err) if err.is_retryable() => give_back(state, &chunk, Outcome::unavailable(&err), false).await,
        Err(err) => fail(state, &chunk, &format!("send refused by the ESP: {err}")).await,
    }
}

async fn record_sent(state: &AppState, chunk: &ChunkRow, delivery: &DeliveryId, how: &str) -> Outcome {
    match state.store.finish_step(&chunk.id, Step::Send, &delivery.to_string()).await {
        Ok(true) => {
            tracing::info!(recipients = chunk.recipients, delivery = %delivery, how, "Chunk sent.");
            publish_event(state, chunk, EventKind::ChunkSent).await;
            Outcome::done(how.to_owned())
        }
        Ok(false) => Outcome::done("chunk was taken over while sending"),
        Err(err) => err.into(),
    }
}

/// Hands the chunk back for a later attempt. `unsure`: the ESP may hold it, so the chunk stays
/// `sending` with its lease dropped, and whoever takes it next checks the ESP's history first.
async fn give_back(state: &AppState, chunk: &ChunkRow, outcome: Outcome, unsure: bool) -> Outcome {
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

async fn unknown(state: &AppState, chunk: &ChunkRow, reason: &str) -> Outcome {
    tracing::error!(%reason, recipients = chunk.recipients, "Chunk outcome unknown.");
    finish(state, chunk, ChunkState::Unknown, reason).await
}

async fn fail(state: &AppState, chunk: &ChunkRow, reason: &str) -> Outcome {
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

async fn publish_event(state: &AppState, chunk: &ChunkRow, kind: EventKind) {
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
