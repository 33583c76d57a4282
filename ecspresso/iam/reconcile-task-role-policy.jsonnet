// Inline policy of the reconciler's task role (PutRolePolicy input): archive moves
// (copy under processed/ failed/ quarantine/, verify, delete the original), re-enqueue,
// orphan scan of incoming/. It never receives or deletes queue messages.
local mf = (import '../mailflow.libsonnet')(std.extVar);

local under(prefixes) = ['%s/%s*' % [mf.bucket_arn, p] for p in prefixes];

local document = {
  Version: '2012-10-17',
  Statement: [
    {
      Sid: 'ReadAndRemoveIncoming',
      Effect: 'Allow',
      Action: ['s3:GetObject', 's3:DeleteObject'],
      Resource: under([mf.incoming_prefix]),
    },
    {
      // CopyObject needs GetObject on the source and PutObject on the target; the verify
      // step reads the copy back (HeadObject is authorised by GetObject).
      Sid: 'WriteArchives',
      Effect: 'Allow',
      Action: ['s3:PutObject', 's3:GetObject'],
      Resource: under(mf.archive_prefixes),
    },
    {
      Sid: 'ScanIncoming',
      Effect: 'Allow',
      Action: ['s3:ListBucket'],
      Resource: [mf.bucket_arn],
    },
    {
      Sid: 'ReEnqueue',
      Effect: 'Allow',
      Action: ['sqs:SendMessage', 'sqs:GetQueueUrl', 'sqs:GetQueueAttributes'],
      Resource: [mf.queue_arn],
    },
    {
      // PutItem: the orphan scan records a mail that never got a notification
      // (conditional on the item not existing).
      Sid: 'DeliveryLedger',
      Effect: 'Allow',
      Action: ['dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:UpdateItem', 'dynamodb:Query'],
      Resource: [mf.table_arn, '%s/index/%s' % [mf.table_arn, mf.attention_index]],
    },
  ],
};

{
  RoleName: mf.reconcile_task_role,
  PolicyName: 'mailflow-reconcile',
  PolicyDocument: std.manifestJsonEx(document, '  '),
}
