//! Sending spans and metrics out over OTLP/HTTP (protobuf): in production to Google Cloud's
//! Telemetry API (`https://telemetry.googleapis.com`: Cloud Trace and Cloud Monitoring), with the
//! service account's credentials; locally to the collector the local stack runs.
//!
//! Configured by OpenTelemetry's standard variables:
//! - `OTEL_EXPORTER_OTLP_ENDPOINT`: the base URL (`/v1/traces` and `/v1/metrics` are appended);
//!   unset, nothing is exported and spans only carry their ids across hops;
//! - `OTEL_METRIC_EXPORT_INTERVAL`: milliseconds between metric exports (60 000 by default);
//! - `OTEL_TRACES_SAMPLER_ARG`: the share of new traces kept (1 by default). A hop keeps its
//!   parent's decision, so a trace is kept or dropped whole.
//!
//! An endpoint on `googleapis.com` gets the credentials' `Authorization` header and the
//! project (`x-goog-user-project`, and the `gcp.project_id` resource attribute the Telemetry API
//! files spans under).
//!
//! The SDK exports from threads of its own (the batch span processor, the periodic metric reader)
//! and its HTTP calls run on a small runtime of their own, so that neither a busy service nor one
//! shutting down can stall the export, nor the export a request.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_auth::credentials::Credentials;
use opentelemetry::KeyValue;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{MetricExporter, Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tokio::runtime::Handle;

/// The variables [`ExportConfig::from_env`] reads, besides `GOOGLE_CLOUD_PROJECT`.
pub const VARIABLES: [&str; 3] =
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_METRIC_EXPORT_INTERVAL", "OTEL_TRACES_SAMPLER_ARG"];

/// Where and how often to export.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    /// The collector's base URL, without `/v1/…`.
    pub endpoint: String,
    pub metric_interval: Duration,
    pub sample_ratio: f64,
    /// The Google Cloud project, sent to a Google endpoint.
    pub project: Option<String>,
}

impl ExportConfig {
    /// The configuration the environment gives (`var` reads a variable); `None` when no endpoint
    /// is set. A value that is set but wrong is an error naming the variable.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let Some(endpoint) = var("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|e| !e.trim().is_empty()) else {
            return Ok(None);
        };
        let endpoint = endpoint.trim().trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&endpoint)
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT `{endpoint}` is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("OTEL_EXPORTER_OTLP_ENDPOINT `{endpoint}` is not an http(s) URL"));
        }
        let metric_interval = match var("OTEL_METRIC_EXPORT_INTERVAL") {
            None => Duration::from_secs(60),
            Some(ms) => match ms.trim().parse::<u64>() {
                Ok(ms) if ms >= 100 => Duration::from_millis(ms),
                _ => {
                    return Err(format!(
                        "OTEL_METRIC_EXPORT_INTERVAL `{ms}` is not a number of milliseconds ≥ 100"
                    ));
                }
            },
        };
        let sample_ratio = match var("OTEL_TRACES_SAMPLER_ARG") {
            None => 1.0,
            Some(ratio) => match ratio.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => return Err(format!("OTEL_TRACES_SAMPLER_ARG `{ratio}` is not a share between 0 and 1")),
            },
        };
        let project = var("GOOGLE_CLOUD_PROJECT").filter(|p| !p.is_empty());
        Ok(Some(Self { endpoint, metric_interval, sample_ratio, project }))
    }

    /// Whether the endpoint is Google's, which wants the credentials and the project.
    pub fn is_google(&self) -> bool {
        reqwest::Url::parse(&self.endpoint)
            .ok()
            .and_then(|u| u.host_str().map(|h| h == "googleapis.com" || h.ends_with(".googleapis.com")))
            .unwrap_or(false)
    }
}

/// The tracer and meter providers of a service, exporting to `config`'s endpoint.
pub(super) fn providers(
    service: &str,
    config: &ExportConfig,
) -> anyhow::Result<(SdkTracerProvider, SdkMeterProvider)> {
    let client = OtlpHttp::new(config)?;
    let mut resource = Resource::builder()
        .with_service_name(service.to_owned())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if let Some(project) = &config.project {
        resource = resource.with_attribute(KeyValue::new("gcp.project_id", project.clone()));
    }
    if let Ok(revision) = std::env::var("K_REVISION") {
        resource = resource.with_attribute(KeyValue::new("service.instance.id", revision));
    }
    let resource = resource.build();

    let spans = SpanExporter::builder()
        .with_http()
        .with_http_client(client.clone())
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", config.endpoint))
        .with_timeout(Duration::from_secs(10))
        .build()?;
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio))))
        .with_resource(resource.clone())
        .build();

    let metrics = MetricExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/metrics", config.endpoint))
        .with_timeout(Duration::from_secs(10))
        .build()?;
    let reader = PeriodicReader::builder(metrics).with_interval(config.metric_interval).build();
    let meter = SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build();
    Ok((tracer, meter))
}

/// The exporters' HTTP client: reqwest on a runtime of its own, with Google's credentials for a
/// Google endpoint.
#[derive(Clone)]
struct OtlpHttp {
    http: reqwest::Client,
    google: Option<Arc<(Credentials, Option<String>)>>,
    runtime: Handle,
}

impl std::fmt::Debug for OtlpHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpHttp").field("google", &self.google.is_some()).finish_non_exhaustive()
    }
}

impl OtlpHttp {
    fn new(config: &ExportConfig) -> anyhow::Result<Self> {
        let google = if config.is_google() {
            Some(Arc::new((crate::gcp::rest_credentials(None)?, config.project.clone())))
        } else {
            None
        };
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if config.endpoint.starts_with("http://") {
            // No TLS to set up: loading the system's roots would cost every short-lived process
            // (each completion pass is one) more than its whole export.
            http = http.tls_certs_only(Vec::<reqwest::Certificate>::new());
        }
        let http = http.build()?;
        Ok(Self { http, google, runtime: export_runtime()? })
    }

    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut call =
            self.http.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body);
        if let Some(google) = &self.google {
            let (credentials, project) = google.as_ref();
            call = call.headers(crate::gcp::rest_headers(credentials).await?);
            if let Some(project) = project {
                call = call.header("x-goog-user-project", project);
            }
        }
        let answer = call.send().await?;
        let (status, headers) = (answer.status(), answer.headers().clone());
        let mut response = Response::builder().status(status).body(answer.bytes().await?)?;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

#[async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let this = self.clone();
        self.runtime.spawn(async move { this.send(request).await }).await?
    }
}

/// A single-threaded runtime on a thread of its own, running the export's HTTP calls.
fn export_runtime() -> std::io::Result<Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Option<ExportConfig>, String> {
        ExportConfig::from_env(|name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned()))
    }

    #[test]
    fn without_an_endpoint_nothing_is_exported() {
        assert_eq!(config(&[]), Ok(None));
        assert_eq!(config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), Ok(None));
    }

    #[test]
    fn the_standard_variables_configure_the_export() {
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://telemetry.googleapis.com/"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "15000"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("GOOGLE_CLOUD_PROJECT", "p"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "https://telemetry.googleapis.com");
        assert_eq!(c.metric_interval, Duration::from_secs(15));
        assert_eq!(c.sample_ratio, 0.25);
        assert_eq!(c.project.as_deref(), Some("p"));
        assert!(c.is_google());

        let local = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")]).unwrap().unwrap();
        assert!(!local.is_google());
        assert_eq!(local.metric_interval, Duration::from_secs(60));
        assert_eq!(local.sample_ratio, 1.0);
    }

    #[test]
    fn a_wrong_value_names_its_variable() {
        for (pairs, named) in [
            (vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "telemetry")], "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")], "OTEL_EXPORTER_OTLP_ENDPOINT"),
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"), ("OTEL_METRIC_EXPORT_INTERVAL", "soon")],
                "OTEL_METRIC_EXPORT_INTERVAL",
            ),
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x"), ("OTEL_TRACES_SAMPLER_ARG", "2")],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
        ] {
            let error = config(&pairs).unwrap_err();
            assert!(error.contains(named), "{error}");
        }
    }

    #[test]
    fn look_alike_hosts_are_not_google() {
        let c = |e: &str| config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", e)]).unwrap().unwrap();
        assert!(!c("https://telemetry.googleapis.com.example.org").is_google());
        assert!(!c("https://notgoogleapis.com").is_google());
    }
}
