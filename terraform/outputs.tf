output "service_urls" {
  description = "Deterministic URL of each Cloud Run service (also the audience its push tokens carry)."
  value       = { for key, name in local.service_names : name => local.service_urls[key] }
}

output "completion_job" {
  description = "Name of the completion Cloud Run job."
  value       = google_cloud_run_v2_job.completion.name
}

output "image_registry" {
  description = "Artifact Registry path that cloudbuild.yaml pushes the images to."
  value       = local.registry
}

output "build_sources_bucket" {
  description = "Bucket for gcloud builds submit --gcs-source-staging-dir."
  value       = google_storage_bucket.build_sources.name
}

output "deployer_service_account" {
  description = "Service account that Cloud Build runs as (gcloud builds submit --service-account)."
  value       = google_service_account.deployer.id
}

output "service_accounts" {
  description = "Runtime service account of each service and the job. Grant the trigger roles/storage.objectViewer on audience buckets outside this project."
  value       = { for key, account in google_service_account.runtime : key => account.email }
}

output "topics" {
  description = "Pub/Sub topics: delivery-requests (publish requests here), request-completed (subscribe here), and the internal ones."
  value       = { for key, topic in google_pubsub_topic.topic : key => topic.id }
}

output "dead_letter_subscriptions" {
  description = "Pull subscriptions holding the messages each push subscription gave up on."
  value       = { for key, subscription in google_pubsub_subscription.dead_letter : key => subscription.id }
}

output "audience_bucket" {
  description = "Bucket of audience exports and chunk objects."
  value       = google_storage_bucket.audiences.name
}

output "bigquery_dataset" {
  description = "Dataset of the deliveries and requests tables."
  value       = google_bigquery_dataset.haishin.id
}

output "database_instance" {
  description = "Cloud SQL connection name of the PostgreSQL instance."
  value       = google_sql_database_instance.haishin.connection_name
}

output "esp_capacity" {
  description = "The mail provider and the limits toward it as configured, each within its limit. dispatch_slots is what the trigger counts chunks in flight against: the upload slots for list-send, the send slots for smtp and ses. Rates are per second, summed over all instances (null: none)."
  value = {
    provider            = var.esp_provider
    upload_limit        = var.esp_upload_limit
    send_limit          = var.esp_send_limit
    list_uploader       = module.capacity.list_uploader
    sender              = module.capacity.sender
    upload_queue        = module.capacity.upload_queue_max_concurrent_dispatches
    upload_slots        = module.capacity.upload_slots
    send_slots          = module.capacity.send_slots
    dispatch_slots      = module.capacity.dispatch_slots
    realtime_reserved   = module.capacity.realtime_reserved_slots
    list_uploader_slots = module.capacity.list_uploader.max_instances * module.capacity.list_uploader.concurrency
    sender_slots        = module.capacity.sender.max_instances * module.capacity.sender.concurrency
    calls_per_second    = var.esp_calls_per_second
    messages_per_second = local.message_provider ? var.esp_messages_per_second : null
    batch_size          = local.message_provider ? var.esp_batch_size : null
  }
}

output "dashboard" {
  description = "The throughput dashboard in Cloud Monitoring."
  value       = "https://console.cloud.google.com/monitoring/dashboards/builder/${element(split("/", google_monitoring_dashboard.throughput.id), 3)}?project=${var.project_id}"
}
