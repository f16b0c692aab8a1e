//! A Cloud Run front door: the IAM invoker check Cloud Run's front end makes before a request
//! reaches a service, as a reverse proxy in front of one local service.
//!
//! With invoker checks on (Cloud Run's default), the front end, not the container, decides who
//! gets in:
//!
//! - a request without a bearer token, or with one that does not verify (signature by the
//!   stand-ins' key, issuer `https://accounts.google.com`, one of the service's audiences, not
//!   expired), is answered 401;
//! - a valid token whose `email` has no invoker binding on the service is answered 403;
//! - the service never sees either;
//! - an accepted request is forwarded unchanged, bodies streamed both ways, except that the
//!   signature part of the token in `Authorization` is replaced by
//!   [`SIGNATURE_REMOVED`] (`header.payload.SIGNATURE_REMOVED_BY_GOOGLE`), so that the service
//!   can read the claims but cannot verify the token again.
//!
//! Paths under [`FrontDoorConfig::public_paths`] pass without a token, with their headers as
//! sent. A service that cannot be reached is answered 503, one that breaks off before answering
//! 502, and one slower than the request timeout 504 (an answer cut off midway is cut off for the
//! caller too). The front door accepts the service's own URL (its
//! own `http://127.0.0.1:PORT`) as audience, plus any custom audiences configured.
//!
//! Not modelled: `X-Serverless-Authorization`, ingress settings, request size limits, and the
//! `X-Forwarded-*` and trace headers Cloud Run adds.

mod proxy;
mod token;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::oidc::TokenSigner;
use crate::server::Served;
use proxy::{Backend, error_page};
use token::{TokenError, Verifier};

/// What Cloud Run puts in place of a forwarded token's signature.
pub const SIGNATURE_REMOVED: &str = "SIGNATURE_REMOVED_BY_GOOGLE";
/// Cloud Run's default request timeout.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// IAM member prefixes an invoker may be written with.
const MEMBER_PREFIXES: [&str; 2] = ["serviceAccount:", "user:"];
/// The IAM member that grants every caller with a valid token.
const ALL_AUTHENTICATED_USERS: &str = "allauthenticatedusers";

/// What a front door stands in front of, and who may call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontDoorConfig {
    /// The service, `http://127.0.0.1:PORT`: accepted requests go there with their path and
    /// query.
    pub backend: String,
    /// Further instances of the same service (default none): requests go to each instance in
    /// turn, as Cloud Run spreads a service's requests over its instances.
    pub more_backends: Vec<String>,
    /// The port to listen on (0, the default: any free port).
    pub port: u16,
    /// Custom audiences accepted besides the front door's own URL (default none).
    pub audiences: Vec<String>,
    /// Accounts with the invoker binding (`roles/run.invoker`), as emails or IAM members
    /// (`serviceAccount:…`, `user:…`, `allAuthenticatedUsers`); default none.
    pub invokers: Vec<String>,
    /// Path prefixes that need no token, matched on whole segments: `/healthz` opens
    /// `/healthz` and `/healthz/live`, `/v1/` everything under it (default none).
    pub public_paths: Vec<String>,
    /// How long a request may take, bodies included (Cloud Run: default 300 s).
    pub request_timeout: Duration,
}

impl FrontDoorConfig {
    /// A front door for the service at `backend` with Cloud Run's defaults: every path needs
    /// a token, nobody is an invoker yet, only its own URL as audience, 300 s timeout.
    pub fn new(backend: impl Into<String>) -> Self {
        Self {
            backend: backend.into(),
            more_backends: Vec::new(),
            port: 0,
            audiences: Vec::new(),
            invokers: Vec::new(),
            public_paths: Vec::new(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// What a front door has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrontDoorStats {
    /// Requests passed to the service (public paths included).
    pub forwarded: u64,
    /// Requests answered 401: no token, or one that does not verify.
    pub unauthenticated: u64,
    /// Requests answered 403: a valid token of an account without the invoker binding.
    pub forbidden: u64,
    /// Forwarded requests answered 502, 503 or 504 because the service could not be reached,
    /// broke off or was too slow.
    pub backend_failures: u64,
}

/// Cloud Run's front end for one local service.
///
/// Dropping it stops the server.
#[derive(Debug)]
pub struct FrontDoor {
    door: Arc<Door>,
    served: Served,
}

impl FrontDoor {
    /// Starts a front door that trusts the tokens of `signer` (the key its key set publishes).
    pub async fn start(config: FrontDoorConfig, signer: &TokenSigner) -> Result<Self, Error> {
        let backends = std::iter::once(&config.backend)
            .chain(&config.more_backends)
            .map(|url| Backend::new(url, config.request_timeout))
            .collect::<Result<Vec<_>, _>>()?;
        let listener = Served::bind(config.port).await?;
        let own_url = format!("http://{}", listener.local_addr()?);
        let audiences: Vec<String> = std::iter::once(own_url).chain(config.audiences).collect();
        let door = Arc::new(Door {
            backends,
            next_backend: std::sync::atomic::AtomicUsize::new(0),
            verifier: Verifier::new(&signer.jwks(), &audiences)?,
            invokers: RwLock::new(config.invokers.iter().map(|m| member(m)).collect()),
            public_paths: config.public_paths,
            stats: Mutex::default(),
        });
        let router = Router::new().fallback(handle).with_state(door.clone());
        let served = Served::serve(listener, router, CancellationToken::new())?;
        Ok(Self { door, served })
    }

    /// The URL callers use, `http://127.0.0.1:PORT` (also the audience it accepts).
    pub fn url(&self) -> String {
        self.served.url()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.served.port()
    }

    /// Adds an invoker binding for an account (an email or an IAM member).
    pub fn grant_invoker(&self, account: &str) {
        self.door.invokers.write().expect("invokers lock").insert(member(account));
    }

    /// Removes an account's invoker binding; its next requests are answered 403.
    pub fn revoke_invoker(&self, account: &str) {
        self.door.invokers.write().expect("invokers lock").remove(&member(account));
    }

    /// What it has done so far.
    pub fn stats(&self) -> FrontDoorStats {
        *self.door.stats.lock().expect("front door stats lock")
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        self.served.shutdown().await;
    }
}

/// State of the proxy handler.
#[derive(Debug)]
struct Door {
    /// The service's instances, taken in turn.
    backends: Vec<Backend>,
    next_backend: std::sync::atomic::AtomicUsize,
    verifier: Verifier,
    /// Lower-case emails, and `allauthenticatedusers`.
    invokers: RwLock<HashSet<String>>,
    public_paths: Vec<String>,
    stats: Mutex<FrontDoorStats>,
}

/// Why a request does not get in.
enum Refusal {
    Unauthenticated(TokenError),
    Forbidden(Option<String>),
}

impl Door {
    fn count(&self, update: impl FnOnce(&mut FrontDoorStats)) {
        update(&mut self.stats.lock().expect("front door stats lock"));
    }

    /// Checks the token and the invoker binding; the `Authorization` value to forward.
    fn admit(&self, headers: &HeaderMap) -> Result<HeaderValue, Refusal> {
        let value = headers.get(AUTHORIZATION).ok_or(Refusal::Unauthenticated(TokenError::Missing))?;
        let value = value.to_str().map_err(|_| Refusal::Unauthenticated(TokenError::Missing))?;
        let token = token::bearer(value).map_err(Refusal::Unauthenticated)?;
        let caller = self.verifier.verify(token).map_err(Refusal::Unauthenticated)?;
        let invokers = self.invokers.read().expect("invokers lock");
        let allowed = invokers.contains(ALL_AUTHENTICATED_USERS)
            || caller.email.as_deref().is_some_and(|email| invokers.contains(&email.to_ascii_lowercase()));
        if !allowed {
            return Err(Refusal::Forbidden(caller.email));
        }
        let signed = token.rsplit_once('.').map_or(token, |(signed, _signature)| signed);
        HeaderValue::from_str(&format!("Bearer {signed}.{SIGNATURE_REMOVED}"))
            .map_err(|e| Refusal::Unauthenticated(TokenError::Malformed(e.to_string())))
    }

    /// Sends the request to the service and streams its answer back.
    async fn forward(&self, request: Request) -> Response {
        self.count(|s| s.forwarded += 1);
        let turn = self.next_backend.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.backends[turn % self.backends.len()].send(request).await.unwrap_or_else(|status| {
            self.count(|s| s.backend_failures += 1);
            error_page(status, "The service did not answer the request.")
        })
    }
}

/// Checks, then forwards, one request.
async fn handle(State(door): State<Arc<Door>>, mut request: Request) -> Response {
    let path = request.uri().path().to_owned();
    if !is_public(&door.public_paths, &path) {
        match door.admit(request.headers()) {
            Ok(authorization) => {
                request.headers_mut().insert(AUTHORIZATION, authorization);
            }
            Err(Refusal::Unauthenticated(reason)) => {
                door.count(|s| s.unauthenticated += 1);
                tracing::debug!(path, %reason, "Request refused: unauthenticated.");
                let mut page = error_page(
                    StatusCode::UNAUTHORIZED,
                    &format!("Your client does not have permission to the requested URL {path}."),
                );
                page.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        r#"Bearer error="invalid_token" error_description="The access token could not be verified""#,
                    ),
                );
                return page;
            }
            Err(Refusal::Forbidden(email)) => {
                door.count(|s| s.forbidden += 1);
                tracing::debug!(path, email, "Request refused: no invoker binding.");
                return error_page(
                    StatusCode::FORBIDDEN,
                    &format!("Your client does not have permission to get URL {path} from this server."),
                );
            }
        }
    }
    door.forward(request).await
}

/// Whether `path` is under one of the public `prefixes`. A path with `.` or `..` segments never
/// is: the service might resolve it to another path.
fn is_public(prefixes: &[String], path: &str) -> bool {
    let dotted = path.split('/').any(|segment| {
        let segment = segment.to_ascii_lowercase().replace("%2e", ".");
        segment == "." || segment == ".."
    });
    !dotted
        && prefixes.iter().any(|prefix| {
            path.strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'))
        })
}

/// An invoker as the front door compares it: the email, lower-case, without an IAM prefix.
fn member(account: &str) -> String {
    let account = account.trim();
    let email = MEMBER_PREFIXES.iter().find_map(|p| account.strip_prefix(p)).unwrap_or(account);
    email.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invokers_are_compared_without_iam_prefixes_or_case() {
        assert_eq!(
            member("serviceAccount:Pusher@P.iam.gserviceaccount.com"),
            "pusher@p.iam.gserviceaccount.com"
        );
        assert_eq!(member("user:a@example.com"), "a@example.com");
        assert_eq!(member("allAuthenticatedUsers"), ALL_AUTHENTICATED_USERS);
    }

    #[test]
    fn public_prefixes_match_whole_segments_and_never_dotted_paths() {
        let prefixes = ["/healthz".to_owned(), "/v1/".to_owned()];

        let public = |path: &str| is_public(&prefixes, path);

        assert!(public("/healthz") && public("/healthz/live") && public("/v1/requests/r-1"));
        assert!(!public("/healthzz") && !public("/v1") && !public("/push/requests"));
        assert!(!public("/v1/../push/requests") && !public("/v1/%2E%2e/push/requests"));
    }
}
