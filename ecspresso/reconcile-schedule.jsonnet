// EventBridge Scheduler: run one `mailflow reconcile` pass every few minutes (CreateSchedule
// input). The task definition ARN has no revision: RunTask takes the latest ACTIVE one, so
// `ecspresso register --config ecspresso/reconcile.yml` is all a release needs.
//   jsonnet $(mailflow_jsonnet_vars) ecspresso/reconcile-schedule.jsonnet > /tmp/schedule.json
//   aws scheduler create-schedule --cli-input-json file:///tmp/schedule.json   (or update-schedule)
local mf = (import 'mailflow.libsonnet')(std.extVar);

{
  Name: 'mailflow-reconcile',
  Description: 'mailflow reconcile: archive finished mail, re-enqueue lost or stuck work, adopt orphans',
  ScheduleExpression: mf.reconcile_schedule,
  ScheduleExpressionTimezone: 'Asia/Tokyo',
  FlexibleTimeWindow: { Mode: 'OFF' },
  State: 'ENABLED',
  Target: {
    Arn: mf.cluster_arn,
    RoleArn: mf.role_arn(mf.scheduler_role),
    EcsParameters: {
      TaskDefinitionArn: 'arn:aws:ecs:%s:%s:task-definition/%s' % [mf.region, mf.account, mf.reconcile_family],
      TaskCount: 1,
      LaunchType: 'FARGATE',
      PlatformVersion: 'LATEST',
      NetworkConfiguration: {
        // Sic: lower-case "awsvpcConfiguration" in the Scheduler API, unlike its members.
        awsvpcConfiguration: {
          Subnets: mf.subnets,
          SecurityGroups: mf.security_groups,
          AssignPublicIp: 'DISABLED',
        },
      },
      EnableECSManagedTags: true,
      PropagateTags: 'TASK_DEFINITION',
    },
    // A missed pass is harmless (the next one does the work); do not pile them up.
    RetryPolicy: { MaximumEventAgeInSeconds: 240, MaximumRetryAttempts: 2 },
  },
}
