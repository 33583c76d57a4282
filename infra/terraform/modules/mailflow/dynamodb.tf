# The delivery ledger: one item per (mail, recipient), the attention index of what needs a
# look, and TTL on finished deliveries.

resource "aws_dynamodb_table" "ledger" {
  name         = var.table_name
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = local.shapes.hash_key
  range_key    = local.shapes.range_key

  dynamic "attribute" {
    for_each = local.shapes.key_types
    content {
      name = attribute.key
      type = attribute.value
    }
  }

  global_secondary_index {
    name            = local.shapes.attention_index
    hash_key        = local.shapes.attention_hash_key
    range_key       = local.shapes.attention_range_key
    projection_type = "ALL"
  }

  ttl {
    enabled        = true
    attribute_name = local.shapes.ttl_attribute
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = aws_kms_key.main.arn
  }

  deletion_protection_enabled = true
  tags                        = local.tags
}

resource "aws_kms_key" "main" {
  description             = "${var.name}: data at rest in the main region (ledger, logs)"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.main_key.json
  tags                    = local.tags
}

resource "aws_kms_alias" "main" {
  name          = "alias/${var.name}-main"
  target_key_id = aws_kms_key.main.key_id
}

data "aws_iam_policy_document" "main_key" {
  #checkov:skip=CKV_AWS_109:A key policy's Resource is always "*" (this key); administration stays with the account.
  #checkov:skip=CKV_AWS_111:Same: "*" in a key policy means this key only.
  #checkov:skip=CKV_AWS_356:Same: "*" in a key policy means this key only.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account}:root"]
    }
  }

  statement {
    # Callers that DynamoDB itself authorises (the task roles) use the key through DynamoDB only.
    sid       = "UseThroughDynamoDb"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey", "kms:CreateGrant"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.worker_task.arn, aws_iam_role.reconcile_task.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["dynamodb.${local.region}.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "kms:CallerAccount"
      values   = [local.account]
    }
  }

  statement {
    # CloudWatch Logs encrypts the task log group with this key, for that log group only.
    sid       = "LogsEncryptTheTaskLogs"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${local.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnEquals"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${local.region}:${local.account}:log-group:${local.log_group_name}"]
    }
  }
}
