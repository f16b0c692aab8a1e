# Cloud Scheduler runs the completion job (Cloud Run Admin API jobs.run) on its schedule.

resource "google_cloud_scheduler_job" "completion" {
  name             = "haishin-completion"
  description      = "Runs the completion job: confirms deliveries, writes logs, closes and expires requests."
  region           = var.region
  schedule         = var.completion.schedule
  time_zone        = "Etc/UTC"
  attempt_deadline = "30s"

  # A missed run is not retried: the next one follows within the schedule's interval.
  retry_config {
    retry_count = 0
  }

  http_target {
    http_method = "POST"
    uri         = "https://run.googleapis.com/v2/projects/${var.project_id}/locations/${var.region}/jobs/${google_cloud_run_v2_job.completion.name}:run"

    oauth_token {
      service_account_email = google_service_account.scheduler.email
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }

  depends_on = [google_cloud_run_v2_job_iam_member.scheduler]
}
