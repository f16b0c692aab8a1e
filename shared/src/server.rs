//! The scaffold of the three push services (trigger, list-uploader, sender): the port, the token
//! check in front of push and task routes, `/healthz`, one span per request (in the trace that the
//! pushed message or the caller names), and graceful shutdown on SIGTERM (Cloud Run's stop signal)
//! that flushes the service's publishers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::Request;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt;
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tower_http::trace::TraceLayer;
use tracing::Span;
use tracing::field::Empty;

use crate::auth::{GOOGLE_JWKS_URL, PushAuth, PushAuthMode, require_token};
use crate::config::CommonArgs;
use crate::gcp::Topic;
use crate::push::{MAX_PUSH_BYTES, MessageTrace, message_trace};
use crate::telemetry::{TRACEPARENT, join_trace, message_trace_root, parse_cloud_trace, parse_traceparent};

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
    /// `public` ones and `/healthz` need none, and every request gets a span named by its route,
    /// in the trace that the pushed message or the caller names.
    pub fn router<S>(&self, state: S, authenticated: Router<S>, public: Router<S>) -> Router
    where
        S: Clone + Send + Sync + 'static,
    {
        let mut router = Router::new()
            .merge(public)
            .route("/healthz", get(|| async { "ok" }))
            .layer(TraceLayer::new_for_http().make_span_with(request_span));
        // Without authenticated routes (the public entry), an unknown path is simply not found.
        if authenticated.has_routes() {
            // The span starts once the body is read, so that a push joins its message's trace.
            let authenticated = authenticated
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(axum::middleware::from_fn(read_message_trace))
                .layer(DefaultBodyLimit::max(MAX_PUSH_BYTES))
                .layer(axum::middleware::from_fn_with_state(self.auth.clone(), require_token));
            router = router.merge(authenticated);
        }
        router.with_state(state)
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

/// Reads the body of an authenticated request for its message's trace ([`MessageTrace`]), and
/// hands the body on as it came: whole when it is within [`MAX_PUSH_BYTES`], otherwise what was
/// read followed by the rest (or the error that cut it short), for the handler to refuse.
async fn read_message_trace(request: Request<Body>, next: Next) -> Response {
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|length| length > MAX_PUSH_BYTES) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let mut rest = body.into_data_stream();
    let mut read = Vec::new();
    let mut size = 0;
    let body = loop {
        match rest.next().await {
            Some(Ok(chunk)) => {
                size += chunk.len();
                read.push(chunk);
                if size > MAX_PUSH_BYTES {
                    break Body::from_stream(futures::stream::iter(read.into_iter().map(Ok)).chain(rest));
                }
            }
            Some(Err(err)) => {
                let read = read.into_iter().map(Ok);
                break Body::from_stream(
                    futures::stream::iter(read).chain(futures::stream::once(async { Err(err) })),
                );
            }
            None => {
                let whole = Bytes::from(read.concat());
                if let Some(trace) = message_trace(&whole) {
                    parts.extensions.insert(trace);
                }
                break Body::from(whole);
            }
        }
    };
    next.run(Request::from_parts(parts, body)).await
}

/// A request's span, `http` with its method, route and attempt, in the trace of the message it
/// delivers (its `traceparent` attribute), or else of its caller (the `traceparent` header), or
/// else, for a message published without one, the trace its message id names (so that every
/// delivery of it, redeliveries included, is one trace), or else Cloud Run's
/// `X-Cloud-Trace-Context`, or else a trace of its own. A malformed one counts as absent.
fn request_span(request: &Request<Body>) -> Span {
    let path = request.extensions().get::<MatchedPath>().map(MatchedPath::as_str).unwrap_or("unmatched");
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    let message = request.extensions().get::<MessageTrace>();
    let parent = [message.and_then(|m| m.traceparent.as_deref()), header(TRACEPARENT)]
        .into_iter()
        .flatten()
        .find_map(parse_traceparent)
        .or_else(|| message.and_then(|m| m.message_id.as_deref()).map(message_trace_root))
        .or_else(|| header("x-cloud-trace-context").and_then(parse_cloud_trace));
    // Cloud Tasks counts retries from 0; Pub/Sub counts deliveries from 1 (with a dead-letter
    // policy).
    let attempt = header("x-cloudtasks-taskretrycount")
        .and_then(|n| n.parse::<u32>().ok())
        .map(|retries| retries + 1)
        .or_else(|| message.and_then(|m| m.delivery_attempt));
    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        path,
        attempt,
        trace_id = Empty,
        span_id = Empty
    );
    join_trace(&span, parent.as_ref());
    span
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

#[cfg(test)]
mod tests {
    use axum::routing::post;
    use base64::Engine;
    use serde_json::json;

    use super::*;
    use crate::push::{Delivered, PushEnvelope};
    use crate::telemetry::current_traceparent;
    use crate::telemetry::testing::{PARENT_SPAN, TRACE, json_logs, traceparent};

    const AUDIENCE: &str = "https://sender.example";
    const INVOKER: &str = "push@p.iam.gserviceaccount.com";
    const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

    /// A push service that trusts Cloud Run's check of its tokens, on a free port.
    async fn service() -> PushService {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let auth = PushAuth::new(
            PushAuthMode::CloudRunIam,
            "http://127.0.0.1:9/keys",
            AUDIENCE,
            [INVOKER.to_owned()],
        );
        PushService { name: "test", listener, auth: Arc::new(auth) }
    }

    /// A token of the invoker as Cloud Run forwards it, its signature removed.
    fn token() -> String {
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap())
        };
        let exp = chrono::Utc::now().timestamp() + 3600;
        let claims = json!({"iss": "https://accounts.google.com", "aud": AUDIENCE, "exp": exp,
                            "email": INVOKER, "email_verified": true});
        format!("{}.{}.SIGNATURE_REMOVED_BY_GOOGLE", b64(json!({"alg": "RS256"})), b64(claims))
    }

    /// A push body whose message has `attributes`.
    fn envelope(attributes: &serde_json::Value) -> reqwest::Body {
        let body = json!({"message": {"data": "e30=", "messageId": "m-1", "attributes": attributes},
                          "subscription": "projects/p/subscriptions/s"});
        serde_json::to_vec(&body).unwrap().into()
    }

    /// The `traceparent` the handler would send on, or why it could not read the body.
    async fn echo(Delivered(envelope): Delivered<PushEnvelope>) -> String {
        match envelope {
            Ok(_) => {
                tracing::info!("Push taken.");
                current_traceparent().unwrap_or_default()
            }
            Err(unreadable) => unreadable.reason,
        }
    }

    /// Serves the echo route, pushes `body` to it with `headers`, and returns the answer.
    async fn push(body: reqwest::Body, headers: &[(&str, &str)], token: Option<String>) -> (u16, String) {
        let service = service().await;
        let url = format!("http://127.0.0.1:{}/push/echo", service.port());
        let router = service.router((), Router::new().route("/push/echo", post(echo)), Router::new());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(service.run(router, async { drop(stopped.await) }, &[]));
        let mut request = reqwest::Client::new().post(url).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let answer = (response.status().as_u16(), response.text().await.unwrap());
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        answer
    }

    fn trace_of(answer: &(u16, String)) -> String {
        assert_eq!(answer.0, 200, "{}", answer.1);
        parse_traceparent(&answer.1).expect("the handler sends a traceparent").trace_id().to_string()
    }

    #[tokio::test]
    async fn a_push_joins_the_trace_of_its_message_with_a_span_of_its_own() {
        let (subscriber, logs) = json_logs("info");
        let _traced = tracing::subscriber::set_default(subscriber);
        let caller = format!("00-{CALLER_TRACE}-b7ad6b7169203331-01");

        let answer = push(
            envelope(&json!({"traceparent": traceparent()})),
            &[("traceparent", &caller)],
            Some(token()),
        )
        .await;

        assert_eq!(trace_of(&answer), TRACE, "the message's trace wins over the caller's");
        let span = parse_traceparent(&answer.1).unwrap().span_id().to_string();
        assert_ne!(span, PARENT_SPAN);
        let lines = logs.lines();
        let line = lines.iter().find(|l| l["message"] == "Push taken.").expect("the handler's line");
        assert_eq!(line["logging.googleapis.com/trace"], format!("projects/p/traces/{TRACE}"));
        assert_eq!(line["logging.googleapis.com/spanId"], span);
        assert_eq!(line["path"], "/push/echo");
    }

    #[tokio::test]
    async fn without_the_attribute_a_push_joins_its_caller_s_trace() {
        let _traced = tracing::subscriber::set_default(json_logs("warn").0);
        let caller = format!("00-{CALLER_TRACE}-b7ad6b7169203331-01");
        let cloud_run = format!("{CALLER_TRACE}/13235353014750950193;o=1");

        let by_traceparent =
            push(envelope(&json!({"class": "batch"})), &[("traceparent", &caller)], Some(token())).await;
        let anonymous = json!({"message": {"data": "e30="}, "subscription": "projects/p/subscriptions/s"});
        let by_cloud_run = push(
            serde_json::to_vec(&anonymous).unwrap().into(),
            &[("x-cloud-trace-context", &cloud_run)],
            Some(token()),
        )
        .await;

        assert_eq!(trace_of(&by_traceparent), CALLER_TRACE);
        assert_eq!(trace_of(&by_cloud_run), CALLER_TRACE);
    }

    #[tokio::test]
    async fn every_delivery_of_a_message_without_the_attribute_is_one_trace() {
        let _traced = tracing::subscriber::set_default(json_logs("warn").0);
        let cloud_run = |n: u64| format!("{CALLER_TRACE}/{n};o=1");

        // Cloud Run gives each delivery a trace header of its own; the message id is the same.
        let first =
            push(envelope(&json!({})), &[("x-cloud-trace-context", &cloud_run(1))], Some(token())).await;
        let again =
            push(envelope(&json!({})), &[("x-cloud-trace-context", &cloud_run(2))], Some(token())).await;

        assert_eq!(trace_of(&first), trace_of(&again));
        assert_eq!(trace_of(&first), message_trace_root("m-1").trace_id().to_string());
    }

    #[tokio::test]
    async fn a_malformed_traceparent_attribute_is_ignored() {
        let _traced = tracing::subscriber::set_default(json_logs("warn").0);
        let caller = format!("00-{CALLER_TRACE}-b7ad6b7169203331-01");
        let malformed = format!("00-{TRACE}-0000000000000000-01");

        let with_caller =
            push(envelope(&json!({"traceparent": malformed})), &[("traceparent", &caller)], Some(token()))
                .await;
        let alone = push(envelope(&json!({"traceparent": "garbage"})), &[], Some(token())).await;

        assert_eq!(trace_of(&with_caller), CALLER_TRACE);
        let own = trace_of(&alone);
        assert_ne!(own, TRACE);
        assert_ne!(own, CALLER_TRACE);
    }

    #[tokio::test]
    async fn an_oversized_push_still_reaches_its_handler_as_unreadable() {
        let _traced = tracing::subscriber::set_default(json_logs("warn").0);
        let oversized = vec![b' '; MAX_PUSH_BYTES + 1];
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(oversized.clone())];

        let sized = push(oversized.into(), &[], Some(token())).await;
        let chunked =
            push(reqwest::Body::wrap_stream(futures::stream::iter(chunks)), &[], Some(token())).await;

        for (status, reason) in [sized, chunked] {
            assert_eq!(status, 200);
            assert!(reason.contains("larger than the limit"), "{reason}");
        }
    }

    #[tokio::test]
    async fn a_push_without_a_token_is_refused_before_its_body_is_read() {
        let _traced = tracing::subscriber::set_default(json_logs("warn").0);
        let (status, _) = push(envelope(&json!({"traceparent": traceparent()})), &[], None).await;
        assert_eq!(status, 401);
    }
}
