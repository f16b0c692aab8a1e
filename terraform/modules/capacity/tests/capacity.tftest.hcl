# The ESP rule as Terraform enforces it. Every failing run names the one rule it must trip in
# expect_failures: a run fails if that rule passes, and also if any other rule or validation
# fails instead, so each case fails for its own reason.

# Haishin's defaults: a list provider (list-send) allowing 8 concurrent calls per API, 4
# instances × 2 requests each. The cases for message providers (smtp, ses) set provider_shape.
variables {
  provider_shape                         = "list"
  esp_upload_limit                       = 8
  esp_send_limit                         = 8
  list_uploader_max_instances            = 4
  list_uploader_concurrency              = 2
  sender_max_instances                   = 4
  sender_concurrency                     = 2
  upload_queue_max_concurrent_dispatches = 8
  realtime_reserved_slots                = 0
}

run "defaults_are_within_the_esp_limits" {
  command = plan

  assert {
    condition     = output.list_uploader == { max_instances = 4, concurrency = 2 }
    error_message = "The list-uploader's scaling must pass through unchanged."
  }

  assert {
    condition     = output.sender == { max_instances = 4, concurrency = 2 }
    error_message = "The sender's scaling must pass through unchanged."
  }

  assert {
    condition     = output.upload_queue_max_concurrent_dispatches == 8
    error_message = "The upload queue's dispatches must pass through unchanged."
  }

  assert {
    condition     = output.upload_slots == 8
    error_message = "With every limit at 8, the trigger must get 8 upload slots."
  }

  assert {
    condition     = output.dispatch_slots == 8
    error_message = "For a list provider the trigger dispatches against the 8 upload slots."
  }
}

run "capacity_exactly_at_the_limits_passes" {
  command = plan

  variables {
    esp_upload_limit                       = 12
    esp_send_limit                         = 30
    list_uploader_max_instances            = 3
    list_uploader_concurrency              = 4
    sender_max_instances                   = 10
    sender_concurrency                     = 3
    upload_queue_max_concurrent_dispatches = 12
    realtime_reserved_slots                = 11
  }

  assert {
    condition     = output.upload_slots == 12
    error_message = "12 upload slots expected."
  }
}

run "upload_slots_follow_the_tightest_limit" {
  command = plan

  variables {
    esp_upload_limit                       = 20
    list_uploader_max_instances            = 5
    list_uploader_concurrency              = 2
    upload_queue_max_concurrent_dispatches = 15
    realtime_reserved_slots                = 2
  }

  assert {
    condition     = output.upload_slots == 10
    error_message = "The list-uploader's capacity (5 × 2 = 10) is the tightest limit, so 10 slots expected."
  }
}

run "a_list_provider_dispatches_against_the_upload_slots" {
  command = plan

  # Uploads are the bottleneck: the upload queue (6) bounds dispatch, not the sender (16).
  variables {
    esp_send_limit                         = 16
    sender_max_instances                   = 8
    upload_queue_max_concurrent_dispatches = 6
  }

  assert {
    condition     = output.upload_slots == 6 && output.send_slots == 16
    error_message = "6 upload slots and 16 send slots expected."
  }

  assert {
    condition     = output.dispatch_slots == 6
    error_message = "A list provider's dispatch slots are its upload slots (6)."
  }
}

run "a_message_provider_dispatches_against_the_send_slots" {
  command = plan

  # Sends are the bottleneck: the sender's 8 × 2 = 16, within the send limit of 20, bounds
  # dispatch; the upload side (6) is not on the path.
  variables {
    provider_shape                         = "message"
    esp_send_limit                         = 20
    sender_max_instances                   = 8
    upload_queue_max_concurrent_dispatches = 6
    realtime_reserved_slots                = 10
  }

  assert {
    condition     = output.send_slots == 16
    error_message = "The sender's capacity (8 × 2 = 16) is the tightest send limit, so 16 send slots expected."
  }

  assert {
    condition     = output.dispatch_slots == 16
    error_message = "A message provider's dispatch slots are its send slots (16)."
  }

  assert {
    condition     = output.realtime_reserved_slots == 10
    error_message = "10 reserved slots are below the 16 send slots and must pass, though above the 6 upload slots."
  }
}

run "a_message_provider_at_the_send_limit_gets_the_send_limit" {
  command = plan

  variables {
    provider_shape       = "message"
    esp_send_limit       = 12
    sender_max_instances = 6
    sender_concurrency   = 2
  }

  assert {
    condition     = output.dispatch_slots == 12
    error_message = "6 × 2 = 12 at a send limit of 12: 12 dispatch slots expected."
  }
}

run "list_uploader_above_the_upload_limit_fails" {
  command = plan

  variables {
    list_uploader_max_instances = 5 # 5 × 2 = 10 > 8
  }

  expect_failures = [terraform_data.list_uploader]
}

run "list_uploader_concurrency_raised_above_the_upload_limit_fails" {
  command = plan

  variables {
    list_uploader_concurrency = 3 # 4 × 3 = 12 > 8
  }

  expect_failures = [terraform_data.list_uploader]
}

run "esp_upload_limit_lowered_below_the_list_uploader_fails" {
  command = plan

  variables {
    esp_upload_limit                       = 6 # 4 × 2 = 8 > 6
    upload_queue_max_concurrent_dispatches = 6
  }

  expect_failures = [terraform_data.list_uploader]
}

run "sender_above_the_send_limit_fails" {
  command = plan

  variables {
    sender_max_instances = 5 # 5 × 2 = 10 > 8
  }

  expect_failures = [terraform_data.sender]
}

run "sender_concurrency_raised_above_the_send_limit_fails" {
  command = plan

  variables {
    sender_concurrency = 3 # 4 × 3 = 12 > 8
  }

  expect_failures = [terraform_data.sender]
}

run "send_limit_is_separate_from_the_upload_limit" {
  command = plan

  # A sender sized for a generous upload limit still fails against a tight send limit.
  variables {
    esp_upload_limit                       = 100
    esp_send_limit                         = 4
    upload_queue_max_concurrent_dispatches = 8
  }

  expect_failures = [terraform_data.sender]
}

run "upload_queue_dispatching_above_the_upload_limit_fails" {
  command = plan

  variables {
    upload_queue_max_concurrent_dispatches = 9
  }

  expect_failures = [terraform_data.upload_queue]
}

run "reserving_every_upload_slot_for_realtime_fails" {
  command = plan

  variables {
    realtime_reserved_slots = 8
  }

  expect_failures = [terraform_data.realtime_reservation]
}

run "reserving_every_slot_of_a_smaller_list_uploader_fails" {
  command = plan

  # The ESP allows 8, but the list-uploader and queue are sized for 4: reserving 4 leaves batch none.
  variables {
    list_uploader_max_instances            = 2
    upload_queue_max_concurrent_dispatches = 4
    realtime_reserved_slots                = 4
  }

  expect_failures = [terraform_data.realtime_reservation]
}

run "reserving_every_send_slot_of_a_message_provider_fails" {
  command = plan

  # 5 reserved slots are below the 8 upload slots, but a message provider dispatches against
  # the sender's 2 × 2 = 4 send slots: batch chunks would get none.
  variables {
    provider_shape          = "message"
    sender_max_instances    = 2
    realtime_reserved_slots = 5
  }

  expect_failures = [terraform_data.realtime_reservation]
}

run "a_message_provider_keeps_the_send_limit" {
  command = plan

  variables {
    provider_shape       = "message"
    sender_max_instances = 5 # 5 × 2 = 10 > 8
  }

  expect_failures = [terraform_data.sender]
}

run "an_unknown_provider_shape_is_rejected" {
  command = plan

  variables {
    provider_shape = "messages"
  }

  expect_failures = [var.provider_shape]
}

run "zero_concurrency_is_rejected" {
  command = plan

  variables {
    sender_concurrency = 0
  }

  expect_failures = [var.sender_concurrency]
}

run "fractional_instances_are_rejected" {
  command = plan

  variables {
    list_uploader_max_instances = 2.5
  }

  expect_failures = [var.list_uploader_max_instances]
}
