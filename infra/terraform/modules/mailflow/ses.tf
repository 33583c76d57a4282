# SES receiving (receiving region): one rule set, made active; one rule per recipient list.
# Each rule scans for spam and viruses (the verdicts reach the worker in the notification),
# then stores the mail under incoming/, encrypted with the mail key, and notifies the topic
# (the S3 action with a topic: one notification per stored mail, naming its object).

resource "aws_ses_receipt_rule_set" "mail" {
  provider      = aws.ses
  rule_set_name = var.rule_set_name
}

resource "aws_ses_active_receipt_rule_set" "mail" {
  provider      = aws.ses
  rule_set_name = aws_ses_receipt_rule_set.mail.rule_set_name
}

resource "aws_ses_receipt_rule" "mail" {
  provider      = aws.ses
  for_each      = var.receipt_rules
  name          = "${var.name}-${each.key}"
  rule_set_name = aws_ses_receipt_rule_set.mail.rule_set_name
  recipients    = each.value
  enabled       = true
  scan_enabled  = true
  tls_policy    = var.tls_policy

  s3_action {
    position          = 1
    bucket_name       = aws_s3_bucket.mail.id
    object_key_prefix = local.shapes.incoming_prefix
    kms_key_arn       = aws_kms_key.mail.arn
    topic_arn         = aws_sns_topic.mail.arn
  }

  # SES checks at rule creation that it may write to the bucket, use the key and publish.
  depends_on = [
    aws_s3_bucket_policy.mail,
    aws_sns_topic_policy.mail,
  ]
}
