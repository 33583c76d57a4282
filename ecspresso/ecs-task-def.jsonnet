// The worker task: mailflow worker + the php-fpm sidecar that runs the legacy script.
// RegisterTaskDefinition input, rendered by ecspresso (`ecspresso render taskdef`).
local must_env = std.native('must_env');
local mf = (import 'mailflow.libsonnet')(must_env, std.native('tfstate'));

local env(o) = [{ name: k, value: std.toString(o[k]) } for k in std.objectFields(o)];
local logs(prefix) = {
  logDriver: 'awslogs',
  options: {
    'awslogs-group': mf.log_group,
    'awslogs-region': mf.region,
    'awslogs-stream-prefix': prefix,
    // Never block the process on a slow log pipe: a stalled stdout would stall deliveries.
    mode: 'non-blocking',
    'max-buffer-size': '25m',
  },
};

local routes = [
  {
    name: 'store',
    match: 'ne-(?P<store>[0-9]{3})@orders\\.example\\.com',
    command: std.join(' ', mf.legacy_command) + ' {store}',
    key: 'store',
    max_in_flight_per_key: 1,
  },
];

{
  family: mf.worker_family,
  taskRoleArn: mf.worker_task_role_arn,
  executionRoleArn: mf.execution_role_arn,
  networkMode: 'awsvpc',  // one network namespace: the sidecar is the worker's 127.0.0.1
  requiresCompatibilities: ['FARGATE'],
  cpu: std.toString(mf.task_cpu),
  memory: std.toString(mf.task_memory_mib),
  runtimePlatform: { operatingSystemFamily: 'LINUX', cpuArchitecture: 'X86_64' },
  // Fargate has no tmpfs: task-scoped bind mounts on the task's ephemeral storage are the
  // writable places of otherwise read-only root filesystems. Owner and mode come from the
  // image's VOLUME directories (the worker image creates them for uid 10001).
  volumes: [
    { name: 'worker-spool' },
    { name: 'worker-run' },
    { name: 'worker-tmp' },
    { name: 'php-tmp' },
    { name: 'legacy-data' },
  ],
  containerDefinitions: [
    {
      name: 'worker',
      image: mf.worker_image,
      essential: true,
      command: ['worker'],
      cpu: 256,
      memoryReservation: 512,
      environment: env({
        AWS_DEFAULT_REGION: mf.region,
        MAILFLOW_BUCKET: mf.bucket,
        MAILFLOW_ALLOWED_BUCKETS: mf.bucket,
        MAILFLOW_MAIL_REGION: mf.mail_region,
        MAILFLOW_KMS_KEY: mf.mail_kms_key_arn,
        MAILFLOW_QUEUE: mf.queue,
        MAILFLOW_TABLE: mf.table,
        MAILFLOW_INCOMING_PREFIX: mf.incoming_prefix,
        MAILFLOW_ROUTES: std.manifestJsonMinified(routes),
        MAILFLOW_PROCESSOR_TRANSPORT: 'fastcgi',
        MAILFLOW_FASTCGI_ADDRESS: mf.fastcgi_address,
        MAILFLOW_RUNNER_SCRIPT: mf.runner_script,
        MAILFLOW_CONCURRENCY: mf.concurrency,
        MAILFLOW_PROCESSOR_TIMEOUT_S: mf.processor_timeout_s,
        MAILFLOW_KILL_GRACE_S: mf.kill_grace_s,
        MAILFLOW_MAX_ATTEMPTS: mf.max_attempts,
        MAILFLOW_SHUTDOWN_GRACE_S: mf.shutdown_grace_s,
        MAILFLOW_HEARTBEAT_FILE: '/run/mailflow/worker.heartbeat',
        MAILFLOW_HEARTBEAT_MAX_AGE_S: mf.heartbeat_max_age_s,
        MAILFLOW_SPOOL_DIR: '/var/spool/mailflow',
        MAILFLOW_LOG_FORMAT: 'json',
        MAILFLOW_METRICS_NAMESPACE: mf.metrics_namespace,
        // What the legacy script may see besides the contract's own variables.
        MAILFLOW_PASS_ENV: std.join(',', ['ORDERS_DIR'] + std.objectFields(mf.secret_parameter_arns)),
        ORDERS_DIR: '/var/lib/legacy/orders',
      }),
      secrets: [
        { name: name, valueFrom: mf.secret_parameter_arns[name] }
        for name in std.objectFields(mf.secret_parameter_arns)
      ],
      dependsOn: [{ containerName: 'php', condition: 'HEALTHY' }],
      // SIGTERM -> drain (MAILFLOW_SHUTDOWN_GRACE_S) -> exit; SIGKILL only after this.
      stopTimeout: mf.stop_timeout_s,
      healthCheck: {
        command: ['CMD', 'mailflow', 'check'],
        interval: 30,
        timeout: 10,
        retries: 3,
        startPeriod: 60,
      },
      readonlyRootFilesystem: true,
      mountPoints: [
        { sourceVolume: 'worker-spool', containerPath: '/var/spool/mailflow', readOnly: false },
        { sourceVolume: 'worker-run', containerPath: '/run/mailflow', readOnly: false },
        { sourceVolume: 'worker-tmp', containerPath: '/tmp', readOnly: false },
      ],
      // tini as PID 1: reaps orphans, forwards SIGTERM to mailflow.
      linuxParameters: { initProcessEnabled: true },
      ulimits: [{ name: 'nofile', softLimit: 65536, hardLimit: 65536 }],
      logConfiguration: logs('worker'),
    },
    {
      name: 'php',
      image: mf.php_image,
      essential: true,  // no sidecar, no deliveries: let ECS replace the whole task
      cpu: 512,
      memoryReservation: 1024,
      // Documents the port the worker dials; php-fpm itself listens on 127.0.0.1 only and
      // the task's security group must not open it.
      portMappings: [{ name: 'fastcgi', containerPort: mf.fastcgi_port, protocol: 'tcp' }],
      environment: env({
        MAILFLOW_FASTCGI_ADDRESS: mf.fastcgi_address,
        MAILFLOW_RUNNER_ALLOW: std.manifestJsonMinified([mf.legacy_command]),
        MAILFLOW_FPM_MAX_CHILDREN: mf.concurrency,
        // php-fpm's last resort must fire after the runner's own timeout + kill grace.
        MAILFLOW_FPM_REQUEST_TERMINATE_TIMEOUT: mf.processor_timeout_s + mf.kill_grace_s + 30,
      }),
      healthCheck: {
        command: ['CMD', '/app/sidecar/healthcheck'],
        interval: 10,
        timeout: 5,
        retries: 3,
        startPeriod: 15,
      },
      // Stopped after the worker (it depends on php): in-flight FastCGI requests end first.
      stopTimeout: mf.stop_timeout_s,
      readonlyRootFilesystem: true,
      mountPoints: [
        { sourceVolume: 'php-tmp', containerPath: '/tmp', readOnly: false },
        { sourceVolume: 'legacy-data', containerPath: '/var/lib/legacy', readOnly: false },
      ],
      linuxParameters: { initProcessEnabled: true },
      logConfiguration: logs('php'),
    },
  ],
  tags: [
    { key: 'service', value: 'mailflow' },
  ],
}
