# Where everything lives, and the names derived from the code's own shapes (shapes.tf.json,
# generated from src/mailflow/aws/shapes.py: never spelled a second time here).

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "main" {}
data "aws_region" "ses" {
  provider = aws.ses
}

locals {
  account   = data.aws_caller_identity.current.account_id
  partition = data.aws_partition.current.partition
  region    = data.aws_region.main.name
  ses_region = data.aws_region.ses.name

  dlq_name = "${var.queue_name}${local.shapes.dlq_suffix}"
  # The same rule as Settings.max_receive_count: every receive counts, deferrals included.
  max_receive_count = max(local.shapes.min_receive_count, local.shapes.receives_per_attempt * var.max_attempts)

  # SES receipt rules of this rule set, for aws:SourceArn conditions.
  rule_arns = [
    for rule in keys(var.receipt_rules) :
    "arn:${local.partition}:ses:${local.ses_region}:${local.account}:receipt-rule-set/${var.rule_set_name}:receipt-rule/${var.name}-${rule}"
  ]
  rule_names = [for rule in keys(var.receipt_rules) : "${var.name}-${rule}"]

  archive_retention_days = {
    processed  = var.processed_retention_days
    failed     = var.failed_retention_days
    quarantine = var.quarantine_retention_days
  }

  worker_family    = "${var.name}-worker"
  reconcile_family = "${var.name}-reconcile"
  cluster_arn      = "arn:${local.partition}:ecs:${local.region}:${local.account}:cluster/${var.cluster_name}"
  log_group_name   = "/ecs/${var.name}"
  secret_parameter_arns = {
    for env, parameter in var.secret_parameters :
    env => "arn:${local.partition}:ssm:${local.region}:${local.account}:parameter${parameter}"
  }
  tags = merge({ service = var.name }, var.tags)
}
