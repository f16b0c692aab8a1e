//! The HTTP server under every stand-in, and Google's JSON error body.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long `shutdown` waits for open connections before dropping them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A running server on 127.0.0.1, stopped when its token is cancelled or when it is dropped.
#[derive(Debug)]
pub(crate) struct Served {
    addr: SocketAddr,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Served {
    /// Binds 127.0.0.1 on `port` (0: any free port) and serves `router` (HTTP/1.1 and h2c).
    pub(crate) async fn start(port: u16, router: Router, cancel: CancellationToken) -> std::io::Result<Self> {
        Self::serve(Self::bind(port).await?, router, cancel)
    }

    /// Binds 127.0.0.1 on `port` (0: any free port), for a server whose router needs its address.
    pub(crate) async fn bind(port: u16) -> std::io::Result<TcpListener> {
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await
    }

    /// Serves `router` (HTTP/1.1 and h2c) on a listener from [`Self::bind`].
    pub(crate) fn serve(
        listener: TcpListener,
        router: Router,
        cancel: CancellationToken,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        // Without Nagle's delay, as Google's front ends answer: a response written in pieces would
        // otherwise wait some 40 ms for the client's delayed ACK.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
            if let Err(err) = served {
                tracing::warn!(%addr, error = %err, "Stand-in server stopped with an error.");
            }
        });
        Ok(Self { addr, cancel, task: Some(task) })
    }

    /// The port listened on.
    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cancels the token and waits (a few seconds at most) for the server to close.
    pub(crate) async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// An error in the JSON shape Google's REST APIs use: `{"error":{"code","message","status"}}`.
///
/// Cloud Storage's JSON API has no `status` but an `errors` list with a `reason`; both forms are
/// built from this one type.
#[derive(Debug)]
pub(crate) struct ApiError {
    http: StatusCode,
    status: Option<&'static str>,
    reason: Option<&'static str>,
    message: String,
}

impl ApiError {
    /// An error as the gRPC-transcoded APIs (Cloud Tasks, Pub/Sub admin) send it.
    pub(crate) fn rpc(http: StatusCode, status: &'static str, message: impl Into<String>) -> Self {
        Self { http, status: Some(status), reason: None, message: message.into() }
    }

    /// An error as Cloud Storage's JSON API sends it.
    pub(crate) fn storage(http: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self { http, status: None, reason: Some(reason), message: message.into() }
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::rpc(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    pub(crate) fn invalid_argument(message: impl Into<String>) -> Self {
        Self::rpc(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
    }
}

impl From<crate::Error> for ApiError {
    fn from(err: crate::Error) -> Self {
        let message = err.to_string();
        match err {
            crate::Error::AlreadyExists(_) => Self::rpc(StatusCode::CONFLICT, "ALREADY_EXISTS", message),
            crate::Error::NotFound(_) => Self::not_found(message),
            crate::Error::InvalidArgument(_) => Self::invalid_argument(message),
            crate::Error::Io(_) => Self::rpc(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = serde_json::json!({ "code": self.http.as_u16(), "message": self.message });
        if let Some(status) = self.status {
            error["status"] = status.into();
        }
        if let Some(reason) = self.reason {
            error["errors"] =
                serde_json::json!([{ "domain": "global", "reason": reason, "message": self.message }]);
        }
        (self.http, Json(serde_json::json!({ "error": error }))).into_response()
    }
}

/// An HTTP client for pushes and dispatches: never through a proxy, one pool per stand-in.
pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .expect("the HTTP client's TLS backend initializes")
}
