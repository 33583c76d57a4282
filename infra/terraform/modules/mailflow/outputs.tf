# Everything ecspresso needs, as one object: the example root re-exports it as the output
# `mailflow`, and ecspresso/mailflow.libsonnet reads it with the tfstate plugin
# (`std.native('tfstate')('output.mailflow')`). Nothing is copied by hand.

output "ecspresso" {
  description = "Names and ARNs the ecspresso definitions (ecspresso/mailflow.libsonnet) read."
  value = {
    region            = local.region
    receiving_region  = local.ses_region
    account_id        = local.account
    cluster           = var.cluster_name
    service           = var.service_name
    subnets           = var.subnet_ids
    security_groups   = [aws_security_group.tasks.id]
    bucket            = aws_s3_bucket.mail.id
    bucket_region     = local.ses_region
    incoming_prefix   = local.shapes.incoming_prefix
    queue             = aws_sqs_queue.mail.name
    queue_url         = aws_sqs_queue.mail.url
    dlq               = aws_sqs_queue.dlq.name
    max_receive_count = local.max_receive_count
    max_attempts      = var.max_attempts
    table             = aws_dynamodb_table.ledger.name
    mail_kms_key_arn  = aws_kms_key.mail.arn
    log_group         = aws_cloudwatch_log_group.tasks.name
    metrics_namespace = var.metrics_namespace
    worker_family     = local.worker_family
    reconcile_family  = local.reconcile_family
    worker_task_role_arn    = aws_iam_role.worker_task.arn
    reconcile_task_role_arn = aws_iam_role.reconcile_task.arn
    execution_role_arn      = aws_iam_role.execution.arn
    worker_repository_url   = aws_ecr_repository.image["worker"].repository_url
    php_repository_url      = aws_ecr_repository.image["php"].repository_url
    secret_parameter_arns   = local.secret_parameter_arns
  }
}

output "topic_arn" {
  description = "SNS topic SES notifies (receiving region)."
  value       = aws_sns_topic.mail.arn
}

output "rule_set_name" {
  description = "The active SES receipt rule set."
  value       = aws_ses_receipt_rule_set.mail.rule_set_name
}

output "ecspresso_env" {
  description = "Shell lines that set where ecspresso deploys (its config file is read before plugins load): eval \"$(terraform output -raw ecspresso_env)\"."
  value       = "export AWS_REGION=${local.region} ECS_CLUSTER=${var.cluster_name} MAILFLOW_SERVICE=${var.service_name}\n"
}
