//! [`ListSendEsp`]: an [`EspProvider`] for list-based ESPs that speak the list-send protocol.
//!
//! A list-based ESP takes a campaign in two calls: upload the recipients as a list, then send a
//! template to that list. The list-send protocol is the reference form of that shape: the ESP
//! simulator (`tools/esp-sim`) serves it, and a real list-based ESP is reached through it or
//! through a provider of its own beside this one.
//!
//! The protocol (JSON over HTTP, `Authorization: Bearer <api key>`):
//! - `POST /v1/lists` `{idempotency_key, request_id, recipients}` → 201 `{list_id}`;
//! - `POST /v1/sends` `{idempotency_key, request_id, list_id, template, class}` → 202 `{delivery_id}`,
//!   or with `recipients` (as in a list upload) in place of `list_id`: a send to a few recipients
//!   given in the call, as transactional APIs take them, without a list;
//! - `POST /v1/send-batches` `{template, class, parts: [{idempotency_key, request_id,
//!   recipients}]}` → 202 `{deliveries: [{idempotency_key, delivery_id}]}`: sends that share a
//!   template in one call, each part a send of its own under its own key;
//! - `GET /v1/sends?idempotency_key=K` → 200 `{delivery_id, accepted_at}`, or 404 with
//!   `{"error":"delivery_not_found"}`;
//! - `GET /v1/sends/{delivery_id}` → 200 `{state: processing|done, delivered, bounced, failed}`.
//!
//! Errors are JSON `{error, message}` with a machine-readable `error` code; 429 carries `Retry-After`.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

mod outcome;

use outcome::{Op, classify_status, decode, encode, snippet, transport_error, unread_answer};

use super::{DeliveryId, DeliveryStatus, EspError, EspProvider, ListId, ListUpload, SendBatch, SendRequest};

/// How to reach an ESP that speaks the list-send protocol.
#[derive(Clone, Debug)]
pub struct ListSendConfig {
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

impl ListSendConfig {
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

/// An [`EspProvider`] speaking the list-send protocol. Build it once and share it: the client pools connections.
#[derive(Clone, Debug)]
pub struct ListSendEsp {
    client: reqwest::Client,
    base: Url,
    auth: Option<HeaderValue>,
    timeout: Duration,
}

impl ListSendEsp {
    /// Builds the provider with its own HTTP client.
    pub fn new(config: ListSendConfig) -> Result<Self, EspError> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| EspError::Permanent(format!("cannot build the http client: {e}")))?;
        Self::with_client(client, config)
    }

    /// Builds the provider over an existing client. Its per-call timeout still applies;
    /// the client should not follow redirects.
    pub fn with_client(client: reqwest::Client, config: ListSendConfig) -> Result<Self, EspError> {
        let ListSendConfig { base_url, api_key, timeout, .. } = config;
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
impl EspProvider for ListSendEsp {
    #[tracing::instrument(skip_all, fields(request_id = %list.request_id, key = %list.idempotency_key, recipients = list.recipients.len()))]
    async fn upload_list(&self, list: &ListUpload<'_>) -> Result<ListId, EspError> {
        let body = encode(Op::Upload, list)?;
        let (status, body) =
            self.call(Op::Upload, Method::POST, self.url(&["v1", "lists"]), Some(body)).await?;
        let created: ListCreated = decode(Op::Upload, status, &body)?;
        Ok(created.list_id)
    }

    #[tracing::instrument(skip_all, fields(request_id = %send.request_id, key = %send.idempotency_key, to = %send.to.describe()))]
    async fn send(&self, send: &SendRequest) -> Result<DeliveryId, EspError> {
        let body = encode(Op::Send, send)?;
        let (status, body) =
            self.call(Op::Send, Method::POST, self.url(&["v1", "sends"]), Some(body)).await?;
        let accepted: SendAccepted = decode(Op::Send, status, &body)?;
        Ok(accepted.delivery_id)
    }

    fn sends_batches(&self) -> bool {
        true
    }

    #[tracing::instrument(skip_all, fields(parts = batch.parts.len(), recipients = batch.recipients()))]
    async fn send_batch(&self, batch: &SendBatch) -> Result<Vec<DeliveryId>, EspError> {
        let body = encode(Op::Send, batch)?;
        let (status, body) =
            self.call(Op::Send, Method::POST, self.url(&["v1", "send-batches"]), Some(body)).await?;
        let accepted: BatchAccepted = decode(Op::Send, status, &body)?;
        // The ESP took the call: an answer that does not match the parts one for one leaves each
        // part's outcome to the ESP's history.
        let matches = accepted.deliveries.len() == batch.parts.len()
            && accepted
                .deliveries
                .iter()
                .zip(&batch.parts)
                .all(|(d, p)| d.idempotency_key == p.idempotency_key);
        if !matches {
            return Err(EspError::Indeterminate(format!(
                "send batch: the answer's deliveries do not match the {} parts sent: {}",
                batch.parts.len(),
                snippet(&body)
            )));
        }
        Ok(accepted.deliveries.into_iter().map(|d| d.delivery_id).collect())
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

#[derive(Debug, Deserialize)]
struct ListCreated {
    list_id: ListId,
}

#[derive(Debug, Deserialize)]
struct SendAccepted {
    delivery_id: DeliveryId,
}

#[derive(Debug, Deserialize)]
struct BatchAccepted {
    deliveries: Vec<PartAccepted>,
}

#[derive(Debug, Deserialize)]
struct PartAccepted {
    idempotency_key: String,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_appended_to_the_base_url() {
        let esp = ListSendEsp::new(ListSendConfig::new("http://127.0.0.1:9/esp/")).unwrap();
        assert_eq!(esp.url(&["v1", "sends", "d/1"]).as_str(), "http://127.0.0.1:9/esp/v1/sends/d%2F1");
        let esp = ListSendEsp::new(ListSendConfig::new("http://127.0.0.1:9")).unwrap();
        assert_eq!(esp.url(&["v1", "lists"]).as_str(), "http://127.0.0.1:9/v1/lists");
    }

    #[test]
    fn a_bad_base_url_is_refused() {
        assert!(matches!(ListSendEsp::new(ListSendConfig::new("not a url")), Err(EspError::Permanent(_))));
        assert!(matches!(ListSendEsp::new(ListSendConfig::new("mailto:x@y")), Err(EspError::Permanent(_))));
    }
}
