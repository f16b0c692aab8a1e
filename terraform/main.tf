# Names and addresses shared by every file, and the APIs Haishin uses.

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  project_number = data.google_project.this.number
  data_location  = coalesce(var.data_location, var.region)
  # BigQuery audiences are exported where their datasets live.
  audience_bigquery_location = coalesce(var.audience_bigquery_location, local.data_location)

  # Cloud Run service names, and the job's.
  service_names = {
    trigger       = "haishin-trigger"
    list_uploader = "haishin-list-uploader"
    sender        = "haishin-sender"
    # The public entry: the trigger's image serving the one-click unsubscribe links alone.
    unsubscribe = "haishin-unsubscribe"
  }
  completion_job_name = "haishin-completion"

  # Every Cloud Run service also answers at https://SERVICE-PROJECT_NUMBER.REGION.run.app. That
  # address is known before the service exists, so the trigger can be told the list-uploader's
  # URL and every service its own (the audience of the tokens it accepts) without a dependency
  # cycle.
  service_urls = {
    for key, name in local.service_names : key => "https://${name}-${local.project_number}.${var.region}.run.app"
  }

  topic_names = {
    delivery_requests = "delivery-requests"
    deliveries        = "deliveries"
    pipeline_events   = "pipeline-events"
    request_completed = "request-completed"
  }

  queue_names = {
    prepare = "prepare"
    upload  = "upload"
  }

  # Google's key set for the OIDC tokens that Pub/Sub and Cloud Tasks attach.
  google_jwks_url = "https://www.googleapis.com/oauth2/v3/certs"

  pubsub_service_agent = "service-${local.project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"

  # The mail provider's shape. list-send takes a chunk as a list upload (list-uploader), then a
  # send; smtp and ses take rendered messages straight from the sender. Only the chosen
  # provider's settings and secrets reach the services, whatever else is set.
  list_send        = var.esp_provider == "list-send"
  message_provider = contains(["smtp", "ses"], var.esp_provider)
  esp_url          = local.list_send ? var.esp_url : null
  smtp             = var.esp_provider == "smtp" ? var.smtp : null
  ses              = var.esp_provider == "ses" ? var.ses : null
}

resource "google_project_service" "enabled" {
  for_each = toset([
    "artifactregistry.googleapis.com",
    "bigquery.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudscheduler.googleapis.com",
    "cloudtasks.googleapis.com",
    "compute.googleapis.com",
    "iam.googleapis.com",
    "iamcredentials.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "secretmanager.googleapis.com",
    "servicenetworking.googleapis.com",
    "sqladmin.googleapis.com",
    "storage.googleapis.com",
  ])

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}
