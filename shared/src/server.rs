//! Serving a router until SIGTERM (Cloud Run's stop signal) or Ctrl-C, with graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::MatchedPath;
use axum::http::Request;
use axum::serve::{ListenerExt, TapIo};
use tokio::net::{TcpListener, TcpStream};
use tower_http::trace::TraceLayer;

/// Binds `0.0.0.0:port` (port 0 picks a free one).
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((host, port)).await
}

/// Answers without Nagle's delay: a response written in pieces (headers, then a small body)
/// would otherwise wait for the peer's delayed ACK, some 40 ms, before its last piece goes out.
pub fn no_delay(listener: TcpListener) -> TapIo<TcpListener, fn(&mut TcpStream)> {
    listener.tap_io(set_no_delay)
}

fn set_no_delay(tcp: &mut TcpStream) {
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(error = %err, "TCP_NODELAY not set.");
    }
}

/// Adds request tracing (one span per request, named by the matched route).
pub fn with_tracing(router: Router) -> Router {
    router.layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
        let path = request.extensions().get::<MatchedPath>().map(MatchedPath::as_str).unwrap_or("unmatched");
        tracing::info_span!("http", method = %request.method(), path)
    }))
}

/// Serves until `shutdown` completes, then lets requests in progress finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(no_delay(listener), router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
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
