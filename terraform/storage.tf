# The bucket for audience exports (BigQuery EXPORT DATA output) and chunk objects. Both hold
# recipient addresses and are only working copies: exports are deleted after
# audience_export_retention_days, everything after chunk_retention_days, and nothing is kept once
# deleted.

resource "google_storage_bucket" "audiences" {
  #checkov:skip=CKV_GCP_62:Access is recorded by Cloud Audit Logs; usage-log buckets are a legacy mechanism and would hold a second copy of object names that include request ids.
  #checkov:skip=CKV_GCP_78:Versioning would keep recipient lists past chunk_retention_days; objects are working copies that the trigger rebuilds from the request's audience.
  name                        = "${var.project_id}-haishin-audiences"
  location                    = local.data_location
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  soft_delete_policy {
    retention_duration_seconds = 0
  }

  lifecycle_rule {
    condition {
      age = var.chunk_retention_days
    }
    action {
      type = "Delete"
    }
  }

  # BigQuery audience exports, requests/<id>/export/*.json, and the partitions of audiences
  # prepared in parts, requests/<id>/parts/*/*.json, go sooner: they are read once, while their
  # request is prepared. A prefix cannot hold a wildcard, so the rule takes everything under
  # requests/ that ends .json: those alone, since chunk objects end .ndjson (tests in
  # shared/src/domain/bigquery.rs and the trigger's prepare/parts keep them apart).
  lifecycle_rule {
    condition {
      age            = var.audience_export_retention_days
      matches_prefix = ["requests/"]
      matches_suffix = [".json"]
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      age = 1
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  depends_on = [google_project_service.enabled]
}
