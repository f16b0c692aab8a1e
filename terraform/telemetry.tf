# Traces and metrics: every service and the completion job export their spans and metrics over
# OTLP to Google's Telemetry API (Cloud Trace and Cloud Monitoring), with their own service
# accounts, and the dashboard below shows what an SRE tunes throughput with. The metric names
# are documented in shared/src/telemetry/metrics.rs; Cloud Monitoring files OTLP metrics under
# their Prometheus names, which the dashboard queries with PromQL.

locals {
  telemetry_env = {
    OTEL_EXPORTER_OTLP_ENDPOINT = "https://telemetry.googleapis.com"
    OTEL_METRIC_EXPORT_INTERVAL = var.telemetry.metric_interval_ms
    OTEL_TRACES_SAMPLER_ARG     = var.telemetry.trace_sample_ratio
  }

  # PromQL over the services' metrics; each chart is one query.
  dashboard_charts = [
    {
      title = "ESP slots in use by API and class, against the limit"
      query = "sum by (api, class) (haishin_esp_calls_active)"
      limit = "sum by (api) (max_over_time(haishin_esp_limit[5m]))"
    },
    {
      title = "Realtime latency, received to accepted by the ESP (p50, p99)"
      query = "histogram_quantile(0.99, sum by (le) (rate(haishin_realtime_latency_seconds_bucket[5m])))"
      limit = "histogram_quantile(0.5, sum by (le) (rate(haishin_realtime_latency_seconds_bucket[5m])))"
    },
    {
      title = "Backlog: chunks not yet final, by state and class"
      query = "sum by (state, class) (haishin_chunks)"
      limit = null
    },
    {
      title = "Oldest chunk waiting for a slot, by class (s)"
      query = "max by (class) (haishin_oldest_pending_chunk_age_seconds)"
      limit = null
    },
    {
      title = "ESP calls per second by outcome (ok, rate_limited, transient, indeterminate, permanent)"
      query = "sum by (api, outcome) (rate(haishin_esp_calls_total[5m]))"
      limit = null
    },
    {
      title = "Recipients per second by outcome"
      query = "sum by (outcome) (rate(haishin_recipients_total[5m]))"
      limit = null
    },
    {
      title = "Dead letters (per hour)"
      query = "sum by (subscription) (increase(haishin_dead_letters_total[1h]))"
      limit = null
    },
  ]
}

resource "google_project_service" "telemetry" {
  project            = var.project_id
  service            = "telemetry.googleapis.com"
  disable_on_destroy = false
}

# Each runtime account writes its own spans and metrics, and nothing else of either.
resource "google_project_iam_member" "traces_writer" {
  for_each = google_service_account.runtime

  project = var.project_id
  role    = "roles/telemetry.tracesWriter"
  member  = each.value.member

  depends_on = [google_project_service.telemetry]
}

resource "google_project_iam_member" "metrics_writer" {
  for_each = google_service_account.runtime

  project = var.project_id
  role    = "roles/monitoring.metricWriter"
  member  = each.value.member
}

resource "google_monitoring_dashboard" "throughput" {
  project = var.project_id
  dashboard_json = jsonencode({
    displayName = "Haishin throughput"
    mosaicLayout = {
      columns = 12
      tiles = [
        for i, chart in local.dashboard_charts : {
          xPos   = (i % 2) * 6
          yPos   = floor(i / 2) * 4
          width  = 6
          height = 4
          widget = {
            title = chart.title
            xyChart = {
              dataSets = concat(
                [{ plotType = "LINE", timeSeriesQuery = { prometheusQuery = chart.query } }],
                chart.limit == null ? [] : [{ plotType = "LINE", timeSeriesQuery = { prometheusQuery = chart.limit } }],
              )
              yAxis = { scale = "LINEAR" }
            }
          }
        }
      ]
    }
  })

  depends_on = [google_project_service.enabled]
}
