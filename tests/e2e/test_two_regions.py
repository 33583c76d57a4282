"""The original design's two regions on one moto server: SES receives in us-west-2 (bucket, topic,
KMS key), the queue, the table and the worker run in ap-northeast-1.

moto serves every region on one endpoint, so the test records the region each request was
signed for (SigV4 credential scope) and asserts every call went to its resource's region
directly; KMS keys exist per region, so the decryption also proves where KMS was asked.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from mailflow.aws import open_clients
from mailflow.config import Settings
from mailflow.dev.motoserver import MotoServer
from mailflow.dev.provision import provision
from support.harness import (
    Env,
    all_terminal,
    behave_route,
    require_binary,
    run_worker_until,
    sample,
)

MAIL_REGION = "us-west-2"
HOME_REGION = "ap-northeast-1"
SCOPE = re.compile(r"Credential=[^/]+/\d{8}/(?P<region>[a-z0-9-]+)/(?P<service>[a-z0-9-]+)/")


class Signed:
    """WSGI middleware: counts (service, region) of every signed request."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def __call__(self, app: Any) -> Any:
        def wrapped(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
            if m := SCOPE.search(environ.get("HTTP_AUTHORIZATION", "")):
                with self._lock:
                    self.seen[(m["service"], m["region"])] += 1
            return app(environ, start)

        return wrapped


@pytest.fixture
def two_regions(moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    signed = Signed()
    server = MotoServer(middleware=signed).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", HOME_REGION)
    try:
        yield signed
    finally:
        server.stop()


def test_two_region_layout_delivers_encrypted_mail(
    two_regions: Signed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_binary("php")
    uid = uuid.uuid4().hex[:10]
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    monkeypatch.setenv("LEDGER_DIR", str(ledger_dir))
    settings = Settings(
        bucket=f"mf-{uid}",
        topic=f"mf-{uid}",
        queue=f"mf-{uid}",
        table=f"mf-{uid}",
        mail_region=MAIL_REGION,
        kms_key=f"alias/mf-{uid}",  # no region in it: the mail region's KMS
        routes=(behave_route(),),
        pass_env=("LEDGER_DIR",),
        wait_time_s=1,
        health_file=tmp_path / "heartbeat",
        spool_dir=tmp_path / "spool",
        log_format="json",
    )
    env = Env(settings=settings, ledger_dir=ledger_dir)
    raw = sample("order-001-iso2022jp.eml")

    async def scenario() -> tuple[dict[str, str], dict[str, Any]]:
        async with open_clients(mail_region=settings.mail_region) as clients:
            made = await provision(clients, settings)
            mail_id = await env.send(clients, raw, ["ok-001@orders.example.com"])
            await run_worker_until(settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            return made, rec

    made, rec = asyncio.run(scenario())
    calls = Counter(two_regions.seen)  # before the assertions below add their own
    assert (rec["status"], rec["reason"]) == ("succeeded", "ok")
    assert (rec["bucket"], rec["key"]) == (settings.bucket, f"incoming/{rec['mail_id']}")
    (seen,) = (ledger_dir / "stdin").iterdir()
    assert seen.read_bytes().endswith(raw)

    # Where each resource was made.
    def boto(service: str, region: str) -> Any:
        return boto3.client(service, region_name=region)

    s3 = boto("s3", MAIL_REGION)
    assert s3.get_bucket_location(Bucket=settings.bucket)["LocationConstraint"] == MAIL_REGION
    assert s3.head_object(Bucket=settings.bucket, Key=rec["key"])["Metadata"]["x-amz-key-v2"]
    assert made["topic_arn"].split(":")[3] == MAIL_REGION
    assert made["kms_key_arn"].split(":")[3] == MAIL_REGION
    assert made["queue_url"].startswith(os.environ["AWS_ENDPOINT_URL"])
    queue_arn = boto("sqs", HOME_REGION).get_queue_attributes(
        QueueUrl=made["queue_url"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    assert queue_arn.split(":")[3] == HOME_REGION
    assert boto("dynamodb", HOME_REGION).describe_table(TableName=settings.table)
    assert settings.table not in boto("dynamodb", MAIL_REGION).list_tables()["TableNames"]
    with pytest.raises(boto("kms", HOME_REGION).exceptions.NotFoundException):
        boto("kms", HOME_REGION).describe_key(KeyId=settings.kms_key)

    # Where each call went: every request signed for its resource's region, none redirected.
    regions: dict[str, set[str]] = {}
    for service, region in calls:
        regions.setdefault(service, set()).add(region)
    assert regions["s3"] == {MAIL_REGION}
    assert regions["kms"] == {MAIL_REGION}
    assert regions["sns"] == {MAIL_REGION}
    assert regions["sqs"] == {HOME_REGION}
    assert regions["dynamodb"] == {HOME_REGION}
    assert calls[("kms", MAIL_REGION)] >= 2  # GenerateDataKey (SES), Decrypt (worker)
