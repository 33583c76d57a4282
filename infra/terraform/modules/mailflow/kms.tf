# The mail key (receiving region): SES encrypts each stored mail with it (the S3 action's
# client-side encryption); the worker and the reconciler decrypt, and nothing else does.
# Every use is bound to this account and this rule set's rules by the encryption context SES
# writes (aws:ses:source-account, aws:ses:rule-name).

resource "aws_kms_key" "mail" {
  provider                = aws.ses
  description             = "${var.name}: mail stored by SES receipt rules"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.mail_key.json
  tags                    = local.tags
}

resource "aws_kms_alias" "mail" {
  provider      = aws.ses
  name          = "alias/${var.name}-mail"
  target_key_id = aws_kms_key.mail.key_id
}

data "aws_iam_policy_document" "mail_key" {
  #checkov:skip=CKV_AWS_109:A key policy's Resource is always "*" (this key); administration stays with the account, as AWS's default key policy does, or the key would be unmanageable.
  #checkov:skip=CKV_AWS_111:Same: "*" in a key policy means this key only; writes are limited to the account's administrators.
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
    sid       = "SesEncryptsThisAccountsMail"
    actions   = ["kms:Encrypt", "kms:GenerateDataKey*"]
    resources = ["*"]
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
    condition {
      test     = "StringEquals"
      variable = "kms:EncryptionContext:aws:ses:source-account"
      values   = [local.account]
    }
    condition {
      test     = "StringEquals"
      variable = "kms:EncryptionContext:aws:ses:rule-name"
      values   = local.rule_names
    }
  }

  statement {
    sid       = "WorkersDecryptThisAccountsMail"
    actions   = ["kms:Decrypt"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.worker_task.arn, aws_iam_role.reconcile_task.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "kms:EncryptionContext:aws:ses:source-account"
      values   = [local.account]
    }
    condition {
      test     = "StringEquals"
      variable = "kms:EncryptionContext:aws:ses:rule-name"
      values   = local.rule_names
    }
    condition {
      test     = "Null"
      variable = "kms:EncryptionContext:aws:ses:message-id"
      values   = ["false"]
    }
  }
}

# The topic key (receiving region): SES publishes to an encrypted topic, so it must be able to
# use the topic's key. A key of its own, so that this grant never reaches the mail key.
resource "aws_kms_key" "topic" {
  provider                = aws.ses
  description             = "${var.name}: SES notifications topic"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.topic_key.json
  tags                    = local.tags
}

resource "aws_kms_alias" "topic" {
  provider      = aws.ses
  name          = "alias/${var.name}-topic"
  target_key_id = aws_kms_key.topic.key_id
}

data "aws_iam_policy_document" "topic_key" {
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
    sid       = "SesPublishesToTheTopic"
    actions   = ["kms:GenerateDataKey*", "kms:Decrypt"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["ses.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account]
    }
  }
}
