//! Log lines as Cloud Logging structured entries: `severity`, `message`, the fields of the spans
//! around the event, and the trace and span the line belongs to.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats events as Cloud Logging structured entries.
pub(super) struct CloudLogging {
    pub(super) service: String,
    /// The project traces belong to, for `logging.googleapis.com/trace`.
    pub(super) project: Option<String>,
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
