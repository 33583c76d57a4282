terraform {
  # 1.6: `check`/validation features used below are stable; 2.x may change the language.
  required_version = ">= 1.6.0, < 2.0.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.60, < 7.0"
      # aws     = the main region (queue, table, ECS, IAM, logs, alarms)
      # aws.ses = the SES receiving region (receipt rules, mail bucket, its key, the topic)
      configuration_aliases = [aws.ses]
    }
  }
}
