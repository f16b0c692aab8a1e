# Secret Manager: the database URL (written by Terraform) and the ESP's API key (written by an
# SRE, so it never enters Terraform's state; see docs/deploy.md).

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

# Add the key with: gcloud secrets versions add haishin-esp-api-key --data-file=-
resource "google_secret_manager_secret" "esp_api_key" {
  secret_id = "haishin-esp-api-key"

  replication {
    auto {}
  }

  depends_on = [google_project_service.enabled]
}
