"""Shared test harness: one moto server per session over real HTTP, fresh resources per test.

Tests are plain sync functions that drive asyncio scenarios with `asyncio.run`, so nothing
depends on an async pytest plugin. Processors are real php-cli processes
(tests/processors/behave.php); tests needing php skip without it, but fail when CI is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mailflow.aws import AwsClients, open_clients
from mailflow.aws.ledger import TERMINAL, Ledger
from mailflow.config import Route, Settings
from mailflow.dev.motoserver import MotoServer
from mailflow.dev.provision import provision
from mailflow.dev.ses import receive_mail
from mailflow.worker.loop import Worker

TESTS = Path(__file__).parent
REPO = TESTS.parent
BEHAVE = TESTS / "processors" / "behave.php"


def require_binary(name: str) -> str:
    """Path of a binary the test needs: skip on a laptop without it, fail in CI."""
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()),
        None,
    )
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI but was not found")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    server = MotoServer().start()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": server.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    )
    os.environ.pop("AWS_PROFILE", None)
    yield server.url
    server.stop()


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

    def with_settings(self, **overrides: Any) -> Settings:
        return self.settings.model_copy(update=overrides)

    # --- the backend, synchronously (boto3), for assertions ---------------------------------

    def boto(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=os.environ["AWS_ENDPOINT_URL"])

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


@pytest.fixture
def env(moto_url: str, tmp_path: Path) -> Env:
    uid = uuid.uuid4().hex[:10]
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    os.environ["LEDGER_DIR"] = str(ledger_dir)
    settings = Settings(
        bucket=f"mf-{uid}",
        topic=f"mf-{uid}",
        queue=f"mf-{uid}",
        table=f"mf-{uid}",
        routes=(behave_route(),),
        pass_env=("LEDGER_DIR", "SLOW_S"),
        concurrency=4,
        visibility_timeout_s=20,
        lease_s=20,
        wait_time_s=1,
        retry_base_s=0.2,
        retry_max_s=0.5,
        processor_timeout_s=10,
        kill_grace_s=1,
        shutdown_grace_s=10,
        health_file=tmp_path / "heartbeat",
        spool_dir=tmp_path / "spool",
        log_format="json",
    )
    asyncio.run(_provision(settings))
    return Env(settings=settings, ledger_dir=ledger_dir)


async def _provision(settings: Settings) -> None:
    async with open_clients() as clients:
        await provision(clients, settings)


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
    import subprocess  # noqa: PLC0415

    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "mailflow", "worker"],
            env=settings_env(settings),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
