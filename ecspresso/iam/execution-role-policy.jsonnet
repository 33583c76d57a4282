// Inline policy of the task execution role (used by ECS, not by mailflow): pull the images,
// write the awslogs streams, resolve the `secrets` valueFrom parameters at task start.
local mf = (import '../mailflow.libsonnet')(std.extVar);

local document = {
  Version: '2012-10-17',
  Statement: [
    {
      Sid: 'EcrLogin',
      Effect: 'Allow',
      Action: ['ecr:GetAuthorizationToken'],
      Resource: ['*'],  // this action has no resource-level permissions
    },
    {
      Sid: 'PullImages',
      Effect: 'Allow',
      Action: ['ecr:BatchGetImage', 'ecr:GetDownloadUrlForLayer', 'ecr:BatchCheckLayerAvailability'],
      Resource: ['arn:aws:ecr:%s:%s:repository/mailflow*' % [mf.region, mf.account]],
    },
    {
      Sid: 'WriteLogs',
      Effect: 'Allow',
      Action: ['logs:CreateLogStream', 'logs:PutLogEvents'],
      Resource: [mf.log_group_arn + ':log-stream:*'],
    },
    {
      Sid: 'ReadSecrets',
      Effect: 'Allow',
      Action: ['ssm:GetParameters'],
      Resource: [mf.ssm_arn(mf.secret_parameters[k]) for k in std.objectFields(mf.secret_parameters)],
    },
  ],
};

{
  RoleName: mf.execution_role,
  PolicyName: 'mailflow-task-execution',
  PolicyDocument: std.manifestJsonEx(document, '  '),
}
