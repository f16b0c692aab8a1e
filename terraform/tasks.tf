# Cloud Tasks queues. The trigger creates every task, with an OIDC token signed as the
# tasks-invoker service account and the target service's URL as audience.

# "prepare": the trigger materializes a request's audience into chunks (POST /tasks/prepare on
# the trigger). Not bound by the ESP.
resource "google_cloud_tasks_queue" "prepare" {
  name     = local.queue_names.prepare
  location = var.region

  rate_limits {
    max_dispatches_per_second = var.prepare_queue.max_dispatches_per_second
    max_concurrent_dispatches = var.prepare_queue.max_concurrent_dispatches
  }

  retry_config {
    max_attempts  = var.prepare_queue.max_attempts
    min_backoff   = var.prepare_queue.min_backoff
    max_backoff   = var.prepare_queue.max_backoff
    max_doublings = 5
  }

  stackdriver_logging_config {
    sampling_ratio = 1.0
  }

  depends_on = [google_project_service.enabled]
}

# "upload": one task per chunk, to the list-uploader (POST /tasks/upload). Its concurrent
# dispatches come from modules/capacity and never exceed the ESP's upload limit, whatever the
# list-uploader's own scaling.
resource "google_cloud_tasks_queue" "upload" {
  name     = local.queue_names.upload
  location = var.region

  rate_limits {
    max_dispatches_per_second = var.upload_queue.max_dispatches_per_second
    max_concurrent_dispatches = module.capacity.upload_queue_max_concurrent_dispatches
  }

  retry_config {
    max_attempts  = var.upload_queue.max_attempts
    min_backoff   = var.upload_queue.min_backoff
    max_backoff   = var.upload_queue.max_backoff
    max_doublings = 5
  }

  stackdriver_logging_config {
    sampling_ratio = 1.0
  }

  depends_on = [google_project_service.enabled]
}
