"""The second backend itself: dynalite and LocalStack as started for the tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from mailflow.dev.backend_process import BackendNotInstalledError
from mailflow.dev.dynalite import Dynalite


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
