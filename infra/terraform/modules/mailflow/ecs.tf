# The ECS side that is not a release: cluster, log group, image repositories, the tasks'
# security group, auto scaling of the worker service, and the reconcile schedule. The service
# and the task definitions are ecspresso's (ecspresso/), fed by this module's outputs.

resource "aws_ecs_cluster" "this" {
  count = var.create_cluster ? 1 : 0
  name  = var.cluster_name
  # Scaling (backlog per task) and the no-healthy-worker alarm read RunningTaskCount from here.
  setting {
    name  = "containerInsights"
    value = "enabled"
  }
  tags = local.tags
}

resource "aws_cloudwatch_log_group" "tasks" {
  name              = local.log_group_name
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
  tags              = local.tags
}

resource "aws_ecr_repository" "image" {
  for_each = toset(["worker", "php"])
  name     = "${var.name}-${each.key}"
  # A tag is a release: it never moves (ecspresso deploys by tag, see MAILFLOW_IMAGE_TAG).
  image_tag_mutability = "IMMUTABLE"
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.main.arn
  }
  tags = local.tags
}

resource "aws_ecr_lifecycle_policy" "image" {
  for_each   = aws_ecr_repository.image
  repository = each.value.name
  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Untagged layers of superseded pushes"
      selection    = { tagStatus = "untagged", countType = "sinceImagePushed", countUnit = "days", countNumber = 14 }
      action       = { type = "expire" }
    }]
  })
}

resource "aws_security_group" "tasks" {
  #checkov:skip=CKV2_AWS_5:Attached outside Terraform: ecspresso's service definition and the reconcile schedule use it (output security_group_ids).
  name        = "${var.name}-tasks"
  description = "mailflow worker and reconcile tasks: no inbound, HTTPS out to the AWS APIs"
  vpc_id      = var.vpc_id
  tags        = local.tags
}

resource "aws_vpc_security_group_egress_rule" "https" {
  security_group_id = aws_security_group.tasks.id
  description       = "AWS APIs (SQS, S3, DynamoDB, KMS, ECR, logs) over NAT or VPC endpoints"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

# --- auto scaling on backlog per task --------------------------------------------------------------
# Application Auto Scaling owns the service's desired count; ecspresso's service definition
# has no desiredCount, so a deploy never resets it.

resource "aws_appautoscaling_target" "worker" {
  count              = var.worker_service_deployed ? 1 : 0
  service_namespace  = "ecs"
  resource_id        = "service/${var.cluster_name}/${var.service_name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.min_tasks
  max_capacity       = var.max_tasks
}

resource "aws_appautoscaling_policy" "backlog_per_task" {
  count              = var.worker_service_deployed ? 1 : 0
  name               = "${var.name}-sqs-backlog-per-task"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.worker[0].service_namespace
  resource_id        = aws_appautoscaling_target.worker[0].resource_id
  scalable_dimension = aws_appautoscaling_target.worker[0].scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value = var.backlog_per_task_target
    # Out fast (mail is waiting), in slowly (a drain costs up to stopTimeout per task).
    scale_out_cooldown = 60
    scale_in_cooldown  = 300
    disable_scale_in   = false

    customized_metric_specification {
      metrics {
        id          = "visible"
        label       = "messages waiting"
        return_data = false
        metric_stat {
          stat = "Sum"
          metric {
            namespace   = "AWS/SQS"
            metric_name = "ApproximateNumberOfMessagesVisible"
            dimensions {
              name  = "QueueName"
              value = aws_sqs_queue.mail.name
            }
          }
        }
      }
      metrics {
        id          = "tasks"
        label       = "running tasks"
        return_data = false
        metric_stat {
          stat = "Average"
          metric {
            namespace   = "ECS/ContainerInsights"
            metric_name = "RunningTaskCount"
            dimensions {
              name  = "ClusterName"
              value = var.cluster_name
            }
            dimensions {
              name  = "ServiceName"
              value = var.service_name
            }
          }
        }
      }
      metrics {
        id          = "backlog_per_task"
        label       = "backlog per task"
        expression  = "visible / tasks"
        return_data = true
      }
    }
  }
}

# --- the reconcile pass, every few minutes ------------------------------------------------------
# The task definition ARN has no revision: RunTask takes the latest ACTIVE one, so
# `ecspresso register --config ecspresso/reconcile.yml` is all a release needs.

resource "aws_scheduler_schedule" "reconcile" {
  #checkov:skip=CKV_AWS_297:The schedule holds no data worth a customer managed key: an expression, ARNs and subnet/security group ids, no payload or secret.
  name                         = "${var.name}-reconcile"
  description                  = "mailflow reconcile: archive finished mail, re-enqueue lost or stuck work, adopt orphans"
  schedule_expression          = var.reconcile_schedule
  schedule_expression_timezone = var.schedule_timezone
  state                        = "ENABLED"

  flexible_time_window {
    mode = "OFF"
  }

  target {
    arn      = local.cluster_arn
    role_arn = aws_iam_role.scheduler.arn

    ecs_parameters {
      task_definition_arn     = "arn:${local.partition}:ecs:${local.region}:${local.account}:task-definition/${local.reconcile_family}"
      task_count              = 1
      launch_type             = "FARGATE"
      platform_version        = "LATEST"
      enable_ecs_managed_tags = true
      propagate_tags          = "TASK_DEFINITION"
      network_configuration {
        subnets          = var.subnet_ids
        security_groups  = [aws_security_group.tasks.id]
        assign_public_ip = false
      }
    }

    # A missed pass is harmless (the next one does the work); do not pile them up.
    retry_policy {
      maximum_event_age_in_seconds = 240
      maximum_retry_attempts       = 2
    }
  }
}
