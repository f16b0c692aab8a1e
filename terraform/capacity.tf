# Every setting that bounds concurrency toward the ESP passes through this module, which fails
# the plan when a service or queue could exceed the ESP's limit for the API it calls. run.tf
# and tasks.tf take these settings from the module's outputs only.
module "capacity" {
  source = "./modules/capacity"

  # Which API bounds dispatch: uploads for a list provider, sends for a message provider.
  provider_shape = local.list_send ? "list" : "message"

  esp_upload_limit                       = var.esp_upload_limit
  esp_send_limit                         = var.esp_send_limit
  list_uploader_max_instances            = var.list_uploader.max_instances
  list_uploader_concurrency              = var.list_uploader.concurrency
  sender_max_instances                   = var.sender.max_instances
  sender_concurrency                     = var.sender.concurrency
  upload_queue_max_concurrent_dispatches = var.upload_queue.max_concurrent_dispatches
  realtime_reserved_slots                = var.realtime_reserved_slots
}
