# Topics, push subscriptions (with OIDC tokens, retry back-off and a dead-letter topic each),
# and a pull subscription on every dead-letter topic so dead letters are kept for inspection.

# Topics keep published messages for 7 days, so a subscription can be replayed (seek) after
# an incident.
resource "google_pubsub_topic" "topic" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption at rest, as for Cloud SQL and the audience bucket, which hold the same request data; customer-managed keys would be adopted for all data stores together, not per topic.
  for_each = local.topic_names

  name                       = each.value
  message_retention_duration = "604800s"

  depends_on = [google_project_service.enabled]
}

locals {
  # One push subscription per route. The two on "deliveries" split by class, so realtime sends
  # never wait behind a batch backlog: Pub/Sub slows a whole subscription when its endpoint
  # pushes back, and this keeps a saturated batch subscription from slowing realtime.
  push_subscriptions = {
    delivery-requests = {
      topic        = "delivery_requests"
      service      = "trigger"
      path         = "/push/requests"
      filter       = null
      ack_deadline = 60
    }
    deliveries-realtime = {
      topic        = "deliveries"
      service      = "sender"
      path         = "/push/deliveries"
      filter       = "attributes.class = \"realtime\""
      ack_deadline = tonumber(trimsuffix(var.sender.timeout, "s"))
    }
    deliveries-batch = {
      topic        = "deliveries"
      service      = "sender"
      path         = "/push/deliveries"
      filter       = "attributes.class != \"realtime\""
      ack_deadline = tonumber(trimsuffix(var.sender.timeout, "s"))
    }
    pipeline-events = {
      topic        = "pipeline_events"
      service      = "trigger"
      path         = "/push/events"
      filter       = null
      ack_deadline = 60
    }
  }
}

resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption at rest, as for the topics whose messages land here; customer-managed keys would be adopted for all data stores together.
  for_each = local.push_subscriptions

  name = "${each.key}-dead-letter"

  depends_on = [google_project_service.enabled]
}

resource "google_pubsub_subscription" "push" {
  for_each = local.push_subscriptions

  name                 = each.key
  topic                = google_pubsub_topic.topic[each.value.topic].id
  filter               = each.value.filter
  ack_deadline_seconds = each.value.ack_deadline

  push_config {
    push_endpoint = "${local.service_urls[each.value.service]}${each.value.path}"

    oidc_token {
      service_account_email = google_service_account.pubsub_push.email
      audience              = local.service_urls[each.value.service]
    }
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter[each.key].id
    max_delivery_attempts = var.pubsub_max_delivery_attempts
  }

  # Never expire for lack of traffic: the realtime subscription can sit idle for weeks.
  expiration_policy {
    ttl = ""
  }

  depends_on = [
    google_cloud_run_v2_service_iam_member.pubsub_push,
    google_pubsub_topic_iam_member.dead_letter_publisher,
  ]
}

# A pull subscription: nothing is pushed, so nothing can be retried in a loop.
resource "google_pubsub_subscription" "dead_letter" {
  for_each = local.push_subscriptions

  name                       = "${each.key}-dead-letter"
  topic                      = google_pubsub_topic.dead_letter[each.key].id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  retain_acked_messages      = true

  expiration_policy {
    ttl = ""
  }
}

# Every dead-letter topic also pushes to the trigger, which keeps each message against its
# request (visible in GET /v1/requests/{id}) and takes a dead-lettered delivery request in again.
# No dead-letter policy, and it cannot loop: /push/dead-letters acknowledges every message, an
# unreadable one too (recorded as a rejection); it answers 5xx only while the database is down,
# when retrying is right. The pull subscription above keeps a copy of each dead letter anyway.
resource "google_pubsub_subscription" "dead_letter_record" {
  for_each = local.push_subscriptions

  name                 = "${each.key}-dead-letter-record"
  topic                = google_pubsub_topic.dead_letter[each.key].id
  ack_deadline_seconds = 60

  push_config {
    push_endpoint = "${local.service_urls.trigger}/push/dead-letters"

    oidc_token {
      service_account_email = google_service_account.pubsub_push.email
      audience              = local.service_urls.trigger
    }
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  expiration_policy {
    ttl = ""
  }

  depends_on = [google_cloud_run_v2_service_iam_member.pubsub_push]
}
