//! Connections to the SMTP server: opening one (TLS, EHLO, AUTH), one message's exchange with
//! a timeout on every step, and the idle connections kept between calls.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use lettre::Address;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use percent_encoding::percent_decode_str;
use reqwest::Url;
use secrecy::ExposeSecret;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use super::SmtpConfig;
use super::classify::{Failure, failure_of, setup_failure};
use crate::esp::OutgoingMessage;
use crate::esp::message::ProviderSetupError;

/// A connection idle longer than this is closed rather than reused: servers close idle
/// connections after a few minutes (Postfix after 5).
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// How the connection is secured.
#[derive(Clone)]
enum Security {
    Plain,
    /// STARTTLS, and fail when the server does not offer it.
    StartTls(TlsParameters),
    /// STARTTLS when the server offers it (not safe against an active attacker).
    StartTlsIfOffered(TlsParameters),
    /// TLS from the first byte (`smtps`).
    Tls(TlsParameters),
}

/// Where the server is and how to talk to it.
#[derive(Clone)]
pub(super) struct Server {
    host: String,
    port: u16,
    security: Security,
    hello: ClientId,
    credentials: Option<Credentials>,
    step_timeout: Duration,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server").field("host", &self.host).field("port", &self.port).finish_non_exhaustive()
    }
}

/// A TCP connection that could not be made.
struct Connect(std::io::Error);

/// Why a connection could not be set up.
enum SetupError {
    Connect(Connect),
    Smtp(lettre::transport::smtp::Error),
}

impl From<Connect> for SetupError {
    fn from(error: Connect) -> Self {
        Self::Connect(error)
    }
}

impl From<lettre::transport::smtp::Error> for SetupError {
    fn from(error: lettre::transport::smtp::Error) -> Self {
        Self::Smtp(error)
    }
}

/// How one message's exchange ended.
pub(super) enum Step {
    Accepted(Response),
    /// `keep_connection` is true when the connection is still in step with the server.
    Failed {
        failure: Failure,
        keep_connection: bool,
    },
}

impl Server {
    pub(super) fn from_config(config: &SmtpConfig) -> Result<Self, ProviderSetupError> {
        let bad = |reason: String| ProviderSetupError::new("smtp url", reason);
        let url = Url::parse(&config.url).map_err(|e| bad(e.to_string()))?;
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("names no host".into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let tls_mode = url.query_pairs().find(|(k, _)| k == "tls").map(|(_, v)| v.into_owned());
        let tls = || TlsParameters::new(host.clone()).map_err(|e| bad(format!("tls: {e}")));
        let (security, default_port) = match (url.scheme(), tls_mode.as_deref()) {
            ("smtp", None) => (Security::Plain, 25),
            ("smtp", Some("starttls" | "required")) => (Security::StartTls(tls()?), 587),
            ("smtp", Some("opportunistic")) => (Security::StartTlsIfOffered(tls()?), 587),
            ("smtps", None) => (Security::Tls(tls()?), 465),
            ("smtp" | "smtps", Some(other)) => {
                return Err(bad(format!("tls={other} is not one of starttls, required, opportunistic")));
            }
            (scheme, _) => return Err(bad(format!("the scheme is {scheme}, not smtp or smtps"))),
        };
        let decode = |s: &str| percent_decode_str(s).decode_utf8().map(|s| s.into_owned());
        let username = match &config.username {
            Some(user) => user.clone(),
            None => decode(url.username()).map_err(|e| bad(format!("user: {e}")))?,
        };
        let password = match (&config.password, url.password()) {
            (Some(password), _) => Some(password.expose_secret().to_owned()),
            (None, Some(password)) => Some(decode(password).map_err(|e| bad(format!("password: {e}")))?),
            (None, None) => None,
        };
        let hello = match url.path().trim_matches('/') {
            "" => ClientId::default(),
            name => ClientId::Domain(name.to_owned()),
        };
        Ok(Self {
            host,
            port: url.port().unwrap_or(default_port),
            security,
            hello,
            credentials: password.map(|p| Credentials::new(username, p)),
            step_timeout: config.command_timeout,
        })
    }

    /// A new connection, greeted, secured and logged in.
    pub(super) async fn connect(&self) -> Result<AsyncSmtpConnection, Failure> {
        let setup = async {
            let mut conn = match &self.security {
                // lettre connects for implicit TLS itself (Nagle's algorithm stays on there).
                Security::Tls(params) => {
                    AsyncSmtpConnection::connect_tokio1(
                        (self.host.as_str(), self.port),
                        Some(self.step_timeout),
                        &self.hello,
                        Some(params.clone()),
                        None,
                    )
                    .await?
                }
                _ => {
                    let tcp = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(Connect)?;
                    // lettre writes a message's content and its final dot in two writes: with
                    // Nagle's algorithm on, the dot waits for the server's delayed ACK, some
                    // 40 ms a message.
                    tcp.set_nodelay(true).map_err(Connect)?;
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await?
                }
            };
            match &self.security {
                Security::StartTls(params) => conn.starttls(params.clone(), &self.hello).await?,
                Security::StartTlsIfOffered(params) if conn.can_starttls() => {
                    conn.starttls(params.clone(), &self.hello).await?;
                }
                _ => {}
            }
            if let Some(credentials) = &self.credentials {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials).await?;
            }
            Ok::<_, SetupError>(conn)
        };
        // Connecting, greeting, STARTTLS and AUTH are a few steps: give them a few steps' time.
        match timeout(self.step_timeout * 3, setup).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(SetupError::Smtp(error))) => Err(setup_failure(&error)),
            Ok(Err(SetupError::Connect(Connect(error)))) => Err(Failure::Setup {
                permanent: false,
                detail: format!("no usable connection to the smtp server: cannot connect: {error}"),
            }),
            Err(_) => Err(Failure::Setup {
                permanent: false,
                detail: format!("no connection within {}s", (self.step_timeout * 3).as_secs()),
            }),
        }
    }

    /// One message's exchange: `MAIL`, `RCPT`, `DATA`, the content.
    pub(super) async fn send(&self, conn: &mut AsyncSmtpConnection, message: &OutgoingMessage) -> Step {
        let refused =
            |detail: String| Step::Failed { failure: Failure::Client(detail), keep_connection: true };
        let Ok(from) = message.envelope_from.parse::<Address>() else {
            return refused("the envelope sender is not a usable address".into());
        };
        let Ok(to) = message.to.parse::<Address>() else {
            return refused("the recipient's address is not usable".into());
        };
        let mut parameters = Vec::new();
        if !(message.envelope_from.is_ascii() && message.to.is_ascii()) {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return refused("the address is not ASCII and the server does not offer SMTPUTF8".into());
            }
            parameters.push(MailParameter::SmtpUtfEight);
        }
        if !message.mime.is_ascii() {
            if !conn.server_info().supports_feature(Extension::EightBitMime) {
                return refused("the message is not 7-bit and the server does not offer 8BITMIME".into());
            }
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        for (command, what) in [
            (Mail::new(Some(from), parameters).to_string(), "MAIL"),
            (Rcpt::new(to, Vec::new()).to_string(), "RCPT"),
            (Data.to_string(), "DATA"),
        ] {
            if let Err(step) = self.step(conn, command, what).await {
                return step;
            }
        }
        // From the first byte of the content on, the server may take the message.
        match timeout(self.step_timeout, conn.message(&message.mime)).await {
            Ok(Ok(response)) => Step::Accepted(response),
            Ok(Err(error)) => match failure_of(&error) {
                reply @ Failure::Reply { .. } => Step::Failed { failure: reply, keep_connection: true },
                failure => Step::Failed { failure: handed_over(failure), keep_connection: false },
            },
            Err(_) => Step::Failed {
                failure: Failure::Broken {
                    handed_over: true,
                    detail: format!("no answer to the message within {}s", self.step_timeout.as_secs()),
                },
                keep_connection: false,
            },
        }
    }

    /// One command before the content; a negative reply resets the transaction with `RSET`.
    async fn step(&self, conn: &mut AsyncSmtpConnection, command: String, what: &str) -> Result<(), Step> {
        match timeout(self.step_timeout, conn.command(command)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => {
                let failure = failure_of(&error);
                let in_step = matches!(failure, Failure::Reply { .. })
                    && matches!(timeout(self.step_timeout, conn.command(Rset)).await, Ok(Ok(_)));
                Err(Step::Failed { failure, keep_connection: in_step })
            }
            Err(_) => Err(Step::Failed {
                failure: Failure::Broken {
                    handed_over: false,
                    detail: format!("no answer to {what} within {}s", self.step_timeout.as_secs()),
                },
                keep_connection: false,
            }),
        }
    }
}

/// A failure once the content started to go out: whatever broke, the server may have the message.
fn handed_over(failure: Failure) -> Failure {
    match failure {
        reply @ Failure::Reply { .. } => reply,
        other => Failure::Broken { handed_over: true, detail: other.detail() },
    }
}

/// Connections kept between calls, most recent first out.
pub(super) struct Idle {
    connections: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    capacity: usize,
}

impl fmt::Debug for Idle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idle").field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

impl Idle {
    pub(super) fn new(capacity: usize) -> Self {
        Self { connections: Mutex::new(Vec::new()), capacity }
    }

    /// The most recently used connection that has not been idle too long.
    pub(super) fn take(&self) -> Option<AsyncSmtpConnection> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.retain(|(_, since)| since.elapsed() < IDLE_LIMIT);
        connections.pop().map(|(conn, _)| conn)
    }

    /// Keeps a connection for the next call, unless enough are kept already.
    pub(super) fn put(&self, conn: AsyncSmtpConnection) {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if connections.len() < self.capacity && !conn.has_broken() {
            connections.push((conn, Instant::now()));
        }
    }
}
