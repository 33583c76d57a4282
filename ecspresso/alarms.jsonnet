// CloudWatch alarms (one PutMetricAlarm input per file):
//   jsonnet $(mailflow_jsonnet_vars) -m /tmp/alarms ecspresso/alarms.jsonnet
//   for f in /tmp/alarms/*.json; do aws cloudwatch put-metric-alarm --cli-input-json "file://$f"; done
local mf = (import 'mailflow.libsonnet')(std.extVar);

local actions = {
  AlarmActions: [mf.alarm_topic_arn],
  OKActions: [mf.alarm_topic_arn],
};
local queue_metric(queue, name, stat) = {
  Namespace: 'AWS/SQS',
  MetricName: name,
  Dimensions: [{ Name: 'QueueName', Value: queue }],
  Statistic: stat,
  Period: 300,  // SQS publishes every 5 minutes at best for these
};
local deliveries(status) = {
  Metric: {
    Namespace: mf.metrics_namespace,
    MetricName: 'deliveries',  // the EMF field of the canonical outcome line (metrics.py)
    Dimensions: [{ Name: 'status', Value: status }],
  },
  Period: 300,
  Stat: 'Sum',
};

{
  'mailflow-dlq-not-empty.json': actions + queue_metric(mf.dlq, 'ApproximateNumberOfMessagesVisible', 'Maximum') + {
    AlarmName: 'mailflow-dlq-not-empty',
    AlarmDescription: 'Notifications in %s: unparseable, untrusted or given up by SQS. Read the reason attribute, fix, then `mailflow redrive`.' % mf.dlq,
    EvaluationPeriods: 1,
    DatapointsToAlarm: 1,
    Threshold: 0,
    ComparisonOperator: 'GreaterThanThreshold',
    TreatMissingData: 'notBreaching',
  },

  'mailflow-oldest-message-age.json': actions + queue_metric(mf.queue, 'ApproximateAgeOfOldestMessage', 'Maximum') + {
    AlarmName: 'mailflow-oldest-message-age',
    AlarmDescription: 'The oldest order mail in %s has waited over 15 minutes: workers stalled, too few, or a retry storm.' % mf.queue,
    EvaluationPeriods: 3,
    DatapointsToAlarm: 3,
    Threshold: 900,
    ComparisonOperator: 'GreaterThanThreshold',
    TreatMissingData: 'notBreaching',
  },

  'mailflow-failure-rate.json': actions + {
    AlarmName: 'mailflow-failure-rate',
    AlarmDescription: 'More than 5% of finished deliveries failed (3 of 3 five-minute periods): legacy script or routing trouble. `mailflow list --status failed`.',
    Metrics: [
      { Id: 'failed', MetricStat: deliveries('failed'), ReturnData: false },
      { Id: 'succeeded', MetricStat: deliveries('succeeded'), ReturnData: false },
      {
        Id: 'failure_pct',
        Label: 'failed deliveries, % of finished',
        Expression: '100 * FILL(failed, 0) / (FILL(failed, 0) + FILL(succeeded, 0))',
        ReturnData: true,
      },
    ],
    EvaluationPeriods: 3,
    DatapointsToAlarm: 3,
    Threshold: 5,
    ComparisonOperator: 'GreaterThanThreshold',
    TreatMissingData: 'notBreaching',  // no deliveries, no rate
  },

  // The worker's heartbeat is its container health check (`mailflow check`): a stale one
  // makes ECS replace the task, so a worker that keeps losing its heartbeat shows up as
  // fewer running tasks than the service's minimum.
  'mailflow-no-healthy-worker.json': actions + {
    AlarmName: 'mailflow-no-healthy-worker',
    AlarmDescription: 'Fewer running worker tasks than the minimum for 5 minutes: heartbeats failing (health check), tasks crashing, or no capacity.',
    Namespace: 'ECS/ContainerInsights',
    MetricName: 'RunningTaskCount',
    Dimensions: [
      { Name: 'ClusterName', Value: mf.cluster },
      { Name: 'ServiceName', Value: mf.service },
    ],
    Statistic: 'Minimum',
    Period: 60,
    EvaluationPeriods: 5,
    DatapointsToAlarm: 5,
    Threshold: mf.min_tasks,
    ComparisonOperator: 'LessThanThreshold',
    TreatMissingData: 'breaching',  // no metric at all: no tasks reporting
  },
}
