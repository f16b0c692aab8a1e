//! Test helpers: an HTTP receiver that records what it is sent, and OIDC verification.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a test waits for something that should happen promptly.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// One request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) at: Instant,
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Received {
    /// A header's value, or "" when absent.
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub(crate) fn bearer(&self) -> Option<&str> {
        self.header("authorization").strip_prefix("Bearer ")
    }
}

/// How a [`Receiver`] answers a request.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) delay: Duration,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Bytes,
}

impl Reply {
    pub(crate) fn status(status: u16) -> Self {
        Self {
            status: StatusCode::from_u16(status).expect("a valid status"),
            delay: Duration::ZERO,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub(crate) fn ok() -> Self {
        Self::status(200)
    }

    pub(crate) fn after(self, delay: Duration) -> Self {
        Self { delay, ..self }
    }

    pub(crate) fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub(crate) fn body(self, body: impl Into<Bytes>) -> Self {
        Self { body: body.into(), ..self }
    }
}

type Responder = dyn Fn(&Received) -> Reply + Send + Sync;

struct Inner {
    requests: Mutex<Vec<Received>>,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    responder: Box<Responder>,
}

/// An HTTP server on 127.0.0.1 that records every request and answers as told.
pub(crate) struct Receiver {
    pub(crate) url: String,
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub(crate) async fn start(responder: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        let inner = Arc::new(Inner {
            requests: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            responder: Box::new(responder),
        });
        let router = Router::new().fallback(record).with_state(inner.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("receiver serves");
        });
        Self { url, inner, task }
    }

    /// A receiver that answers 200 at once.
    pub(crate) async fn ok() -> Self {
        Self::start(|_| Reply::ok()).await
    }

    pub(crate) fn requests(&self) -> Vec<Received> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// The most requests ever being answered at once.
    pub(crate) fn peak_in_flight(&self) -> usize {
        self.inner.peak.load(Ordering::SeqCst)
    }

    /// Waits until `n` requests arrived and returns them; panics after [`PATIENCE`].
    pub(crate) async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            assert!(Instant::now() < deadline, "expected {n} requests, got {}", requests.len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Received {
        at: Instant::now(),
        method,
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers,
        body,
    };
    let reply = (inner.responder)(&received);
    inner.requests.lock().unwrap().push(received);
    let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    inner.peak.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(reply.delay).await;
    inner.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut response = (reply.status, reply.body).into_response();
    for (name, value) in reply.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("a valid header name");
        response.headers_mut().append(name, HeaderValue::from_str(&value).expect("a valid header value"));
    }
    response
}

/// Verifies a token as a Google OIDC verifier would, with the key set at `jwks_url`; returns
/// its claims and header key id.
pub(crate) async fn verify(token: &str, jwks_url: &str, audience: &str) -> Result<(Value, String), String> {
    let jwks: Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(jwks_url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let header = decode_header(token).map_err(|e| e.to_string())?;
    if header.alg != Algorithm::RS256 {
        return Err(format!("algorithm {:?}", header.alg));
    }
    let kid = header.kid.ok_or("no kid")?;
    let jwk = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == kid.as_str()))
        .ok_or("unknown kid")?;
    let key = DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap_or_default(),
        jwk["e"].as_str().unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&["https://accounts.google.com"]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    let data = decode::<Value>(token, &key, &validation).map_err(|e| format!("{:?}", e.kind()))?;
    Ok((data.claims, kid))
}

/// Waits until `done` holds; panics after [`PATIENCE`].
pub(crate) async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Anonymous credentials, as the services use against local endpoints.
pub(crate) fn anonymous() -> google_cloud_auth::credentials::Credentials {
    google_cloud_auth::credentials::anonymous::Builder::new().build()
}
