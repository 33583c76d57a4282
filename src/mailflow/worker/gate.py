"""Per-tenant concurrency: at most N deliveries of one route key (e.g. one store) at a time.

The legacy stock update may not survive two orders of one store at once; other stores must
keep flowing meanwhile, so the gate is per key, not global. This gate is the worker's own;
across workers the key's slots in the table (aws/keyslots.py) hold the limit.

Waiters of one key are admitted in SES receipt order (`mail.timestamp`), arrival order on
ties: an order mail and its cancellation waiting here together start in the order SES got them.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
from collections.abc import AsyncIterator


class _OrderedSemaphore:
    """A semaphore whose waiters are woken lowest `order` first (FIFO among equals)."""

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def locked(self) -> bool:
        return self.free == 0 or bool(self._waiters)

    async def acquire(self, order: float) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (order, next(self._seq), future)
        heapq.heappush(self._waiters, entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted as we were cancelled: hand it on
            else:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)  # the slot passes straight to the earliest waiter
                return
        self.free += 1


class KeyGate:
    """Per (route, key) semaphores for `max_in_flight_per_key`, in this worker only.

    A delivery without a key or limit passes straight through. Idle keys are forgotten, so
    memory stays bounded however many stores there are."""

    def __init__(self) -> None:
        self._gates: dict[tuple[str, str], _OrderedSemaphore] = {}
        self._users: dict[tuple[str, str], int] = {}

    def busy(self, route: str, key: str | None, limit: int | None) -> bool:
        """True when every slot of this key is taken (a new delivery of it would wait)."""
        if key is None or limit is None:
            return False
        gate = self._gates.get((route, key))
        return gate is not None and gate.locked()

    def waiting(self, route: str, key: str | None) -> int:
        """Deliveries of this key that hold or wait for the gate (0: idle or no key)."""
        return 0 if key is None else self._users.get((route, key), 0)

    @contextlib.asynccontextmanager
    async def slot(
        self, route: str, key: str | None, limit: int | None, order: float | None = None
    ) -> AsyncIterator[None]:
        """Hold one of the key's `limit` slots for the block, waiting for one if needed (the
        lowest `order`, the SES receipt time, first); a no-op without a key or a limit."""
        if key is None or limit is None:
            yield
            return
        name = (route, key)
        gate = self._gates.setdefault(name, _OrderedSemaphore(limit))
        self._users[name] = self._users.get(name, 0) + 1
        try:
            await gate.acquire(math.inf if order is None else order)
            try:
                yield
            finally:
                gate.release()
        finally:
            self._users[name] -= 1
            if self._users[name] == 0:  # forget idle keys: hundreds of stores, bounded memory
                del self._users[name]
                del self._gates[name]
