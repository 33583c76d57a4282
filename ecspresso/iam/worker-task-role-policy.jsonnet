// Inline policy of the worker's task role (PutRolePolicy input): exactly the calls the
// worker makes, on exactly its resources. No sns:Publish (only `mailflow smtp`/`send`, which
// emulate SES, publish), no s3:PutObject/DeleteObject (archiving is the reconciler's job),
// no dynamodb:PutItem/DeleteItem (every write is a conditional UpdateItem; TTL deletes).
//   aws iam put-role-policy --cli-input-json file://<(jsonnet $(mailflow_jsonnet_vars) ecspresso/iam/worker-task-role-policy.jsonnet)
local mf = (import '../mailflow.libsonnet')(std.extVar);

local document = {
  Version: '2012-10-17',
  Statement: [
    {
      Sid: 'ConsumeTheQueue',
      Effect: 'Allow',
      // ChangeMessageVisibilityBatch and DeleteMessageBatch are authorised by the
      // non-batch actions: SQS has no separate IAM action for them.
      Action: [
        'sqs:ReceiveMessage',
        'sqs:DeleteMessage',
        'sqs:ChangeMessageVisibility',
        'sqs:GetQueueUrl',
        'sqs:GetQueueAttributes',
      ],
      Resource: [mf.queue_arn],
    },
    {
      Sid: 'DeadLetterBadNotifications',
      Effect: 'Allow',
      Action: ['sqs:SendMessage', 'sqs:GetQueueUrl', 'sqs:GetQueueAttributes'],
      Resource: [mf.dlq_arn],
    },
    {
      Sid: 'ReadIncomingMail',
      Effect: 'Allow',
      Action: ['s3:GetObject'],
      Resource: ['%s/%s*' % [mf.bucket_arn, mf.incoming_prefix]],
    },
    {
      // Without ListBucket, GetObject on a missing key answers 403 instead of 404, and the
      // worker could not tell "not there (yet)" (retry) from "not allowed" (a real error).
      // No s3:prefix condition: a GetObject request carries no prefix to match it against.
      Sid: 'TellMissingFromForbidden',
      Effect: 'Allow',
      Action: ['s3:ListBucket'],
      Resource: [mf.bucket_arn],
    },
    {
      Sid: 'DeliveryLedger',
      Effect: 'Allow',
      Action: ['dynamodb:GetItem', 'dynamodb:UpdateItem', 'dynamodb:Query'],
      Resource: [mf.table_arn],
    },
  ],
};

{
  RoleName: mf.worker_task_role,
  PolicyName: 'mailflow-worker',
  PolicyDocument: std.manifestJsonEx(document, '  '),
}
