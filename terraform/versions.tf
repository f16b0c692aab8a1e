terraform {
  required_version = ">= 1.9"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.50"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }

  # State holds the database password: keep it in a bucket only the SREs can read.
  # terraform init -backend-config="bucket=PROJECT-tfstate" -backend-config="prefix=haishin"
  backend "gcs" {}
}

provider "google" {
  project = var.project_id
  region  = var.region

  default_labels = {
    app = "haishin"
  }
}
