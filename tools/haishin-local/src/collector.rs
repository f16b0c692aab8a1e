//! The local stack's OpenTelemetry collector: an OTLP/HTTP (protobuf) receiver on 127.0.0.1 that
//! the services export their spans and metrics to, as they export to Google's Telemetry API in
//! production, and the `traces` section of the report built from what it received.
//!
//! A span's service is its resource's `service.name` (each service runs as a process of its own),
//! or, for services running inside one process (the tests), the crate its span was opened in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use serde::Serialize;
use tokio::task::JoinHandle;

/// The services of the pipeline, by the names spans carry.
const SERVICES: [&str; 4] = ["trigger", "list-uploader", "sender", "completion"];

/// The span each hop of a request opens, in the order of the pipeline.
const HOPS: [&str; 6] = ["take", "run", "dispatch", "upload_chunk", "send_chunk", "request_logged"];

/// One span as received.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a trace's root.
    pub parent_span_id: String,
    pub name: String,
    pub service: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Default)]
struct Received {
    spans: Vec<SpanRecord>,
    /// Metric names seen, with the number of exports that carried each.
    metrics: BTreeMap<String, u64>,
}

/// A running collector; stops when dropped.
pub struct Collector {
    endpoint: String,
    received: Arc<Mutex<Received>>,
    server: JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Collector {
    /// Listens on a free port of 127.0.0.1.
    pub async fn start() -> anyhow::Result<Self> {
        let received = Arc::new(Mutex::new(Received::default()));
        let app = Router::new()
            .route("/v1/traces", post(receive_traces))
            .route("/v1/metrics", post(receive_metrics))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { endpoint, received, server })
    }

    /// The base URL to give the services as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<SpanRecord> {
        self.received.lock().expect("lock").spans.clone()
    }

    /// The names of the metrics received so far.
    pub fn metric_names(&self) -> Vec<String> {
        self.received.lock().expect("lock").metrics.keys().cloned().collect()
    }
}

fn protobuf(body: Vec<u8>) -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/x-protobuf")], body)
}

async fn receive_traces(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> impl IntoResponse {
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, "not an ExportTraceServiceRequest").into_response();
    };
    let mut spans = Vec::new();
    for resource in export.resource_spans {
        let resource_service = resource
            .resource
            .as_ref()
            .and_then(|r| attribute(&r.attributes, "service.name"))
            .filter(|name| SERVICES.contains(&name.as_str()));
        for scope in resource.scope_spans {
            for span in scope.spans {
                let attributes: BTreeMap<String, String> = span
                    .attributes
                    .iter()
                    .filter_map(|kv| Some((kv.key.clone(), text(kv.value.as_ref()?)?)))
                    .collect();
                let service = resource_service.clone().unwrap_or_else(|| {
                    attributes.get("code.module.name").map_or("unknown", |m| service_of_module(m)).to_owned()
                });
                spans.push(SpanRecord {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    service,
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    attributes,
                });
            }
        }
    }
    received.lock().expect("lock").spans.extend(spans);
    protobuf(ExportTraceServiceResponse { partial_success: None }.encode_to_vec()).into_response()
}

async fn receive_metrics(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> impl IntoResponse {
    let Ok(export) = ExportMetricsServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, "not an ExportMetricsServiceRequest").into_response();
    };
    let mut received = received.lock().expect("lock");
    for metric in export.resource_metrics.iter().flat_map(|r| &r.scope_metrics).flat_map(|s| &s.metrics) {
        *received.metrics.entry(metric.name.clone()).or_default() += 1;
    }
    protobuf(ExportMetricsServiceResponse { partial_success: None }.encode_to_vec()).into_response()
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| text(kv.value.as_ref()?))
}

fn text(value: &AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The service a module belongs to (`haishin_list_uploader::…` → `list-uploader`); code shared by
/// all of them counts as `shared`.
fn service_of_module(module: &str) -> &'static str {
    match module.split("::").next().unwrap_or_default() {
        "haishin_trigger" => "trigger",
        "haishin_list_uploader" => "list-uploader",
        "haishin_sender" => "sender",
        "haishin_completion" => "completion",
        _ => "shared",
    }
}

/// The `traces` section of a report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TracesReport {
    pub spans_received: u64,
    pub requests_completed: u64,
    /// Completed requests with exactly one trace, holding spans of every service on their path.
    pub requests_with_complete_trace: u64,
    /// The services the complete traces hold spans of (the list-uploader only those of requests
    /// with a list uploaded: a small realtime one sent without a list never reaches it).
    pub services_required: Vec<String>,
    pub spans_per_request: SpansPerRequest,
    /// Up to five completed requests whose trace is not complete, and why.
    pub incomplete: Vec<Incomplete>,
    pub slowest_realtime: Option<RequestTrace>,
    /// The metrics the services exported.
    pub metrics_received: Vec<String>,
}

impl TracesReport {
    /// One line for the run's summary: how many requests have their complete trace, and where the
    /// slowest realtime request spent its time.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "Traces:     {}/{} completed requests in one trace through {} ({:.1} spans each)",
            self.requests_with_complete_trace,
            self.requests_completed,
            self.services_required.join(", "),
            self.spans_per_request.mean
        );
        if let Some(slowest) = &self.slowest_realtime {
            // Each hop's own span: when it started after the first, and how long it took.
            let hops: Vec<String> = slowest
                .spans
                .iter()
                .filter(|s| HOPS.contains(&s.name.as_str()))
                .map(|s| format!("{} at {:.0} ms for {:.0} ms", s.name, s.start_ms, s.duration_ms))
                .collect();
            line.push_str(&format!(
                "\n            slowest realtime request {:.0} ms: {}",
                slowest.total_ms,
                hops.join(", ")
            ));
        }
        line
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SpansPerRequest {
    pub mean: f64,
    pub max: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Incomplete {
    pub request_id: String,
    pub traces: usize,
    pub services: Vec<String>,
}

/// Where one request's time went: its spans in the order they started.
#[derive(Debug, Clone, Serialize)]
pub struct RequestTrace {
    pub request_id: String,
    pub trace_id: String,
    /// From the first span's start to the last span's end.
    pub total_ms: f64,
    pub spans: Vec<SpanTiming>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpanTiming {
    pub service: String,
    pub name: String,
    /// From the trace's first span.
    pub start_ms: f64,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk: Option<String>,
}

/// The `traces` section of a stack's run, once its services have stopped (and so sent their
/// last spans): over the requests that completed.
pub async fn traces(stack: &crate::stack::LocalStack) -> anyhow::Result<Option<TracesReport>> {
    if !crate::stack::telemetry_exported() {
        return Ok(None);
    }
    // A request whose chunks were uploaded as lists went through the list-uploader; one sent
    // without a list (or through a message-based provider) did not.
    let completed: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT r.id, r.class, EXISTS (SELECT 1 FROM chunks c WHERE c.request_id = r.id AND c.list_id IS NOT NULL)
         FROM requests r WHERE r.state = 'completed' ORDER BY r.id",
    )
    .fetch_all(stack.store.pool())
    .await?;
    let completed: Vec<Completed> =
        completed.into_iter().map(|(id, class, uploaded)| Completed { id, class, uploaded }).collect();
    Ok(Some(report(&stack.collector.spans(), stack.collector.metric_names(), &completed)))
}

/// A completed request, as the traces report judges it.
#[derive(Debug, Clone)]
pub struct Completed {
    pub id: String,
    pub class: String,
    /// Its chunks were uploaded as lists: its trace must reach the list-uploader too.
    pub uploaded: bool,
}

impl Completed {
    /// A request of `class` whose chunks were uploaded as lists.
    pub fn uploaded(id: &str, class: &str) -> Self {
        Self { id: id.to_owned(), class: class.to_owned(), uploaded: true }
    }

    /// The services its trace must reach.
    fn required(&self) -> &'static [&'static str] {
        if self.uploaded { &SERVICES } else { &["trigger", "sender", "completion"] }
    }
}

/// The `traces` section for `completed` requests: each request's trace must be one, and reach
/// every service on its path.
pub fn report(spans: &[SpanRecord], metrics_received: Vec<String>, completed: &[Completed]) -> TracesReport {
    // The traces a request's spans name, and every span of each trace.
    let mut traces_of: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    let mut by_trace: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
    for span in spans {
        by_trace.entry(&span.trace_id).or_default().push(span);
        if let Some(id) = span.attributes.get("request_id") {
            traces_of.entry(id).or_default().insert(&span.trace_id);
        }
    }
    let mut out = TracesReport {
        spans_received: spans.len() as u64,
        requests_completed: completed.len() as u64,
        // The services some request's trace had to reach: the list-uploader only when a list was
        // uploaded (never for SMTP and SES).
        services_required: SERVICES
            .iter()
            .filter(|s| completed.iter().any(|r| r.required().contains(s)))
            .map(|s| (*s).to_owned())
            .collect(),
        metrics_received,
        ..TracesReport::default()
    };
    let (mut total_spans, mut slowest): (u64, Option<RequestTrace>) = (0, None);
    for request in completed {
        let (id, class) = (&request.id, &request.class);
        let traces = traces_of.get(id.as_str()).cloned().unwrap_or_default();
        let trace_spans: Vec<&SpanRecord> =
            traces.iter().flat_map(|t| by_trace.get(t).into_iter().flatten().copied()).collect();
        let services: BTreeSet<&str> = trace_spans.iter().map(|s| s.service.as_str()).collect();
        let complete = traces.len() == 1 && request.required().iter().all(|s| services.contains(s));
        if complete {
            out.requests_with_complete_trace += 1;
            total_spans += trace_spans.len() as u64;
            out.spans_per_request.max = out.spans_per_request.max.max(trace_spans.len() as u64);
            if class == "realtime" {
                let timed = timing(id, &trace_spans);
                if slowest.as_ref().is_none_or(|s| timed.total_ms > s.total_ms) {
                    slowest = Some(timed);
                }
            }
        } else if out.incomplete.len() < 5 {
            out.incomplete.push(Incomplete {
                request_id: id.clone(),
                traces: traces.len(),
                services: services.iter().map(|s| (*s).to_owned()).collect(),
            });
        }
    }
    if out.requests_with_complete_trace > 0 {
        out.spans_per_request.mean = total_spans as f64 / out.requests_with_complete_trace as f64;
    }
    out.slowest_realtime = slowest;
    out
}

fn timing(request_id: &str, spans: &[&SpanRecord]) -> RequestTrace {
    let mut spans: Vec<&SpanRecord> = spans.to_vec();
    spans.sort_by_key(|s| (s.start_ns, s.end_ns));
    let first = spans.first().map_or(0, |s| s.start_ns);
    let last = spans.iter().map(|s| s.end_ns).max().unwrap_or(first);
    let ms = |ns: u64| ns as f64 / 1e6;
    RequestTrace {
        request_id: request_id.to_owned(),
        trace_id: spans.first().map(|s| s.trace_id.clone()).unwrap_or_default(),
        total_ms: ms(last.saturating_sub(first)),
        spans: spans
            .iter()
            .map(|s| SpanTiming {
                service: s.service.clone(),
                name: s.name.clone(),
                start_ms: ms(s.start_ns.saturating_sub(first)),
                duration_ms: ms(s.end_ns.saturating_sub(s.start_ns)),
                chunk: s.attributes.get("chunk").cloned(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: &str, service: &str, request: Option<&str>, start: u64, end: u64) -> SpanRecord {
        let mut attributes = BTreeMap::new();
        if let Some(id) = request {
            attributes.insert("request_id".to_owned(), id.to_owned());
        }
        SpanRecord {
            trace_id: trace.into(),
            span_id: format!("{start}"),
            parent_span_id: String::new(),
            name: "s".into(),
            service: service.into(),
            start_ns: start,
            end_ns: end,
            attributes,
        }
    }

    #[test]
    fn a_request_in_one_trace_through_every_service_is_complete() {
        let spans = vec![
            span("t1", "trigger", Some("r1"), 0, 5_000_000),
            span("t1", "shared", None, 1_000_000, 2_000_000),
            span("t1", "sender", Some("r1"), 10_000_000, 20_000_000),
            span("t1", "completion", Some("r1"), 30_000_000, 31_000_000),
        ];
        let sent_without_a_list = Completed { uploaded: false, ..Completed::uploaded("r1", "realtime") };
        let report = report(&spans, vec![], &[sent_without_a_list]);
        assert_eq!(report.requests_with_complete_trace, 1);
        assert_eq!(report.services_required, ["trigger", "sender", "completion"]);
        assert_eq!(report.spans_per_request.max, 4);
        let slowest = report.slowest_realtime.expect("the realtime request's timing");
        assert_eq!(slowest.total_ms, 31.0);
        assert_eq!(slowest.spans[2].service, "sender");
        assert_eq!(slowest.spans[2].start_ms, 10.0);
        assert_eq!(slowest.spans[2].duration_ms, 10.0);
    }

    #[test]
    fn two_traces_or_a_missing_service_leave_a_request_incomplete() {
        let spans = vec![
            span("t1", "trigger", Some("r1"), 0, 1),
            span("t1", "sender", Some("r1"), 2, 3),
            span("t2", "completion", Some("r1"), 4, 5),
            span("t3", "trigger", Some("r2"), 0, 1),
            span("t3", "completion", Some("r2"), 4, 5),
        ];
        let completed = [Completed::uploaded("r1", "batch"), Completed::uploaded("r2", "batch")];
        let report = report(&spans, vec![], &completed);
        assert_eq!(report.requests_with_complete_trace, 0);
        assert_eq!(report.incomplete.len(), 2);
        assert_eq!(report.incomplete[0].traces, 2);
        assert_eq!(report.incomplete[1].services, ["completion", "trigger"]);
    }

    #[test]
    fn crates_name_their_services() {
        assert_eq!(service_of_module("haishin_list_uploader::upload"), "list-uploader");
        assert_eq!(service_of_module("haishin_shared::server"), "shared");
    }
}
