"""Per-key run slots and operator holds in memory (KeySlotsPort), as `aws.keyslots` keeps them.

A slot is taken when it is free, expired, or already ours (a retried take); renewing and
releasing are fenced by the token, so a holder whose slot expired and was taken can neither
extend nor free the new holder's.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailflow.aws.keyslots import Hold, SlotRef, hold_name
from mailflow.aws.ledger import DeliveryKey


@dataclass(slots=True)
class _Slot:
    token: str
    until_s: float
    worker: str
    holder: DeliveryKey
    taken_at: float


class FakeKeySlots:
    """In-memory `KeySlotsPort`; `slots` by (route, key, index), `hold_items` by name."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.slots: dict[tuple[str, str, int], _Slot] = {}
        self.hold_items: dict[str, Hold] = {}

    async def take(
        self,
        route: str,
        key: str,
        limit: int,
        *,
        holder: DeliveryKey,
        worker: str,
        token: str,
        lease_s: float,
    ) -> SlotRef | None:
        """One of the key's `limit` slots, tried from a token-dependent start."""
        start = zlib.crc32(token.encode()) % limit
        now = self._clock()
        for step in range(limit):
            index = (start + step) % limit
            slot = self.slots.get((route, key, index))
            if slot is None or slot.until_s < now or slot.token == token:
                self.slots[(route, key, index)] = _Slot(token, now + lease_s, worker, holder, now)
                return SlotRef(route, key, index, token)
        return None

    async def renew(self, ref: SlotRef, lease_s: float, *, deadline_s: float | None = None) -> bool:  # noqa: ARG002
        """Extend our slot; False once it is not ours."""
        slot = self.slots.get((ref.route, ref.key, ref.index))
        if slot is None or slot.token != ref.token:
            return False
        slot.until_s = self._clock() + lease_s
        return True

    async def release(self, ref: SlotRef) -> None:
        """Free the slot if it is still ours."""
        slot = self.slots.get((ref.route, ref.key, ref.index))
        if slot is not None and slot.token == ref.token:
            del self.slots[(ref.route, ref.key, ref.index)]

    async def release_all(self, route: str, key: str, limit: int, token: str) -> None:
        """Free whichever of the key's slots carries `token`."""
        for index in range(limit):
            await self.release(SlotRef(route, key, index, token))

    async def holders(self, route: str, key: str) -> list[dict[str, Any]]:
        """The key's taken slots (held or expired)."""
        return [
            {
                "slot_token": s.token,
                "slot_until": s.until_s,
                "slot_worker": s.worker,
                "slot_mail_id": s.holder.mail_id,
                "slot_recipient": s.holder.recipient,
            }
            for (r, k, _), s in sorted(self.slots.items(), key=lambda kv: kv[0][2])
            if (r, k) == (route, key)
        ]

    async def holds(self) -> list[Hold]:
        """Every operator hold."""
        return list(self.hold_items.values())

    async def put_hold(self, route: str, key: str, *, by: str, note: str = "") -> Hold:
        """Hold a key or a route (the first `held_at` is kept)."""
        name = hold_name(route, key)
        old = self.hold_items.get(name)
        hold = Hold(route, key, old.held_at if old else self._clock(), by, note)
        self.hold_items[name] = hold
        return hold

    async def hold_exists(self, hold: Hold) -> bool:
        """Is this hold still in force?"""
        return hold.name in self.hold_items

    async def delete_hold(self, route: str, key: str) -> bool:
        """Lift a hold; False if there was none."""
        return self.hold_items.pop(hold_name(route, key), None) is not None
