// Everything the mailflow deploy files share: names, sizes, limits and how they relate.
//
//   local mf = (import 'mailflow.libsonnet')(std.native('must_env'));  // ecspresso files
//   local mf = (import 'mailflow.libsonnet')(std.extVar);              // `jsonnet -V NAME` files
//
// Values that differ per environment or change per deploy (account, region, network, image
// references, resource names) come from the environment through `must_env`: a missing one
// stops the render instead of deploying a guess. Tuning knobs are constants below, so that
// changing one is a reviewed commit, and the checks at the bottom keep them consistent.
function(must_env) {
  local mf = self,
  local split = function(s) [x for x in std.split(s, ',') if x != ''],

  // --- where ---------------------------------------------------------------------------
  region: must_env('AWS_REGION'),
  account: must_env('AWS_ACCOUNT_ID'),
  cluster: must_env('ECS_CLUSTER'),
  service: must_env('MAILFLOW_SERVICE'),
  subnets: split(must_env('MAILFLOW_SUBNETS')),
  security_groups: split(must_env('MAILFLOW_SECURITY_GROUPS')),

  // --- what runs (full references: registry/repo:tag or @sha256:digest) ------------------
  worker_image: must_env('MAILFLOW_WORKER_IMAGE'),
  php_image: must_env('MAILFLOW_PHP_IMAGE'),

  // --- resources ---------------------------------------------------------------------------
  bucket: must_env('MAILFLOW_BUCKET'),
  queue: must_env('MAILFLOW_QUEUE'),
  dlq: mf.queue + '-dlq',  // Settings.dlq: the queue's name + "-dlq"
  table: must_env('MAILFLOW_TABLE'),
  attention_index: 'attention',  // ledger.ATTENTION_INDEX
  alarm_topic_arn: must_env('MAILFLOW_ALARM_TOPIC_ARN'),
  incoming_prefix: 'incoming/',
  archive_prefixes: ['processed/', 'failed/', 'quarantine/'],
  metrics_namespace: 'mailflow',
  log_group: '/ecs/mailflow',

  // IAM roles (created outside this repo; the policies are in iam/).
  role_arn(name):: 'arn:aws:iam::%s:role/%s' % [mf.account, name],
  worker_task_role: 'mailflow-worker-task',
  reconcile_task_role: 'mailflow-reconcile-task',
  execution_role: 'mailflow-task-execution',
  scheduler_role: 'mailflow-reconcile-scheduler',

  // Secrets: SSM SecureString parameters, injected by ECS through `valueFrom` (never the
  // value in a definition file). The worker passes them on to the legacy script
  // (MAILFLOW_PASS_ENV), which is the only consumer.
  secret_parameters: {
    LEGACY_DB_PASSWORD: '/mailflow/legacy/db-password',
  },
  ssm_arn(name):: 'arn:aws:ssm:%s:%s:parameter%s' % [mf.region, mf.account, name],

  // --- arns ------------------------------------------------------------------------------
  queue_arn: 'arn:aws:sqs:%s:%s:%s' % [mf.region, mf.account, mf.queue],
  dlq_arn: 'arn:aws:sqs:%s:%s:%s' % [mf.region, mf.account, mf.dlq],
  table_arn: 'arn:aws:dynamodb:%s:%s:table/%s' % [mf.region, mf.account, mf.table],
  bucket_arn: 'arn:aws:s3:::%s' % mf.bucket,
  cluster_arn: 'arn:aws:ecs:%s:%s:cluster/%s' % [mf.region, mf.account, mf.cluster],
  reconcile_family: 'mailflow-reconcile',
  worker_family: 'mailflow-worker',
  task_definition_arn(family, revision='*')::
    'arn:aws:ecs:%s:%s:task-definition/%s:%s' % [mf.region, mf.account, family, revision],
  log_group_arn: 'arn:aws:logs:%s:%s:log-group:%s' % [mf.region, mf.account, mf.log_group],

  // --- sizes and limits ------------------------------------------------------------------
  // FastCGI between the two containers of one task: the same network namespace (awsvpc).
  fastcgi_port: 9000,
  fastcgi_address: '127.0.0.1:%d' % mf.fastcgi_port,
  runner_script: '/app/sidecar/runner.php',
  legacy_command: ['php', '/app/legacy/receive_mail.php'],

  concurrency: 8,  // deliveries per task; php-fpm's pool is sized to match
  processor_timeout_s: 300,
  kill_grace_s: 5,
  max_attempts: 5,
  // ECS sends SIGTERM, waits stopTimeout (at most 120 s on Fargate), then SIGKILL.
  // The worker drains for shutdown_grace_s, and needs a few seconds after that to hand
  // back what is left and write its outcomes.
  stop_timeout_s: 120,
  shutdown_grace_s: 90,
  heartbeat_max_age_s: 60,

  task_cpu: 1024,
  task_memory_mib: 2048,

  // Auto scaling on backlog per task (see docs/deploy.md for the arithmetic):
  //   acceptable backlog per task = acceptable latency / mean processing time × concurrency
  acceptable_latency_s: 60,
  mean_processing_s: 5,
  backlog_per_task_target: mf.acceptable_latency_s / mf.mean_processing_s * mf.concurrency,
  min_tasks: 1,  // >= 1: the backlog-per-task metric divides by the running task count
  max_tasks: 10,

  reconcile_schedule: 'rate(5 minutes)',

  // --- consistency checks (a failed assert stops the render) -----------------------------
  assert mf.shutdown_grace_s + 10 <= mf.stop_timeout_s : 'shutdown grace must end well before stopTimeout',
  assert mf.stop_timeout_s <= 120 : 'Fargate caps stopTimeout at 120 s',
  assert mf.min_tasks >= 1 : 'min_tasks >= 1 (backlog per task divides by running tasks)',
  assert std.length(mf.subnets) > 0 : 'MAILFLOW_SUBNETS: at least one subnet id',
  assert std.length(mf.security_groups) > 0 : 'MAILFLOW_SECURITY_GROUPS: at least one group id',
}
