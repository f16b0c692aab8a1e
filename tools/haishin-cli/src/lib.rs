//! `haishin`, the operator's command line: a client of the trigger's `/v1` API.
//!
//! It talks to a deployed trigger with an ID token for the trigger's URL, obtained from
//! Application Default Credentials (the caller needs `roles/run.invoker` on the trigger), or to
//! `haishin-local up`'s trigger, whose API needs no token, through the endpoints file it wrote.
//!
//! - [`Client`]: one method per API call, answers as JSON, errors that say what the API said.
//! - [`progress`]: what `watch` shows of a request: how far it is, at what rate, and its ETA.

pub mod progress;

use std::path::Path;

use anyhow::{Context, bail};
use google_cloud_auth::credentials::idtoken::{self, IDTokenCredentials};
use serde_json::{Value, json};

/// Where the trigger is, and how to authenticate to it.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// An ID token source for a deployed trigger; `None` locally.
    token: Option<IDTokenCredentials>,
}

/// The controls of a running request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Control {
    Pause,
    Resume,
    Cancel,
}

impl Control {
    fn verb(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Cancel => "cancel",
        }
    }
}

/// Filters of `list`.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub states: Vec<String>,
    pub classes: Vec<String>,
    /// `key:value` pairs, all of which must match.
    pub labels: Vec<String>,
    /// Most requests to fetch, across pages.
    pub limit: usize,
}

impl Client {
    /// A deployed trigger at `url`: every call carries an ID token for it, from Application
    /// Default Credentials.
    pub fn deployed(url: &str) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let token = idtoken::Builder::new(base.clone())
            .build()
            .context("ID token credentials from Application Default Credentials")?;
        Ok(Self { base, http: reqwest::Client::new(), token: Some(token) })
    }

    /// The trigger of a local stack, from the endpoints file `haishin-local up` wrote.
    pub fn local(endpoints: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(endpoints).with_context(|| format!("reading {}", endpoints.display()))?;
        let endpoints: Value = serde_json::from_str(&text).context("the endpoints file is not JSON")?;
        let url = endpoints["trigger"].as_str().context("the endpoints file names no trigger")?;
        Ok(Self::unauthenticated(url))
    }

    /// A trigger reached without a token (a local stack's).
    pub fn unauthenticated(url: &str) -> Self {
        Self { base: url.trim_end_matches('/').to_owned(), http: reqwest::Client::new(), token: None }
    }

    /// Submits a delivery request; answers its status.
    pub async fn submit(&self, request: &Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, "/v1/requests", Some(request)).await
    }

    /// A request's status.
    pub async fn status(&self, id: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, &format!("/v1/requests/{}", segment(id)), None).await
    }

    /// Pauses, resumes or cancels a request; answers its status.
    pub async fn control(&self, id: &str, control: Control, reason: Option<&str>) -> anyhow::Result<Value> {
        let body = reason.map(|reason| json!({ "reason": reason }));
        let path = format!("/v1/requests/{}:{}", segment(id), control.verb());
        self.call(reqwest::Method::POST, &path, Some(&body.unwrap_or_else(|| json!({})))).await
    }

    /// Requests newest first, following pages up to `filter.limit`.
    pub async fn list(&self, filter: &ListFilter) -> anyhow::Result<Vec<Value>> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        query.extend(filter.states.iter().map(|s| ("state", s.as_str())));
        query.extend(filter.classes.iter().map(|c| ("class", c.as_str())));
        query.extend(filter.labels.iter().map(|l| ("label", l.as_str())));
        let limit = filter.limit.max(1);
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let size = (limit - all.len()).min(500).to_string();
            let mut params = query.clone();
            params.push(("page_size", &size));
            if let Some(token) = &token {
                params.push(("page_token", token));
            }
            let path = format!("/v1/requests?{}", encode_query(&params));
            let page = self.call(reqwest::Method::GET, &path, None).await?;
            all.extend(page["requests"].as_array().cloned().unwrap_or_default());
            token = page["next_page_token"].as_str().map(str::to_owned);
            if token.is_none() || all.len() >= limit {
                return Ok(all);
            }
        }
    }

    /// Suppresses an address, globally or for one label (`category:promotions`).
    pub async fn suppress(&self, address: &str, scope: Option<&str>, reason: &str) -> anyhow::Result<Value> {
        let body = json!({ "scope": scope.unwrap_or("global"), "reason": reason });
        self.call(reqwest::Method::PUT, &format!("/v1/suppressions/{}", segment(address)), Some(&body)).await
    }

    /// Lifts an address's suppression in one scope.
    pub async fn unsuppress(&self, address: &str, scope: Option<&str>) -> anyhow::Result<Value> {
        let path = format!(
            "/v1/suppressions/{}?{}",
            segment(address),
            encode_query(&[("scope", scope.unwrap_or("global"))])
        );
        self.call(reqwest::Method::DELETE, &path, None).await
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.id_token().await.context("getting an ID token")?);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let answer: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let said = answer["error"]
                .as_str()
                .or(answer["reason"].as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| answer.to_string());
            bail!("{method} {path}: {status}: {said}");
        }
        Ok(answer)
    }
}

/// One path segment, percent-encoded (an id or an address may hold `/`, `?`, `#`, `%`, spaces).
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' | b'+' | b':' => {
                out.push(byte as char)
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

fn encode_query(params: &[(&str, &str)]) -> String {
    params.iter().map(|(k, v)| format!("{k}={}", segment(v))).collect::<Vec<_>>().join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_addresses_are_one_path_segment() {
        assert_eq!(segment("campaign/2026 #1"), "campaign%2F2026%20%231");
        assert_eq!(segment("ann+news@example.com"), "ann+news@example.com");
        assert_eq!(
            encode_query(&[("label", "category:promo&x"), ("page_size", "5")]),
            "label=category:promo%26x&page_size=5"
        );
    }
}
