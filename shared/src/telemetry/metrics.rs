//! The metrics an SRE tunes throughput with. Their names are already in Prometheus form, which is
//! how Cloud Monitoring files OTLP metrics (`prometheus.googleapis.com/NAME/KIND`) and how the
//! dashboard in `terraform/dashboard.tf` queries them:
//!
//! | metric | kind | attributes | recorded by |
//! |---|---|---|---|
//! | `haishin_esp_calls_active` | up-down counter | `api`, `class` | list-uploader, sender, around each ESP call |
//! | `haishin_esp_limit` | gauge | `api` | list-uploader, sender: the calls allowed at once |
//! | `haishin_esp_calls_total` | counter | `api`, `class`, `outcome` | list-uploader, sender |
//! | `haishin_chunks` | gauge | `state`, `class` | completion: chunks not yet final |
//! | `haishin_oldest_pending_chunk_age_seconds` | gauge | `class` | completion |
//! | `haishin_realtime_latency_seconds` | histogram | | completion: request received → ESP accepted |
//! | `haishin_recipients_total` | counter | `outcome`, `class` | completion, per logged chunk |
//! | `haishin_dead_letters_total` | counter | `subscription` | trigger |
//!
//! `api` is `upload` or `send`; `outcome` of an ESP call is `ok`, `rate_limited`, `transient`,
//! `indeterminate` or `permanent` (the [`EspError`] classes). Without a configured exporter the
//! instruments are no-ops.

use std::sync::LazyLock;

pub use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, UpDownCounter};

use crate::domain::Class;
use crate::esp::EspError;

/// The instruments, created from the global meter provider on first use (after
/// [`super::init`] installed it).
pub struct Metrics {
    esp_active: UpDownCounter<i64>,
    esp_limit: Gauge<u64>,
    esp_calls: Counter<u64>,
    pub chunks: Gauge<u64>,
    pub oldest_pending: Gauge<f64>,
    pub realtime_latency: Histogram<f64>,
    pub recipients: Counter<u64>,
    pub dead_letters: Counter<u64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let meter = opentelemetry::global::meter("haishin");
    Metrics {
        esp_active: meter
            .i64_up_down_counter("haishin_esp_calls_active")
            .with_description("ESP calls in flight: the slots in use")
            .build(),
        esp_limit: meter
            .u64_gauge("haishin_esp_limit")
            .with_description("ESP calls allowed at once by this instance")
            .build(),
        esp_calls: meter
            .u64_counter("haishin_esp_calls_total")
            .with_description("ESP calls, by outcome class")
            .build(),
        chunks: meter.u64_gauge("haishin_chunks").with_description("Chunks not yet final, by state").build(),
        oldest_pending: meter
            .f64_gauge("haishin_oldest_pending_chunk_age_seconds")
            .with_description("Age of the oldest chunk waiting for a slot")
            .build(),
        realtime_latency: meter
            .f64_histogram("haishin_realtime_latency_seconds")
            .with_description("Realtime requests: received to the ESP accepting the send")
            .with_boundaries(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0])
            .build(),
        recipients: meter
            .u64_counter("haishin_recipients_total")
            .with_description("Recipients of logged chunks, by outcome")
            .build(),
        dead_letters: meter
            .u64_counter("haishin_dead_letters_total")
            .with_description("Messages dead-lettered after their last delivery attempt")
            .build(),
    }
});

/// The instruments.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Which ESP API a call is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Upload,
    Send,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Upload => "upload",
            Api::Send => "send",
        }
    }
}

/// The outcome class of an ESP call.
pub fn outcome(result: Result<(), &EspError>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(EspError::RateLimited { .. }) => "rate_limited",
        Err(EspError::Transient(_)) => "transient",
        Err(EspError::Indeterminate(_)) => "indeterminate",
        Err(EspError::Permanent(_)) => "permanent",
    }
}

impl Metrics {
    /// Records the calls an instance may make at once to `api`.
    pub fn esp_limit(&self, api: Api, limit: u32) {
        self.esp_limit.record(u64::from(limit), &[KeyValue::new("api", api.as_str())]);
    }

    /// Marks an ESP call in flight until the returned guard is finished (or dropped).
    pub fn esp_call(&'static self, api: Api, class: Class) -> EspCall {
        let attributes = [KeyValue::new("api", api.as_str()), KeyValue::new("class", class.as_str())];
        self.esp_active.add(1, &attributes);
        EspCall { metrics: self, attributes, done: false }
    }
}

/// One ESP call in flight.
pub struct EspCall {
    metrics: &'static Metrics,
    attributes: [KeyValue; 2],
    done: bool,
}

impl EspCall {
    /// Ends the call with its outcome class ([`outcome`]).
    pub fn finish(mut self, outcome: &'static str) {
        self.done = true;
        self.metrics.esp_active.add(-1, &self.attributes);
        let [api, class] = self.attributes.clone();
        self.metrics.esp_calls.add(1, &[api, class, KeyValue::new("outcome", outcome)]);
    }
}

impl Drop for EspCall {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.esp_active.add(-1, &self.attributes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esp_errors_map_to_their_outcome_class() {
        assert_eq!(outcome(Ok(())), "ok");
        assert_eq!(outcome(Err(&EspError::RateLimited { retry_after: None })), "rate_limited");
        assert_eq!(outcome(Err(&EspError::Transient("503".into()))), "transient");
        assert_eq!(outcome(Err(&EspError::Indeterminate("timeout".into()))), "indeterminate");
        assert_eq!(outcome(Err(&EspError::Permanent("400".into()))), "permanent");
    }
}
