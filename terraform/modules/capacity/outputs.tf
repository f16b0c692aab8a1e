# Every output waits on all four rules, so no value reaches a Cloud Run service or a queue from
# a configuration that breaks one.

output "list_uploader" {
  description = "Checked Cloud Run scaling of the list-uploader: max_instances and concurrency."
  value = {
    max_instances = var.list_uploader_max_instances
    concurrency   = var.list_uploader_concurrency
  }
  depends_on = [terraform_data.list_uploader, terraform_data.sender, terraform_data.upload_queue, terraform_data.realtime_reservation]
}

output "sender" {
  description = "Checked Cloud Run scaling of the sender: max_instances and concurrency."
  value = {
    max_instances = var.sender_max_instances
    concurrency   = var.sender_concurrency
  }
  depends_on = [terraform_data.list_uploader, terraform_data.sender, terraform_data.upload_queue, terraform_data.realtime_reservation]
}

output "upload_queue_max_concurrent_dispatches" {
  description = "Checked max_concurrent_dispatches of the Cloud Tasks queue \"upload\"."
  value       = var.upload_queue_max_concurrent_dispatches
  depends_on  = [terraform_data.list_uploader, terraform_data.sender, terraform_data.upload_queue, terraform_data.realtime_reservation]
}

output "upload_slots" {
  description = "Uploads that can run at once: the least of the ESP's upload limit, the list-uploader's capacity and the upload queue's dispatches."
  value       = local.upload_slots
  depends_on  = [terraform_data.list_uploader, terraform_data.sender, terraform_data.upload_queue, terraform_data.realtime_reservation]
}

output "send_slots" {
  description = "Sends that can run at once: the least of the ESP's send limit and the sender's capacity."
  value       = local.send_slots
  depends_on  = [terraform_data.list_uploader, terraform_data.sender, terraform_data.upload_queue, terraform_data.realtime_reservation]
}

output "dispatch_slots" {
  description = "Chunks that may be in flight toward the provider's bottleneck API: the upload slots for a list provider, the send slots for a message provider. The trigger schedules against this (ESP_SLOTS)."
  value       = local.dispatch_slots
  depends_on  = [terraform_data.list_uploader, terraform_data.sender, terraform_data.upload_queue, terraform_data.realtime_reservation]
}

output "realtime_reserved_slots" {
  description = "Checked number of dispatch slots kept for realtime chunks."
  value       = var.realtime_reserved_slots
  depends_on  = [terraform_data.list_uploader, terraform_data.sender, terraform_data.upload_queue, terraform_data.realtime_reservation]
}
