# The mail bucket (receiving region): SES writes under incoming/, the reconciler moves
# finished mail under processed/, failed/ or quarantine/, and lifecycle rules expire each.

resource "aws_s3_bucket" "mail" {
  #checkov:skip=CKV_AWS_18:Access logging needs a separate log bucket this module does not own; every object operation by the workers is in the delivery ledger, and CloudTrail data events can be enabled account-wide.
  #checkov:skip=CKV_AWS_144:Cross-region replication is a cost/residency decision per deployment; versioning with a recovery window protects against deletes here.
  #checkov:skip=CKV_AWS_145:Each mail is already encrypted by SES with the mail KMS key before it reaches S3 (client-side, bound to this account's rules); SSE-S3 adds encryption at rest for anything else without granting SES a second use of the key.
  #checkov:skip=CKV2_AWS_62:No S3 event notifications by design: SES publishes to the topic after storing each mail (the S3 action with a topic), and the reconciler scans incoming/ for orphans.
  provider = aws.ses
  bucket   = var.bucket_name
  tags     = local.tags
}

resource "aws_s3_bucket_public_access_block" "mail" {
  provider                = aws.ses
  bucket                  = aws_s3_bucket.mail.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "mail" {
  provider = aws.ses
  bucket   = aws_s3_bucket.mail.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "mail" {
  provider = aws.ses
  bucket   = aws_s3_bucket.mail.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "mail" {
  provider = aws.ses
  bucket   = aws_s3_bucket.mail.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "mail" {
  provider = aws.ses
  bucket   = aws_s3_bucket.mail.id

  # incoming/ is never expired: what stays there is unfinished work the reconciler adopts.
  dynamic "rule" {
    for_each = local.shapes.archive_prefixes
    content {
      id     = "expire-${rule.key}"
      status = "Enabled"
      filter {
        prefix = rule.value
      }
      expiration {
        days = local.archive_retention_days[rule.key]
      }
      noncurrent_version_expiration {
        noncurrent_days = var.noncurrent_version_days
      }
    }
  }

  rule {
    id     = "housekeeping"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
    # The reconciler's moves leave the original as a noncurrent version behind a delete marker.
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    expiration {
      expired_object_delete_marker = true
    }
  }

  depends_on = [aws_s3_bucket_versioning.mail]
}

resource "aws_s3_bucket_policy" "mail" {
  provider = aws.ses
  bucket   = aws_s3_bucket.mail.id
  policy   = data.aws_iam_policy_document.mail_bucket.json
  # Public access block first, so that this policy is never briefly evaluated without it.
  depends_on = [aws_s3_bucket_public_access_block.mail]
}

data "aws_iam_policy_document" "mail_bucket" {
  statement {
    sid       = "SesStoresThisAccountsMail"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.mail.arn}/${local.shapes.incoming_prefix}*"]
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

  statement {
    sid       = "TlsOnly"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.mail.arn, "${aws_s3_bucket.mail.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}
