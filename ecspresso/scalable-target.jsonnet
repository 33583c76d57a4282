// Application Auto Scaling: the worker service's desired count is scaled between these bounds.
//   jsonnet $(mailflow_jsonnet_vars) ecspresso/scalable-target.jsonnet > /tmp/target.json
//   aws application-autoscaling register-scalable-target --cli-input-json file:///tmp/target.json
local mf = (import 'mailflow.libsonnet')(std.extVar);

{
  ServiceNamespace: 'ecs',
  ResourceId: 'service/%s/%s' % [mf.cluster, mf.service],
  ScalableDimension: 'ecs:service:DesiredCount',
  MinCapacity: mf.min_tasks,
  MaxCapacity: mf.max_tasks,
  SuspendedState: {
    DynamicScalingInSuspended: false,
    DynamicScalingOutSuspended: false,
    ScheduledScalingSuspended: false,
  },
}
