"""Per-tenant concurrency: at most N deliveries of one route key (e.g. one store) at a time.

The legacy stock update may not survive two orders of one store at once; other stores must
keep flowing meanwhile, so the gate is per key, not global.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyGate:
    """Per (route, key) semaphores for `max_in_flight_per_key`, in this worker only.

    A delivery without a key or limit passes straight through. Idle keys are forgotten, so
    memory stays bounded however many stores there are."""

    def __init__(self) -> None:
        self._gates: dict[tuple[str, str], asyncio.Semaphore] = {}
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
    async def slot(self, route: str, key: str | None, limit: int | None) -> AsyncIterator[None]:
        """Hold one of the key's `limit` slots for the block, waiting for one if needed; a no-op
        without a key or a limit."""
        if key is None or limit is None:
            yield
            return
        name = (route, key)
        gate = self._gates.setdefault(name, asyncio.Semaphore(limit))
        self._users[name] = self._users.get(name, 0) + 1
        try:
            async with gate:
                yield
        finally:
            self._users[name] -= 1
            if self._users[name] == 0:  # forget idle keys: hundreds of stores, bounded memory
                del self._users[name]
                del self._gates[name]
