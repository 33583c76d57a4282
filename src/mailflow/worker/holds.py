"""Operator holds as the worker sees them: a cached copy, refreshed by the heartbeat.

Reading the holds costs one Query per heartbeat interval per worker, never a call per
delivery: routes nobody holds pay nothing. The price is staleness: a new hold stops new runs
within one refresh (`heartbeat_s`); `mailflow hold` waits that long before it returns.

A delivery of a held key is parked in the table (`attn = held`) and its SQS message deleted,
like postfix's hold queue: it waits there without any receive count, however long the hold
lasts, and `mailflow release` queues it again. A hold lifted between our cached read and the
park is caught by reading the hold item once more after the park: if it is gone, the
delivery is taken back out of the hold queue and runs now.
"""

from __future__ import annotations

import structlog

from mailflow.aws.keyslots import Hold
from mailflow.aws.ledger import DeliveryKey
from mailflow.mail.notification import MailRef
from mailflow.ports import KeySlotsPort, LedgerPort
from mailflow.routing import DeliveryPlan
from mailflow.worker.delivery import Deliverer

log = structlog.get_logger("mailflow.worker.holds")


class HoldBook:
    """The holds in force, as of the last refresh."""

    def __init__(self, slots: KeySlotsPort, ledger: LedgerPort) -> None:
        self._slots = slots
        self._ledger = ledger
        self._holds: list[Hold] = []

    @property
    def holds(self) -> list[Hold]:
        """The cached holds."""
        return list(self._holds)

    async def refresh(self) -> None:
        """Read every hold (one Query). On failure the previous copy stays in force."""
        holds = await self._slots.holds()
        if {h.name for h in holds} != {h.name for h in self._holds}:
            log.info("holds_changed", holds=sorted(h.name for h in holds))
        self._holds = holds

    def covering(self, route: str, key: str | None) -> Hold | None:
        """The hold that stops this route key, if any (the cache: no call)."""
        return next((h for h in self._holds if h.covers(route, key)), None)

    async def park(
        self, deliverer: Deliverer, ref: MailRef, recipient: str, plan: DeliveryPlan
    ) -> bool:
        """True: the delivery is in the hold queue, its message may go. False: run it."""
        hold = self.covering(plan.route, plan.key)
        if hold is None:
            return False
        if not await deliverer.hold(ref, recipient, plan, hold.name):
            return False
        if await self._slots.hold_exists(hold):
            return True
        # Released while we parked it: the release may have missed this delivery.
        log.info("hold_lifted_meanwhile", mail_id=ref.mail_id, hold=hold.name)
        await self._ledger.unhold_delivery(DeliveryKey(ref.mail_id, recipient))
        self._holds = [h for h in self._holds if h.name != hold.name]
        return False
