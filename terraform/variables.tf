# What an SRE sets and tunes. The ESP limits and the scaling of the two services that call the
# ESP go through modules/capacity, which refuses a plan that could exceed the ESP's limits.

# ---------------------------------------------------------------------------------------------
# Where
# ---------------------------------------------------------------------------------------------

variable "project_id" {
  description = "Google Cloud project that holds everything Haishin needs."
  type        = string
}

variable "region" {
  description = "Region of the Cloud Run services and job, Cloud Tasks queues, Cloud Scheduler, Cloud SQL, Artifact Registry and the network. Default: asia-northeast1."
  type        = string
  default     = "asia-northeast1"
}

variable "data_location" {
  description = "Location of the audience bucket and the BigQuery dataset. BigQuery exports a query's result only to a bucket in a location compatible with the queried data, so set this to where the marketing datasets live (e.g. \"US\", \"EU\", \"asia-northeast1\"). Default: null, meaning the region."
  type        = string
  default     = null
}

# ---------------------------------------------------------------------------------------------
# The ESP and throughput
# ---------------------------------------------------------------------------------------------

variable "esp_provider" {
  description = "The provider that delivers the mail. list-send: a list-based ESP speaking the list-send protocol (a chunk is uploaded as a list, then sent with a template stored at the ESP; needs esp_url and the secret haishin-esp-api-key). smtp: an SMTP relay that takes rendered messages (needs smtp, mail_from and the secret haishin-smtp-password). ses: Amazon SES v2 (needs ses, mail_from and the secrets haishin-aws-access-key-id and haishin-aws-secret-access-key). Default: list-send."
  type        = string
  default     = "list-send"

  validation {
    condition     = contains(["list-send", "smtp", "ses"], var.esp_provider)
    error_message = "esp_provider must be one of: list-send, smtp, ses."
  }
}

variable "esp_url" {
  description = "Base URL of the list-send ESP's API (https). Required when esp_provider is list-send, unused otherwise. Default: null."
  type        = string
  default     = null

  validation {
    condition     = var.esp_provider != "list-send" || (var.esp_url == null ? false : startswith(var.esp_url, "https://"))
    error_message = "esp_provider list-send needs esp_url, an https:// URL."
  }
}

variable "smtp" {
  description = "The SMTP relay, when esp_provider is smtp. url: smtp://HOST:587?tls=starttls (STARTTLS required), smtps://HOST:465 (TLS from the start) or smtp://HOST:25 (plain, for a relay inside the network only); without a password, which is read from the secret haishin-smtp-password. username: the AUTH user (default: none, or the user in the URL). Each chunk being sent holds one connection, and each message is its own envelope on it. Default: null."
  type = object({
    url      = string
    username = optional(string)
  })
  default = null

  validation {
    condition     = var.esp_provider != "smtp" || var.smtp != null
    error_message = "esp_provider smtp needs smtp = { url = \"smtp://HOST:587?tls=starttls\" }."
  }

  validation {
    condition     = var.smtp == null ? true : can(regex("^smtps?://[^/?#\\s]+", var.smtp.url))
    error_message = "smtp.url must be smtp://HOST:PORT (with ?tls=starttls for STARTTLS) or smtps://HOST:PORT."
  }

  validation {
    condition     = var.smtp == null ? true : !can(regex("^smtps?://[^/?#@]*:[^/?#@]*@", var.smtp.url))
    error_message = "smtp.url must not hold a password: the sender reads it from the secret haishin-smtp-password (docs/deploy.md, Choosing the mail provider)."
  }
}

variable "ses" {
  description = "Amazon SES, when esp_provider is ses. region: the AWS region of the SES account (\"eu-west-1\"). endpoint: another endpoint than AWS's own for that region (default: none). configuration_set: the SES configuration set every message is sent with, for event destinations or a dedicated IP pool (default: none). The access key is read from the secrets haishin-aws-access-key-id and haishin-aws-secret-access-key. Default: null."
  type = object({
    region            = string
    endpoint          = optional(string)
    configuration_set = optional(string)
  })
  default = null

  validation {
    condition     = var.esp_provider != "ses" || var.ses != null
    error_message = "esp_provider ses needs ses = { region = \"REGION\" }."
  }

  validation {
    condition     = var.ses == null ? true : can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]+$", var.ses.region))
    error_message = "ses.region must be an AWS region such as \"eu-west-1\"."
  }

  validation {
    condition     = var.ses == null ? true : (var.ses.endpoint == null ? true : startswith(var.ses.endpoint, "https://"))
    error_message = "ses.endpoint must be an https:// URL."
  }
}

variable "mail_from" {
  description = "The From header of every message, when esp_provider is smtp or ses: an address, with a display name or without (\"Shop <news@shop.example>\"). Its domain must be one the provider may send for (an SES verified identity, a domain the relay signs). Default: null."
  type        = string
  default     = null

  validation {
    condition     = !contains(["smtp", "ses"], var.esp_provider) || (var.mail_from == null ? false : can(regex("^[^@<>]*<[^@<>\\s]+@[^@<>\\s]+>$|^[^@<>\\s]+@[^@<>\\s]+$", trimspace(var.mail_from))))
    error_message = "esp_provider smtp and ses need mail_from, an address such as \"news@shop.example\" or \"Shop <news@shop.example>\"."
  }
}

variable "mail_envelope_from" {
  description = "The envelope sender (SMTP MAIL FROM, Return-Path), where bounces go, when esp_provider is smtp or ses: a bare address (\"bounces@shop.example\"). Default: null, meaning the address of mail_from."
  type        = string
  default     = null

  validation {
    condition     = var.mail_envelope_from == null ? true : can(regex("^[^@<>\\s]+@[^@<>\\s]+$", var.mail_envelope_from))
    error_message = "mail_envelope_from must be a bare address such as \"bounces@shop.example\"."
  }
}

variable "unsubscribe_url" {
  description = "Base URL (https, no query or fragment) of the one-click unsubscribe endpoint, when esp_provider is smtp or ses: an address that leads to the public entry's /unsubscribe route (a custom domain mapped to the service haishin-unsubscribe, \"https://mail.shop.example/unsubscribe\"). Every message carries List-Unsubscribe with this base and the recipient's token as one more path segment, and List-Unsubscribe-Post for one-click unsubscription (RFC 8058). Default: null, meaning the public entry's own URL, https://haishin-unsubscribe-PROJECT_NUMBER.REGION.run.app/unsubscribe."
  type        = string
  default     = null

  validation {
    condition     = var.unsubscribe_url == null ? true : can(regex("^https://[^/?#\\s]+[^?#\\s]*$", var.unsubscribe_url))
    error_message = "unsubscribe_url must be an https:// URL without a query or fragment."
  }
}

variable "unsubscribe_scope_label" {
  description = "The request label whose value a one-click unsubscribe applies to, when esp_provider is smtp or ses: unsubscribing from a request labelled category = promotions suppresses the address for requests labelled so (scope category:promotions); a request without the label is unsubscribed from globally. Default: category."
  type        = string
  default     = "category"

  validation {
    condition     = length(trimspace(var.unsubscribe_scope_label)) > 0
    error_message = "unsubscribe_scope_label must not be empty."
  }
}

variable "unsubscribe_token_days" {
  description = "How long each message's unsubscribe link works, in days, when esp_provider is smtp or ses. Default: 60."
  type        = number
  default     = 60

  validation {
    condition     = var.unsubscribe_token_days >= 1 && floor(var.unsubscribe_token_days) == var.unsubscribe_token_days
    error_message = "unsubscribe_token_days must be a whole number of days, at least 1."
  }
}

variable "esp_calls_per_second" {
  description = "Most provider calls per second that change something (a list upload, a send call; for SES, each SendEmail), from the provider's contract, summed over every instance of the list-uploader, the sender and the completion job: each call reserves the next free moment of a schedule shared through the database. Reads (polling, history) are not counted. Default: null, meaning no rate limit, only the concurrency limits."
  type        = number
  default     = null

  validation {
    condition     = var.esp_calls_per_second == null ? true : var.esp_calls_per_second > 0
    error_message = "esp_calls_per_second must be above 0, or null for no limit."
  }
}

variable "esp_messages_per_second" {
  description = "Most messages per second the provider accepts (for SES, the account's maximum send rate; for SMTP, the relay's), summed over every sender instance: each message reserves the next free moment of a schedule shared through the database. smtp and ses only. Default: null, meaning no limit."
  type        = number
  default     = null

  validation {
    condition     = var.esp_messages_per_second == null ? true : var.esp_messages_per_second > 0
    error_message = "esp_messages_per_second must be above 0, or null for no limit."
  }
}

variable "esp_batch_size" {
  description = "Messages the sender hands to a message provider in one call, and the step by which it records its progress through a chunk (1 to 500). SMTP: one connection, one envelope per message. SES: one SendEmail per message, so a call is that many SES requests. A message provider only. Default: 50."
  type        = number
  default     = 50

  validation {
    condition     = var.esp_batch_size >= 1 && var.esp_batch_size <= 500 && floor(var.esp_batch_size) == var.esp_batch_size
    error_message = "esp_batch_size must be a whole number from 1 to 500."
  }
}

variable "esp_upload_limit" {
  description = "Concurrent calls the ESP accepts on its list-upload API (from the ESP's contract; list-send only). list-uploader max_instances × concurrency and the upload queue's max_concurrent_dispatches may not exceed it. Default: 8."
  type        = number
  default     = 8
}

variable "esp_send_limit" {
  description = "Concurrent calls the provider accepts on its send API (from its contract): list-send's send calls, SMTP connections, concurrent SES SendEmail calls. sender max_instances × concurrency may not exceed it. Default: 8."
  type        = number
  default     = 8
}

variable "chunk_size" {
  description = "Most recipients in one chunk, the unit of upload, send, retry and scheduling. Default: 10000."
  type        = number
  default     = 10000

  validation {
    condition     = var.chunk_size >= 1 && var.chunk_size <= 1000000 && floor(var.chunk_size) == var.chunk_size
    error_message = "chunk_size must be a whole number from 1 to 1000000."
  }
}

variable "realtime_reserved_slots" {
  description = "Dispatch slots that batch chunks may never take, so realtime mail starts at once while campaigns run. Must stay below the dispatch slots (upload slots for list-send, send slots for smtp and ses). Default: 0."
  type        = number
  default     = 0
}

variable "esp_inline_recipients_max" {
  description = "list-send only: realtime chunks of at most this many recipients are sent with their recipients in the send call, without a list upload, so realtime mail never waits for an upload slot behind a campaign. Set it only when the ESP takes recipients in a send (the list-send protocol's inline send), and no higher than the ESP's cap per call. 0: every chunk is uploaded as a list. Default: 0."
  type        = number
  default     = 0

  validation {
    condition     = var.esp_inline_recipients_max >= 0 && var.esp_inline_recipients_max <= 10000 && floor(var.esp_inline_recipients_max) == var.esp_inline_recipients_max
    error_message = "esp_inline_recipients_max must be a whole number from 0 to 10000."
  }
}

variable "dispatch_prefetch" {
  description = "Chunks the trigger may queue beyond the free dispatch slots, so a freed slot is refilled without waiting for the trigger. Keep it small: queued work cannot be reordered. Default: 1."
  type        = number
  default     = 1

  validation {
    condition     = var.dispatch_prefetch >= 0 && var.dispatch_prefetch <= 100 && floor(var.dispatch_prefetch) == var.dispatch_prefetch
    error_message = "dispatch_prefetch must be a whole number from 0 to 100."
  }
}

# ---------------------------------------------------------------------------------------------
# Cloud Run: one object per service; set only the attributes you change.
# cpu is one of "1", "2", "4", "6", "8"; memory a Kubernetes quantity ("512Mi", "2Gi");
# timeout the longest request, in seconds with an "s"; db_connections the pool size of one
# instance (DATABASE_MAX_CONNECTIONS), of which up to 4 are kept open, ready for a burst.
# ---------------------------------------------------------------------------------------------

variable "inline_prepare_max" {
  description = "Inline audiences up to this many recipients (at most 10,000, the inline limit) are prepared as the request is taken in and stored with it, without a prepare task: the realtime path. A larger inline audience is prepared by a prepare task, which reads the request back."
  type        = number
  default     = 10000

  validation {
    condition     = var.inline_prepare_max >= 0 && var.inline_prepare_max <= 10000
    error_message = "inline_prepare_max must be between 0 and 10000 (the most recipients an inline audience holds)."
  }
}

variable "prepare_partition_bytes" {
  description = "Audiences larger than this (bytes of their files; compressed files count four times) are prepared in parts: a task per file or byte range of a large file (up to this size), then tasks that cut the partitions of the addresses, of about this size each, spread over the trigger's instances. One part holds about 70 bytes of memory per 40-byte row, so this bounds a trigger instance's memory together with prepare_parts_at_once."
  type        = number
  default     = 8388608

  validation {
    condition     = var.prepare_partition_bytes >= 1048576
    error_message = "prepare_partition_bytes must be at least 1 MiB (1048576)."
  }
}

variable "prepare_parts_at_once" {
  description = "Parts of large audiences one trigger instance prepares at once; further part tasks wait. Memory for parts is about prepare_parts_at_once × 9 × prepare_partition_bytes."
  type        = number
  default     = 2

  validation {
    condition     = var.prepare_parts_at_once >= 1
    error_message = "prepare_parts_at_once must be at least 1."
  }
}

variable "prepare_kept_bytes" {
  description = "Bytes of partition objects a trigger instance keeps in memory after spreading them, so that the cuts it runs next, the first chunks of a large audience among them, skip the round trips to Cloud Storage (the first three shards, about 2 MB of rows, fit; only a request's first shards are kept, as a cut reads every shard up to its own). Counts toward the trigger's memory. 0: none are kept. Default: 8 MiB."
  type        = number
  default     = 8388608

  validation {
    condition     = var.prepare_kept_bytes >= 0 && floor(var.prepare_kept_bytes) == var.prepare_kept_bytes
    error_message = "prepare_kept_bytes must be a whole number of bytes, 0 or more."
  }
}

variable "esp_timeout_secs" {
  description = "Longest wait for one provider request, in seconds. A request that times out may still have been accepted: for list-send the sender then asks the ESP's history before anything is sent again; for smtp and ses a message that may have reached the provider is never sent again blindly (its outcome is unknown). Default: 30."
  type        = number
  default     = 30
}

variable "reconcile" {
  description = "When the completion job treats work as stuck. queued_timeout_secs: a chunk queued for upload this long is dispatched again under a new task name. uploaded_timeout_secs: a chunk uploaded this long without being sent is published to the sender again."
  type = object({
    queued_timeout_secs   = optional(number, 900)
    uploaded_timeout_secs = optional(number, 120)
  })
  default = {}
}

variable "kill_switch" {
  description = "The completion job pauses an open request whose bounce rate reaches bounce_rate (the ESP's bounces and the webhooks' hard bounces over the recipients delivered or bounced, 0 to 1; 0 turns it off) or whose complaint rate reaches complaint_rate (spam complaints from the webhooks over the same sample; 0 turns it off; mailbox providers start rejecting at about 0.3%) once its completed chunks hold min_sample recipients with an outcome (since its last resume), and logs \"Request paused by the kill switch.\" (alert kill_switch)."
  type = object({
    bounce_rate    = optional(number, 0.05)
    complaint_rate = optional(number, 0.003)
    min_sample     = optional(number, 1000)
  })
  default = {}

  validation {
    condition     = var.kill_switch.bounce_rate >= 0 && var.kill_switch.bounce_rate <= 1 && var.kill_switch.complaint_rate >= 0 && var.kill_switch.complaint_rate <= 1 && var.kill_switch.min_sample >= 1 && floor(var.kill_switch.min_sample) == var.kill_switch.min_sample
    error_message = "kill_switch: bounce_rate and complaint_rate must be between 0 and 1 (0 turns each off) and min_sample a whole number of at least 1."
  }
}

variable "trigger" {
  description = "trigger (validates and stores requests, plans chunks, dispatches work; does not call the ESP, so it scales freely). Defaults: min_instances 0, max_instances 10, concurrency 40, cpu \"1\", memory \"1Gi\", timeout \"1800s\" (preparing a large audience streams it in one request), db_connections 10, ingress \"INGRESS_TRAFFIC_ALL\" (direct API callers; use \"INGRESS_TRAFFIC_INTERNAL_ONLY\" when all requests come through Pub/Sub)."
  type = object({
    min_instances  = optional(number, 0)
    max_instances  = optional(number, 10)
    concurrency    = optional(number, 40)
    cpu            = optional(string, "1")
    memory         = optional(string, "1Gi")
    timeout        = optional(string, "1800s")
    db_connections = optional(number, 10)
    ingress        = optional(string, "INGRESS_TRAFFIC_ALL")
  })
  default = {}

  validation {
    condition     = var.trigger.max_instances >= 1 && var.trigger.min_instances >= 0 && var.trigger.min_instances <= var.trigger.max_instances
    error_message = "trigger needs 0 <= min_instances <= max_instances and max_instances >= 1."
  }

  validation {
    condition     = var.trigger.concurrency >= 1 && var.trigger.concurrency <= 1000
    error_message = "trigger.concurrency must be from 1 to 1000."
  }

  validation {
    condition     = contains(["1", "2", "4", "6", "8"], var.trigger.cpu)
    error_message = "trigger.cpu must be one of \"1\", \"2\", \"4\", \"6\", \"8\"."
  }

  validation {
    condition     = contains(["INGRESS_TRAFFIC_ALL", "INGRESS_TRAFFIC_INTERNAL_ONLY", "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"], var.trigger.ingress)
    error_message = "trigger.ingress must be INGRESS_TRAFFIC_ALL, INGRESS_TRAFFIC_INTERNAL_ONLY or INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER."
  }
}

variable "unsubscribe" {
  description = "The public entry (the trigger's image serving the one-click unsubscribe links and the provider webhooks alone, invoked by anyone). Defaults: min_instances 0, max_instances 3, concurrency 80, db_connections 2."
  type = object({
    min_instances  = optional(number, 0)
    max_instances  = optional(number, 3)
    concurrency    = optional(number, 80)
    db_connections = optional(number, 2)
  })
  default = {}

  validation {
    condition     = var.unsubscribe.max_instances >= 1 && var.unsubscribe.min_instances >= 0 && var.unsubscribe.min_instances <= var.unsubscribe.max_instances
    error_message = "unsubscribe needs 0 <= min_instances <= max_instances and max_instances >= 1."
  }

  validation {
    condition     = var.unsubscribe.concurrency >= 1 && var.unsubscribe.concurrency <= 1000 && var.unsubscribe.db_connections >= 1
    error_message = "unsubscribe.concurrency must be from 1 to 1000, and db_connections at least 1."
  }
}

variable "list_uploader" {
  description = "list-uploader (uploads one chunk to the ESP's upload API per request). max_instances × concurrency is its number of ESP upload slots and may not exceed esp_upload_limit. Defaults: min_instances 0, max_instances 4, concurrency 2, cpu \"1\", memory \"512Mi\", timeout \"600s\", db_connections 4."
  type = object({
    min_instances  = optional(number, 0)
    max_instances  = optional(number, 4)
    concurrency    = optional(number, 2)
    cpu            = optional(string, "1")
    memory         = optional(string, "512Mi")
    timeout        = optional(string, "600s")
    db_connections = optional(number, 4)
  })
  default = {}

  validation {
    condition     = var.list_uploader.min_instances >= 0 && var.list_uploader.min_instances <= var.list_uploader.max_instances
    error_message = "list_uploader needs 0 <= min_instances <= max_instances."
  }

  validation {
    condition     = contains(["1", "2", "4", "6", "8"], var.list_uploader.cpu)
    error_message = "list_uploader.cpu must be one of \"1\", \"2\", \"4\", \"6\", \"8\"."
  }
}

variable "sender" {
  description = "sender (push subscriber of topic deliveries; one ESP send call per request; CPU always allocated). max_instances × concurrency is its number of ESP send slots and may not exceed esp_send_limit. Defaults: min_instances 0, max_instances 4, concurrency 2, cpu \"1\", memory \"512Mi\", timeout \"600s\" (the push subscriptions' ack deadline follows it), db_connections 4."
  type = object({
    min_instances  = optional(number, 0)
    max_instances  = optional(number, 4)
    concurrency    = optional(number, 2)
    cpu            = optional(string, "1")
    memory         = optional(string, "512Mi")
    timeout        = optional(string, "600s")
    db_connections = optional(number, 4)
  })
  default = {}

  validation {
    condition     = var.sender.min_instances >= 0 && var.sender.min_instances <= var.sender.max_instances
    error_message = "sender needs 0 <= min_instances <= max_instances."
  }

  validation {
    condition     = contains(["1", "2", "4", "6", "8"], var.sender.cpu)
    error_message = "sender.cpu must be one of \"1\", \"2\", \"4\", \"6\", \"8\"."
  }

  validation {
    condition     = tonumber(trimsuffix(var.sender.timeout, "s")) >= 10 && tonumber(trimsuffix(var.sender.timeout, "s")) <= 600
    error_message = "sender.timeout must be from \"10s\" to \"600s\": it is also the Pub/Sub ack deadline of the deliveries subscriptions."
  }
}

variable "completion" {
  description = "completion job (polls the ESP, writes BigQuery, closes requests), run by Cloud Scheduler. Defaults: schedule \"* * * * *\" (every minute, UTC), cpu \"1\", memory \"512Mi\", timeout \"300s\" per run, db_connections 4, run_seconds 50 (a run takes passes while work is left, none starting after this many seconds: keep it below the schedule's interval)."
  type = object({
    schedule       = optional(string, "* * * * *")
    cpu            = optional(string, "1")
    memory         = optional(string, "512Mi")
    timeout        = optional(string, "300s")
    db_connections = optional(number, 4)
    run_seconds    = optional(number, 50)
  })
  default = {}

  validation {
    condition     = var.completion.run_seconds >= 1 && var.completion.run_seconds < tonumber(trimsuffix(var.completion.timeout, "s"))
    error_message = "completion.run_seconds must be at least 1 and below completion.timeout: a pass starts only before it, and must end before the run is stopped."
  }

  validation {
    condition     = contains(["1", "2", "4", "6", "8"], var.completion.cpu)
    error_message = "completion.cpu must be one of \"1\", \"2\", \"4\", \"6\", \"8\"."
  }
}

# ---------------------------------------------------------------------------------------------
# Cloud Tasks and Pub/Sub
# ---------------------------------------------------------------------------------------------

variable "prepare_queue" {
  description = "Cloud Tasks queue \"prepare\" (trigger materializes an audience into chunks). Defaults: max_dispatches_per_second 5, max_concurrent_dispatches 10, max_attempts 10, min_backoff \"10s\", max_backoff \"600s\"."
  type = object({
    max_dispatches_per_second = optional(number, 5)
    max_concurrent_dispatches = optional(number, 10)
    max_attempts              = optional(number, 10)
    min_backoff               = optional(string, "10s")
    max_backoff               = optional(string, "600s")
  })
  default = {}

  validation {
    condition     = var.prepare_queue.max_dispatches_per_second > 0 && var.prepare_queue.max_dispatches_per_second <= 500 && var.prepare_queue.max_concurrent_dispatches >= 1 && var.prepare_queue.max_concurrent_dispatches <= 5000
    error_message = "prepare_queue needs max_dispatches_per_second in (0, 500] and max_concurrent_dispatches in [1, 5000]."
  }
}

variable "upload_queue" {
  description = "Cloud Tasks queue \"upload\" (one task per chunk, to the list-uploader). max_concurrent_dispatches may not exceed esp_upload_limit. Defaults: max_dispatches_per_second 10, max_concurrent_dispatches 8, max_attempts 20, min_backoff \"5s\", max_backoff \"300s\"."
  type = object({
    max_dispatches_per_second = optional(number, 10)
    max_concurrent_dispatches = optional(number, 8)
    max_attempts              = optional(number, 20)
    min_backoff               = optional(string, "5s")
    max_backoff               = optional(string, "300s")
  })
  default = {}

  validation {
    condition     = var.upload_queue.max_dispatches_per_second > 0 && var.upload_queue.max_dispatches_per_second <= 500
    error_message = "upload_queue.max_dispatches_per_second must be in (0, 500]."
  }
}

variable "pubsub_max_delivery_attempts" {
  description = "Push deliveries of one message before Pub/Sub moves it to the subscription's dead-letter topic (5 to 100). Default: 10."
  type        = number
  default     = 10

  validation {
    condition     = var.pubsub_max_delivery_attempts >= 5 && var.pubsub_max_delivery_attempts <= 100
    error_message = "pubsub_max_delivery_attempts must be from 5 to 100."
  }
}

# ---------------------------------------------------------------------------------------------
# Data and access
# ---------------------------------------------------------------------------------------------

variable "chunk_retention_days" {
  description = "Days after which audience exports and chunk objects are deleted from the bucket. Must outlast the longest campaign: a chunk retried after its object is gone fails. Default: 7."
  type        = number
  default     = 7

  validation {
    condition     = var.chunk_retention_days >= 1 && floor(var.chunk_retention_days) == var.chunk_retention_days
    error_message = "chunk_retention_days must be a whole number of at least 1."
  }
}

variable "audience_export_retention_days" {
  description = "Days after which the BigQuery exports of audiences (requests/<id>/export/*.json) are deleted from the bucket. An export is read once, while its request is prepared; chunks are kept for chunk_retention_days. Default: 2."
  type        = number
  default     = 2

  validation {
    condition     = var.audience_export_retention_days >= 1 && floor(var.audience_export_retention_days) == var.audience_export_retention_days
    error_message = "audience_export_retention_days must be a whole number of at least 1."
  }
}

variable "audience_bigquery_location" {
  description = "BigQuery location of the datasets that bigquery audiences read (US, EU or a region): their export jobs run there, and the audience bucket must be in or within it. Default: data_location."
  type        = string
  default     = null
}

variable "sql" {
  description = "Cloud SQL for PostgreSQL (private IP only). Defaults: tier \"db-custom-2-8192\", availability_type \"REGIONAL\" (a standby in a second zone), disk_size_gb 20 (grows automatically), max_connections 200 (every service's max_instances × db_connections must fit, with 10 left for administration)."
  type = object({
    tier              = optional(string, "db-custom-2-8192")
    availability_type = optional(string, "REGIONAL")
    disk_size_gb      = optional(number, 20)
    max_connections   = optional(number, 200)
  })
  default = {}

  validation {
    condition     = contains(["ZONAL", "REGIONAL"], var.sql.availability_type)
    error_message = "sql.availability_type must be ZONAL or REGIONAL."
  }
}

variable "run_subnet_cidr" {
  description = "Range of the subnet that Cloud Run uses for Direct VPC egress to Cloud SQL (at least /26; each instance takes an address). Default: 10.8.0.0/24."
  type        = string
  default     = "10.8.0.0/24"
}

variable "api_callers" {
  description = "Service-account emails allowed to call the trigger's API (POST /v1/requests) directly, besides publishing to the delivery-requests topic. Default: none."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for email in var.api_callers : can(regex("^[^@:\\s]+@[^@\\s]+\\.gserviceaccount\\.com$", email))])
    error_message = "api_callers holds service-account emails (NAME@PROJECT.iam.gserviceaccount.com), without a \"serviceAccount:\" prefix."
  }
}

variable "image_tag" {
  description = "Tag in Artifact Registry that a newly created service or job starts from. null starts them on Google's placeholder images, as in the first apply in an empty project, before Cloud Build has pushed anything. After creation Cloud Build owns the running image: Terraform ignores image changes. Default: null."
  type        = string
  default     = null
}

variable "rust_log" {
  description = "RUST_LOG filter of every service and the job. Default: \"info\"."
  type        = string
  default     = "info"
}

variable "deletion_protection" {
  description = "Refuse to destroy the Cloud Run services and job, the Cloud SQL instance and the BigQuery tables. Set false only to tear a deployment down. Default: true."
  type        = bool
  default     = true
}

variable "request_publishers" {
  description = "IAM members (e.g. \"serviceAccount:mkt@other-project.iam.gserviceaccount.com\") allowed to publish delivery requests to the delivery-requests topic. Default: none."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for member in var.request_publishers : can(regex("^(serviceAccount|user|group|domain|principal|principalSet):", member))])
    error_message = "request_publishers holds IAM members such as \"serviceAccount:NAME@PROJECT.iam.gserviceaccount.com\"."
  }
}

variable "completion_subscribers" {
  description = "IAM members allowed to attach subscriptions to the request-completed topic (the marketing platform). Default: none."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for member in var.completion_subscribers : can(regex("^(serviceAccount|user|group|domain|principal|principalSet):", member))])
    error_message = "completion_subscribers holds IAM members such as \"serviceAccount:NAME@PROJECT.iam.gserviceaccount.com\"."
  }
}

variable "alert_notification_channels" {
  description = "Cloud Monitoring notification channels (ids such as projects/PROJECT/notificationChannels/123, made in the console or with gcloud) that every Haishin alert notifies. Empty: the alerts still open incidents, visible in the console, but notify nobody."
  type        = list(string)
  default     = []
}

variable "alert_thresholds" {
  description = "When the alerts fire. oldest_unacked_secs: a push subscription's oldest unacknowledged message is older than this. esp_rate_limited_share: more than this share of ESP calls answered 429 over 10 minutes (Haishin fills the ESP by scheduling, so any sustained share means the ESP's real limit is below the configured one)."
  type = object({
    oldest_unacked_secs    = optional(number, 900)
    esp_rate_limited_share = optional(number, 0.05)
  })
  default = {}

  validation {
    condition     = var.alert_thresholds.oldest_unacked_secs > 0 && var.alert_thresholds.esp_rate_limited_share > 0 && var.alert_thresholds.esp_rate_limited_share < 1
    error_message = "alert_thresholds: oldest_unacked_secs must be positive and esp_rate_limited_share between 0 and 1."
  }
}

variable "feedback_webhooks" {
  description = "The provider webhooks the public entry serves, reporting bounces and complaints: sns_topic_arns, the SNS topics whose SES notifications POST /webhooks/ses accepts (subscribe the public entry's /webhooks/ses over HTTPS to each; the subscription confirms itself); sendgrid_public_key, the verification key SendGrid shows once the Event Webhook's signature is enabled (POST /webhooks/sendgrid). Unset, each route answers 404."
  type = object({
    sns_topic_arns      = optional(list(string), [])
    sendgrid_public_key = optional(string)
  })
  default = {}

  validation {
    condition     = alltrue([for arn in var.feedback_webhooks.sns_topic_arns : can(regex("^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]+$", arn))])
    error_message = "feedback_webhooks.sns_topic_arns must be SNS topic ARNs (arn:aws:sns:REGION:ACCOUNT:NAME)."
  }
}

variable "telemetry" {
  description = "Traces and metrics exported to Cloud Trace and Cloud Monitoring: how often metrics are sent (ms), and the share of delivery requests traced (a request is traced whole or not at all)."
  type = object({
    metric_interval_ms = optional(number, 60000)
    trace_sample_ratio = optional(number, 1)
  })
  default = {}

  validation {
    condition     = var.telemetry.metric_interval_ms >= 5000
    error_message = "telemetry.metric_interval_ms must be at least 5000: Cloud Monitoring takes a point per series every 5 s at most."
  }
  validation {
    condition     = var.telemetry.trace_sample_ratio >= 0 && var.telemetry.trace_sample_ratio <= 1
    error_message = "telemetry.trace_sample_ratio must be between 0 and 1."
  }
}
