// The reconciler: one `mailflow reconcile` pass, started by EventBridge Scheduler
// (reconcile-schedule.jsonnet). No PHP sidecar: it never runs the legacy script.
// Its own family and task role, because it needs rights the worker must not have
// (copy/delete under the archive prefixes, re-enqueue).
local mf = (import 'mailflow.libsonnet')(std.native('must_env'), std.native('tfstate'));

{
  family: mf.reconcile_family,
  taskRoleArn: mf.reconcile_task_role_arn,
  executionRoleArn: mf.execution_role_arn,
  networkMode: 'awsvpc',
  requiresCompatibilities: ['FARGATE'],
  cpu: '256',
  memory: '512',
  runtimePlatform: { operatingSystemFamily: 'LINUX', cpuArchitecture: 'X86_64' },
  volumes: [{ name: 'reconcile-tmp' }, { name: 'reconcile-run' }, { name: 'reconcile-spool' }],
  containerDefinitions: [
    {
      name: 'reconcile',
      image: mf.worker_image,
      essential: true,
      command: ['reconcile'],
      environment: [
        { name: k[0], value: std.toString(k[1]) }
        for k in [
          ['AWS_DEFAULT_REGION', mf.region],
          ['MAILFLOW_BUCKET', mf.bucket],
          ['MAILFLOW_ALLOWED_BUCKETS', mf.bucket],
          ['MAILFLOW_MAIL_REGION', mf.mail_region],
          ['MAILFLOW_KMS_KEY', mf.mail_kms_key_arn],
          ['MAILFLOW_QUEUE', mf.queue],
          ['MAILFLOW_TABLE', mf.table],
          ['MAILFLOW_INCOMING_PREFIX', mf.incoming_prefix],
          ['MAILFLOW_MAX_ATTEMPTS', mf.max_attempts],
          ['MAILFLOW_LOG_FORMAT', 'json'],
          ['MAILFLOW_METRICS_NAMESPACE', mf.metrics_namespace],
        ]
      ],
      // A pass is idempotent and safe to run twice at once: stopping it early loses nothing.
      stopTimeout: 30,
      readonlyRootFilesystem: true,
      mountPoints: [
        { sourceVolume: 'reconcile-tmp', containerPath: '/tmp', readOnly: false },
        { sourceVolume: 'reconcile-run', containerPath: '/run/mailflow', readOnly: false },
        { sourceVolume: 'reconcile-spool', containerPath: '/var/spool/mailflow', readOnly: false },
      ],
      linuxParameters: { initProcessEnabled: true },
      logConfiguration: {
        logDriver: 'awslogs',
        options: {
          'awslogs-group': mf.log_group,
          'awslogs-region': mf.region,
          'awslogs-stream-prefix': 'reconcile',
          mode: 'non-blocking',
          'max-buffer-size': '25m',
        },
      },
    },
  ],
  tags: [{ key: 'service', value: 'mailflow' }],
}
