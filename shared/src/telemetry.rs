//! Logging: JSON in Cloud Logging's format on Cloud Run (`K_SERVICE` set), readable text elsewhere.
//!
//! Filter with `RUST_LOG` (default `info`). Span fields (such as `request_id`) are copied into every
//! line logged inside the span, so one request can be followed across services.

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
    if std::env::var_os("K_SERVICE").is_some() || std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .fmt_fields(JsonFields::new())
            .event_format(CloudLogging { service: service.to_owned() })
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).compact().with_target(false).init();
    }
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
