variable "provider_shape" {
  description = "How the ESP provider takes mail, which decides the API that bounds dispatch: \"list\" (list-send: a list upload, then one send call per chunk; uploads are the bottleneck) or \"message\" (smtp, ses: rendered messages, handed over by the sender; sends are the bottleneck)."
  type        = string

  validation {
    condition     = contains(["list", "message"], var.provider_shape)
    error_message = "provider_shape must be \"list\" or \"message\"."
  }
}

variable "esp_upload_limit" {
  description = "Concurrent calls the ESP accepts on its list-upload API."
  type        = number

  validation {
    condition     = var.esp_upload_limit >= 1 && floor(var.esp_upload_limit) == var.esp_upload_limit
    error_message = "esp_upload_limit must be a whole number of at least 1."
  }
}

variable "esp_send_limit" {
  description = "Concurrent calls the ESP accepts on its send API (for SMTP: connections; for SES: SendEmail calls)."
  type        = number

  validation {
    condition     = var.esp_send_limit >= 1 && floor(var.esp_send_limit) == var.esp_send_limit
    error_message = "esp_send_limit must be a whole number of at least 1."
  }
}

variable "list_uploader_max_instances" {
  description = "Largest number of list-uploader instances Cloud Run may start."
  type        = number

  validation {
    condition     = var.list_uploader_max_instances >= 1 && floor(var.list_uploader_max_instances) == var.list_uploader_max_instances
    error_message = "list_uploader_max_instances must be a whole number of at least 1."
  }
}

variable "list_uploader_concurrency" {
  description = "Requests one list-uploader instance serves at once (each is one ESP upload call)."
  type        = number

  validation {
    condition     = var.list_uploader_concurrency >= 1 && var.list_uploader_concurrency <= 1000 && floor(var.list_uploader_concurrency) == var.list_uploader_concurrency
    error_message = "list_uploader_concurrency must be a whole number from 1 to 1000 (Cloud Run's range)."
  }
}

variable "sender_max_instances" {
  description = "Largest number of sender instances Cloud Run may start."
  type        = number

  validation {
    condition     = var.sender_max_instances >= 1 && floor(var.sender_max_instances) == var.sender_max_instances
    error_message = "sender_max_instances must be a whole number of at least 1."
  }
}

variable "sender_concurrency" {
  description = "Requests one sender instance serves at once (each is one chunk being sent: one ESP send call at a time)."
  type        = number

  validation {
    condition     = var.sender_concurrency >= 1 && var.sender_concurrency <= 1000 && floor(var.sender_concurrency) == var.sender_concurrency
    error_message = "sender_concurrency must be a whole number from 1 to 1000 (Cloud Run's range)."
  }
}

variable "upload_queue_max_concurrent_dispatches" {
  description = "Tasks the Cloud Tasks queue \"upload\" keeps in flight to the list-uploader at once."
  type        = number

  validation {
    condition     = var.upload_queue_max_concurrent_dispatches >= 1 && var.upload_queue_max_concurrent_dispatches <= 5000 && floor(var.upload_queue_max_concurrent_dispatches) == var.upload_queue_max_concurrent_dispatches
    error_message = "upload_queue_max_concurrent_dispatches must be a whole number from 1 to 5000 (Cloud Tasks' range)."
  }
}

variable "realtime_reserved_slots" {
  description = "Dispatch slots that batch chunks may never take, kept free for realtime chunks."
  type        = number

  validation {
    condition     = var.realtime_reserved_slots >= 0 && floor(var.realtime_reserved_slots) == var.realtime_reserved_slots
    error_message = "realtime_reserved_slots must be a whole number of at least 0."
  }
}
