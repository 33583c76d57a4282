# --- names ------------------------------------------------------------------------------------

variable "name" {
  description = "Prefix of every resource name (roles, key aliases, repositories, families, alarms)."
  type        = string
  default     = "mailflow"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name: lower-case letters, digits and '-', 2 to 31 characters."
  }
}

variable "bucket_name" {
  description = "Mail bucket in the receiving region (MAILFLOW_BUCKET). Globally unique."
  type        = string
}

variable "topic_name" {
  description = "SNS topic SES notifies after each stored mail (receiving region)."
  type        = string
  default     = "mailflow-inbound"
}

variable "queue_name" {
  description = "SQS queue the workers consume (MAILFLOW_QUEUE); its DLQ is named from it."
  type        = string
  default     = "mailflow-inbound"
}

variable "table_name" {
  description = "DynamoDB delivery ledger (MAILFLOW_TABLE)."
  type        = string
  default     = "mailflow-deliveries"
}

# --- SES receiving ------------------------------------------------------------------------------

variable "rule_set_name" {
  description = "SES receipt rule set, made the active one (an account has one active set per region)."
  type        = string
  default     = "mailflow"
}

variable "receipt_rules" {
  description = "One SES receipt rule per entry: rule name => recipient domains or addresses it takes."
  type        = map(list(string))
  validation {
    condition     = length(var.receipt_rules) > 0 && alltrue([for r in values(var.receipt_rules) : length(r) > 0])
    error_message = "receipt_rules: at least one rule, each with at least one recipient."
  }
}

variable "tls_policy" {
  description = "SES receipt rules: Require refuses mail from servers that do not use TLS."
  type        = string
  default     = "Require"
  validation {
    condition     = contains(["Require", "Optional"], var.tls_policy)
    error_message = "tls_policy: Require or Optional."
  }
}

# --- retention ----------------------------------------------------------------------------------

variable "processed_retention_days" {
  description = "Days a mail stays under processed/ before S3 expires it."
  type        = number
  default     = 90
}

variable "failed_retention_days" {
  description = "Days a mail stays under failed/ (long enough to investigate and retry)."
  type        = number
  default     = 365
}

variable "quarantine_retention_days" {
  description = "Days a mail stays under quarantine/ (virus verdicts)."
  type        = number
  default     = 30
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept (recovery window)."
  type        = number
  default     = 30
}

variable "log_retention_days" {
  description = "CloudWatch Logs retention of the worker and reconciler logs."
  type        = number
  default     = 365
}

# --- worker ---------------------------------------------------------------------------------

variable "max_attempts" {
  description = "MAILFLOW_MAX_ATTEMPTS: the queue's maxReceiveCount is derived from it."
  type        = number
  default     = 5
  validation {
    condition     = var.max_attempts >= 1 && var.max_attempts <= 100
    error_message = "max_attempts: 1 to 100 (Settings.max_attempts)."
  }
}

variable "secret_parameters" {
  description = "Environment variable => SSM SecureString parameter name, injected into the worker (and passed to the legacy script)."
  type        = map(string)
  default     = { LEGACY_DB_PASSWORD = "/mailflow/legacy/db-password" }
}

variable "metrics_namespace" {
  description = "CloudWatch namespace of the worker's EMF metrics (MAILFLOW_METRICS_NAMESPACE)."
  type        = string
  default     = "mailflow"
}

# --- ECS ------------------------------------------------------------------------------------

variable "create_cluster" {
  description = "Create the ECS cluster (with Container Insights, which scaling and alarms read). False: use an existing cluster named cluster_name, which must have Container Insights on."
  type        = bool
  default     = true
}

variable "cluster_name" {
  description = "ECS cluster of the worker service and the reconcile task."
  type        = string
  default     = "mailflow"
}

variable "service_name" {
  description = "ECS service of the workers (created by `ecspresso deploy`)."
  type        = string
  default     = "mailflow-worker"
}

variable "vpc_id" {
  description = "VPC of the tasks."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the tasks (with a NAT gateway or VPC endpoints for the AWS APIs)."
  type        = list(string)
  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "subnet_ids: at least one subnet."
  }
}

variable "worker_service_deployed" {
  description = "Set to true once `ecspresso deploy` has created the service: Application Auto Scaling can only register an existing service."
  type        = bool
  default     = false
}

variable "min_tasks" {
  description = "Fewest worker tasks (>= 1: backlog per task divides by the running task count)."
  type        = number
  default     = 1
  validation {
    condition     = var.min_tasks >= 1
    error_message = "min_tasks: at least 1."
  }
}

variable "max_tasks" {
  description = "Most worker tasks."
  type        = number
  default     = 10
}

variable "backlog_per_task_target" {
  description = "Target of the scaling policy: messages waiting per running task (acceptable latency / mean processing time x concurrency; docs/deploy.md)."
  type        = number
  default     = 96
}

variable "reconcile_schedule" {
  description = "EventBridge Scheduler expression of the reconcile pass."
  type        = string
  default     = "rate(5 minutes)"
}

variable "schedule_timezone" {
  description = "Time zone of cron() reconcile schedules."
  type        = string
  default     = "Asia/Tokyo"
}

variable "alarm_actions" {
  description = "ARNs (SNS topics) notified when an alarm fires or recovers."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = {}
}
