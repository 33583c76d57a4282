// Everything the mailflow deploy files share: names, sizes, limits and how they relate.
//
//   local mf = (import 'mailflow.libsonnet')(std.native('must_env'), std.native('tfstate'));
//
// Every resource (names, ARNs, network, roles, repositories) comes from the Terraform state of
// infra/terraform (its output `mailflow`), read by ecspresso's tfstate plugin: nothing is
// copied by hand, and a missing output stops the render. What changes per release (the image
// tags) comes from the environment through `must_env`. Tuning knobs are constants below, so
// that changing one is a reviewed commit, and the checks at the bottom keep them consistent.
function(must_env, tfstate) {
  local mf = self,
  local tf = tfstate('output.mailflow'),

  // --- where (Terraform) -------------------------------------------------------------------
  region: tf.region,
  account: tf.account_id,
  cluster: tf.cluster,
  service: tf.service,
  subnets: tf.subnets,
  security_groups: tf.security_groups,

  // --- what runs: the release's image tags (tag or @sha256:digest) --------------------------
  local ref(repository, tag) = if std.startsWith(tag, '@') then repository + tag else repository + ':' + tag,
  worker_image: ref(tf.worker_repository_url, must_env('MAILFLOW_WORKER_IMAGE_TAG')),
  php_image: ref(tf.php_repository_url, must_env('MAILFLOW_PHP_IMAGE_TAG')),

  // --- resources (Terraform; their names and shapes come from mailflow.aws.shapes) ----------
  bucket: tf.bucket,
  // SES receives in another region than the one the workers run in: the bucket and the key
  // that SES encrypts each mail with live there (MAILFLOW_MAIL_REGION, MAILFLOW_KMS_KEY).
  mail_region: tf.bucket_region,
  mail_kms_key_arn: tf.mail_kms_key_arn,
  queue: tf.queue,
  dlq: tf.dlq,
  table: tf.table,
  incoming_prefix: tf.incoming_prefix,
  metrics_namespace: tf.metrics_namespace,
  log_group: tf.log_group,
  worker_family: tf.worker_family,
  reconcile_family: tf.reconcile_family,

  // IAM roles: made, with their policies, by infra/terraform/modules/mailflow/iam.tf.
  worker_task_role_arn: tf.worker_task_role_arn,
  reconcile_task_role_arn: tf.reconcile_task_role_arn,
  execution_role_arn: tf.execution_role_arn,

  // Secrets: SSM SecureString parameters (Terraform variable secret_parameters), injected by
  // ECS through `valueFrom` (never the value in a definition file). The worker passes them on
  // to the legacy script (MAILFLOW_PASS_ENV), which is the only consumer.
  secret_parameter_arns: tf.secret_parameter_arns,

  // --- sizes and limits ------------------------------------------------------------------
  // FastCGI between the two containers of one task: the same network namespace (awsvpc).
  fastcgi_port: 9000,
  fastcgi_address: '127.0.0.1:%d' % mf.fastcgi_port,
  runner_script: '/app/sidecar/runner.php',
  legacy_command: ['php', '/app/legacy/receive_mail.php'],

  concurrency: 8,  // deliveries per task; php-fpm's pool is sized to match
  processor_timeout_s: 300,
  kill_grace_s: 5,
  // Terraform derives the queue's maxReceiveCount from the same number.
  max_attempts: tf.max_attempts,
  // ECS sends SIGTERM, waits stopTimeout (at most 120 s on Fargate), then SIGKILL.
  // The worker drains for shutdown_grace_s, and needs a few seconds after that to hand
  // back what is left and write its outcomes.
  stop_timeout_s: 120,
  shutdown_grace_s: 90,
  heartbeat_max_age_s: 60,

  task_cpu: 1024,
  task_memory_mib: 2048,

  // Auto scaling (Terraform, ecs.tf) tracks backlog per task towards
  //   acceptable latency / mean processing time x deliveries per task
  // (docs/deploy.md §5); its variable backlog_per_task_target must equal this (a test checks).
  acceptable_latency_s: 60,
  mean_processing_s: 5,
  backlog_per_task_target: mf.acceptable_latency_s / mf.mean_processing_s * mf.concurrency,

  // --- consistency checks (a failed assert stops the render) -----------------------------
  assert mf.shutdown_grace_s + 10 <= mf.stop_timeout_s : 'shutdown grace must end well before stopTimeout',
  assert mf.stop_timeout_s <= 120 : 'Fargate caps stopTimeout at 120 s',
  assert std.length(mf.subnets) > 0 : 'Terraform output mailflow.subnets: at least one subnet id',
  assert std.length(mf.security_groups) > 0 : 'Terraform output mailflow.security_groups: at least one group id',
}
