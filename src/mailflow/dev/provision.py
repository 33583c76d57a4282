"""`mailflow provision`: create the bucket, topic, queue + DLQ, subscription and table.

Idempotent: every step checks or tolerates "already exists", so running it twice (or from
two containers at once in `docker compose up`) is fine. In production these resources
come from infra/terraform; both take every name and shape the code relies on from
mailflow.aws.shapes. This keeps dev, tests and LocalStack one command away.
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from mailflow import aws
from mailflow.aws import AwsClients, AwsPermanentError, shapes
from mailflow.aws.envelope import describe_key_arn, key_region
from mailflow.config import Settings

log = structlog.get_logger("mailflow.dev.provision")

DLQ_RETENTION_S = shapes.QUEUE_RETENTION_S


async def provision(clients: AwsClients, settings: Settings) -> dict[str, str]:
    """Create (or find) every resource mailflow needs and return their names: `bucket`,
    `topic_arn`, `queue_url`, `dlq_url`, `table`, and `kms_key_arn` when a KMS key is configured.

    Idempotent: safe to run again, and from two processes at once."""
    out: dict[str, str] = {}
    out["bucket"] = await _bucket(clients, settings.bucket)
    if settings.archive_bucket:
        await _bucket(clients, settings.archive_bucket)
    topic = await aws.call("sns.CreateTopic", clients.sns.create_topic, Name=settings.topic)
    out["topic_arn"] = topic["TopicArn"]
    dlq_url, dlq_arn = await _queue(
        clients,
        settings.dlq,
        {
            "MessageRetentionPeriod": str(DLQ_RETENTION_S),
        },
    )
    queue_url, queue_arn = await _queue(
        clients,
        settings.queue,
        {
            "VisibilityTimeout": str(settings.visibility_timeout_s),
            "ReceiveMessageWaitTimeSeconds": str(settings.wait_time_s),
            "MessageRetentionPeriod": str(DLQ_RETENTION_S),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": settings.max_receive_count},
            ),
        },
    )
    await aws.call(
        "sqs.SetQueueAttributes",
        clients.sqs.set_queue_attributes,
        QueueUrl=queue_url,
        Attributes={"Policy": json.dumps(_queue_policy(queue_arn, out["topic_arn"]))},
    )
    await _subscribe(clients, out["topic_arn"], queue_arn)
    out["queue_url"], out["dlq_url"] = queue_url, dlq_url
    out["table"] = await _table(clients, settings.table)
    if settings.kms_key:
        out["kms_key_arn"] = await _kms_key(clients, settings.kms_key)
    log.info("provisioned", **out)
    return out


async def _bucket(clients: AwsClients, name: str) -> str:
    # The S3 client's region: the mail region (MAILFLOW_MAIL_REGION) when one is set.
    region = clients.s3.meta.region_name or "us-east-1"
    kwargs: dict[str, Any] = {"Bucket": name}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        await aws.call("s3.CreateBucket", clients.s3.create_bucket, **kwargs)
    except AwsPermanentError as exc:
        if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise
    return name


async def _kms_key(clients: AwsClients, key_id: str) -> str:
    """The key SES encrypts with: created (with its alias) when an alias names none yet."""
    kms = await clients.kms_in(key_region(key_id))
    try:
        return await describe_key_arn(kms, key_id)
    except AwsPermanentError as exc:
        alias = "alias/" + key_id.rsplit(":alias/", maxsplit=1)[-1].removeprefix("alias/")
        if exc.code != "NotFoundException" or "alias/" not in key_id:
            raise
    created = await aws.call(
        "kms.CreateKey",
        kms.create_key,
        Description="mailflow: SES receipt rule encryption (development)",
        KeySpec="SYMMETRIC_DEFAULT",
        KeyUsage="ENCRYPT_DECRYPT",
    )
    arn = str(created["KeyMetadata"]["Arn"])
    await aws.call("kms.CreateAlias", kms.create_alias, AliasName=alias, TargetKeyId=arn)
    return arn


async def _queue(clients: AwsClients, name: str, attrs: dict[str, str]) -> tuple[str, str]:
    try:
        resp = await aws.call(
            "sqs.CreateQueue",
            clients.sqs.create_queue,
            QueueName=name,
            Attributes=attrs,
        )
        url = resp["QueueUrl"]
    except AwsPermanentError as exc:
        if "QueueAlreadyExists" not in exc.code and "QueueNameExists" not in exc.code:
            raise
        # Same name, other attributes: keep the queue, converge its attributes.
        url = (await aws.call("sqs.GetQueueUrl", clients.sqs.get_queue_url, QueueName=name))[
            "QueueUrl"
        ]
        await aws.call(
            "sqs.SetQueueAttributes",
            clients.sqs.set_queue_attributes,
            QueueUrl=url,
            Attributes=attrs,
        )
    got = await aws.call(
        "sqs.GetQueueAttributes",
        clients.sqs.get_queue_attributes,
        QueueUrl=url,
        AttributeNames=["QueueArn"],
    )
    return str(url), str(got["Attributes"]["QueueArn"])


def _queue_policy(queue_arn: str, topic_arn: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "topic-to-queue",
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            },
        ],
    }


async def _subscribe(clients: AwsClients, topic_arn: str, queue_arn: str) -> None:
    subs = await aws.call(
        "sns.ListSubscriptionsByTopic",
        clients.sns.list_subscriptions_by_topic,
        TopicArn=topic_arn,
    )
    if any(s.get("Endpoint") == queue_arn for s in subs.get("Subscriptions", [])):
        return
    await aws.call(
        "sns.Subscribe",
        clients.sns.subscribe,
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=queue_arn,
    )


async def _table(clients: AwsClients, name: str) -> str:
    try:
        await aws.call(
            "ddb.CreateTable",
            clients.dynamodb.create_table,
            TableName=name,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[
                {"AttributeName": name, "AttributeType": kind}
                for name, kind in shapes.KEY_TYPES.items()
            ],
            KeySchema=[
                {"AttributeName": shapes.HASH_KEY, "KeyType": "HASH"},
                {"AttributeName": shapes.RANGE_KEY, "KeyType": "RANGE"},
            ],
            GlobalSecondaryIndexes=[
                {
                    "IndexName": shapes.ATTENTION_INDEX,
                    "KeySchema": [
                        {"AttributeName": shapes.ATTENTION_HASH_KEY, "KeyType": "HASH"},
                        {"AttributeName": shapes.ATTENTION_RANGE_KEY, "KeyType": "RANGE"},
                    ],
                    "Projection": {"ProjectionType": "ALL"},
                },
            ],
        )
    except AwsPermanentError as exc:
        if exc.code != "ResourceInUseException":
            raise
        return name
    waiter = clients.dynamodb.get_waiter("table_exists")
    await waiter.wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    try:
        await aws.call(
            "ddb.UpdateTimeToLive",
            clients.dynamodb.update_time_to_live,
            TableName=name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": shapes.TTL_ATTRIBUTE},
        )
    except AwsPermanentError as exc:  # already enabled, or a backend without TTL
        log.info("ttl_not_set", error=str(exc))
    return name
