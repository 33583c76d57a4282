// Target tracking on SQS backlog per running task (PutScalingPolicy input).
//   backlog per task = ApproximateNumberOfMessagesVisible / RunningTaskCount
// RunningTaskCount comes from Container Insights (enable it on the cluster). The target is
// the backlog one task can clear within the acceptable latency; docs/deploy.md derives it.
//   jsonnet $(mailflow_jsonnet_vars) ecspresso/scaling-policy.jsonnet > /tmp/policy.json
//   aws application-autoscaling put-scaling-policy --cli-input-json file:///tmp/policy.json
local mf = (import 'mailflow.libsonnet')(std.extVar);

{
  PolicyName: 'mailflow-sqs-backlog-per-task',
  ServiceNamespace: 'ecs',
  ResourceId: 'service/%s/%s' % [mf.cluster, mf.service],
  ScalableDimension: 'ecs:service:DesiredCount',
  PolicyType: 'TargetTrackingScaling',
  TargetTrackingScalingPolicyConfiguration: {
    TargetValue: mf.backlog_per_task_target,
    CustomizedMetricSpecification: {
      Metrics: [
        {
          Id: 'visible',
          Label: 'messages waiting',
          MetricStat: {
            Metric: {
              Namespace: 'AWS/SQS',
              MetricName: 'ApproximateNumberOfMessagesVisible',
              Dimensions: [{ Name: 'QueueName', Value: mf.queue }],
            },
            Stat: 'Sum',
          },
          ReturnData: false,
        },
        {
          Id: 'tasks',
          Label: 'running tasks',
          MetricStat: {
            Metric: {
              Namespace: 'ECS/ContainerInsights',
              MetricName: 'RunningTaskCount',
              Dimensions: [
                { Name: 'ClusterName', Value: mf.cluster },
                { Name: 'ServiceName', Value: mf.service },
              ],
            },
            Stat: 'Average',
          },
          ReturnData: false,
        },
        {
          Id: 'backlog_per_task',
          Label: 'backlog per task',
          Expression: 'visible / tasks',
          ReturnData: true,
        },
      ],
    },
    // Out fast (mail is waiting), in slowly (a drain costs up to stopTimeout per task).
    ScaleOutCooldown: 60,
    ScaleInCooldown: 300,
    DisableScaleIn: false,
  },
}
