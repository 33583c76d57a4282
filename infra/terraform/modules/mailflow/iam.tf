# The four roles and their least-privilege policies: the only definition of them (ecspresso
# reads the role ARNs from this module's outputs).

data "aws_iam_policy_document" "ecs_tasks_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account]
    }
  }
}

locals {
  bucket_arn = aws_s3_bucket.mail.arn
  # SES encrypts each mail with this context; a decrypt outside it is refused.
  ses_encryption_context = {
    "kms:EncryptionContext:aws:ses:source-account" = [local.account]
    "kms:EncryptionContext:aws:ses:rule-name"      = local.rule_names
  }
}

# --- worker ---------------------------------------------------------------------------------
# Exactly the calls the worker makes, on exactly its resources. No sns:Publish (only the SES
# emulator publishes), no s3:PutObject/DeleteObject (archiving is the reconciler's job), no
# dynamodb:PutItem/DeleteItem (every write is a conditional UpdateItem; TTL deletes).

resource "aws_iam_role" "worker_task" {
  name               = "${var.name}-worker-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_trust.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "worker_task" {
  name   = "${var.name}-worker"
  role   = aws_iam_role.worker_task.id
  policy = data.aws_iam_policy_document.worker_task.json
}

data "aws_iam_policy_document" "worker_task" {
  statement {
    sid = "ConsumeTheQueue"
    # ChangeMessageVisibilityBatch and DeleteMessageBatch are authorised by the non-batch
    # actions: SQS has no separate IAM action for them.
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueUrl",
      "sqs:GetQueueAttributes",
    ]
    resources = [aws_sqs_queue.mail.arn]
  }

  statement {
    sid       = "DeadLetterBadNotifications"
    actions   = ["sqs:SendMessage", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.dlq.arn]
  }

  statement {
    sid       = "ReadIncomingMail"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/${local.shapes.incoming_prefix}*"]
  }

  statement {
    # Without ListBucket, GetObject on a missing key answers 403 instead of 404, and the
    # worker could not tell "not there (yet)" (retry) from "not allowed" (a real error).
    sid       = "TellMissingFromForbidden"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
  }

  statement {
    sid       = "DecryptMailStoredBySes"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.mail.arn]
    dynamic "condition" {
      for_each = local.ses_encryption_context
      content {
        test     = "StringEquals"
        variable = condition.key
        values   = condition.value
      }
    }
    # SES binds every data key to one mail: a context without a message id is not SES's.
    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:aws:ses:message-id"
      values   = ["false"]
    }
  }

  statement {
    sid       = "DeliveryLedger"
    actions   = ["dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:Query"]
    resources = [aws_dynamodb_table.ledger.arn]
  }
}

# --- reconciler -------------------------------------------------------------------------------
# Archive moves (copy under processed/ failed/ quarantine/, verify, delete the original),
# re-enqueue, orphan scan of incoming/. It never receives or deletes queue messages.

resource "aws_iam_role" "reconcile_task" {
  name               = "${var.name}-reconcile-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_trust.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "reconcile_task" {
  name   = "${var.name}-reconcile"
  role   = aws_iam_role.reconcile_task.id
  policy = data.aws_iam_policy_document.reconcile_task.json
}

data "aws_iam_policy_document" "reconcile_task" {
  statement {
    sid       = "ReadAndRemoveIncoming"
    actions   = ["s3:GetObject", "s3:DeleteObject"]
    resources = ["${local.bucket_arn}/${local.shapes.incoming_prefix}*"]
  }

  statement {
    # CopyObject needs GetObject on the source and PutObject on the target; the verify step
    # reads the copy back (HeadObject is authorised by GetObject).
    sid       = "WriteArchives"
    actions   = ["s3:PutObject", "s3:GetObject"]
    resources = [for prefix in values(local.shapes.archive_prefixes) : "${local.bucket_arn}/${prefix}*"]
  }

  statement {
    sid       = "ScanIncoming"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
  }

  statement {
    # The orphan scan reads the headers of mail that never got a notification.
    sid       = "DecryptMailStoredBySes"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.mail.arn]
    dynamic "condition" {
      for_each = local.ses_encryption_context
      content {
        test     = "StringEquals"
        variable = condition.key
        values   = condition.value
      }
    }
    # SES binds every data key to one mail: a context without a message id is not SES's.
    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:aws:ses:message-id"
      values   = ["false"]
    }
  }

  statement {
    sid       = "ReEnqueue"
    actions   = ["sqs:SendMessage", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.mail.arn]
  }

  statement {
    # PutItem: the orphan scan records a mail that never got a notification (conditional on
    # the item not existing).
    sid       = "DeliveryLedger"
    actions   = ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query"]
    resources = [aws_dynamodb_table.ledger.arn, "${aws_dynamodb_table.ledger.arn}/index/${local.shapes.attention_index}"]
  }
}

# --- task execution (used by ECS, not by mailflow) ----------------------------------------------
# Pull the images, write the awslogs streams, resolve the `secrets` parameters at task start.

resource "aws_iam_role" "execution" {
  name               = "${var.name}-task-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_trust.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "execution" {
  name   = "${var.name}-task-execution"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution.json
}

data "aws_iam_policy_document" "execution" {
  statement {
    sid       = "EcrLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # this action has no resource-level permissions
  }

  statement {
    sid       = "PullImages"
    actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
    resources = [for repo in aws_ecr_repository.image : repo.arn]
  }

  statement {
    sid       = "WriteLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.tasks.arn}:log-stream:*"]
  }

  dynamic "statement" {
    for_each = length(var.secret_parameters) > 0 ? [1] : []
    content {
      sid       = "ReadSecrets"
      actions   = ["ssm:GetParameters"]
      resources = values(local.secret_parameter_arns)
    }
  }
}

# --- scheduler: starts the reconcile task -------------------------------------------------------

resource "aws_iam_role" "scheduler" {
  name               = "${var.name}-reconcile-scheduler"
  assume_role_policy = data.aws_iam_policy_document.scheduler_trust.json
  tags               = local.tags
}

data "aws_iam_policy_document" "scheduler_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["scheduler.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account]
    }
  }
}

resource "aws_iam_role_policy" "scheduler" {
  name   = "${var.name}-reconcile-scheduler"
  role   = aws_iam_role.scheduler.id
  policy = data.aws_iam_policy_document.scheduler.json
}

data "aws_iam_policy_document" "scheduler" {
  statement {
    sid       = "RunReconcileTask"
    actions   = ["ecs:RunTask"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account}:task-definition/${local.reconcile_family}:*"]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [local.cluster_arn]
    }
  }

  statement {
    sid       = "TagTheTask" # EnableECSManagedTags / PropagateTags tag the task at launch
    actions   = ["ecs:TagResource"]
    resources = ["arn:${local.partition}:ecs:${local.region}:${local.account}:task/${var.cluster_name}/*"]
    condition {
      test     = "StringEquals"
      variable = "ecs:CreateAction"
      values   = ["RunTask"]
    }
  }

  statement {
    sid       = "PassTheTaskRoles"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.reconcile_task.arn, aws_iam_role.execution.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }
}
