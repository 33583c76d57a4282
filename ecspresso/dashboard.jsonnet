// CloudWatch dashboard (PutDashboard input):
//   jsonnet $(mailflow_jsonnet_vars) ecspresso/dashboard.jsonnet > /tmp/dashboard.json
//   aws cloudwatch put-dashboard --cli-input-json file:///tmp/dashboard.json
local mf = (import 'mailflow.libsonnet')(std.extVar);

// A metric line is [namespace, name, dimension, value, ..., {rendering options}].
local sqs(name, queue, opts={}) =
  ['AWS/SQS', name, 'QueueName', queue, { stat: 'Maximum', label: name } + opts];
local delivered(status) =
  [mf.metrics_namespace, 'deliveries', 'status', status, { stat: 'Sum', label: status }];
local ecs(name, opts={}) =
  ['ECS/ContainerInsights', name, 'ClusterName', mf.cluster, 'ServiceName', mf.service, { stat: 'Average' } + opts];

local widget(x, y, title, metrics, props={}) = {
  type: 'metric',
  x: x,
  y: y,
  width: 12,
  height: 6,
  properties: {
    title: title,
    region: mf.region,
    view: 'timeSeries',
    period: 60,
    metrics: metrics,
  } + props,
};

local body = {
  widgets: [
    widget(0, 0, 'Queue: waiting and in flight', [
      sqs('ApproximateNumberOfMessagesVisible', mf.queue, { label: 'waiting' }),
      sqs('ApproximateNumberOfMessagesNotVisible', mf.queue, { label: 'in flight / deferred' }),
      sqs('ApproximateNumberOfMessagesVisible', mf.dlq, { label: 'DLQ' }),
    ]),
    widget(12, 0, 'Oldest message age (s)', [
      sqs('ApproximateAgeOfOldestMessage', mf.queue, { label: 'oldest' }),
    ], { annotations: { horizontal: [{ label: 'alarm', value: 900 }] } }),
    widget(0, 6, 'Deliveries by outcome (per 5 min)', [
      delivered('succeeded'),
      delivered('retrying'),
      delivered('failed'),
    ], { period: 300, stacked: true }),
    widget(12, 6, 'Processor time and queue lag (ms)', [
      [mf.metrics_namespace, 'processor_ms', 'status', 'succeeded', { stat: 'p50', label: 'processor p50' }],
      [mf.metrics_namespace, 'processor_ms', 'status', 'succeeded', { stat: 'p99', label: 'processor p99' }],
      [mf.metrics_namespace, 'queue_lag_ms', 'status', 'succeeded', { stat: 'p90', label: 'queue lag p90' }],
    ], { period: 300 }),
    widget(0, 12, 'Tasks and backlog per task (scaling input)', [
      ecs('RunningTaskCount', { id: 'tasks', label: 'running tasks' }),
      ecs('DesiredTaskCount', { label: 'desired tasks' }),
      sqs('ApproximateNumberOfMessagesVisible', mf.queue, { stat: 'Sum', id: 'visible', visible: false }),
      [{ expression: 'visible / tasks', label: 'backlog per task (target %d)' % mf.backlog_per_task_target, id: 'backlog' }],
    ]),
    widget(12, 12, 'Task CPU and memory', [
      ecs('CpuUtilized'),
      ecs('MemoryUtilized'),
    ]),
  ],
};

{
  DashboardName: 'mailflow',
  DashboardBody: std.manifestJsonMinified(body),
}
