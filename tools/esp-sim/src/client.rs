//! [`SimClient`]: reads and steers a simulator that runs in another process.

use std::time::Duration;

use anyhow::Context;
use reqwest::{StatusCode, Url};

use crate::config::Faults;
use crate::report::{RequestDeliveries, SimReport};

/// A client of a simulator's `/_sim` endpoints.
#[derive(Clone, Debug)]
pub struct SimClient {
    base: Url,
    http: reqwest::Client,
}

impl SimClient {
    /// A client of the simulator at `base_url` (e.g. `http://127.0.0.1:8089`).
    pub fn new(base_url: &str) -> anyhow::Result<Self> {
        let base = Url::parse(base_url).with_context(|| format!("invalid simulator url `{base_url}`"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the http client")?;
        Ok(Self { base, http })
    }

    fn url(&self, path: &str) -> anyhow::Result<Url> {
        self.base.join(path).with_context(|| format!("joining `{path}` to {}", self.base))
    }

    /// Waits until the simulator answers, for at most `within`.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let url = self.url("/healthz")?;
        loop {
            match self.http.get(url.clone()).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                _ if tokio::time::Instant::now() >= deadline => {
                    anyhow::bail!("the esp simulator at {} did not answer within {within:?}", self.base)
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The simulator's report; `timeline: false` leaves the busy timeline out.
    pub async fn report(&self, timeline: bool) -> anyhow::Result<SimReport> {
        let mut url = self.url("/_sim/report")?;
        url.query_pairs_mut().append_pair("timeline", if timeline { "true" } else { "false" });
        let response = self.http.get(url).send().await.context("asking for the report")?;
        let response = response.error_for_status().context("asking for the report")?;
        response.json().await.context("reading the report")
    }

    /// Who a request was delivered to; `None` when it had no send accepted.
    pub async fn deliveries(&self, request_id: &str) -> anyhow::Result<Option<RequestDeliveries>> {
        let mut url = self.url("/_sim/deliveries")?;
        url.query_pairs_mut().append_pair("request_id", request_id);
        let response = self.http.get(url).send().await.context("asking for deliveries")?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = response.error_for_status().context("asking for deliveries")?;
        Ok(Some(response.json().await.context("reading deliveries")?))
    }

    /// Replaces the faults in effect.
    pub async fn set_faults(&self, faults: &Faults) -> anyhow::Result<()> {
        let response =
            self.http.post(self.url("/_sim/faults")?).json(faults).send().await.context("setting faults")?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!("the simulator refused the faults ({status}): {body}");
        }
        Ok(())
    }
}
