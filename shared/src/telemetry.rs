//! Logging: JSON in Cloud Logging's format on Cloud Run (services set `K_SERVICE`, jobs
//! `CLOUD_RUN_JOB`; `LOG_FORMAT=json` forces it), readable text elsewhere.
//!
//! Filter with `RUST_LOG` (default `info`). Span fields (such as `request_id`) are copied into every
//! line logged inside the span, so one request can be followed across services. A span field
//! `trace_id` (set from the `traceparent` or `X-Cloud-Trace-Context` header of the request being
//! served) becomes `logging.googleapis.com/trace`, which Cloud Logging links to the trace, and
//! `span_id` becomes `logging.googleapis.com/spanId`.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(service: &str) {
    init_with_default(service, "info");
}

/// Installs the global subscriber, with `default` as the filter when `RUST_LOG` is not set.
pub fn init_with_default(service: &str, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    if cloud_logging_wanted(|name| std::env::var(name).ok()) {
        let project = std::env::var("GOOGLE_CLOUD_PROJECT").ok();
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .fmt_fields(JsonFields::new())
            .event_format(CloudLogging { service: service.to_owned(), project })
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).compact().with_target(false).init();
    }
}

/// Whether to log Cloud Logging JSON: on Cloud Run (a service or a job), or when asked to.
fn cloud_logging_wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    var("K_SERVICE").is_some()
        || var("CLOUD_RUN_JOB").is_some()
        || var("LOG_FORMAT").as_deref() == Some("json")
}

/// A W3C `traceparent` (`00-TRACE-SPAN-FLAGS`) or Cloud Run's `X-Cloud-Trace-Context`
/// (`TRACE/SPAN;o=1`, the span id in decimal), as (trace id, span id in hex).
pub fn trace_context(
    traceparent: Option<&str>,
    cloud_trace: Option<&str>,
) -> Option<(String, Option<String>)> {
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(value) = traceparent {
        let parts: Vec<&str> = value.trim().split('-').collect();
        if let [_, trace, span, _] = parts[..]
            && hex(trace, 32)
            && hex(span, 16)
            && trace.bytes().any(|b| b != b'0')
        {
            return Some((trace.to_ascii_lowercase(), Some(span.to_ascii_lowercase())));
        }
    }
    let value = cloud_trace?.trim();
    let (trace, rest) = value.split_once('/').unwrap_or((value, ""));
    if !hex(trace, 32) {
        return None;
    }
    let span = rest.split(';').next().and_then(|s| s.parse::<u64>().ok()).map(|s| format!("{s:016x}"));
    Some((trace.to_ascii_lowercase(), span))
}

/// Installs a subscriber for tests when `TEST_LOG` is set; otherwise does nothing.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).compact().with_test_writer().try_init();
    }
}

/// Formats events as Cloud Logging structured entries.
struct CloudLogging {
    service: String,
    /// The project traces belong to, for `logging.googleapis.com/trace`.
    project: Option<String>,
}

impl<S, N> FormatEvent<S, N> for CloudLogging
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut entry = Map::new();
        // Span fields first, so that the event's own fields win.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields)
                {
                    entry.extend(map);
                }
            }
        }
        let mut visitor = JsonVisitor(&mut entry);
        event.record(&mut visitor);
        let severity = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG | Level::TRACE => "DEBUG",
        };
        entry.insert("severity".into(), severity.into());
        entry.insert("target".into(), event.metadata().target().into());
        entry.insert("service".into(), self.service.clone().into());
        if let Some(Value::String(trace)) = entry.remove("trace_id") {
            let trace = match &self.project {
                Some(project) => format!("projects/{project}/traces/{trace}"),
                None => trace,
            };
            entry.insert("logging.googleapis.com/trace".into(), trace.into());
        }
        if let Some(span) = entry.remove("span_id") {
            entry.insert("logging.googleapis.com/spanId".into(), span);
        }
        if let Some(request_id) = entry.get("request_id").cloned() {
            entry.insert(
                "logging.googleapis.com/labels".into(),
                serde_json::json!({ "request_id": request_id }),
            );
        }
        let line = serde_json::to_string(&entry).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn trace_ids_come_from_traceparent_or_cloud_run_s_header() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            trace_context(Some(&format!("00-{trace}-00f067aa0ba902b7-01")), None),
            Some((trace.to_owned(), Some("00f067aa0ba902b7".to_owned())))
        );
        assert_eq!(
            trace_context(None, Some(&format!("{trace}/1;o=1"))),
            Some((trace.to_owned(), Some("0000000000000001".to_owned())))
        );
        assert_eq!(
            trace_context(Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None),
            None
        );
        assert_eq!(trace_context(Some("garbage"), Some("also garbage")), None);
    }
}
