"""All three fakes on one clock, as `mailflow.ports.Backend`."""

from __future__ import annotations

import time
from collections.abc import Callable

from mailflow.ports import Backend
from mailflow.testing.keyslots import FakeKeySlots
from mailflow.testing.ledger import FakeLedger
from mailflow.testing.queue import FakeQueue, new_queue_pair
from mailflow.testing.store import FakeStore


def fake_backend(
    *,
    clock: Callable[[], float] = time.time,
    max_receive_count: int | None = 5,
    poll_time_scale: float = 1.0,
) -> tuple[Backend, FakeLedger, FakeQueue, FakeStore]:
    """A ledger, a queue with its DLQ and redrive policy, and a store, on one clock; returned
    both as a Backend (for the worker) and one by one (for the test's own checks)."""
    ledger = FakeLedger(clock)
    queue = new_queue_pair(
        clock=clock, max_receive_count=max_receive_count, poll_time_scale=poll_time_scale
    )
    store = FakeStore(clock)
    backend = Backend(ledger=ledger, queue=queue, store=store, keyslots=FakeKeySlots(clock))
    return backend, ledger, queue, store
