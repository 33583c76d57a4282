"""The second backend itself: dynalite and LocalStack as started for the tests."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from mailflow.aws import AwsClients, open_clients
from mailflow.dev.backend_process import BackendNotInstalledError
from mailflow.dev.dynalite import Dynalite
from mailflow.dev.ses import received_notification
from mailflow.routing import delivery_id
from mailflow.worker.loop import Worker
from support.harness import SIMPLE_MAIL, Env, all_terminal, run_worker_until


def test_dynalite_refuses_what_dynamodb_refuses(aws_like_endpoints: dict[str, str]) -> None:
    ddb = boto3.client("dynamodb", endpoint_url=aws_like_endpoints["AWS_ENDPOINT_URL_DYNAMODB"])
    with pytest.raises(ClientError) as caught:
        ddb.create_table(
            TableName="ab",  # DynamoDB's minimum is 3 characters; moto accepts it
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
        )
    assert caught.value.response["Error"]["Code"] == "ValidationException"


def test_localstack_serves_sqs_sns_and_s3(aws_like_endpoints: dict[str, str]) -> None:
    url = aws_like_endpoints["AWS_ENDPOINT_URL_SQS"]
    assert {aws_like_endpoints[f"AWS_ENDPOINT_URL_{s}"] for s in ("S3", "SNS")} == {url}
    assert "QueueUrls" not in boto3.client("sqs", endpoint_url=url).list_queues(
        QueueNamePrefix="never-made-"
    )
    assert boto3.client("sns", endpoint_url=url).list_topics()["Topics"] is not None
    assert boto3.client("s3", endpoint_url=url).list_buckets()["Buckets"] is not None


def test_a_stopped_emulator_leaves_no_process() -> None:
    try:
        server = Dynalite().start()
    except BackendNotInstalledError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the second backend is required in CI: {exc}")
        pytest.skip(str(exc))
    pid = server._proc.pid if server._proc else 0
    server.stop()
    server.stop()  # idempotent
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("backend", ["localstack+dynalite"])
def test_a_control_character_reaches_localstacks_dlq_with_its_reason(env: Env) -> None:
    """Real SQS validation, no proxy: LocalStack refuses control characters in a message
    attribute as SQS does; the escaped dead-letter reason goes through at the first receive."""
    doc = received_notification(
        mail_id="a\x01b\x1b[31m",
        bucket=env.settings.bucket,
        key=f"{env.settings.incoming_prefix}x",
        prefix=env.settings.incoming_prefix,
        topic_arn="arn:aws:sns:us-east-1:000000000000:t",
        sender="shop@example.com",
        recipients=["ok-001@orders.example.com"],
        common_headers={},
        now=datetime.now(UTC),
    )
    env.publish_raw(json.dumps(doc))

    async def scenario() -> Worker:
        async with open_clients() as clients:

            async def settled(_c: AwsClients) -> bool:
                return env.queue_counts() == {"visible": 0, "in_flight": 0}

            return await run_worker_until(env.settings, clients, settled, timeout_s=30)

    worker = asyncio.run(scenario())
    (msg,) = env.drain_queue(dlq=True, wait_s=1)
    attrs = {k: v["StringValue"] for k, v in msg["MessageAttributes"].items()}
    assert attrs["mailflow_reason"] == "bad_mail_id"
    assert attrs["mailflow_detail"] == "a\\x01b\\x1b[31m"
    assert worker.stats["dead_lettered"] == 1


@pytest.mark.php
@pytest.mark.parametrize("backend", ["localstack+dynalite"])
def test_three_copies_of_one_notification_run_once_on_dynalite(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Duplicates meet a held lease: the claim's failed condition must say whose it is.
    dynalite sends no item back (no ReturnValuesOnConditionCheckFailure); the ledger reads it
    (before, the copies were deferred as `unknown` until the redrive limit)."""

    async def scenario() -> str:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["slow-001@orders.example.com"])
            (msg,) = env.drain_queue(wait_s=1)  # SNS to SQS is asynchronous on LocalStack
            env.boto("sqs").change_message_visibility(
                QueueUrl=env.queue_url(), ReceiptHandle=msg["ReceiptHandle"], VisibilityTimeout=0
            )
            env.publish_raw(msg["Body"])
            env.publish_raw(json.loads(msg["Body"])["Message"])  # raw-delivery shape too
            monkeypatch.setenv("SLOW_S", "1")

            async def settled(c: AwsClients) -> bool:
                return await all_terminal(env, [mail_id])(c) and env.queue_counts() == {
                    "visible": 0,
                    "in_flight": 0,
                }

            await run_worker_until(env.settings, clients, settled, timeout_s=40)
            return mail_id

    mail_id = asyncio.run(scenario())
    assert len(env.starts(delivery_id(mail_id, "slow-001@orders.example.com"))) == 1
