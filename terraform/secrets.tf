# Secret Manager: the database URL and the unsubscribe key (written by Terraform) and the mail provider's credentials
# (written by an SRE, so they never enter Terraform's state; see docs/deploy.md). A provider's
# credentials are read only when it is the chosen one (run.tf); the SMTP password and the AWS
# access key exist only for their provider.

resource "google_secret_manager_secret" "database_url" {
  secret_id = "haishin-database-url"

  replication {
    auto {}
  }

  depends_on = [google_project_service.enabled]
}

resource "google_secret_manager_secret_version" "database_url" {
  secret = google_secret_manager_secret.database_url.id
  # sqlx's connection URL: TCP to the private address, TLS required (the instance refuses
  # unencrypted connections).
  secret_data = "postgres://${google_sql_user.haishin.name}:${random_password.database.result}@${google_sql_database_instance.haishin.private_ip_address}:5432/${google_sql_database.haishin.name}?sslmode=require"
}

# The key unsubscribe tokens are signed with (the sender) and checked with (the trigger and the
# public entry). Generated here, so that a deployment works from its first apply; replacing it
# (terraform apply -replace=random_password.unsubscribe) makes every link already sent invalid.
resource "random_password" "unsubscribe" {
  length  = 64
  special = false
}

resource "google_secret_manager_secret" "unsubscribe" {
  secret_id = "haishin-unsubscribe-secret"

  replication {
    auto {}
  }

  depends_on = [google_project_service.enabled]
}

resource "google_secret_manager_secret_version" "unsubscribe" {
  secret      = google_secret_manager_secret.unsubscribe.id
  secret_data = random_password.unsubscribe.result
}

# list-send. Add the key with: gcloud secrets versions add haishin-esp-api-key --data-file=-
resource "google_secret_manager_secret" "esp_api_key" {
  secret_id = "haishin-esp-api-key"

  replication {
    auto {}
  }

  depends_on = [google_project_service.enabled]
}

# The message providers' credentials, each created only for the provider that uses it. Add
# each with: gcloud secrets versions add SECRET_ID --data-file=-
locals {
  provider_secret_ids = {
    smtp = ["haishin-smtp-password"]
    ses  = ["haishin-aws-access-key-id", "haishin-aws-secret-access-key"]
  }
}

resource "google_secret_manager_secret" "provider" {
  for_each = toset(lookup(local.provider_secret_ids, var.esp_provider, []))

  secret_id = each.key

  replication {
    auto {}
  }

  depends_on = [google_project_service.enabled]
}
