# Alarms and the dashboard (docs/operations.md says what to do when each fires).

locals {
  dlq_name_for_metrics = aws_sqs_queue.dlq.name
}

resource "aws_cloudwatch_metric_alarm" "dlq_not_empty" {
  alarm_name          = "${var.name}-dlq-not-empty"
  alarm_description   = "Notifications in ${aws_sqs_queue.dlq.name}: unparseable, untrusted or given up by SQS. Read the reason attribute, fix, then `mailflow redrive`."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.dlq.name }
  statistic           = "Maximum"
  period              = 300 # SQS publishes every 5 minutes at best for these
  evaluation_periods  = 1
  datapoints_to_alarm = 1
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = var.alarm_actions
  ok_actions          = var.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "oldest_message_age" {
  alarm_name          = "${var.name}-oldest-message-age"
  alarm_description   = "The oldest order mail in ${aws_sqs_queue.mail.name} has waited over 15 minutes: workers stalled, too few, or a retry storm."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  dimensions          = { QueueName = aws_sqs_queue.mail.name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  threshold           = 900
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = var.alarm_actions
  ok_actions          = var.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "failure_rate" {
  alarm_name          = "${var.name}-failure-rate"
  alarm_description   = "More than 5% of finished deliveries failed (3 of 3 five-minute periods): legacy script or routing trouble. `mailflow list --status failed`."
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  threshold           = 5
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching" # no deliveries, no rate
  alarm_actions       = var.alarm_actions
  ok_actions          = var.alarm_actions
  tags                = local.tags

  dynamic "metric_query" {
    # The EMF field of the worker's canonical outcome line (metrics.py), by status.
    for_each = toset(["failed", "succeeded"])
    content {
      id          = metric_query.value
      return_data = false
      metric {
        namespace   = var.metrics_namespace
        metric_name = "deliveries"
        dimensions  = { status = metric_query.value }
        period      = 300
        stat        = "Sum"
      }
    }
  }

  metric_query {
    id          = "failure_pct"
    label       = "failed deliveries, % of finished"
    expression  = "100 * FILL(failed, 0) / (FILL(failed, 0) + FILL(succeeded, 0))"
    return_data = true
  }
}

# The worker's heartbeat is its container health check (`mailflow check`): a stale one makes
# ECS replace the task, so a worker that keeps losing its heartbeat shows up as fewer running
# tasks than the service's minimum.
resource "aws_cloudwatch_metric_alarm" "no_healthy_worker" {
  alarm_name          = "${var.name}-no-healthy-worker"
  alarm_description   = "Fewer running worker tasks than the minimum for 5 minutes: heartbeats failing (health check), tasks crashing, or no capacity."
  namespace           = "ECS/ContainerInsights"
  metric_name         = "RunningTaskCount"
  dimensions          = { ClusterName = var.cluster_name, ServiceName = var.service_name }
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 5
  threshold           = var.min_tasks
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching" # no metric at all: no tasks reporting
  alarm_actions       = var.alarm_actions
  ok_actions          = var.alarm_actions
  tags                = local.tags
}

locals {
  # A metric line is [namespace, name, dimension, value, ..., {rendering options}].
  sqs_line = {
    for q in [aws_sqs_queue.mail.name, aws_sqs_queue.dlq.name] : q => {
      visible     = ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", q]
      not_visible = ["AWS/SQS", "ApproximateNumberOfMessagesNotVisible", "QueueName", q]
      oldest      = ["AWS/SQS", "ApproximateAgeOfOldestMessage", "QueueName", q]
    }
  }
  ecs_line = {
    for m in ["RunningTaskCount", "DesiredTaskCount", "CpuUtilized", "MemoryUtilized"] :
    m => ["ECS/ContainerInsights", m, "ClusterName", var.cluster_name, "ServiceName", var.service_name]
  }
  q = aws_sqs_queue.mail.name
  widget = {
    width  = 12
    height = 6
    type   = "metric"
  }
  widget_props = { region = local.region, view = "timeSeries", period = 60 }
}

resource "aws_cloudwatch_dashboard" "mailflow" {
  dashboard_name = var.name
  dashboard_body = jsonencode({
    widgets = [
      merge(local.widget, { x = 0, y = 0, properties = merge(local.widget_props, {
        title = "Queue: waiting and in flight"
        metrics = [
          concat(local.sqs_line[local.q].visible, [{ stat = "Maximum", label = "waiting" }]),
          concat(local.sqs_line[local.q].not_visible, [{ stat = "Maximum", label = "in flight / deferred" }]),
          concat(local.sqs_line[local.dlq_name_for_metrics].visible, [{ stat = "Maximum", label = "DLQ" }]),
        ]
      }) }),
      merge(local.widget, { x = 12, y = 0, properties = merge(local.widget_props, {
        title       = "Oldest message age (s)"
        metrics     = [concat(local.sqs_line[local.q].oldest, [{ stat = "Maximum", label = "oldest" }])]
        annotations = { horizontal = [{ label = "alarm", value = 900 }] }
      }) }),
      merge(local.widget, { x = 0, y = 6, properties = merge(local.widget_props, {
        title   = "Deliveries by outcome (per 5 min)"
        period  = 300
        stacked = true
        metrics = [
          for s in ["succeeded", "retrying", "failed"] :
          [var.metrics_namespace, "deliveries", "status", s, { stat = "Sum", label = s }]
        ]
      }) }),
      merge(local.widget, { x = 12, y = 6, properties = merge(local.widget_props, {
        title  = "Processor time and queue lag (ms)"
        period = 300
        metrics = [
          [var.metrics_namespace, "processor_ms", "status", "succeeded", { stat = "p50", label = "processor p50" }],
          [var.metrics_namespace, "processor_ms", "status", "succeeded", { stat = "p99", label = "processor p99" }],
          [var.metrics_namespace, "queue_lag_ms", "status", "succeeded", { stat = "p90", label = "queue lag p90" }],
        ]
      }) }),
      merge(local.widget, { x = 0, y = 12, properties = merge(local.widget_props, {
        title = "Tasks and backlog per task (scaling input)"
        metrics = [
          concat(local.ecs_line["RunningTaskCount"], [{ stat = "Average", id = "tasks", label = "running tasks" }]),
          concat(local.ecs_line["DesiredTaskCount"], [{ stat = "Average", label = "desired tasks" }]),
          concat(local.sqs_line[local.q].visible, [{ stat = "Sum", id = "visible", visible = false }]),
          [{ expression = "visible / tasks", label = "backlog per task (target ${var.backlog_per_task_target})", id = "backlog" }],
        ]
      }) }),
      merge(local.widget, { x = 12, y = 12, properties = merge(local.widget_props, {
        title = "Task CPU and memory"
        metrics = [
          concat(local.ecs_line["CpuUtilized"], [{ stat = "Average" }]),
          concat(local.ecs_line["MemoryUtilized"], [{ stat = "Average" }]),
        ]
      }) }),
    ]
  })
}
