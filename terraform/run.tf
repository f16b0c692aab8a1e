# The three Cloud Run services and the completion job, with the environment each one reads.

locals {
  registry = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.haishin.repository_id}"

  # Image per service, named as cloudbuild.yaml pushes them.
  image_names = {
    trigger       = "trigger"
    list_uploader = "list-uploader"
    sender        = "sender"
    completion    = "completion"
    # The public entry runs the trigger's image as `trigger unsubscribe`.
    unsubscribe = "trigger"
  }

  # Google's sample images, which a service or job runs from its creation until Cloud Build
  # deploys the real one (see var.image_tag).
  placeholder_images = {
    service = "us-docker.pkg.dev/cloudrun/container/hello"
    job     = "us-docker.pkg.dev/cloudrun/container/job"
  }

  images = {
    for key, name in local.image_names : key => (
      var.image_tag == null
      ? (key == "completion" ? local.placeholder_images.job : local.placeholder_images.service)
      : "${local.registry}/${name}:${var.image_tag}"
    )
  }

  # Service accounts whose OIDC tokens each service accepts on its push and task routes.
  push_invokers = {
    trigger       = concat([google_service_account.pubsub_push.email, google_service_account.tasks_invoker.email], var.api_callers)
    list_uploader = [google_service_account.tasks_invoker.email]
    sender        = [google_service_account.pubsub_push.email]
  }

  # ------------------------------------------------------------------------------------------
  # Environment: the one place that says what each service and the job read. Secrets are
  # listed apart, by Secret Manager secret; iam.tf grants each service access to exactly the
  # secrets listed here. Cloud Run sets PORT and K_SERVICE itself.
  #
  # A value that is unset (an optional setting, another provider's setting or secret) is left
  # out of the environment, never passed empty: each service block ends with a map of such
  # values, filtered of nulls. A secret is only listed for the provider that reads it, because
  # Cloud Run refuses to start a revision whose secret has no version.
  # ------------------------------------------------------------------------------------------
  common_env = merge({
    GOOGLE_CLOUD_PROJECT = var.project_id
    RUST_LOG             = var.rust_log
  }, local.telemetry_env)

  # Cloud Run's IAM invoker check (iam.tf) verifies each push's and task's token and forwards it
  # with the signature removed; the services check the forwarded claims (docs/deploy.md).
  push_env = {
    for key, url in local.service_urls : key => {
      PUSH_AUTH     = "cloud-run-iam"
      OIDC_JWKS_URL = local.google_jwks_url
      PUSH_AUDIENCE = url
      PUSH_INVOKERS = join(",", local.push_invokers[key])
    } if contains(keys(local.push_invokers), key)
  }

  # Where each message's List-Unsubscribe points: the public entry's unsubscribe route, unless
  # unsubscribe_url names another address that leads to it (a custom domain).
  unsubscribe_url = coalesce(var.unsubscribe_url, "${local.service_urls.unsubscribe}/unsubscribe")

  # The provider webhooks' settings. Providers post to the public entry; the trigger serves the
  # same routes behind its invoker check, with the same settings, for callers with a Google
  # identity (a relay of the provider's posts, say).
  feedback_env = {
    for name, value in {
      SNS_TOPIC_ARNS              = length(var.feedback_webhooks.sns_topic_arns) > 0 ? join(",", var.feedback_webhooks.sns_topic_arns) : null
      SENDGRID_WEBHOOK_PUBLIC_KEY = var.feedback_webhooks.sendgrid_public_key
    } : name => value if value != null
  }

  env = {
    trigger = merge(local.common_env, local.push_env.trigger, {
      DATABASE_MAX_CONNECTIONS = var.trigger.db_connections
      ESP_PROVIDER             = var.esp_provider
      TASKS_LOCATION           = var.region
      PREPARE_QUEUE            = google_cloud_tasks_queue.prepare.name
      UPLOAD_QUEUE             = google_cloud_tasks_queue.upload.name
      TASKS_INVOKER_SA         = google_service_account.tasks_invoker.email
      TRIGGER_URL              = local.service_urls.trigger
      LIST_UPLOADER_URL        = local.service_urls.list_uploader
      # For a message provider the trigger publishes each chunk straight to the sender.
      DELIVERIES_TOPIC = google_pubsub_topic.topic["deliveries"].name
      BUCKET           = google_storage_bucket.audiences.name
      CHUNK_SIZE       = var.chunk_size
      # Where the export jobs of BigQuery audiences run: the location of the audience datasets.
      BIGQUERY_LOCATION = local.audience_bigquery_location
      # The chunks the trigger lets be in flight toward the provider's bottleneck API: for
      # list-send the upload slots (the least of the ESP's upload limit, the list-uploader's
      # capacity and the upload queue's dispatches), for smtp and ses the send slots (the
      # least of the send limit and the sender's capacity). See modules/capacity.
      ESP_SLOTS               = module.capacity.dispatch_slots
      REALTIME_RESERVED_SLOTS = module.capacity.realtime_reserved_slots
      # Small realtime chunks skip the list upload (list-send only); the sender reads the same.
      ESP_INLINE_RECIPIENTS_MAX = local.message_provider ? 0 : var.esp_inline_recipients_max
      # Those go to the sender in at most this many messages at once (one send call each).
      ESP_SEND_SLOTS          = module.capacity.send_slots
      DISPATCH_PREFETCH       = var.dispatch_prefetch
      INLINE_PREPARE_MAX      = var.inline_prepare_max
      PREPARE_PARTITION_BYTES = var.prepare_partition_bytes
      PREPARE_PARTS_AT_ONCE   = var.prepare_parts_at_once
      PREPARE_KEPT_BYTES      = var.prepare_kept_bytes
      # A prepare step may run as long as the request that runs it; each task's dispatch deadline
      # is the timeout of the service it targets.
      PREPARE_LEASE_SECS  = trimsuffix(var.trigger.timeout, "s")
      UPLOAD_TIMEOUT_SECS = trimsuffix(var.list_uploader.timeout, "s")
    }, local.feedback_env)

    list_uploader = merge(local.common_env, local.push_env.list_uploader, {
      DATABASE_MAX_CONNECTIONS = var.list_uploader.db_connections
      ESP_PROVIDER             = var.esp_provider
      BUCKET                   = google_storage_bucket.audiences.name
      DELIVERIES_TOPIC         = google_pubsub_topic.topic["deliveries"].name
      EVENTS_TOPIC             = google_pubsub_topic.topic["pipeline_events"].name
      ESP_TIMEOUT_SECS         = var.esp_timeout_secs
      # An upload may run as long as the request that runs it; then another may take it over.
      UPLOAD_LEASE_SECS = trimsuffix(var.list_uploader.timeout, "s")
      }, {
      for name, value in {
        ESP_URL              = local.esp_url
        ESP_CALLS_PER_SECOND = var.esp_calls_per_second
      } : name => value if value != null
    })

    sender = merge(local.common_env, local.push_env.sender, {
      DATABASE_MAX_CONNECTIONS = var.sender.db_connections
      ESP_PROVIDER             = var.esp_provider
      EVENTS_TOPIC             = google_pubsub_topic.topic["pipeline_events"].name
      ESP_SEND_CONCURRENCY     = module.capacity.sender.concurrency
      ESP_TIMEOUT_SECS         = var.esp_timeout_secs
      SEND_LEASE_SECS          = trimsuffix(var.sender.timeout, "s")
      # For a message provider the sender reads each chunk's recipients from its object and
      # renders their messages, handing them over esp_batch_size at a time.
      BUCKET         = google_storage_bucket.audiences.name
      ESP_BATCH_SIZE = var.esp_batch_size
      # list-send: small realtime chunks are sent with their recipients, read from the chunk object.
      ESP_INLINE_RECIPIENTS_MAX = local.message_provider ? 0 : var.esp_inline_recipients_max
      }, {
      for name, value in {
        ESP_URL                 = local.esp_url
        ESP_CALLS_PER_SECOND    = var.esp_calls_per_second
        ESP_MESSAGES_PER_SECOND = local.message_provider ? var.esp_messages_per_second : null
        MAIL_FROM               = local.message_provider ? var.mail_from : null
        MAIL_ENVELOPE_FROM      = local.message_provider ? var.mail_envelope_from : null
        UNSUBSCRIBE_URL         = local.message_provider ? local.unsubscribe_url : null
        UNSUBSCRIBE_SCOPE_LABEL = local.message_provider ? var.unsubscribe_scope_label : null
        UNSUBSCRIBE_TOKEN_DAYS  = local.message_provider ? var.unsubscribe_token_days : null
        # null[*] is empty, so one() gives null for a provider not chosen.
        SMTP_URL              = one(local.smtp[*].url)
        SMTP_USERNAME         = one(local.smtp[*].username)
        SES_REGION            = one(local.ses[*].region)
        SES_ENDPOINT          = one(local.ses[*].endpoint)
        SES_CONFIGURATION_SET = one(local.ses[*].configuration_set)
      } : name => value if value != null
    })

    # The public entry serves /unsubscribe/{token} and the provider webhooks to anyone (iam.tf)
    # and reaches only the database (and SNS's signing certificates); it receives no pushes.
    unsubscribe = merge(local.common_env, {
      DATABASE_MAX_CONNECTIONS = var.unsubscribe.db_connections
    }, local.feedback_env)

    # The job receives no pushes, so it has no push settings.
    completion = merge(local.common_env, {
      DATABASE_MAX_CONNECTIONS   = var.completion.db_connections
      ESP_PROVIDER               = var.esp_provider
      EVENTS_TOPIC               = google_pubsub_topic.topic["pipeline_events"].name
      COMPLETED_TOPIC            = google_pubsub_topic.topic["request_completed"].name
      LOG_SINK                   = "bigquery"
      BIGQUERY_DATASET           = google_bigquery_dataset.haishin.dataset_id
      DELIVERIES_TOPIC           = google_pubsub_topic.topic["deliveries"].name
      ESP_TIMEOUT_SECS           = var.esp_timeout_secs
      QUEUED_TIMEOUT_SECS        = var.reconcile.queued_timeout_secs
      UPLOADED_TIMEOUT_SECS      = var.reconcile.uploaded_timeout_secs
      KILL_SWITCH_BOUNCE_RATE    = var.kill_switch.bounce_rate
      KILL_SWITCH_MIN_SAMPLE     = var.kill_switch.min_sample
      KILL_SWITCH_COMPLAINT_RATE = var.kill_switch.complaint_rate
      RUN_SECONDS                = var.completion.run_seconds
      }, {
      for name, value in {
        ESP_URL              = local.esp_url
        ESP_CALLS_PER_SECOND = var.esp_calls_per_second
      } : name => value if value != null
    })
  }

  # The ESP's API key for list-send, the SMTP password for smtp, the AWS access key for ses:
  # each secret only exists (secrets.tf), and is only listed here, for its provider.
  secret_env = {
    # The trigger checks unsubscribe tokens with the key the sender signs them with.
    trigger = {
      DATABASE_URL       = google_secret_manager_secret.database_url.secret_id
      UNSUBSCRIBE_SECRET = google_secret_manager_secret.unsubscribe.secret_id
    }
    unsubscribe = {
      DATABASE_URL       = google_secret_manager_secret.database_url.secret_id
      UNSUBSCRIBE_SECRET = google_secret_manager_secret.unsubscribe.secret_id
    }
    list_uploader = {
      for name, secret in {
        DATABASE_URL = google_secret_manager_secret.database_url.secret_id
        ESP_API_KEY  = local.list_send ? google_secret_manager_secret.esp_api_key.secret_id : null
      } : name => secret if secret != null
    }
    sender = {
      for name, secret in {
        DATABASE_URL          = google_secret_manager_secret.database_url.secret_id
        ESP_API_KEY           = local.list_send ? google_secret_manager_secret.esp_api_key.secret_id : null
        UNSUBSCRIBE_SECRET    = local.message_provider ? google_secret_manager_secret.unsubscribe.secret_id : null
        SMTP_PASSWORD         = try(google_secret_manager_secret.provider["haishin-smtp-password"].secret_id, null)
        AWS_ACCESS_KEY_ID     = try(google_secret_manager_secret.provider["haishin-aws-access-key-id"].secret_id, null)
        AWS_SECRET_ACCESS_KEY = try(google_secret_manager_secret.provider["haishin-aws-secret-access-key"].secret_id, null)
      } : name => secret if secret != null
    }
    completion = {
      for name, secret in {
        DATABASE_URL = google_secret_manager_secret.database_url.secret_id
        ESP_API_KEY  = local.list_send ? google_secret_manager_secret.esp_api_key.secret_id : null
      } : name => secret if secret != null
    }
  }

  # ------------------------------------------------------------------------------------------
  # Scaling. The list-uploader and the sender take theirs from modules/capacity, which refuses
  # a plan where either could exceed the ESP's limit.
  # ------------------------------------------------------------------------------------------
  services = {
    trigger = {
      description   = "Validates and stores delivery requests, plans chunks and dispatches them."
      min_instances = var.trigger.min_instances
      max_instances = var.trigger.max_instances
      concurrency   = var.trigger.concurrency
      cpu           = var.trigger.cpu
      memory        = var.trigger.memory
      timeout       = var.trigger.timeout
      # CPU stays allocated between requests: the trigger dispatches the chunks a prepare step
      # stores while it goes on reading the audience, and those dispatch rounds may end after the
      # request that started them has answered. With CPU allocated only during requests they
      # would stall until the next request arrived.
      cpu_idle = false
      ingress  = var.trigger.ingress
      args     = []
    }
    list_uploader = {
      description   = "Uploads one chunk's recipients to the ESP per request."
      min_instances = var.list_uploader.min_instances
      max_instances = module.capacity.list_uploader.max_instances
      concurrency   = module.capacity.list_uploader.concurrency
      cpu           = var.list_uploader.cpu
      memory        = var.list_uploader.memory
      timeout       = var.list_uploader.timeout
      cpu_idle      = true
      ingress       = "INGRESS_TRAFFIC_INTERNAL_ONLY"
      args          = []
    }
    sender = {
      description   = "Sends one chunk through the mail provider per request."
      min_instances = var.sender.min_instances
      max_instances = module.capacity.sender.max_instances
      concurrency   = module.capacity.sender.concurrency
      cpu           = var.sender.cpu
      memory        = var.sender.memory
      timeout       = var.sender.timeout
      # CPU stays allocated between requests, so the Pub/Sub publisher's background batches go
      # out at once. Each ESP call still runs inside a request, which is what keeps
      # max instances × concurrency an upper bound on concurrent ESP send calls.
      cpu_idle = false
      ingress  = "INGRESS_TRAFFIC_INTERNAL_ONLY"
      args     = []
    }
    # Recipients follow their unsubscribe links from anywhere: ingress from all, invoked by
    # allUsers (iam.tf), serving /unsubscribe/{token}, /webhooks/* and /healthz alone.
    unsubscribe = {
      description   = "Serves the one-click unsubscribe links of the messages (RFC 8058) and the provider's signed bounce and complaint webhooks, and nothing else."
      min_instances = var.unsubscribe.min_instances
      max_instances = var.unsubscribe.max_instances
      concurrency   = var.unsubscribe.concurrency
      cpu           = "1"
      memory        = "512Mi"
      timeout       = "30s"
      cpu_idle      = true
      ingress       = "INGRESS_TRAFFIC_ALL"
      args          = ["unsubscribe"]
    }
  }
}

resource "google_cloud_run_v2_service" "service" {
  for_each = local.services

  name                = local.service_names[each.key]
  location            = var.region
  description         = each.value.description
  ingress             = each.value.ingress
  deletion_protection = var.deletion_protection

  template {
    service_account                  = google_service_account.runtime[each.key].email
    max_instance_request_concurrency = each.value.concurrency
    timeout                          = each.value.timeout
    execution_environment            = "EXECUTION_ENVIRONMENT_GEN2"

    scaling {
      min_instance_count = each.value.min_instances
      max_instance_count = each.value.max_instances
    }

    vpc_access {
      egress = "PRIVATE_RANGES_ONLY"
      network_interfaces {
        network    = google_compute_network.haishin.name
        subnetwork = google_compute_subnetwork.run.name
      }
    }

    containers {
      image = local.images[each.key]
      args  = each.value.args

      ports {
        container_port = 8080
      }

      resources {
        limits = {
          cpu    = each.value.cpu
          memory = each.value.memory
        }
        cpu_idle          = each.value.cpu_idle
        startup_cpu_boost = true
      }

      dynamic "env" {
        for_each = local.env[each.key]
        content {
          name  = env.key
          value = env.value
        }
      }

      dynamic "env" {
        for_each = local.secret_env[each.key]
        content {
          name = env.key
          value_source {
            secret_key_ref {
              secret  = env.value
              version = "latest"
            }
          }
        }
      }
    }
  }

  lifecycle {
    # Cloud Build deploys new images (cloudbuild.yaml); Terraform owns everything else.
    ignore_changes = [
      template[0].containers[0].image,
      client,
      client_version,
    ]
  }

  depends_on = [
    google_project_service.enabled,
    google_secret_manager_secret_iam_member.runtime,
    google_secret_manager_secret_version.database_url,
    google_secret_manager_secret_version.unsubscribe,
  ]
}

resource "google_cloud_run_v2_job" "completion" {
  name                = local.completion_job_name
  location            = var.region
  deletion_protection = var.deletion_protection

  template {
    task_count  = 1
    parallelism = 1

    template {
      service_account       = google_service_account.runtime["completion"].email
      timeout               = var.completion.timeout
      execution_environment = "EXECUTION_ENVIRONMENT_GEN2"
      # A failed run is not retried: the next scheduled run, a minute later, redoes its work.
      max_retries = 0

      vpc_access {
        egress = "PRIVATE_RANGES_ONLY"
        network_interfaces {
          network    = google_compute_network.haishin.name
          subnetwork = google_compute_subnetwork.run.name
        }
      }

      containers {
        image = local.images.completion

        resources {
          limits = {
            cpu    = var.completion.cpu
            memory = var.completion.memory
          }
        }

        dynamic "env" {
          for_each = local.env.completion
          content {
            name  = env.key
            value = env.value
          }
        }

        dynamic "env" {
          for_each = local.secret_env.completion
          content {
            name = env.key
            value_source {
              secret_key_ref {
                secret  = env.value
                version = "latest"
              }
            }
          }
        }
      }
    }
  }

  lifecycle {
    ignore_changes = [
      template[0].template[0].containers[0].image,
      client,
      client_version,
    ]
  }

  depends_on = [
    google_project_service.enabled,
    google_secret_manager_secret_iam_member.runtime,
    google_secret_manager_secret_version.database_url,
  ]
}
