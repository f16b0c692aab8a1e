//! The scaffold of the three push services (trigger, list-uploader, sender): the port, the token
//! check in front of push and task routes, `/healthz`, one span per request, and graceful
//! shutdown on SIGTERM (Cloud Run's stop signal) that flushes the service's publishers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::Request;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpStream};
use tower_http::trace::TraceLayer;

use crate::auth::{GOOGLE_JWKS_URL, PushAuth, PushAuthMode, require_token};
use crate::config::CommonArgs;
use crate::gcp::Topic;
use crate::push::MAX_PUSH_BYTES;
use crate::telemetry::trace_context;

/// A push service bound to its port, not yet serving.
pub struct PushService {
    name: &'static str,
    listener: TcpListener,
    auth: Arc<PushAuth>,
}

impl PushService {
    /// Binds `host:port` from `args` (port 0 picks a free one).
    pub async fn bind(name: &'static str, args: &CommonArgs) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding port {}", args.port))?;
        Ok(Self { name, listener, auth: args.push_auth() })
    }

    /// Binds `host:port` for a service whose routes are all public (port 0 picks a free one): it
    /// accepts no token, so a route put among the authenticated ones answers 401 to everyone.
    pub async fn bind_public(name: &'static str, host: &str, port: u16) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind((host, port)).await.with_context(|| format!("binding port {port}"))?;
        let nobody = PushAuth::new(PushAuthMode::Verify, GOOGLE_JWKS_URL, "", Vec::new());
        Ok(Self { name, listener, auth: Arc::new(nobody) })
    }

    /// The port the service listens on.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    /// The service's whole router: `authenticated` routes answer 401 without a valid token,
    /// `public` ones and `/healthz` need none, and every request gets a span named by its route.
    pub fn router<S>(&self, state: S, authenticated: Router<S>, public: Router<S>) -> Router
    where
        S: Clone + Send + Sync + 'static,
    {
        let mut router = Router::new().merge(public);
        // Without authenticated routes (the public entry), an unknown path is simply not found.
        if authenticated.has_routes() {
            let authenticated = authenticated
                .layer(DefaultBodyLimit::max(MAX_PUSH_BYTES))
                .layer(axum::middleware::from_fn_with_state(self.auth.clone(), require_token));
            router = router.merge(authenticated);
        }
        let router = router.route("/healthz", get(|| async { "ok" })).with_state(state);
        router.layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let path =
                request.extensions().get::<MatchedPath>().map(MatchedPath::as_str).unwrap_or("unmatched");
            let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
            let (trace_id, span_id) =
                match trace_context(header("traceparent"), header("x-cloud-trace-context")) {
                    Some((trace, span)) => (Some(trace), span),
                    None => (None, None),
                };
            tracing::info_span!("http", method = %request.method(), path, trace_id, span_id)
        }))
    }

    /// Serves `router` until `shutdown` completes, lets requests in progress finish, then sends
    /// what the `publishers` still hold.
    pub async fn run(
        self,
        router: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
        publishers: &[&Topic],
    ) -> anyhow::Result<()> {
        tracing::info!(service = self.name, port = self.port(), "Listening.");
        axum::serve(
            self.listener.tap_io(set_no_delay),
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await?;
        for topic in publishers {
            topic.flush().await;
        }
        Ok(())
    }
}

/// Answers without Nagle's delay: a response written in pieces (headers, then a small body)
/// would otherwise wait for the peer's delayed ACK, some 40 ms, before its last piece goes out.
fn set_no_delay(tcp: &mut TcpStream) {
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(error = %err, "TCP_NODELAY not set.");
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("Shutting down.");
}
