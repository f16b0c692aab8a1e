# BigQuery: delivery logs (one row per chunk) and request summaries (one row per finished
# request), written by the completion job. Column lists live in schemas/.

resource "google_bigquery_dataset" "haishin" {
  #checkov:skip=CKV_GCP_81:Rows hold counts, states and labels, never recipient addresses; Google-managed encryption at rest.
  dataset_id                 = "haishin"
  friendly_name              = "Haishin delivery logs"
  description                = "Delivery logs and request summaries written by Haishin's completion job."
  location                   = local.data_location
  delete_contents_on_destroy = false

  depends_on = [google_project_service.enabled]
}

resource "google_bigquery_table" "deliveries" {
  #checkov:skip=CKV_GCP_80:Rows hold counts, states and labels, never recipient addresses; Google-managed encryption at rest.
  dataset_id          = google_bigquery_dataset.haishin.dataset_id
  table_id            = "deliveries"
  description         = "One row per finished chunk."
  deletion_protection = var.deletion_protection
  schema              = file("${path.module}/schemas/deliveries.json")
  clustering          = ["request_id"]

  time_partitioning {
    type  = "DAY"
    field = "completed_at"
  }
}

resource "google_bigquery_table" "requests" {
  #checkov:skip=CKV_GCP_80:Rows hold counts, states and labels, never recipient addresses; Google-managed encryption at rest.
  dataset_id          = google_bigquery_dataset.haishin.dataset_id
  table_id            = "requests"
  description         = "One summary row per finished request."
  deletion_protection = var.deletion_protection
  schema              = file("${path.module}/schemas/requests.json")
  clustering          = ["request_id"]

  time_partitioning {
    type  = "DAY"
    field = "finished_at"
  }
}
