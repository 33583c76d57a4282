// Inline policy of the role EventBridge Scheduler assumes to start the reconciler.
local mf = (import '../mailflow.libsonnet')(std.extVar);

local document = {
  Version: '2012-10-17',
  Statement: [
    {
      Sid: 'RunReconcileTask',
      Effect: 'Allow',
      Action: ['ecs:RunTask'],
      Resource: [mf.task_definition_arn(mf.reconcile_family)],
      Condition: { ArnEquals: { 'ecs:cluster': mf.cluster_arn } },
    },
    {
      Sid: 'TagTheTask',  // EnableECSManagedTags / PropagateTags tag the task at launch
      Effect: 'Allow',
      Action: ['ecs:TagResource'],
      Resource: ['arn:aws:ecs:%s:%s:task/%s/*' % [mf.region, mf.account, mf.cluster]],
      Condition: { StringEquals: { 'ecs:CreateAction': 'RunTask' } },
    },
    {
      Sid: 'PassTheTaskRoles',
      Effect: 'Allow',
      Action: ['iam:PassRole'],
      Resource: [mf.role_arn(mf.reconcile_task_role), mf.role_arn(mf.execution_role)],
      Condition: { StringEquals: { 'iam:PassedToService': 'ecs-tasks.amazonaws.com' } },
    },
  ],
};

{
  RoleName: mf.scheduler_role,
  PolicyName: 'mailflow-reconcile-scheduler',
  PolicyDocument: std.manifestJsonEx(document, '  '),
}
