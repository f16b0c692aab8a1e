//! Logging and trace context: JSON in Cloud Logging's format on Cloud Run (services set
//! `K_SERVICE`, jobs `CLOUD_RUN_JOB`; `LOG_FORMAT=json` forces it), readable text elsewhere; and
//! the W3C trace context that joins the hops of one delivery request into one trace.
//!
//! Filter with `RUST_LOG` (default `info`). Span fields (such as `request_id`) are copied into every
//! line logged inside the span, so one request can be followed across services. A span's
//! `trace_id` and `span_id` fields (recorded by [`join_trace`], as the push services do for every
//! request) become `logging.googleapis.com/trace`, which Cloud Logging links to the trace, and
//! `logging.googleapis.com/spanId`.
//!
//! # Layout
//! - this module: the subscriber (log output filtered by `RUST_LOG`, spans traced regardless);
//! - `propagation`: `traceparent` out ([`current_traceparent`], which `Topic::publish` and
//!   `TaskQueue::enqueue` attach) and in ([`parse_traceparent`], [`parse_cloud_trace`],
//!   [`join_trace`]);
//! - `cloud_logging`: the JSON line format;
//! - [`export`]: spans and metrics out over OTLP, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set;
//! - [`metrics`]: the instruments the services record.

mod cloud_logging;
pub mod export;
pub mod metrics;
mod propagation;
#[cfg(test)]
pub(crate) mod testing;

use tracing::Subscriber;
use tracing_subscriber::filter::{FilterExt, LevelFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use cloud_logging::CloudLogging;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
pub use propagation::{
    TRACEPARENT, current_traceparent, join_trace, message_trace_root, parse_cloud_trace, parse_traceparent,
};

/// Installs the global subscriber and, when an OTLP endpoint is configured, the exporters of
/// spans and metrics. Call once, first thing in `main`, and keep the guard until the end: dropping
/// it sends what is still buffered.
pub fn init(service: &str) -> anyhow::Result<Telemetry> {
    init_with_default(service, "info")
}

/// [`init`], with `default` as the filter when `RUST_LOG` is not set.
pub fn init_with_default(service: &str, default: &str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let output = if cloud_logging_wanted(|name| std::env::var(name).ok()) {
        let project = std::env::var("GOOGLE_CLOUD_PROJECT").ok();
        Output::CloudLogging(CloudLogging { service: service.to_owned(), project })
    } else {
        Output::Text
    };
    let telemetry =
        match export::ExportConfig::from_env(|name| std::env::var(name).ok()).map_err(anyhow::Error::msg)? {
            Some(config) => Telemetry::exporting(service, &config)?,
            None => Telemetry { tracer: SdkTracerProvider::builder().build(), meter: None },
        };
    subscriber(output, filter, std::io::stdout, &telemetry.tracer).init();
    if let Some(meter) = &telemetry.meter {
        opentelemetry::global::set_meter_provider(meter.clone());
    }
    Ok(telemetry)
}

/// The providers behind the global subscriber; dropping it flushes and stops the export.
#[must_use = "dropping the guard stops the export of spans and metrics"]
pub struct Telemetry {
    tracer: SdkTracerProvider,
    meter: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Providers exporting to `config`'s endpoint as `service`, not installed yet.
    pub fn exporting(service: &str, config: &export::ExportConfig) -> anyhow::Result<Self> {
        let (tracer, meter) = export::providers(service, config)?;
        propagation::set_new_trace_ratio(config.sample_ratio);
        Ok(Self { tracer, meter: Some(meter) })
    }

    /// Installs these providers as the global ones, logging as text with `RUST_LOG` (`info` by
    /// default) to the test harness: for tests that run services in their own process.
    pub fn install_for_tests(&self) {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = subscriber(Output::Text, filter, tracing_subscriber::fmt::TestWriter::new(), &self.tracer)
            .try_init();
        if let Some(meter) = &self.meter {
            opentelemetry::global::set_meter_provider(meter.clone());
        }
    }

    /// Sends what is buffered now.
    pub fn flush(&self) {
        let _ = self.tracer.force_flush();
        if let Some(meter) = &self.meter {
            let _ = meter.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(err) = self.tracer.shutdown() {
            eprintln!("spans not all exported: {err}");
        }
        if let Some(meter) = &self.meter
            && let Err(err) = meter.shutdown()
        {
            eprintln!("metrics not all exported: {err}");
        }
    }
}

/// Installs a subscriber for tests when `TEST_LOG` is set; otherwise does nothing.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let tracer = SdkTracerProvider::builder().build();
        let _ =
            subscriber(Output::Text, filter, tracing_subscriber::fmt::TestWriter::new(), &tracer).try_init();
    }
}

/// How log lines look.
enum Output {
    CloudLogging(CloudLogging),
    /// Compact text, without targets.
    Text,
}

/// Log lines as `output` to `writer`, for the events `filter` lets through; every span at `info`
/// and above is traced (and its fields logged with the events inside it) whatever the filter says.
fn subscriber<W>(
    output: Output,
    filter: EnvFilter,
    writer: W,
    tracer: &SdkTracerProvider,
) -> impl Subscriber + Send + Sync + use<W>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let logs = match output {
        Output::CloudLogging(format) => tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(format)
            .with_writer(writer)
            .boxed(),
        Output::Text => {
            tracing_subscriber::fmt::layer().compact().with_target(false).with_writer(writer).boxed()
        }
    };
    // At `info` or more the filter lets every traced span through to the logs by itself. Only a
    // quieter one is widened to them, so that lines logged inside a span still carry its fields:
    // under concurrent load, that combined filter has been seen to leave a span out of the trace
    // layer now and then (its children then start a trace of their own).
    let logs = if filter.max_level_hint().is_none_or(|level| level >= LevelFilter::INFO) {
        logs.with_filter(filter).boxed()
    } else {
        logs.with_filter(filter.or(propagation::traced_spans())).boxed()
    };
    tracing_subscriber::registry().with(propagation::layer(tracer)).with(logs)
}

/// Whether to log Cloud Logging JSON: on Cloud Run (a service or a job), or when asked to.
fn cloud_logging_wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    var("K_SERVICE").is_some()
        || var("CLOUD_RUN_JOB").is_some()
        || var("LOG_FORMAT").as_deref() == Some("json")
}

#[cfg(test)]
mod tests {
    use tracing::field::Empty;

    use super::testing::{PARENT_SPAN, TRACE, json_logs, traceparent};
    use super::*;

    #[test]
    fn cloud_run_jobs_log_json_as_services_do() {
        let only = |name: &'static str, value: &'static str| {
            move |var: &str| (var == name).then(|| value.to_owned())
        };
        assert!(cloud_logging_wanted(only("K_SERVICE", "trigger")));
        assert!(cloud_logging_wanted(only("CLOUD_RUN_JOB", "haishin-completion")));
        assert!(cloud_logging_wanted(only("LOG_FORMAT", "json")));
        assert!(!cloud_logging_wanted(only("LOG_FORMAT", "text")));
        assert!(!cloud_logging_wanted(|_| None));
    }

    fn request_span() -> tracing::Span {
        tracing::info_span!("http", trace_id = Empty, span_id = Empty)
    }

    #[test]
    fn log_lines_name_the_trace_and_the_span_of_their_request() {
        let (subscriber, logs) = json_logs("info");
        let sent = tracing::subscriber::with_default(subscriber, || {
            let span = request_span();
            join_trace(&span, parse_traceparent(&traceparent()).as_ref());
            span.in_scope(|| {
                tracing::info!(chunk = "c-1", "Chunk sent.");
                current_traceparent()
            })
        });

        let sent = parse_traceparent(&sent.expect("a traceparent")).unwrap();
        let line = &logs.lines()[0];
        assert_eq!(line["logging.googleapis.com/trace"], format!("projects/p/traces/{TRACE}"));
        assert_eq!(line["logging.googleapis.com/spanId"], sent.span_id().to_string());
        assert_ne!(line["logging.googleapis.com/spanId"], PARENT_SPAN);
        assert_eq!(line["message"], "Chunk sent.");
    }

    #[test]
    fn a_quiet_filter_keeps_the_trace_and_its_log_fields() {
        let (subscriber, logs) = json_logs("warn");
        let sent = tracing::subscriber::with_default(subscriber, || {
            let span = request_span();
            join_trace(&span, parse_traceparent(&traceparent()).as_ref());
            span.in_scope(|| {
                tracing::info!("Not logged.");
                tracing::warn!("Chunk failed.");
                current_traceparent()
            })
        });

        assert_eq!(parse_traceparent(&sent.unwrap()).unwrap().trace_id().to_string(), TRACE);
        let lines = logs.lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["logging.googleapis.com/trace"], format!("projects/p/traces/{TRACE}"));
    }

    #[test]
    fn spans_below_info_send_the_trace_of_the_span_around_them() {
        let (subscriber, _logs) = json_logs("debug");
        tracing::subscriber::with_default(subscriber, || {
            let span = request_span();
            join_trace(&span, None);
            let _request = span.enter();
            let outer = current_traceparent().unwrap();

            let inner = tracing::debug_span!("detail").in_scope(current_traceparent);

            assert_eq!(inner, Some(outer));
        });
    }
}
