//! The SMTP provider: rendered messages to an SMTP relay (a company MTA, a provider's SMTP
//! endpoint), one envelope per recipient, each call on one connection, connections kept for
//! the next call.
//!
//! # Reaching the server
//! [`SmtpConfig::url`] says how: `smtp://host:port` (plain), `smtp://host:port?tls=starttls`
//! (STARTTLS, required; lettre's `tls=required` and `tls=opportunistic` work too),
//! `smtps://host:port` (TLS from the first byte). `user:password@` in the URL, or
//! [`SmtpConfig::username`] and [`SmtpConfig::password`], log in with AUTH (PLAIN or LOGIN).
//! Certificates are checked against the system's roots. A path (`smtp://host/mta.example`)
//! is the name said in `EHLO`; the machine's hostname otherwise.
//!
//! # Why not lettre's transport
//! lettre's `AsyncSmtpTransport` applies its timeout to the TCP connect only, and a send that
//! is cancelled returns its connection, mid-exchange, to the pool, where the next message would
//! read the previous one's reply. This provider drives lettre's [`AsyncSmtpConnection`]
//! (lettre::transport::smtp::client) itself: every step has a timeout, a connection that
//! failed or timed out is dropped, never reused, and it knows how far each exchange got.
//!
//! # What a reply means
//! Each message is its own envelope (`MAIL`, one `RCPT`, `DATA`), so a reply concerns one
//! recipient:
//! - 2xx after the message: accepted; the provider id is the queue id when the server names it;
//! - 4xx: deferred, may be sent again (421, the server closing, also stops the batch);
//! - 5xx: refused for good, counted `failed` with the reply;
//! - a refused login (530/534/535/538), no connection, a TLS failure: the batch stops, nothing
//!   was sent (on the first message the whole call fails, for good when the login was refused);
//! - a timeout or a broken connection before the message's content went out: deferred (on a
//!   reused connection, which the server may have closed while idle, it is tried once more on
//!   a new one); once the content started to go out: unknown, never sent again blindly.
//!
//! [`AsyncSmtpConnection`]: lettre::transport::smtp::client::AsyncSmtpConnection

mod classify;
mod session;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Url;
use secrecy::SecretString;
use tokio::time::Instant;

use self::classify::Failure;
use self::session::{Idle, Server, Step};
use super::message::{Attempt, BatchRun, ProviderSetupError};
use super::{EspError, MessageOutcome, MessageProvider, OutgoingMessage, ProviderLimits};
use crate::store::Reservation;

/// How to reach an SMTP server, and what it allows.
#[derive(Clone)]
pub struct SmtpConfig {
    /// `smtp://`, `smtp://…?tls=starttls` or `smtps://` (see the module doc).
    pub url: String,
    /// The AUTH user, when not in the URL.
    pub username: Option<String>,
    /// The AUTH password, when not in the URL (from Secret Manager).
    pub password: Option<SecretString>,
    /// Longest wait for the server at any one step (connect, a command, the message).
    pub command_timeout: Duration,
    /// Longest a call may run: messages not started by then are deferred.
    pub call_timeout: Duration,
    /// `concurrency` is also how many idle connections are kept for reuse.
    pub limits: ProviderLimits,
}

impl SmtpConfig {
    /// A server at `url`, 4 connections, batches of 100, 30 s per step, 5 minutes per call.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            username: None,
            password: None,
            command_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(300),
            limits: ProviderLimits::new(4, 100),
        }
    }
}

/// Shows the URL without its password.
impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("url", &redacted_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "redacted"))
            .field("command_timeout", &self.command_timeout)
            .field("call_timeout", &self.call_timeout)
            .field("limits", &self.limits)
            .finish()
    }
}

fn redacted_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("redacted"));
            }
            url.to_string()
        }
        Err(_) => "(not a url)".to_owned(),
    }
}

/// Delivers rendered messages over SMTP.
#[derive(Debug)]
pub struct SmtpProvider {
    server: Server,
    idle: Idle,
    limits: ProviderLimits,
    call_timeout: Duration,
}

impl SmtpProvider {
    /// Checks the settings; connects on first use.
    pub fn new(config: &SmtpConfig) -> Result<Self, ProviderSetupError> {
        if config.limits.max_batch == 0 {
            return Err(ProviderSetupError::new("smtp max batch", "must be at least 1"));
        }
        Ok(Self {
            server: Server::from_config(config)?,
            idle: Idle::new(config.limits.concurrency.max(1) as usize),
            limits: config.limits,
            call_timeout: config.call_timeout,
        })
    }
}

#[async_trait]
impl MessageProvider for SmtpProvider {
    fn name(&self) -> &'static str {
        "smtp"
    }

    fn limits(&self) -> ProviderLimits {
        self.limits
    }

    #[tracing::instrument(name = "smtp_send_batch", skip_all, fields(messages = messages.len()))]
    async fn send_batch(
        &self,
        messages: &[OutgoingMessage],
        pace: &Reservation,
    ) -> Result<Vec<MessageOutcome>, EspError> {
        self.limits.check_batch(self.name(), messages.len())?;
        let deadline = Instant::now() + self.call_timeout;
        let mut run = BatchRun::new(messages.len());
        // The call's connection: reused from an earlier call when one is idle.
        let mut connection = self.idle.take();
        let mut reused = connection.is_some();
        for (index, message) in messages.iter().enumerate() {
            pace.ready(index).await;
            if run.out_of_time(deadline, self.call_timeout) {
                break;
            }
            let attempt = loop {
                let conn = match connection.as_mut() {
                    Some(conn) => conn,
                    None => match self.server.connect().await {
                        Ok(conn) => connection.insert(conn),
                        Err(failure) => break classify::attempt(failure),
                    },
                };
                match self.server.send(conn, message).await {
                    Step::Accepted(response) => {
                        break Attempt::Done(MessageOutcome::Accepted {
                            provider_id: classify::queue_id(&response),
                        });
                    }
                    Step::Failed { failure, keep_connection } => {
                        if !keep_connection {
                            connection = None;
                        }
                        // The server may close a connection while it sits idle: one more try
                        // on a new connection, since nothing of the message went out.
                        if reused && matches!(failure, Failure::Broken { handed_over: false, .. }) {
                            reused = false;
                            continue;
                        }
                        break classify::attempt(failure);
                    }
                }
            };
            reused = false;
            if !run.record(attempt) {
                break;
            }
        }
        if let Some(conn) = connection {
            self.idle.put(conn);
        }
        run.finish_logged(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_never_shows_the_password() {
        let mut config = SmtpConfig::new("smtps://user:hunter2@mail.example:465");
        config.password = Some(SecretString::from("s3cret"));
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2") && !debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("mail.example"), "{debug}");
    }

    #[test]
    fn settings_that_cannot_work_are_refused_at_start() {
        let mut config = SmtpConfig::new("smtp://127.0.0.1:2525");
        config.limits.max_batch = 0;
        assert!(SmtpProvider::new(&config).is_err());
        assert!(SmtpProvider::new(&SmtpConfig::new("http://127.0.0.1")).is_err());
        assert!(SmtpProvider::new(&SmtpConfig::new("smtp://127.0.0.1:2525?tls=maybe")).is_err());
    }
}
