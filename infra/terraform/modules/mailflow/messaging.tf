# SES -> SNS topic (receiving region) -> SQS queue + DLQ (main region).

resource "aws_sns_topic" "mail" {
  provider          = aws.ses
  name              = var.topic_name
  kms_master_key_id = aws_kms_key.topic.arn
  tags              = local.tags
}

resource "aws_sns_topic_policy" "mail" {
  provider = aws.ses
  arn      = aws_sns_topic.mail.arn
  policy   = data.aws_iam_policy_document.topic.json
}

data "aws_iam_policy_document" "topic" {
  statement {
    sid       = "SesPublishesForThisAccountsRules"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.mail.arn]
    principals {
      type        = "Service"
      identifiers = ["ses.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = local.rule_arns
    }
  }
}

resource "aws_sqs_queue" "dlq" {
  name                      = local.dlq_name
  message_retention_seconds = local.shapes.queue_retention_s
  sqs_managed_sse_enabled   = true
  tags                      = local.tags
}

resource "aws_sqs_queue" "mail" {
  name                       = var.queue_name
  visibility_timeout_seconds = local.shapes.visibility_timeout_s
  receive_wait_time_seconds  = local.shapes.wait_time_s
  message_retention_seconds  = local.shapes.queue_retention_s
  sqs_managed_sse_enabled    = true
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dlq.arn
    maxReceiveCount     = local.max_receive_count
  })
  tags = local.tags
}

# Only the mail queue may dead-letter into the DLQ.
resource "aws_sqs_queue_redrive_allow_policy" "dlq" {
  queue_url = aws_sqs_queue.dlq.id
  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.mail.arn]
  })
}

resource "aws_sqs_queue_policy" "mail" {
  queue_url = aws_sqs_queue.mail.id
  policy    = data.aws_iam_policy_document.queue.json
}

data "aws_iam_policy_document" "queue" {
  statement {
    sid       = "TopicToQueue"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.mail.arn]
    principals {
      type        = "Service"
      identifiers = ["sns.amazonaws.com"]
    }
    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = [aws_sns_topic.mail.arn]
    }
  }
}

# Created in the topic's region; the queue is in the main region (SNS delivers across regions).
resource "aws_sns_topic_subscription" "mail" {
  provider  = aws.ses
  topic_arn = aws_sns_topic.mail.arn
  protocol  = "sqs"
  endpoint  = aws_sqs_queue.mail.arn
  # The worker reads the SNS envelope (its MessageId, the SES notification inside).
  raw_message_delivery = false
  depends_on           = [aws_sqs_queue_policy.mail]
}
