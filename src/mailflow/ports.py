"""The seams between mailflow's logic and its backends: the ledger, the queue, the mail store.

Each protocol lists exactly the methods the worker, one delivery, the reconciler and the
archive moves call, nothing more. Two families implement them:
- `mailflow.aws` (`Ledger` and `KeySlots` on DynamoDB, `Queue` on SQS, `S3Store` on S3):
  production, and the moto server / LocalStack in development and in the contract and
  end-to-end tests;
- `mailflow.testing` (`FakeLedger`, `FakeKeySlots`, `FakeQueue`, `FakeStore`): in memory,
  with an injectable clock, for the fast logic tests. tests/contract runs one suite against
  both families, so a fake cannot drift from the real behaviour.

This module sits at the top of the package, beside the other pure domain modules, and not in
`aws/`: logic that types against it must not pull in aioboto3 (importing `mailflow.aws` costs
about a second). The value types the protocols speak (`DeliveryKey`, `Claimed`, `Message`,
`SpooledMail`, ...) still live beside their AWS implementation and are imported here for the
type checker only, so importing this module at run time costs nothing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mailflow.aws.keyslots import Hold, SlotRef
    from mailflow.aws.ledger import Busy, Claimed, DeliveryKey, Status
    from mailflow.aws.queue import Message
    from mailflow.aws.store import Listed, Location, ObjectInfo, SpooledMail


class LedgerPort(Protocol):
    """The deliveries table: conditional writes fenced by lease tokens, and its reads."""

    async def claim(
        self,
        key: DeliveryKey,
        *,
        worker: str,
        token: str,
        lease_s: float,
        meta: Mapping[str, Any],
        carrier: str | None = None,
    ) -> Claimed | Busy:
        """Take the delivery (new, received, due retry, expired lease) or say who holds it."""
        ...

    async def renew(
        self,
        key: DeliveryKey,
        token: str,
        lease_s: float,
        *,
        deadline_s: float | None = None,
    ) -> bool:
        """Extend our lease; False once someone else owns the delivery."""
        ...

    async def finish(
        self,
        key: DeliveryKey,
        token: str,
        status: Status,
        fields: Mapping[str, Any],
        history_entry: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Record an attempt's outcome under our lease; raises LeaseLostError."""
        ...

    async def record_without_claim(
        self,
        key: DeliveryKey,
        status: Status,
        fields: Mapping[str, Any],
        *,
        attn: str | None = None,
    ) -> bool:
        """A final state no run precedes (unroutable, quarantined); False if it existed."""
        ...

    async def hold_delivery(self, key: DeliveryKey, *, hold: str, meta: Mapping[str, Any]) -> bool:
        """Park an unclaimed delivery of a held key in the table; False if it is not."""
        ...

    async def unhold_delivery(self, key: DeliveryKey) -> dict[str, Any] | None:
        """Take a delivery out of the hold queue, due now; None if it was not held."""
        ...

    async def transition(
        self,
        key: DeliveryKey,
        *,
        expect: tuple[Status, ...],
        status: Status,
        fields: Mapping[str, Any],
        attention: bool = True,
    ) -> dict[str, Any] | None:
        """From one of `expect` to `status`; None if it was in none of them."""
        ...

    async def get_mail(self, mail_id: str) -> list[dict[str, Any]]:
        """Every delivery of one mail."""
        ...

    async def get(self, key: DeliveryKey) -> dict[str, Any]:
        """One delivery, {} if there is none."""
        ...

    async def needing_attention(
        self, status: Status | str, *, before_s: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Not-archived deliveries in `status` whose attention time has come, oldest first."""
        ...

    async def reconcile_state(self) -> dict[str, Any]:
        """The orphan scan's saved state ({} before the first pass)."""
        ...

    async def save_reconcile_state(self, *, cursor: str, queue_empty_at: float | None) -> None:
        """Save the orphan scan's cursor and when the queue was last seen empty."""
        ...

    async def lock_mail(self, key: DeliveryKey, owner: str, hold_s: float) -> bool:
        """Take the expiring per-mail lock (re-entrant for `owner`)."""
        ...

    async def unlock_mail(self, key: DeliveryKey, owner: str) -> None:
        """Release the per-mail lock if it is still ours."""
        ...

    async def create_received(self, key: DeliveryKey, fields: Mapping[str, Any]) -> bool:
        """A `received` delivery for an orphan mail; False if the key exists."""
        ...

    async def mark_requeued(
        self, key: DeliveryKey, *, expect: Status, seen_requeues: int, recheck_at: float
    ) -> dict[str, Any] | None:
        """Record a re-enqueue if the delivery is still as the reconciler saw it."""
        ...

    async def fail_stale(
        self,
        key: DeliveryKey,
        *,
        expect: Status,
        seen_requeues: int,
        fields: Mapping[str, Any],
        entry: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        """Fail abandoned work that cannot run, if still as the reconciler saw it."""
        ...


class QueuePort(Protocol):
    """The notification queue and its DLQ: receive, settle, defer, keep alive, dead-letter."""

    url: str

    async def receive(self, max_messages: int, wait_s: int, visibility_s: int) -> list[Message]:
        """Up to `max_messages` (10 at most), long-polling up to `wait_s`, hidden for
        `visibility_s`; each receive counts towards the redrive policy."""
        ...

    async def delete(self, msg: Message) -> None:
        """Delete a handled message (a stale handle is logged, not raised)."""
        ...

    async def set_visibility(self, msg: Message, seconds: float) -> bool:
        """Hide the message for `seconds` from now (0: visible at once); False if refused."""
        ...

    async def extend_batch(
        self, messages: Sequence[Message], seconds: float, *, deadline_s: float | None = None
    ) -> list[str]:
        """Push visibility out for many messages; the ids refused."""
        ...

    async def dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        """Copy to the DLQ with the reason as message attributes, then delete here."""
        ...

    async def send(self, body: str) -> str:
        """Enqueue a body; its message id."""
        ...

    async def depth(self) -> dict[str, int]:
        """`queue_visible`, `queue_in_flight` (and `dlq_…` when there is a DLQ)."""
        ...


class KeySlotsPort(Protocol):
    """Per-key run slots shared by every worker, and the operator's holds."""

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
        """One of the key's `limit` slots (free, expired, or ours already); None if all held."""
        ...

    async def renew(self, ref: SlotRef, lease_s: float, *, deadline_s: float | None = None) -> bool:
        """Extend the slot; False once it is not ours."""
        ...

    async def release(self, ref: SlotRef) -> None:
        """Free the slot if it is still ours."""
        ...

    async def release_all(self, route: str, key: str, limit: int, token: str) -> None:
        """Free whichever of the key's slots carries `token`."""
        ...

    async def holds(self) -> list[Hold]:
        """Every operator hold."""
        ...

    async def hold_exists(self, hold: Hold) -> bool:
        """Is this hold still in force?"""
        ...


class MailStorePort(Protocol):
    """The mail bucket: spool a mail for a processor, and move mails to their archive."""

    def spooled(
        self,
        bucket: str,
        key: str,
        *,
        spool_dir: Path,
        max_bytes: int,
        mail_id: str | None = None,
    ) -> AbstractAsyncContextManager[SpooledMail]:
        """The mail in a private spool file for the block (ObjectMissingError, TooLargeError)."""
        ...

    async def head(self, where: Location) -> ObjectInfo | None:
        """Size, ETag, checksum and metadata of an object; None if it does not exist."""
        ...

    def list_objects(
        self,
        bucket: str,
        prefix: str,
        *,
        max_pages: int,
        start_after: str | None = None,
        page_keys: int = 1000,
    ) -> AsyncGenerator[Listed, None]:
        """Objects under `prefix` after `start_after`, in key order, at most `max_pages`
        pages of `page_keys`."""
        ...

    async def read_prefix(self, where: Location, size_bytes: int) -> bytes:
        """The first `size_bytes` of a mail (its header block)."""
        ...

    async def copy_verified(
        self, src: ObjectInfo, dest: Location, metadata: dict[str, str]
    ) -> tuple[ObjectInfo, str]:
        """Copy with new metadata if the source is unchanged; verify the copy's bytes."""
        ...

    async def verify_copy(self, src: ObjectInfo, dst: ObjectInfo) -> str:
        """How `dst` was found byte-identical to `src`; raises CopyMismatchError if not."""
        ...

    async def delete(self, where: Location) -> None:
        """Delete an object (a missing one is no error)."""
        ...


@dataclass(frozen=True, slots=True)
class Backend:
    """The three seams together, as the worker and the reconciler use them."""

    ledger: LedgerPort
    queue: QueuePort
    store: MailStorePort
    keyslots: KeySlotsPort
