# Provider-free on purpose: this module uses only Terraform's built-in terraform_data, so its
# rules can be planned and tested anywhere, with no cloud credentials and no provider download.
terraform {
  required_version = ">= 1.9"
}
