variable "environment" {
  description = "Environment tag (production, staging, ...)."
  type        = string
  default     = "production"
}

variable "region" {
  description = "Main region: queue, table, ECS, logs."
  type        = string
  default     = "ap-northeast-1"
}

variable "ses_region" {
  description = "SES receiving region: receipt rules, mail bucket, its key, the topic (SES receives email in a few regions only)."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Mail bucket (globally unique)."
  type        = string
}

variable "receipt_rules" {
  description = "Rule name => recipient domains/addresses."
  type        = map(list(string))
}

variable "tls_policy" {
  description = "Require or Optional."
  type        = string
  default     = "Require"
}

variable "vpc_id" {
  description = "VPC of the tasks."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the tasks."
  type        = list(string)
}

variable "max_attempts" {
  description = "Worker attempts per delivery; the queue's maxReceiveCount follows from it."
  type        = number
  default     = 5
}

variable "worker_service_deployed" {
  description = "True after the first `ecspresso deploy` created the service (enables auto scaling)."
  type        = bool
  default     = false
}

variable "alarm_actions" {
  description = "SNS topics notified by the alarms."
  type        = list(string)
  default     = []
}
