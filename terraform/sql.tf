# Cloud SQL for PostgreSQL: the requests and chunks and their states. Private IP only, TLS
# required; the services reach it through Direct VPC egress (run.tf).

locals {
  # Connections the services and the job may open at most: each instance's pool times its
  # largest instance count. A job run can overlap the next one, so it counts twice.
  database_connections = (
    var.trigger.max_instances * var.trigger.db_connections
    + var.list_uploader.max_instances * var.list_uploader.db_connections
    + var.sender.max_instances * var.sender.db_connections
    + var.unsubscribe.max_instances * var.unsubscribe.db_connections
    + 2 * var.completion.db_connections
  )
}

resource "google_sql_database_instance" "haishin" {
  #checkov:skip=CKV_GCP_6:ssl_mode ENCRYPTED_ONLY refuses every unencrypted connection, which is what this check asks; checkov recognises only TRUSTED_CLIENT_CERTIFICATE_REQUIRED, which would add client certificates on top of a password that only Haishin's service accounts can read, on an instance with no public address.
  name   = "haishin"
  region = var.region
  # A major-version upgrade is a planned operation (gcloud sql instances patch --database-version).
  database_version    = "POSTGRES_18"
  deletion_protection = var.deletion_protection

  settings {
    edition                     = "ENTERPRISE"
    tier                        = var.sql.tier
    availability_type           = var.sql.availability_type
    disk_type                   = "PD_SSD"
    disk_size                   = var.sql.disk_size_gb
    disk_autoresize             = true
    deletion_protection_enabled = var.deletion_protection

    ip_configuration {
      ipv4_enabled    = false
      private_network = google_compute_network.haishin.id
      ssl_mode        = "ENCRYPTED_ONLY"
    }

    backup_configuration {
      enabled                        = true
      start_time                     = "18:00"
      point_in_time_recovery_enabled = true
      transaction_log_retention_days = 7

      backup_retention_settings {
        retained_backups = 14
      }
    }

    maintenance_window {
      day          = 7
      hour         = 18
      update_track = "stable"
    }

    insights_config {
      query_insights_enabled = true
    }

    database_flags {
      name  = "max_connections"
      value = var.sql.max_connections
    }

    # Logging that a security review expects of a PostgreSQL server.
    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
    database_flags {
      name  = "log_duration"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "warning"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
  }

  lifecycle {
    precondition {
      condition     = local.database_connections <= var.sql.max_connections - 10
      error_message = "The services could open ${local.database_connections} database connections (max_instances × db_connections, summed), more than sql.max_connections (${var.sql.max_connections}) less 10 kept for administration. Raise sql.max_connections (and the tier) or lower db_connections."
    }
  }

  depends_on = [google_service_networking_connection.google_services]
}

resource "google_sql_database" "haishin" {
  name     = "haishin"
  instance = google_sql_database_instance.haishin.name
}

resource "random_password" "database" {
  length  = 32
  special = false
}

resource "google_sql_user" "haishin" {
  name     = "haishin"
  instance = google_sql_database_instance.haishin.name
  password = random_password.database.result
}
