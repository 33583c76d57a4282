"""A worker's world on the in-memory fakes: settings, ledger, queue + DLQ, store, processor.

The logic tests (tests/unit) run the real Worker, Deliverer and Reconciler on this. No server,
no php, no sleeps. Time is a `ManualClock` shared by the fakes and the worker, and it jumps
(like trio's autojump clock): whenever the world is idle (no run in progress, no message
visible, no message held by a worker), `run_until` moves the clock to the moment the next
hidden message becomes visible. A deferral or a retry backoff then costs no real time, and
nothing happens out of order: a lease can only run out while nothing else is going on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailflow.aws.ledger import TERMINAL, DeliveryKey
from mailflow.config import Settings
from mailflow.ports import Backend
from mailflow.testing import (
    FakeLedger,
    FakeQueue,
    FakeStore,
    ManualClock,
    ScriptedProcessor,
    behave_route,
    fake_backend,
    receive_mail,
)
from mailflow.worker.loop import Worker

#: A long poll with nothing to return lasts 1/20 of its wait_time_s (see FakeQueue).
POLL_TIME_SCALE = 0.05
#: Polls (5 ms apart) that must find the world idle before the clock jumps.
IDLE_POLLS_BEFORE_JUMP = 3

SIMPLE_MAIL = (
    b"From: Shop <shop@example.com>\r\nTo: ok-001@orders.example.com\r\n"
    b"Subject: order\r\nMessage-ID: <x@example.com>\r\n\r\n"
) + "注文番号: 1001\r\n".encode()


def mail_to(*to: str, body: bytes = b"hello\r\n") -> bytes:
    """A small mail addressed to `to` (its header; the envelope is what routes it)."""
    return (
        b"From: Shop <shop@example.com>\r\nTo: "
        + ", ".join(to).encode()
        + b"\r\nSubject: test\r\n\r\n"
        + body
    )


def fake_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """The e2e tests' settings, on fake resource names."""
    uid = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "bucket": f"mf-{uid}",
        "topic": f"mf-{uid}",
        "queue": f"mf-{uid}",
        "table": f"mf-{uid}",
        "routes": (behave_route(),),
        "concurrency": 4,
        "visibility_timeout_s": 20,
        "lease_s": 20,
        "wait_time_s": 1,
        "retry_base_s": 0.2,
        "retry_max_s": 0.5,
        "processor_timeout_s": 10,
        "kill_grace_s": 1,
        "shutdown_grace_s": 10,
        "health_file": tmp_path / "health",
        "spool_dir": tmp_path / "spool",
        "log_format": "json",
    }
    return Settings(**(values | overrides))


Until = Callable[[], Awaitable[bool]]


@dataclass
class World:
    """Everything a logic test sets up and looks at."""

    settings: Settings
    clock: ManualClock
    backend: Backend
    ledger: FakeLedger
    queue: FakeQueue
    store: FakeStore
    processor: ScriptedProcessor = field(default_factory=ScriptedProcessor)
    jumps_s: list[float] = field(default_factory=list)  # how far the clock jumped, each time

    @property
    def dlq(self) -> FakeQueue:
        """The DLQ behind the queue."""
        assert self.queue.dlq is not None
        return self.queue.dlq

    async def send(
        self, raw: bytes, to: list[str], sender: str = "shop@example.com", verdict: str = "PASS"
    ) -> str:
        """A mail received by SES: stored, its notification queued; its mail id."""
        return await receive_mail(
            self.store, self.queue, self.settings, raw, to, sender, verdict=verdict
        )

    async def records(self, mail_id: str) -> list[dict[str, Any]]:
        """Every delivery of one mail."""
        return await self.ledger.get_mail(mail_id)

    async def record(self, mail_id: str, recipient: str) -> dict[str, Any]:
        """One delivery."""
        return await self.ledger.get(DeliveryKey(mail_id, recipient))

    def all_terminal(self, mail_ids: list[str], expected: int | None = None) -> Until:
        """A condition: every delivery of these mails is terminal (and there are `expected`)."""

        async def check() -> bool:
            records = [r for m in mail_ids for r in await self.records(m)]
            want = expected if expected is not None else len(mail_ids)
            return len(records) >= want and all(r.get("status") in TERMINAL for r in records)

        return check

    def settled(self, mail_ids: list[str]) -> Until:
        """A condition: all terminal and the queue empty."""
        terminal = self.all_terminal(mail_ids)

        async def check() -> bool:
            return await terminal() and self.queue.counts() == {"visible": 0, "in_flight": 0}

        return check

    def worker(self, settings: Settings | None = None, **kwargs: Any) -> Worker:
        """A worker on this world's fakes and processor."""
        return Worker(
            settings or self.settings,
            None,
            self.processor,
            backend=self.backend,
            clock=self.clock,
            **kwargs,
        )

    def _idle(self, workers: list[Worker]) -> bool:
        return (
            self.processor.running == 0
            and self.queue.counts()["visible"] == 0
            and not any(w._held for w in workers)
        )

    def _jump(self) -> None:
        upcoming = self.queue.next_visible_at()
        if upcoming is not None:
            step = upcoming - self.clock() + 0.001
            self.jumps_s.append(step)
            self.clock.advance(step)

    async def run_until(
        self,
        until: Until,
        *,
        settings: Settings | None = None,
        timeout_s: float = 10,
        workers: int = 1,
        worker_ids: tuple[str, ...] = (),
    ) -> list[Worker]:
        """Run workers (named `worker_ids`, else `workers` of them) until `until` holds;
        then stop them and wait. Fails on timeout."""
        ids = worker_ids or (None,) * workers
        running = [self.worker(settings, worker_id=i) for i in ids]
        tasks = [asyncio.create_task(w.run(handle_signals=False)) for w in running]
        deadline = time.monotonic() + timeout_s
        idle_polls = 0
        try:
            while not await until():
                for task in tasks:
                    if task.done():
                        raise AssertionError(f"worker exited early: {task.result()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"condition not met within {timeout_s}s")
                idle_polls = idle_polls + 1 if self._idle(running) else 0
                if idle_polls >= IDLE_POLLS_BEFORE_JUMP:
                    self._jump()
                    idle_polls = 0
                await asyncio.sleep(0.005)
        finally:
            for w in running:
                w.request_stop()
            for w, task in zip(running, tasks, strict=True):
                w.exit_code = await task  # type: ignore[attr-defined]
        return running


def make_world(tmp_path: Path, **overrides: Any) -> World:
    """A fresh world; `overrides` change the settings."""
    settings = fake_settings(tmp_path, **overrides)
    clock = ManualClock()
    backend, ledger, queue, store = fake_backend(
        clock=clock, max_receive_count=settings.max_receive_count, poll_time_scale=POLL_TIME_SCALE
    )
    return World(settings, clock, backend, ledger, queue, store)
