# A private network for the database: Cloud SQL has only a private address, which the services
# and the job reach through Direct VPC egress into their own subnet.

resource "google_compute_network" "haishin" {
  name                    = "haishin"
  auto_create_subnetworks = false

  depends_on = [google_project_service.enabled]
}

resource "google_compute_subnetwork" "run" {
  name                     = "haishin-run"
  region                   = var.region
  network                  = google_compute_network.haishin.id
  ip_cidr_range            = var.run_subnet_cidr
  private_ip_google_access = true

  log_config {
    aggregation_interval = "INTERVAL_5_SEC"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Nothing in this network accepts connections from outside it; Cloud Run only connects out.
resource "google_compute_firewall" "deny_ingress" {
  name      = "haishin-deny-all-ingress"
  network   = google_compute_network.haishin.id
  direction = "INGRESS"
  priority  = 65534

  deny {
    protocol = "all"
  }

  source_ranges = ["0.0.0.0/0"]

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# The range Google's services (Cloud SQL) take their private addresses from.
resource "google_compute_global_address" "google_services" {
  name          = "haishin-google-services"
  purpose       = "VPC_PEERING"
  address_type  = "INTERNAL"
  prefix_length = 20
  network       = google_compute_network.haishin.id
}

resource "google_service_networking_connection" "google_services" {
  network                 = google_compute_network.haishin.id
  service                 = "servicenetworking.googleapis.com"
  reserved_peering_ranges = [google_compute_global_address.google_services.name]
}
