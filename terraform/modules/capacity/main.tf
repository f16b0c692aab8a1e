# The static half of Haishin's ESP guarantee: for each ESP API, the Cloud Run capacity of the one
# service that calls it (max instances × per-instance concurrency), and for uploads also the
# Cloud Tasks queue that feeds that service, never exceed the ESP's limit. Each rule is a
# precondition on its own terraform_data, so a plan that breaks a rule stops and names it.
#
# Which API bounds dispatch depends on the provider's shape. A list provider (list-send) takes
# a chunk as a list upload, then one send call: uploads are the bottleneck, their slots are
# held by the list-uploader. A message provider (smtp, ses) takes rendered messages from the
# sender, with no upload: sends are the bottleneck, their slots are held by the sender.

locals {
  list_uploader_capacity = var.list_uploader_max_instances * var.list_uploader_concurrency
  sender_capacity        = var.sender_max_instances * var.sender_concurrency

  # Uploads that can really run at once: the tightest of the ESP's limit, the list-uploader's
  # capacity and the upload queue's dispatch limit.
  upload_slots = min(var.esp_upload_limit, local.list_uploader_capacity, var.upload_queue_max_concurrent_dispatches)

  # Sends that can really run at once: the tightest of the ESP's limit and the sender's capacity.
  send_slots = min(var.esp_send_limit, local.sender_capacity)

  # The slots of the bottleneck API. The trigger counts the chunks in flight toward it against
  # this number, so it never queues work that would only wait or bounce off a 429.
  dispatch_slots = var.provider_shape == "list" ? local.upload_slots : local.send_slots

  dispatch_slots_reason = (
    var.provider_shape == "list"
    ? "the upload slots: the least of the ESP's upload limit ${var.esp_upload_limit}, the list-uploader's capacity ${local.list_uploader_capacity} and the upload queue's ${var.upload_queue_max_concurrent_dispatches} dispatches"
    : "the send slots: the least of the ESP's send limit ${var.esp_send_limit} and the sender's capacity ${local.sender_capacity}"
  )
}

resource "terraform_data" "list_uploader" {
  input = {
    max_instances = var.list_uploader_max_instances
    concurrency   = var.list_uploader_concurrency
    capacity      = local.list_uploader_capacity
  }

  lifecycle {
    precondition {
      condition     = local.list_uploader_capacity <= var.esp_upload_limit
      error_message = "list-uploader could make ${local.list_uploader_capacity} ESP upload calls at once (max instances ${var.list_uploader_max_instances} × concurrency ${var.list_uploader_concurrency}), above the ESP's upload limit of ${var.esp_upload_limit}. Lower list_uploader.max_instances or list_uploader.concurrency."
    }
  }
}

resource "terraform_data" "sender" {
  input = {
    max_instances = var.sender_max_instances
    concurrency   = var.sender_concurrency
    capacity      = local.sender_capacity
  }

  lifecycle {
    precondition {
      condition     = local.sender_capacity <= var.esp_send_limit
      error_message = "sender could make ${local.sender_capacity} ESP send calls at once (max instances ${var.sender_max_instances} × concurrency ${var.sender_concurrency}), above the ESP's send limit of ${var.esp_send_limit}. Lower sender.max_instances or sender.concurrency."
    }
  }
}

resource "terraform_data" "upload_queue" {
  input = {
    max_concurrent_dispatches = var.upload_queue_max_concurrent_dispatches
  }

  lifecycle {
    precondition {
      condition     = var.upload_queue_max_concurrent_dispatches <= var.esp_upload_limit
      error_message = "The Cloud Tasks queue \"upload\" could dispatch ${var.upload_queue_max_concurrent_dispatches} tasks at once, above the ESP's upload limit of ${var.esp_upload_limit}. Lower upload_queue.max_concurrent_dispatches."
    }
  }
}

resource "terraform_data" "realtime_reservation" {
  input = {
    reserved       = var.realtime_reserved_slots
    dispatch_slots = local.dispatch_slots
  }

  lifecycle {
    precondition {
      condition     = var.realtime_reserved_slots < local.dispatch_slots
      error_message = "realtime_reserved_slots (${var.realtime_reserved_slots}) must stay below the dispatch slots (${local.dispatch_slots}, ${local.dispatch_slots_reason}), or batch chunks could never be dispatched."
    }
  }
}
