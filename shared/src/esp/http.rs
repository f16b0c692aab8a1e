//! [`HttpEsp`]: an [`EspProvider`] speaking the ESP simulator's HTTP API.
//!
//! The protocol (JSON over HTTP, `Authorization: Bearer <api key>`):
//! - `POST /v1/lists` `{idempotency_key, request_id, recipients}` → 201 `{list_id}`;
//! - `POST /v1/sends` `{idempotency_key, request_id, list_id, template, class}` → 202 `{delivery_id}`;
//! - `GET /v1/sends?idempotency_key=K` → 200 `{delivery_id, accepted_at}`, or 404 with
//!   `{"error":"delivery_not_found"}`;
//! - `GET /v1/sends/{delivery_id}` → 200 `{state: processing|done, delivered, bounced, failed}`.
//!
//! Errors are JSON `{error, message}` with a machine-readable `error` code; 429 carries `Retry-After`.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{DeliveryId, DeliveryStatus, EspError, EspProvider, ListId, ListUpload, SendRequest};

/// How to reach an ESP that speaks the simulator's protocol.
#[derive(Clone, Debug)]
pub struct HttpEspConfig {
    /// Where the API lives, e.g. `http://127.0.0.1:8089`; the `/v1/...` paths are appended.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<SecretString>,
    /// Longest wait for one call, from sending it to reading the whole answer (default 60 s).
    /// A call that times out after it was sent ends in [`EspError::Indeterminate`].
    pub timeout: Duration,
    /// Longest wait for a connection (default 5 s); a call that could not connect was never sent.
    pub connect_timeout: Duration,
}

impl HttpEspConfig {
    /// A configuration with the default timeouts and no API key.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Sets the API key.
    pub fn with_api_key(mut self, api_key: impl Into<String>) -> Self {
        self.api_key = Some(SecretString::from(api_key.into()));
        self
    }

    /// Sets the per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// An [`EspProvider`] over HTTP. Build it once and share it: the client pools connections.
#[derive(Clone, Debug)]
pub struct HttpEsp {
    client: reqwest::Client,
    base: Url,
    auth: Option<HeaderValue>,
    timeout: Duration,
}

impl HttpEsp {
    /// Builds the provider with its own HTTP client.
    pub fn new(config: HttpEspConfig) -> Result<Self, EspError> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| EspError::Permanent(format!("cannot build the http client: {e}")))?;
        Self::with_client(client, config)
    }

    /// Builds the provider over an existing client. Its per-call timeout still applies;
    /// the client should not follow redirects.
    pub fn with_client(client: reqwest::Client, config: HttpEspConfig) -> Result<Self, EspError> {
        let HttpEspConfig { base_url, api_key, timeout, .. } = config;
        let base = Url::parse(&base_url)
            .map_err(|e| EspError::Permanent(format!("invalid esp url `{base_url}`: {e}")))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(EspError::Permanent(format!(
                "invalid esp url `{base_url}`: not an http(s) base url"
            )));
        }
        let auth = match api_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
                    .map_err(|_| EspError::Permanent("the esp api key is not a valid header value".into()))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self { client, base, auth, timeout })
    }

    /// The API's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // `with_client` checked that the url can be a base, so this cannot fail.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Makes one call and returns the status and body of a success (or of a 404 when
    /// `op` is a lookup); every other outcome becomes an [`EspError`].
    async fn call(
        &self,
        op: Op,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), EspError> {
        let mut request = self.client.request(method, url).timeout(self.timeout);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if let Some(body) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        let response = request.send().await.map_err(|e| transport_error(op, &e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await;
        if status.is_success() || (status == StatusCode::NOT_FOUND && op == Op::Lookup) {
            let body = body.map_err(|e| unread_answer(op, status, &e))?;
            return Ok((status, body));
        }
        let body = body.unwrap_or_default();
        Err(classify_status(op, status, &headers, &body, Utc::now()))
    }
}

#[async_trait]
impl EspProvider for HttpEsp {
    #[tracing::instrument(skip_all, fields(request_id = %list.request_id, key = %list.idempotency_key, recipients = list.recipients.len()))]
    async fn upload_list(&self, list: &ListUpload) -> Result<ListId, EspError> {
        let body = encode(Op::Upload, list)?;
        let (status, body) =
            self.call(Op::Upload, Method::POST, self.url(&["v1", "lists"]), Some(body)).await?;
        let created: ListCreated = decode(Op::Upload, status, &body)?;
        Ok(created.list_id)
    }

    #[tracing::instrument(skip_all, fields(request_id = %send.request_id, key = %send.idempotency_key, list = %send.list_id))]
    async fn send(&self, send: &SendRequest) -> Result<DeliveryId, EspError> {
        let body = encode(Op::Send, send)?;
        let (status, body) =
            self.call(Op::Send, Method::POST, self.url(&["v1", "sends"]), Some(body)).await?;
        let accepted: SendAccepted = decode(Op::Send, status, &body)?;
        Ok(accepted.delivery_id)
    }

    #[tracing::instrument(skip_all, fields(key = %idempotency_key))]
    async fn find_delivery(&self, idempotency_key: &str) -> Result<Option<DeliveryId>, EspError> {
        let mut url = self.url(&["v1", "sends"]);
        url.query_pairs_mut().append_pair("idempotency_key", idempotency_key);
        let (status, body) = self.call(Op::Lookup, Method::GET, url, None).await?;
        if status == StatusCode::NOT_FOUND {
            // Only the protocol's own "no such send" answer means the ESP never accepted it;
            // a bare 404 (a wrong base url, a proxy) must not be taken for that.
            return match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) if e.error == "delivery_not_found" => Ok(None),
                _ => Err(EspError::Permanent(format!(
                    "{}: 404 without the protocol's not-found answer (is the esp url right?): {}",
                    Op::Lookup.describe(),
                    snippet(&body)
                ))),
            };
        }
        let found: SendFound = decode(Op::Lookup, status, &body)?;
        Ok(Some(found.delivery_id))
    }

    #[tracing::instrument(skip_all, fields(delivery = %id))]
    async fn delivery_status(&self, id: &DeliveryId) -> Result<DeliveryStatus, EspError> {
        let url = self.url(&["v1", "sends", &id.0]);
        let (status, body) = self.call(Op::Status, Method::GET, url, None).await?;
        let answer: StatusBody = decode(Op::Status, status, &body)?;
        match answer.state.as_str() {
            "processing" => Ok(DeliveryStatus::Processing),
            "done" => Ok(DeliveryStatus::Done {
                delivered: answer.delivered,
                bounced: answer.bounced,
                failed: answer.failed,
            }),
            other => Err(EspError::Transient(format!(
                "{}: unknown delivery state `{other}`",
                Op::Status.describe()
            ))),
        }
    }
}

/// Which call failed: it decides whether a lost answer leaves the outcome unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Upload,
    Send,
    Lookup,
    Status,
}

impl Op {
    fn describe(self) -> &'static str {
        match self {
            Op::Upload => "list upload",
            Op::Send => "send",
            Op::Lookup => "delivery lookup",
            Op::Status => "delivery status",
        }
    }

    /// Calls that change something at the ESP: losing their answer leaves the outcome unknown.
    fn changes_state(self) -> bool {
        matches!(self, Op::Upload | Op::Send)
    }
}

#[derive(Debug, Deserialize)]
struct ListCreated {
    list_id: ListId,
}

#[derive(Debug, Deserialize)]
struct SendAccepted {
    delivery_id: DeliveryId,
}

#[derive(Debug, Deserialize)]
struct SendFound {
    delivery_id: DeliveryId,
}

#[derive(Debug, Deserialize)]
struct StatusBody {
    state: String,
    #[serde(default)]
    delivered: u64,
    #[serde(default)]
    bounced: u64,
    #[serde(default)]
    failed: u64,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: String,
}

fn encode<T: serde::Serialize>(op: Op, value: &T) -> Result<Vec<u8>, EspError> {
    serde_json::to_vec(value)
        .map_err(|e| EspError::Permanent(format!("{}: cannot encode the request: {e}", op.describe())))
}

/// Decodes a success's body. A 2xx to an upload or a send whose body makes no sense
/// still means the ESP accepted the call, so the outcome is unknown, not failed.
fn decode<T: DeserializeOwned>(op: Op, status: StatusCode, body: &[u8]) -> Result<T, EspError> {
    serde_json::from_slice(body).map_err(|e| {
        let message = format!("{}: unreadable {status} answer ({e}): {}", op.describe(), snippet(body));
        if op.changes_state() { EspError::Indeterminate(message) } else { EspError::Transient(message) }
    })
}

/// A call that produced no HTTP answer.
fn transport_error(op: Op, error: &reqwest::Error) -> EspError {
    let cause = error_chain(error);
    if error.is_builder() {
        EspError::Permanent(format!("{}: cannot build the request: {cause}", op.describe()))
    } else if error.is_connect() {
        EspError::Transient(format!("{}: cannot connect to the esp: {cause}", op.describe()))
    } else if op.changes_state() {
        let what = if error.is_timeout() { "timed out" } else { "lost its connection" };
        EspError::Indeterminate(format!(
            "{} {what} after it was sent, the esp may have accepted it: {cause}",
            op.describe()
        ))
    } else {
        EspError::Transient(format!("{}: {cause}", op.describe()))
    }
}

/// A success whose body could not be read: accepted, but with no id to show for it.
fn unread_answer(op: Op, status: StatusCode, error: &reqwest::Error) -> EspError {
    let message = format!(
        "{}: answered {status} but the answer could not be read: {}",
        op.describe(),
        error_chain(error)
    );
    if op.changes_state() { EspError::Indeterminate(message) } else { EspError::Transient(message) }
}

/// Classifies an HTTP answer that is not a success.
fn classify_status(
    op: Op,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
) -> EspError {
    let message = format!("{} answered {status}: {}", op.describe(), snippet(body));
    match status {
        StatusCode::TOO_MANY_REQUESTS => EspError::RateLimited {
            retry_after: headers.get(RETRY_AFTER).and_then(|v| parse_retry_after(v, now)),
        },
        // The gateway gave up waiting for the ESP, which may have gone on to accept the call.
        StatusCode::GATEWAY_TIMEOUT if op.changes_state() => EspError::Indeterminate(message),
        StatusCode::REQUEST_TIMEOUT => EspError::Transient(message),
        s if s.is_server_error() => EspError::Transient(message),
        _ => EspError::Permanent(message),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(value: &HeaderValue, now: DateTime<Utc>) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    if let Ok(seconds) = text.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let at = DateTime::parse_from_rfc2822(text).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The start of an answer's body, for error messages.
fn snippet(body: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    if body.len() > MAX { format!("{text}…") } else { text.into_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(op: Op, status: u16, headers: &[(&'static str, &str)]) -> EspError {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        let now = DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z").unwrap().with_timezone(&Utc);
        classify_status(op, StatusCode::from_u16(status).unwrap(), &map, br#"{"error":"x"}"#, now)
    }

    #[test]
    fn a_429_is_rate_limited_with_the_delay_the_esp_asked_for() {
        assert_eq!(
            classify(Op::Send, 429, &[("retry-after", "3")]),
            EspError::RateLimited { retry_after: Some(Duration::from_secs(3)) }
        );
        assert_eq!(
            classify(Op::Upload, 429, &[("retry-after", "Sun, 01 Mar 2026 12:00:05 GMT")]),
            EspError::RateLimited { retry_after: Some(Duration::from_secs(5)) }
        );
        assert_eq!(classify(Op::Upload, 429, &[]), EspError::RateLimited { retry_after: None });
        assert_eq!(
            classify(Op::Upload, 429, &[("retry-after", "soon")]),
            EspError::RateLimited { retry_after: None }
        );
    }

    #[test]
    fn server_errors_are_transient_and_client_errors_permanent() {
        for op in [Op::Upload, Op::Send, Op::Lookup, Op::Status] {
            assert!(matches!(classify(op, 500, &[]), EspError::Transient(_)));
            assert!(matches!(classify(op, 503, &[]), EspError::Transient(_)));
            assert!(matches!(classify(op, 408, &[]), EspError::Transient(_)));
            for status in [400, 401, 403, 404, 409, 422] {
                assert!(matches!(classify(op, status, &[]), EspError::Permanent(_)), "{status}");
            }
        }
    }

    #[test]
    fn a_gateway_timeout_leaves_a_send_indeterminate_but_a_read_transient() {
        assert!(classify(Op::Send, 504, &[]).maybe_accepted());
        assert!(classify(Op::Upload, 504, &[]).maybe_accepted());
        assert!(matches!(classify(Op::Lookup, 504, &[]), EspError::Transient(_)));
    }

    #[test]
    fn an_unreadable_success_leaves_a_send_indeterminate() {
        let err = decode::<SendAccepted>(Op::Send, StatusCode::ACCEPTED, b"<html>").unwrap_err();
        assert!(err.maybe_accepted(), "{err}");
        let err = decode::<StatusBody>(Op::Status, StatusCode::OK, b"<html>").unwrap_err();
        assert!(matches!(err, EspError::Transient(_)), "{err}");
    }

    #[test]
    fn paths_are_appended_to_the_base_url() {
        let esp = HttpEsp::new(HttpEspConfig::new("http://127.0.0.1:9/esp/")).unwrap();
        assert_eq!(esp.url(&["v1", "sends", "d/1"]).as_str(), "http://127.0.0.1:9/esp/v1/sends/d%2F1");
        let esp = HttpEsp::new(HttpEspConfig::new("http://127.0.0.1:9")).unwrap();
        assert_eq!(esp.url(&["v1", "lists"]).as_str(), "http://127.0.0.1:9/v1/lists");
    }

    #[test]
    fn a_bad_base_url_is_refused() {
        assert!(matches!(HttpEsp::new(HttpEspConfig::new("not a url")), Err(EspError::Permanent(_))));
        assert!(matches!(HttpEsp::new(HttpEspConfig::new("mailto:x@y")), Err(EspError::Permanent(_))));
    }
}
