"""What the tests share: the backend as a test sees it (`Env`), the php test processor's route,
an in-process worker run until a condition holds, and the sample mails.

Fixtures live in tests/conftest.py; everything a test imports lives here (never in conftest,
which pytest imports under its own rules).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from mailflow.aws import AwsClients, open_clients
from mailflow.aws.ledger import TERMINAL, Ledger
from mailflow.config import Route, Settings
from mailflow.dev.provision import provision
from mailflow.dev.ses import receive_mail
from mailflow.worker.loop import Worker

TESTS = Path(__file__).parent.parent
REPO = TESTS.parent
BEHAVE = TESTS / "processors" / "behave.php"

#: The backends an end-to-end test can run on: `@pytest.mark.parametrize("backend", BACKENDS)`.
#: The second validates like AWS (LocalStack for S3/SQS/SNS, dynalite for DynamoDB).
BACKENDS = ("moto", "localstack+dynalite")
#: The per-service endpoint variables botocore reads before AWS_ENDPOINT_URL.
SERVICE_ENDPOINT_VARS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_SQS",
    "AWS_ENDPOINT_URL_SNS",
    "AWS_ENDPOINT_URL_DYNAMODB",
)

#: What decides where a boto3 client sends its calls (Env.boto keeps one client per value).
_CLIENT_ENV = (*SERVICE_ENDPOINT_VARS, "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")

#: Where daemons live on Debian: php-fpm8.2 is in /usr/sbin, which a user's PATH may lack.
EXTRA_SBIN = "/usr/sbin:/usr/local/sbin:/sbin"


def require_binary(*names: str) -> str:
    """The first of `names` found (PATH plus the sbin directories): skip on a laptop without
    it, fail when CI is set (a missing binary there is a broken CI image)."""
    search = os.environ.get("PATH", "") + os.pathsep + EXTRA_SBIN
    for name in names:
        found = shutil.which(name, path=search)
        if found:
            return found
    message = f"needs {' or '.join(names)}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: a missing binary is a broken CI image)")
    pytest.skip(message)
    raise AssertionError("unreachable")  # pytest.skip raises


def behave_route(name: str = "behave") -> Route:
    """`<mode>-<store>@…` runs behave.php MODE STORE: the recipient picks the behaviour."""
    return Route(
        name=name,
        match=r"(?P<mode>[a-z0-9]+)-(?P<store>[0-9]{3})@orders\.example\.com",
        command=f"php {BEHAVE} {{mode}} {{store}}",
        key="store",
    )


@dataclass
class Env:
    settings: Settings
    ledger_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    _boto_clients: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False)

    def with_settings(self, **overrides: Any) -> Settings:
        return self.settings.model_copy(update=overrides)

    # --- the backend, synchronously (boto3), for assertions ---------------------------------

    def boto(self, service: str) -> Any:
        """A boto3 client of `service`, made once per endpoint and region: the endpoint comes
        from AWS_ENDPOINT_URL_<SERVICE> or AWS_ENDPOINT_URL, as the worker's."""
        key = (service, *(os.environ.get(name, "") for name in _CLIENT_ENV))
        client = self._boto_clients.get(key)
        if client is None:
            client = self._boto_clients[key] = boto3.client(service)
        return client

    def queue_url(self, dlq: bool = False) -> str:
        name = self.settings.dlq if dlq else self.settings.queue
        return str(self.boto("sqs").get_queue_url(QueueName=name)["QueueUrl"])

    def drain_queue(self, dlq: bool = False, wait_s: int = 0) -> list[dict[str, Any]]:
        sqs = self.boto("sqs")
        out = []
        while True:
            resp = sqs.receive_message(
                QueueUrl=self.queue_url(dlq),
                MaxNumberOfMessages=10,
                WaitTimeSeconds=wait_s,
                MessageAttributeNames=["All"],
                VisibilityTimeout=300,
            )
            msgs = resp.get("Messages", [])
            if not msgs:
                return out
            out.extend(msgs)

    def queue_counts(self) -> dict[str, int]:
        attrs = self.boto("sqs").get_queue_attributes(
            QueueUrl=self.queue_url(),
            AttributeNames=["All"],
        )["Attributes"]
        return {
            "visible": int(attrs["ApproximateNumberOfMessages"]),
            "in_flight": int(attrs["ApproximateNumberOfMessagesNotVisible"]),
        }

    def effects(self) -> list[list[str]]:
        path = self.ledger_dir / "effects.log"
        if not path.exists():
            return []
        return [line.split() for line in path.read_text().splitlines() if line.strip()]

    def starts(self, delivery_id: str | None = None) -> list[list[str]]:
        return [
            e
            for e in self.effects()
            if e[-1] == "start" and (delivery_id is None or e[0] == delivery_id)
        ]

    def publish_raw(self, body: str) -> None:
        self.boto("sqs").send_message(QueueUrl=self.queue_url(), MessageBody=body)

    # --- async helpers ----------------------------------------------------------------------

    async def send(
        self,
        clients: AwsClients,
        raw: bytes,
        to: list[str],
        sender: str = "shop@example.com",
        verdict: str = "PASS",
    ) -> str:
        return await receive_mail(clients, self.settings, raw, to, sender, verdict=verdict)

    async def records(self, clients: AwsClients, mail_id: str) -> list[dict[str, Any]]:
        return await Ledger(clients.dynamodb, self.settings.table).get_mail(mail_id)


Until = Callable[[AwsClients], Awaitable[bool]]


async def run_worker_until(
    settings: Settings,
    clients: AwsClients,
    until: Until,
    *,
    timeout_s: float = 30,
    poll_s: float = 0.2,
) -> Worker:
    """Run an in-process worker until `until` holds; then drain it. Fails on timeout."""
    worker = Worker(settings, clients)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if task.done():
                raise AssertionError(f"worker exited early: {task.result()}")
            if await until(clients):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout_s}s")
            await asyncio.sleep(poll_s)
    finally:
        worker.request_stop()
        worker.exit_code = await task  # type: ignore[attr-defined]
    return worker


def all_terminal(env: Env, mail_ids: list[str], expected: int | None = None) -> Until:
    async def check(clients: AwsClients) -> bool:
        records = [r for m in mail_ids for r in await env.records(clients, m)]
        want = expected if expected is not None else len(mail_ids)
        return len(records) >= want and all(r.get("status") in TERMINAL for r in records)

    return check


def sample(name: str) -> bytes:
    return (REPO / "examples" / "mail" / name).read_bytes()


SIMPLE_MAIL = (
    b"From: Shop <shop@example.com>\r\nTo: ok-001@orders.example.com\r\n"
    b"Subject: order\r\nMessage-ID: <x@example.com>\r\n\r\n"
) + "注文番号: 1001\r\n".encode()


def settings_env(settings: Settings) -> dict[str, str]:
    """The MAILFLOW_* variables that make a `mailflow` subprocess use these settings."""
    out = dict(os.environ)
    for name, value in settings.model_dump(mode="json", exclude={"routes_file"}).items():
        if value is None:
            continue
        if name == "routes":
            out["MAILFLOW_ROUTES"] = json.dumps(value)
        elif isinstance(value, list):
            out[f"MAILFLOW_{name.upper()}"] = json.dumps(value)
        else:
            out[f"MAILFLOW_{name.upper()}"] = str(value)
    return out


def start_worker_process(settings: Settings, log_path: Path) -> Any:
    """`mailflow worker` as a real OS process in its own session (so a test can kill -PGID)."""
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "mailflow", "worker"],
            env=settings_env(settings),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


async def provision_settings(settings: Settings) -> None:
    """Create the bucket, topic, queue + DLQ and table these settings name."""
    async with open_clients() as clients:
        await provision(clients, settings)


def mail_to(*to: str) -> bytes:
    """A small mail addressed to `to` (its header; the envelope is what routes it)."""
    return (
        b"From: Shop <shop@example.com>\r\nTo: " + ", ".join(to).encode()
        + b"\r\nSubject: order\r\nMessage-ID: <r@example.com>\r\n\r\nbody\r\n"
    )  # fmt: skip


def cli_env(env: Env, **extra: str) -> dict[str, str]:
    """The environment of a `mailflow` CLI subprocess on this test's resources."""
    s = env.settings
    return {
        **os.environ,
        "MAILFLOW_BUCKET": s.bucket, "MAILFLOW_TOPIC": s.topic, "MAILFLOW_QUEUE": s.queue,
        "MAILFLOW_TABLE": s.table, "MAILFLOW_LOG_FORMAT": "json",
        "MAILFLOW_ROUTES": json.dumps([r.model_dump() for r in s.routes]),
        **extra,
    }  # fmt: skip


def obj(env: Env, key: str) -> bytes | None:
    """The bytes of an object in the test's bucket; None if it does not exist."""
    try:
        return env.boto("s3").get_object(Bucket=env.settings.bucket, Key=key)["Body"].read()
    except env.boto("s3").exceptions.NoSuchKey:
        return None
