# mailflow's receiving architecture, as the seed runs it: SES receives in us-east-1, everything
# else runs in ap-northeast-1. Apply through pull requests (Atlantis: atlantis.yaml at the
# repository root plans this directory on every PR), then deploy the ECS side with ecspresso.
#
#   cp terraform.tfvars.example terraform.tfvars   # and edit
#   terraform init && terraform plan -out plan && terraform apply plan

terraform {
  required_version = ">= 1.10.0, < 2.0.0" # use_lockfile (S3-native state locking)

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.60, < 7.0"
    }
  }

  # ecspresso reads this state (its tfstate plugin, MAILFLOW_TFSTATE_URL=s3://BUCKET/KEY).
  # The state bucket is the one thing made before this root: it cannot hold its own state.
  backend "s3" {
    bucket       = "example-terraform-state"
    key          = "mailflow/production.tfstate"
    region       = "ap-northeast-1"
    encrypt      = true
    use_lockfile = true
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = { service = "mailflow", environment = var.environment }
  }
}

provider "aws" {
  alias  = "ses"
  region = var.ses_region
  default_tags {
    tags = { service = "mailflow", environment = var.environment }
  }
}

module "mailflow" {
  source = "../../modules/mailflow"
  providers = {
    aws     = aws
    aws.ses = aws.ses
  }

  bucket_name             = var.bucket_name
  receipt_rules           = var.receipt_rules
  tls_policy              = var.tls_policy
  vpc_id                  = var.vpc_id
  subnet_ids              = var.subnet_ids
  max_attempts            = var.max_attempts
  worker_service_deployed = var.worker_service_deployed
  alarm_actions           = var.alarm_actions
}

output "mailflow" {
  description = "Read by ecspresso (ecspresso/mailflow.libsonnet): `tfstate('output.mailflow')`."
  value       = module.mailflow.ecspresso
}

output "ecspresso_env" {
  description = "eval \"$(terraform output -raw ecspresso_env)\" before running ecspresso."
  value       = module.mailflow.ecspresso_env
}
