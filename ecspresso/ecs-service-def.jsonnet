// The worker service (CreateService/UpdateService input without name, cluster and task
// definition, which ecspresso fills in). Rendered by ecspresso (`ecspresso render servicedef`).
local mf = (import 'mailflow.libsonnet')(std.native('must_env'));

{
  launchType: 'FARGATE',
  platformVersion: 'LATEST',
  schedulingStrategy: 'REPLICA',
  // Used when the service is created; afterwards Application Auto Scaling owns the count
  // (see scalable-target.jsonnet) and `ecspresso deploy` leaves it alone.
  desiredCount: mf.min_tasks,
  deploymentController: { type: 'ECS' },
  deploymentConfiguration: {
    // Start new tasks before stopping old ones: a deploy never lowers capacity.
    minimumHealthyPercent: 100,
    maximumPercent: 200,
    deploymentCircuitBreaker: { enable: true, rollback: true },
  },
  networkConfiguration: {
    awsvpcConfiguration: {
      subnets: mf.subnets,
      securityGroups: mf.security_groups,
      assignPublicIp: 'DISABLED',  // private subnets with NAT or VPC endpoints
    },
  },
  enableECSManagedTags: true,
  propagateTags: 'SERVICE',
  enableExecuteCommand: false,
  tags: [
    { key: 'service', value: 'mailflow' },
  ],
}
