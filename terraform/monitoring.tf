# Alerts an SRE gets out of the box. Each notifies var.alert_notification_channels.
#
# - dead letters: a message Pub/Sub gave up delivering waits in a dead-letter subscription;
# - stuck pushes: a push subscription's oldest unacknowledged message is older than the threshold;
# - unknown outcomes: the sender could not establish whether a chunk was sent (it is never
#   re-sent blindly, so a person decides);
# - deadlines at risk: the trigger forecasts that a request will miss its deadline at the current
#   pace (it logs this on every scheduler tick);
# - ESP rate limiting: the share of ESP calls answered 429;
# - the kill switch: the completion job paused a request whose bounce rate crossed
#   var.kill_switch.bounce_rate.
#
# The last four count the structured log lines of the services (of the completion job for the
# kill switch) with log-based metrics.

locals {
  alert_documentation = "Haishin runbook: docs/deploy.md (Watching it). GET /v1/requests/{id} on the trigger shows a request's chunks by state, its dead letters and its deadline forecast."

  log_metrics = {
    chunk_outcome_unknown = {
      description = "Chunks whose send outcome could not be established (state unknown)."
      message     = "Chunk outcome unknown."
    }
    request_deadline_at_risk = {
      description = "Forecasts, one per scheduler tick and request, that a request will miss its deadline at the current pace."
      message     = "Request at risk of missing its deadline."
    }
    esp_rate_limited = {
      description = "ESP calls answered 429 (rate limited), by API."
      message     = "ESP rate limited the call."
    }
    esp_calls_done = {
      description = "ESP calls that uploaded a list or sent a chunk."
      message     = null
    }
  }
}

resource "google_logging_metric" "haishin" {
  for_each = local.log_metrics

  name        = "haishin/${each.key}"
  description = each.value.description
  filter = join(" AND ", [
    "resource.type=\"cloud_run_revision\"",
    "resource.labels.service_name=(\"${join("\" OR \"", values(local.service_names))}\")",
    each.value.message != null
    ? "jsonPayload.message=\"${each.value.message}\""
    : "jsonPayload.message=(\"Chunk uploaded.\" OR \"Chunk sent.\")",
  ])

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "dead_letters" {
  display_name          = "Haishin: dead letters waiting"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "A dead-letter subscription holds messages"
    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND metric.type = \"pubsub.googleapis.com/subscription/num_undelivered_messages\" AND resource.labels.subscription_id = monitoring.regex.full_match(\".*-dead-letter\")"
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "300s"
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  documentation {
    content   = "${local.alert_documentation} Dead letters are also recorded against their request (dead_letters in its status)."
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "stuck_pushes" {
  display_name          = "Haishin: pushes not acknowledged"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "Oldest unacknowledged message older than ${var.alert_thresholds.oldest_unacked_secs} s"
    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND metric.type = \"pubsub.googleapis.com/subscription/oldest_unacked_message_age\" AND resource.labels.subscription_id = one_of(\"${join("\", \"", keys(local.push_subscriptions))}\")"
      comparison      = "COMPARISON_GT"
      threshold_value = var.alert_thresholds.oldest_unacked_secs
      duration        = "300s"
      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  documentation {
    content   = local.alert_documentation
    mime_type = "text/markdown"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "unknown_outcomes" {
  display_name          = "Haishin: chunks with an unknown outcome"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "A chunk ended unknown"
    condition_threshold {
      filter          = "resource.type = \"cloud_run_revision\" AND metric.type = \"logging.googleapis.com/user/${google_logging_metric.haishin["chunk_outcome_unknown"].name}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_SUM"
      }
    }
  }

  documentation {
    content   = "${local.alert_documentation} An unknown chunk was neither confirmed nor re-sent: check the ESP's own record of the send (its idempotency key is send:<chunk id>)."
    mime_type = "text/markdown"
  }
}

resource "google_monitoring_alert_policy" "deadline_at_risk" {
  display_name          = "Haishin: a request will miss its deadline"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "The deadline forecast says at risk"
    condition_threshold {
      filter          = "resource.type = \"cloud_run_revision\" AND metric.type = \"logging.googleapis.com/user/${google_logging_metric.haishin["request_deadline_at_risk"].name}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_SUM"
      }
    }
  }

  documentation {
    content   = "${local.alert_documentation} The forecast in the request's status says how many chunks are left and ahead of it; raising the ESP limits (Tuning throughput) or the request's priority helps."
    mime_type = "text/markdown"
  }
}

resource "google_monitoring_alert_policy" "esp_rate_limited" {
  display_name          = "Haishin: the ESP rate-limits calls"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "More than ${var.alert_thresholds.esp_rate_limited_share * 100}% of ESP calls answered 429"
    condition_prometheus_query_language {
      query               = "sum(rate(logging_googleapis_com:user_haishin_esp_rate_limited[10m])) / (sum(rate(logging_googleapis_com:user_haishin_esp_rate_limited[10m])) + sum(rate(logging_googleapis_com:user_haishin_esp_calls_done[10m]))) > ${var.alert_thresholds.esp_rate_limited_share}"
      duration            = "600s"
      evaluation_interval = "60s"
    }
  }

  documentation {
    content   = "${local.alert_documentation} Haishin keeps the ESP at its configured limits, so sustained 429s mean the ESP's real limit is lower (shared with another system, or lowered by the provider): lower esp_upload_limit / esp_send_limit, or set or lower esp_calls_per_second / esp_messages_per_second when the provider limits a rate rather than concurrency."
    mime_type = "text/markdown"
  }

  depends_on = [google_logging_metric.haishin]
}

# The completion job is a Cloud Run job, whose log lines have a resource of their own.
resource "google_logging_metric" "kill_switch" {
  name        = "haishin/request_paused_by_kill_switch"
  description = "Requests the completion job paused because their bounce rate crossed the kill switch's threshold."
  filter = join(" AND ", [
    "resource.type=\"cloud_run_job\"",
    "resource.labels.job_name=\"${local.completion_job_name}\"",
    "jsonPayload.message=\"Request paused by the kill switch.\"",
  ])

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "kill_switch" {
  display_name          = "Haishin: a request was paused by the kill switch"
  combiner              = "OR"
  notification_channels = var.alert_notification_channels

  conditions {
    display_name = "Bounce rate of a request at or over ${var.kill_switch.bounce_rate * 100}%"
    condition_threshold {
      filter          = "resource.type = \"cloud_run_job\" AND metric.type = \"logging.googleapis.com/user/${google_logging_metric.kill_switch.name}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period   = "300s"
        per_series_aligner = "ALIGN_SUM"
      }
    }
  }

  documentation {
    content   = "${local.alert_documentation} The completion job paused a request whose bounce rate crossed the kill switch's threshold after its minimum sample; the log line has the request_id, and the request's pause_reason the rate. Check the audience (a stale or purchased list, a typo'd domain) before POST /v1/requests/{id}:resume, which judges the request afresh on the chunks finished after it, or :cancel it."
    mime_type = "text/markdown"
  }
}

# Cloud Run logs every request's URL, and an unsubscribe link's URL holds its token (the
# recipient's address, and a signature that unsubscribes them): the public entry's request log is
# not kept. Its own log lines name the route (/unsubscribe/{token}), never the token.
resource "google_logging_project_exclusion" "unsubscribe_request_urls" {
  name        = "haishin-unsubscribe-request-urls"
  description = "Cloud Run request logs of the public entry, whose URLs hold unsubscribe tokens."
  filter = join(" AND ", [
    "resource.type=\"cloud_run_revision\"",
    "resource.labels.service_name=\"${local.service_names.unsubscribe}\"",
    "log_id(\"run.googleapis.com/requests\")",
  ])

  depends_on = [google_project_service.enabled]
}
