//! Subscribers and trace contexts for tests.

use std::io::Write;
use std::sync::{Arc, Mutex};

use opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::Value;
use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;

use super::cloud_logging::CloudLogging;
use super::{Output, propagation, subscriber};

/// The trace of a remote parent.
pub(crate) const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
/// The remote parent's span.
pub(crate) const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// The remote parent's `traceparent` (sampled).
pub(crate) fn traceparent() -> String {
    format!("00-{TRACE}-{PARENT_SPAN}-01")
}

/// What `f` returns when run in a span that joined the remote parent's trace, under [`traced`].
pub(crate) fn in_remote_trace<T>(f: impl FnOnce() -> T) -> T {
    tracing::subscriber::with_default(traced(), || {
        let span =
            tracing::info_span!("hop", trace_id = tracing::field::Empty, span_id = tracing::field::Empty);
        super::join_trace(&span, super::parse_traceparent(&traceparent()).as_ref());
        span.in_scope(f)
    })
}

/// A subscriber that traces spans and logs nothing.
pub(crate) fn traced() -> impl Subscriber + Send + Sync {
    tracing_subscriber::registry().with(propagation::layer(&SdkTracerProvider::builder().build()))
}

/// A subscriber that traces spans and logs Cloud Logging JSON for project `p` into the returned
/// buffer, for the events `filter` lets through.
pub(crate) fn json_logs(filter: &str) -> (impl Subscriber + Send + Sync, Captured) {
    let captured = Captured::default();
    let format = CloudLogging { service: "sender".into(), project: Some("p".into()) };
    let writer = captured.clone();
    let tracer = SdkTracerProvider::builder().build();
    let subscriber =
        subscriber(Output::CloudLogging(format), EnvFilter::new(filter), move || writer.clone(), &tracer);
    (subscriber, captured)
}

/// The lines a subscriber wrote, shared with the test.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Every line written so far, parsed as JSON.
    pub(crate) fn lines(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
