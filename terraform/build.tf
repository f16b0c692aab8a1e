# What Cloud Build needs to build and deploy Haishin (cloudbuild.yaml): the image registry and a
# bucket for the uploaded sources. The deployer service account is in iam.tf.

resource "google_artifact_registry_repository" "haishin" {
  #checkov:skip=CKV_GCP_84:Holds only Haishin's own images, built from its public source, with no data or secrets in them; Google-managed encryption at rest.
  repository_id = "haishin"
  location      = var.region
  format        = "DOCKER"
  description   = "Haishin service images, one per service, tagged with the Cloud Build id."

  # Every build pushes new tags, so a tag once pushed never moves.
  docker_config {
    immutable_tags = true
  }

  cleanup_policy_dry_run = false

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 20
    }
  }

  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      older_than = "7776000s"
    }
  }

  depends_on = [google_project_service.enabled]
}

# gcloud builds submit --gcs-source-staging-dir=gs://THIS_BUCKET/source uploads the sources here.
resource "google_storage_bucket" "build_sources" {
  #checkov:skip=CKV_GCP_62:Holds only source archives of this repository for a week; Cloud Audit Logs record access.
  #checkov:skip=CKV_GCP_78:Each build uploads a new archive under a new name; there is nothing to version.
  name                        = "${var.project_id}-haishin-build-sources"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true

  lifecycle_rule {
    condition {
      age = 7
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.enabled]
}
