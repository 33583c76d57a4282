// The worker service (CreateService/UpdateService input without name, cluster and task
// definition, which ecspresso fills in). Rendered by ecspresso (`ecspresso render servicedef`);
// the network comes from the Terraform state (mailflow.libsonnet).
local mf = (import 'mailflow.libsonnet')(std.native('must_env'), std.native('tfstate'));

{
  launchType: 'FARGATE',
  platformVersion: 'LATEST',
  schedulingStrategy: 'REPLICA',
  // No desiredCount, on purpose: Application Auto Scaling owns the count (infra/terraform,
  // ecs.tf). ecspresso sends a definition's desiredCount with every deploy unless --tasks is
  // given, which would reset a scaled-out service to its minimum in the middle of a backlog.
  // The first deploy creates the service with `ecspresso deploy --tasks 1` (docs/deploy.md).
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
