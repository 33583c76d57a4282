"""The backends the contract suite runs against: the in-memory fakes and real servers.

Every test in tests/contract takes the `backend` fixture (tests/contract/conftest.py) and runs
once per entry of BACKENDS. Adding a backend is one line there: a name, the async context
manager that opens it (`ContractBackend` for one fresh set of resources) and the session
fixture of its server (None for the fakes). Tests on a server are marked `server`, so
`make unit` runs only the fakes.

Time: the ledger runs on a `ManualClock` on every backend (its conditions compare times the
ledger itself writes). The queue's visibility timeouts run on the server's own clock, so
`pass_time` moves the manual clock and, on a server, also sleeps: a test says how much time
passes, and only a server test spends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mailflow.aws import AwsClients, open_clients
from mailflow.aws.keyslots import KeySlots
from mailflow.aws.ledger import Ledger
from mailflow.aws.queue import Queue
from mailflow.aws.store import S3Store
from mailflow.config import Settings
from mailflow.dev.provision import provision
from mailflow.ports import LedgerPort, MailStorePort, QueuePort
from mailflow.testing import FakeKeySlots, FakeLedger, FakeQueue, FakeStore, ManualClock

#: The redrive policy's maxReceiveCount on every backend.
MAX_RECEIVE_COUNT = 2
#: The fakes' empty long polls last this fraction of their wait (a server's take the whole).
POLL_TIME_SCALE = 0.05


@dataclass
class ContractBackend:
    """One backend's three ports on fresh resources, and what a test needs to look inside."""

    name: str
    clock: ManualClock
    ledger: LedgerPort
    queue: QueuePort
    store: MailStorePort
    keyslots: Any  # KeySlotsPort, plus the operator's put_hold / delete_hold
    bucket: str
    put: Callable[[str, bytes], Awaitable[None]]
    counts: Callable[[], Awaitable[dict[str, int]]]
    dead_letters: Callable[[], Awaitable[list[tuple[str, dict[str, str]]]]]
    real_time: bool

    async def pass_time(self, seconds: float) -> None:
        """Let `seconds` pass: on the manual clock, and on a server's clock too."""
        self.clock.advance(seconds)
        if self.real_time:
            await asyncio.sleep(seconds)


@contextlib.asynccontextmanager
async def fake() -> AsyncIterator[ContractBackend]:
    """The in-memory fakes of mailflow.testing, all on one manual clock."""
    clock = ManualClock()
    dlq = FakeQueue("contract-dlq", clock=clock, poll_time_scale=POLL_TIME_SCALE)
    queue = FakeQueue(
        "contract",
        clock=clock,
        dlq=dlq,
        max_receive_count=MAX_RECEIVE_COUNT,
        poll_time_scale=POLL_TIME_SCALE,
    )
    store = FakeStore(clock)

    async def put(key: str, data: bytes) -> None:
        store.put("contract", key, data)

    async def counts() -> dict[str, int]:
        return queue.counts()

    async def dead_letters() -> list[tuple[str, dict[str, str]]]:
        return [(m.body, dict(m.attributes)) for m in dlq.messages()]

    yield ContractBackend(
        name="fake",
        clock=clock,
        ledger=FakeLedger(clock),
        queue=queue,
        store=store,
        keyslots=FakeKeySlots(clock),
        bucket="contract",
        put=put,
        counts=counts,
        dead_letters=dead_letters,
        real_time=False,
    )


@contextlib.asynccontextmanager
async def aws_api(client: str = "botocore") -> AsyncIterator[ContractBackend]:
    """mailflow's AWS adapters against whatever server AWS_ENDPOINT_URL names (moto,
    LocalStack, ...), on resources provisioned as `mailflow dev` provisions them; `client`
    is open_clients' (botocore, or the lean hot path)."""
    clock = ManualClock()
    uid = uuid.uuid4().hex[:10]
    settings = Settings(bucket=f"ct-{uid}", topic=f"ct-{uid}", queue=f"ct-{uid}", table=f"ct-{uid}")
    async with open_clients(client=client) as clients:
        await provision(clients, settings)
        queue = await Queue.resolve(clients.sqs, settings.queue, settings.dlq)
        await _redrive(clients, queue, MAX_RECEIVE_COUNT)

        async def put(key: str, data: bytes) -> None:
            await clients.s3.put_object(Bucket=settings.bucket, Key=key, Body=data)

        async def counts() -> dict[str, int]:
            depth = await queue.depth()
            return {"visible": depth["queue_visible"], "in_flight": depth["queue_in_flight"]}

        async def dead_letters() -> list[tuple[str, dict[str, str]]]:
            resp = await clients.sqs.receive_message(
                QueueUrl=queue.dlq_url,
                MaxNumberOfMessages=10,
                MessageAttributeNames=["All"],
                VisibilityTimeout=60,
            )
            return [
                (
                    m["Body"],
                    {k: v["StringValue"] for k, v in m.get("MessageAttributes", {}).items()},
                )
                for m in resp.get("Messages", [])
            ]

        yield ContractBackend(
            name=f"aws_api/{client}",
            clock=clock,
            ledger=Ledger(clients.dynamodb, settings.table, clock=clock),
            queue=queue,
            store=S3Store(clients.s3),
            keyslots=KeySlots(clients.dynamodb, settings.table, clock=clock),
            bucket=settings.bucket,
            put=put,
            counts=counts,
            dead_letters=dead_letters,
            real_time=True,
        )


async def _redrive(clients: AwsClients, queue: Queue, max_receive_count: int) -> None:
    arn = await queue.arn(str(queue.dlq_url))
    policy = {"deadLetterTargetArn": arn, "maxReceiveCount": max_receive_count}
    await clients.sqs.set_queue_attributes(
        QueueUrl=queue.url, Attributes={"RedrivePolicy": json.dumps(policy)}
    )


Opener = Callable[[], contextlib.AbstractAsyncContextManager[ContractBackend]]

#: name → (opener, the session fixture of its server: a URL for every service, or a dict of
#: per-service endpoint variables; None for the fakes).
BACKENDS: dict[str, tuple[Opener, str | None]] = {
    "fake": (fake, None),
    "moto": (aws_api, "moto_url"),
    "localstack+dynalite": (aws_api, "aws_like_endpoints"),
    # The lean hot path (mailflow.aws.lean) on the same servers: its answers and errors must be
    # botocore's, or these fail where the botocore rows pass.
    "localstack+dynalite+lean": (functools.partial(aws_api, "lean"), "aws_like_endpoints"),
}


@dataclass
class Runner:
    """`backend.run(scenario)`: asyncio.run of `scenario(ContractBackend)` (the AWS clients
    live in the scenario's event loop, so the backend is opened inside it)."""

    opener: Opener

    def run(self, scenario: Callable[[ContractBackend], Awaitable[Any]]) -> Any:
        """Open the backend, run the scenario on it, close the backend."""

        async def main() -> Any:
            async with self.opener() as b:
                return await scenario(b)

        return asyncio.run(main())
