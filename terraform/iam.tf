# Identities and every role they hold. Each service runs as its own service account, and every
# grant is on the one resource it concerns (a topic, a queue, a secret, the bucket) except the
# roles that exist only per project (BigQuery jobs of the trigger and the completion job, build
# logs).
# tests/tests/iam_parity.rs checks that the runtime grants are exactly what the code calls.

# ---------------------------------------------------------------------------------------------
# Service accounts
# ---------------------------------------------------------------------------------------------

resource "google_service_account" "runtime" {
  for_each = {
    trigger       = "trigger: validates requests, plans chunks, dispatches Cloud Tasks"
    list_uploader = "list-uploader: uploads chunks to the ESP"
    sender        = "sender: sends uploaded chunks through the ESP"
    completion    = "completion job: confirms deliveries, writes logs, closes requests"
    unsubscribe   = "public entry: serves the one-click unsubscribe links and provider webhooks"
  }

  account_id   = "haishin-${replace(each.key, "_", "-")}"
  display_name = "Haishin ${replace(each.key, "_", "-")}"
  description  = each.value

  depends_on = [google_project_service.enabled]
}

# Signs the OIDC tokens of Cloud Tasks (queues prepare and upload).
resource "google_service_account" "tasks_invoker" {
  account_id   = "haishin-tasks-invoker"
  display_name = "Haishin Cloud Tasks invoker"
  description  = "Identity of Cloud Tasks dispatches to the trigger and the list-uploader"

  depends_on = [google_project_service.enabled]
}

# Signs the OIDC tokens of Pub/Sub push subscriptions.
resource "google_service_account" "pubsub_push" {
  account_id   = "haishin-pubsub-push"
  display_name = "Haishin Pub/Sub push"
  description  = "Identity of Pub/Sub pushes to the trigger and the sender"

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "scheduler" {
  account_id   = "haishin-scheduler"
  display_name = "Haishin scheduler"
  description  = "Identity of Cloud Scheduler starting the completion job"

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "deployer" {
  account_id   = "haishin-deployer"
  display_name = "Haishin deployer"
  description  = "Identity of Cloud Build: pushes images and deploys them to the services and the job"

  depends_on = [google_project_service.enabled]
}

# ---------------------------------------------------------------------------------------------
# Secrets: each service reads exactly the secrets in its environment (local.secret_env).
# ---------------------------------------------------------------------------------------------

locals {
  secret_readers = merge([
    for service, secrets in local.secret_env : {
      for variable, secret in secrets : "${service}/${variable}" => { service = service, secret = secret }
    }
  ]...)
}

resource "google_secret_manager_secret_iam_member" "runtime" {
  for_each = local.secret_readers

  secret_id = each.value.secret
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.runtime[each.value.service].member
}

# ---------------------------------------------------------------------------------------------
# trigger
# ---------------------------------------------------------------------------------------------

resource "google_cloud_tasks_queue_iam_member" "trigger_enqueuer" {
  for_each = {
    prepare = google_cloud_tasks_queue.prepare.name
    upload  = google_cloud_tasks_queue.upload.name
  }

  location = var.region
  name     = each.value
  role     = "roles/cloudtasks.enqueuer"
  member   = google_service_account.runtime["trigger"].member
}

# Creating a task whose OIDC token is signed as the tasks invoker requires acting as it.
resource "google_service_account_iam_member" "trigger_acts_as_tasks_invoker" {
  service_account_id = google_service_account.tasks_invoker.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.runtime["trigger"].member
}

# Writes export shards and chunk objects, reads them back, lists and removes them.
resource "google_storage_bucket_iam_member" "trigger_objects" {
  bucket = google_storage_bucket.audiences.name
  role   = "roles/storage.objectUser"
  member = google_service_account.runtime["trigger"].member
}

# BigQuery audiences: the trigger runs one EXPORT DATA query job per request. Reading the
# audience's own tables (roles/bigquery.dataViewer on their datasets) is granted by whoever owns
# them, outside this configuration (docs/deploy.md); the export writes to the bucket above.
resource "google_project_iam_member" "trigger_bigquery_jobs" {
  project = var.project_id
  role    = "roles/bigquery.jobUser"
  member  = google_service_account.runtime["trigger"].member
}

# ---------------------------------------------------------------------------------------------
# list-uploader
# ---------------------------------------------------------------------------------------------

resource "google_storage_bucket_iam_member" "list_uploader_objects" {
  bucket = google_storage_bucket.audiences.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.runtime["list_uploader"].member
}

# ---------------------------------------------------------------------------------------------
# sender
# ---------------------------------------------------------------------------------------------

# A message provider's sender reads each chunk's recipients from its object; list-send's sender
# sends a list the ESP already holds, and needs no access.
resource "google_storage_bucket_iam_member" "sender_objects" {
  count = local.message_provider ? 1 : 0

  bucket = google_storage_bucket.audiences.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.runtime["sender"].member
}

# ---------------------------------------------------------------------------------------------
# Publishers: who publishes to which topic.
# ---------------------------------------------------------------------------------------------

locals {
  topic_publishers = {
    "trigger/deliveries"            = { service = "trigger", topic = "deliveries" }
    "list_uploader/deliveries"      = { service = "list_uploader", topic = "deliveries" }
    "list_uploader/pipeline_events" = { service = "list_uploader", topic = "pipeline_events" }
    "sender/pipeline_events"        = { service = "sender", topic = "pipeline_events" }
    "completion/pipeline_events"    = { service = "completion", topic = "pipeline_events" }
    "completion/deliveries"         = { service = "completion", topic = "deliveries" }
    "completion/request_completed"  = { service = "completion", topic = "request_completed" }
  }
}

resource "google_pubsub_topic_iam_member" "runtime_publisher" {
  for_each = local.topic_publishers

  topic  = google_pubsub_topic.topic[each.value.topic].name
  role   = "roles/pubsub.publisher"
  member = google_service_account.runtime[each.value.service].member
}

# The marketing platform publishes delivery requests...
resource "google_pubsub_topic_iam_member" "request_publishers" {
  for_each = toset(var.request_publishers)

  topic  = google_pubsub_topic.topic["delivery_requests"].name
  role   = "roles/pubsub.publisher"
  member = each.value
}

# ...and subscribes to completed requests (from its own project, too).
resource "google_pubsub_topic_iam_member" "completion_subscribers" {
  for_each = toset(var.completion_subscribers)

  topic  = google_pubsub_topic.topic["request_completed"].name
  role   = "roles/pubsub.subscriber"
  member = each.value
}

# ---------------------------------------------------------------------------------------------
# completion
# ---------------------------------------------------------------------------------------------

resource "google_bigquery_dataset_iam_member" "completion_logs" {
  dataset_id = google_bigquery_dataset.haishin.dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = google_service_account.runtime["completion"].member
}

# Appending rows through DML or load jobs runs a BigQuery job.
resource "google_project_iam_member" "completion_bigquery_jobs" {
  project = var.project_id
  role    = "roles/bigquery.jobUser"
  member  = google_service_account.runtime["completion"].member
}

# ---------------------------------------------------------------------------------------------
# Who may call which service. Every service also checks the token's audience and service
# account itself (PUSH_AUDIENCE, PUSH_INVOKERS in run.tf).
# ---------------------------------------------------------------------------------------------

resource "google_cloud_run_v2_service_iam_member" "tasks_invoker" {
  for_each = toset(["trigger", "list_uploader"])

  location = var.region
  name     = google_cloud_run_v2_service.service[each.key].name
  role     = "roles/run.invoker"
  member   = google_service_account.tasks_invoker.member
}

resource "google_cloud_run_v2_service_iam_member" "pubsub_push" {
  for_each = toset(["trigger", "sender"])

  location = var.region
  name     = google_cloud_run_v2_service.service[each.key].name
  role     = "roles/run.invoker"
  member   = google_service_account.pubsub_push.member
}

resource "google_cloud_run_v2_service_iam_member" "api_callers" {
  for_each = toset(var.api_callers)

  location = var.region
  name     = google_cloud_run_v2_service.service["trigger"].name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${each.value}"
}

# Recipients follow their unsubscribe links from their mail client, and providers post their
# webhooks, with no Google identity: the public entry is invoked by anyone. It serves
# /unsubscribe/{token} and /webhooks/* alone (each token, SNS message and SendGrid post signed and
# checked in the service) and reaches nothing but the database and SNS's signing certificates;
# the trigger stays behind the invoker check (docs/deploy.md).
resource "google_cloud_run_v2_service_iam_member" "public_unsubscribe" {
  #checkov:skip=CKV_GCP_102:The public entry serves one-click unsubscribe links (RFC 8058) and the providers' bounce webhooks, which mail clients and providers call without Google credentials; every token is an HMAC signed by the sender, every webhook post carries the provider's signature, each checked in the service, and the service reaches nothing but the database.
  location = var.region
  name     = google_cloud_run_v2_service.service["unsubscribe"].name
  role     = "roles/run.invoker"
  member   = "allUsers"
}

resource "google_cloud_run_v2_job_iam_member" "scheduler" {
  location = var.region
  name     = google_cloud_run_v2_job.completion.name
  role     = "roles/run.invoker"
  member   = google_service_account.scheduler.member
}

# ---------------------------------------------------------------------------------------------
# The Pub/Sub service agent: mints the push subscriptions' OIDC tokens, and moves messages
# that exhausted their delivery attempts to the dead-letter topics.
# ---------------------------------------------------------------------------------------------

resource "google_service_account_iam_member" "pubsub_agent_token_creator" {
  service_account_id = google_service_account.pubsub_push.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = "serviceAccount:${local.pubsub_service_agent}"
}

resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  for_each = google_pubsub_topic.dead_letter

  topic  = each.value.name
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${local.pubsub_service_agent}"
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  for_each = google_pubsub_subscription.push

  subscription = each.value.name
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${local.pubsub_service_agent}"
}

# ---------------------------------------------------------------------------------------------
# Cloud Build (cloudbuild.yaml) runs as the deployer.
# ---------------------------------------------------------------------------------------------

resource "google_artifact_registry_repository_iam_member" "deployer_writer" {
  location   = google_artifact_registry_repository.haishin.location
  repository = google_artifact_registry_repository.haishin.name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.deployer.member
}

resource "google_storage_bucket_iam_member" "deployer_sources" {
  bucket = google_storage_bucket.build_sources.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.deployer.member
}

resource "google_cloud_run_v2_service_iam_member" "deployer" {
  for_each = google_cloud_run_v2_service.service

  location = var.region
  name     = each.value.name
  role     = "roles/run.developer"
  member   = google_service_account.deployer.member
}

resource "google_cloud_run_v2_job_iam_member" "deployer" {
  location = var.region
  name     = google_cloud_run_v2_job.completion.name
  role     = "roles/run.developer"
  member   = google_service_account.deployer.member
}

# Deploying a revision that runs as a service account requires acting as it.
resource "google_service_account_iam_member" "deployer_acts_as_runtime" {
  for_each = google_service_account.runtime

  service_account_id = each.value.name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.deployer.member
}

# A build that runs as a user-managed service account writes its log to Cloud Logging.
resource "google_project_iam_member" "deployer_logs" {
  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = google_service_account.deployer.member
}
