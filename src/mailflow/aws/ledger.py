"""The deliveries table (DynamoDB): claim, lease, fencing, outcome. The one source of truth.

Key: `mail_id` (SES messageId) + `recipient` (lower-cased envelope recipient). Never the SQS
MessageId: a duplicate SNS delivery gets a new one.

Delivery semantics, in one place:
- `claim` is one conditional write. It wins when the item does not exist, is `received`, is
  `retrying` and due, or is `processing` with an expired lease. It installs a fresh random
  `lease_token`; every later write is conditional on that token (fencing), so a worker that
  lost its lease can never overwrite a newer attempt.
- Writes are retried on transient errors (aws.call). A retried write whose first try did land
  fails its condition; the item then shows *our* token, and we recognise our own write
  instead of mistaking it for a loss.
- The `attention` index is sparse: only items that are not archived carry `attn`, so the
  reconciler and `mailflow list` query instead of scanning.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mailflow import aws
from mailflow.aws import ConditionFailedError
from mailflow.aws.expressions import Update, attribute_value, deserialize, serialize
from mailflow.aws.shapes import ATTENTION_INDEX
from mailflow.errors import LeaseLostError

HISTORY_TAIL_CHARS = 512


class Status(enum.StrEnum):
    """A delivery's state. received → processing → succeeded | failed | retrying (→ processing
    again); a finished mail's deliveries become archived, keeping the final one as `outcome`."""

    RECEIVED = "received"
    PROCESSING = "processing"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ARCHIVED = "archived"


TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.ARCHIVED})
#: `attn` of a delivery parked in the table because its key is held (`mailflow hold`). Its
#: `status` stays `received` or `retrying`; the reconciler, which queries by status, skips it.
HELD = "held"
#: `attn` of a mail the reconciler found without a notification whose recipients only its To/Cc
#: headers name: recorded `failed`, never delivered, kept (not archived) for an operator.
ORPHAN = "orphan"
#: The item holding the reconciler's orphan-scan state (no `attn`: outside the index; a
#: mail_id SES never makes: its message ids are lower-case letters and digits).
RECONCILE_STATE_KEY = {"mail_id": "#reconcile", "recipient": "orphan-scan"}


@dataclass(frozen=True, slots=True)
class DeliveryKey:
    """The table key of one delivery: the SES messageId and the lower-cased envelope recipient."""

    mail_id: str
    recipient: str

    def as_key(self) -> dict[str, Any]:
        """The key in DynamoDB's typed form, for `Key=`."""
        return {"mail_id": {"S": self.mail_id}, "recipient": {"S": self.recipient}}


@dataclass(frozen=True, slots=True)
class Claimed:
    """A won claim: the delivery as the claim left it, and the lease token every later write of
    this attempt is fenced by."""

    record: dict[str, Any]
    token: str

    @property
    def attempt(self) -> int:
        """Which attempt this is, counting from 1 (the claim counts it)."""
        return int(self.record.get("attempts", 1))


@dataclass(frozen=True, slots=True)
class Busy:
    """The claim lost. `why` says what to do with the SQS message:
    terminal → duplicate, delete it; leased / not_due → defer it until `until_s`."""

    record: dict[str, Any]
    why: str
    until_s: float | None


class Ledger:
    """The deliveries table: the one record of every delivery's state, and the lease that makes
    one worker at a time run it.

    Contract: every state change is one conditional UpdateItem, so concurrent workers,
    reconcilers and operators never overwrite each other; the worker's writes after `claim`
    are fenced by the claim's lease token (a worker that lost its lease gets `LeaseLostError`
    or False, never a silent overwrite); every write may be retried safely, a retry whose first
    try landed being recognised as our own. Operator and reconciler writes return None/False
    when their condition did not hold. Backend failures raise `TransientError` (retryable) or
    `AwsPermanentError`. Times are epoch seconds from `clock`."""

    def __init__(
        self,
        client: Any,
        table: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ddb = client
        self.table = table
        self._clock = clock

    async def _update(
        self,
        op: str,
        key: DeliveryKey,
        upd: Update,
        condition: str,
        returns: str = "ALL_NEW",
        *,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        try:
            resp = await aws.call(
                op,
                self._ddb.update_item,
                deadline_s=deadline_s,
                TableName=self.table,
                Key=key.as_key(),
                UpdateExpression=upd.expression(),
                ConditionExpression=condition,
                ExpressionAttributeNames=upd.names,
                ExpressionAttributeValues=upd.values,
                ReturnValues=returns,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ConditionFailedError as exc:
            if exc.item is not None:
                raise
            # A backend without ReturnValuesOnConditionCheckFailure (dynalite, older DynamoDB
            # Local) sends no item: without one a claim cannot tell whose the delivery is, and
            # would defer a finished delivery's duplicate until the redrive limit. Read it.
            raw = await aws.call(
                "ddb.GetItem",
                self._ddb.get_item,
                deadline_s=deadline_s,
                TableName=self.table,
                Key=key.as_key(),
                ConsistentRead=True,
            )
            item = raw.get("Item") or {}
            raise ConditionFailedError(op, "condition failed (item read back)", item) from None
        return deserialize(resp.get("Attributes"))

    async def _update_or_none(
        self, op: str, key: DeliveryKey, upd: Update, condition: str
    ) -> dict[str, Any] | None:
        """`_update`, or None when the condition did not hold (someone else got there first)."""
        try:
            return await self._update(op, key, upd, condition)
        except ConditionFailedError:
            return None

    async def _pages(self, op: str, method: Any, limit: int, **kwargs: Any) -> list[dict[str, Any]]:
        """Every item of a paginated Query or Scan, deserialized, at most `limit`."""
        items: list[dict[str, Any]] = []
        while len(items) < limit:
            resp = await aws.call(op, method, **kwargs)
            items.extend(deserialize(i) for i in resp.get("Items", []))
            if "LastEvaluatedKey" not in resp:
                break
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
        return items[:limit]

    # --- the worker's writes ----------------------------------------------------------------

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
        """Claim the delivery for one attempt: one conditional write, so at most one claimant
        wins, whatever the number of workers and duplicate messages.

        It wins when the delivery does not exist yet, is `received`, is `retrying` and due, or
        is `processing` with an expired lease (its worker died). The winner gets `Claimed`: the
        delivery is `processing`, leased to `worker` for `lease_s` seconds under `token` (pass
        a fresh random one; `renew` and `finish` are fenced by it), `attempts` counted up, and
        `meta` written where absent. A retried call whose first try landed is recognised as
        ours and also returns `Claimed`. Otherwise `Busy` says why (terminal, leased, not due)
        and until when. Backend failures raise.

        `carrier` is the SQS MessageId of the message this attempt runs for: the one copy that
        stays queued until the delivery is terminal, so another copy that finds the lease held
        may be deleted (see the worker)."""
        now = self._clock()
        upd = Update()
        upd.set("status", Status.PROCESSING.value)
        upd.set("lease_owner", worker)
        upd.set("lease_token", token)
        if carrier is not None:
            upd.set("lease_message", carrier)
        else:
            upd.remove("lease_message")
        upd.set("lease_expires_at", now + lease_s)
        upd.set("started_at", now)
        upd.set("updated_at", now)
        upd.set("attn", Status.PROCESSING.value)
        upd.set("attn_at", now + lease_s)
        attempts = upd.name("attempts")
        zero, one = upd.value("zero", 0), upd.value("one", 1)
        upd.set_raw(f"{attempts} = if_not_exists({attempts}, {zero}) + {one}")
        for attr, value in meta.items():
            upd.set_if_absent(attr, value)
        upd.remove("next_attempt_at")
        st, nxt, exp = upd.name("status"), upd.name("next_attempt_at"), upd.name("lease_expires_at")
        now_ref = upd.value("now", now)
        condition = (
            f"{upd.item_exists('mail_id', exists=False)}"
            f" OR {st} = {upd.value('received', Status.RECEIVED.value)}"
            f" OR ({st} = {upd.value('retrying', Status.RETRYING.value)} AND {nxt} <= {now_ref})"
            f" OR ({st} = {upd.value('processing', Status.PROCESSING.value)}"
            f" AND {exp} < {now_ref})"
        )
        try:
            record = await self._update("ddb.claim", key, upd, condition)
        except ConditionFailedError as exc:
            old = deserialize(exc.item)
            if old.get("lease_token") == token and old.get("status") == Status.PROCESSING:
                return Claimed(old, token)  # our own write landed; its response was lost
            return _busy(old, now)
        return Claimed(record, token)

    async def renew(
        self,
        key: DeliveryKey,
        token: str,
        lease_s: float,
        *,
        deadline_s: float | None = None,
    ) -> bool:
        """Extend the lease. False means it is gone: someone else owns the delivery now.
        True also when the delivery already carries our own outcome (nothing left to renew).
        `deadline_s` bounds the call (TransientError past it), so a heartbeat ends in time."""
        now = self._clock()
        upd = Update()
        upd.set("lease_expires_at", now + lease_s)
        upd.set("attn_at", now + lease_s)
        condition = (
            f"{upd.name('lease_token')} = {upd.value('token', token)}"
            f" AND {upd.name('status')} = {upd.value('processing', Status.PROCESSING.value)}"
        )
        try:
            await self._update(
                "ddb.renew", key, upd, condition, returns="NONE", deadline_s=deadline_s
            )
        except ConditionFailedError as exc:
            # Our own outcome landed after the heartbeat took its snapshot: nothing was lost
            # (a False here would cancel a delivery that has just finished).
            old = deserialize(exc.item)
            return old.get("lease_token") == old.get("outcome_token") == token
        return True

    async def finish(
        self,
        key: DeliveryKey,
        token: str,
        status: Status,
        fields: Mapping[str, Any],
        history_entry: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Record an attempt's outcome, fenced by the lease token. Raises LeaseLostError.

        Returns nothing of the item on success: reading it back (history, tails) cost the
        worker about a millisecond of CPU per delivery to parse, and nobody needs it. When a
        retried write finds its own first try landed, the item as it was is returned."""
        now = self._clock()
        upd = Update()
        upd.set("status", status.value)
        upd.set("updated_at", now)
        upd.set("attn", status.value)
        upd.set("attn_at", fields.get("next_attempt_at") or now)
        upd.assign(fields)
        upd.remove("lease_expires_at")
        upd.remove("lease_owner")
        # Which attempt wrote this outcome: only that attempt may mistake a failed condition
        # for its own earlier write (the reconciler's writes keep the lease token, not this).
        upd.set("outcome_token", token)
        upd.append_history(history_entry)
        condition = (
            f"{upd.name('lease_token')} = {upd.value('token', token)}"
            f" AND {upd.name('status')} = {upd.value('processing', Status.PROCESSING.value)}"
        )
        try:
            return await self._update("ddb.finish", key, upd, condition, returns="NONE")
        except ConditionFailedError as exc:
            old = deserialize(exc.item)
            if old.get("lease_token") == old.get("outcome_token") == token and (
                old.get("status") == status.value
            ):
                return old  # our own write, retried after a lost response
            raise LeaseLostError(
                f"{key.mail_id}/{key.recipient}: lease lost"
                f" (now {old.get('status')} by {old.get('lease_owner')})",
            ) from None

    async def record_without_claim(
        self,
        key: DeliveryKey,
        status: Status,
        fields: Mapping[str, Any],
        *,
        attn: str | None = None,
    ) -> bool:
        """Write a final state no processor run precedes (unroutable, quarantined).

        Only a delivery nobody has touched yet can be written this way; False = it existed.
        `attn` files it under another attention bucket than its status (ORPHAN).
        """
        now = self._clock()
        upd = Update()
        values = {"created_at": now, "finished_at": now, "attempts": 0, **fields}
        values |= {
            "status": status.value,
            "updated_at": now,
            "attn": attn or status.value,
            "attn_at": now,
        }
        for attr, value in values.items():
            upd.set(attr, value)
        condition = (
            f"{upd.item_exists('mail_id', exists=False)}"
            f" OR {upd.name('status')} = {upd.value('received', Status.RECEIVED.value)}"
        )
        return await self._update_or_none("ddb.record", key, upd, condition) is not None

    async def hold_delivery(self, key: DeliveryKey, *, hold: str, meta: Mapping[str, Any]) -> bool:
        """Park a delivery of a held key in the table (the hold queue): `attn = held`.

        Only a delivery nobody has claimed is held: absent, `received`, or `retrying`
        (its `next_attempt_at` is kept). False: it is processing elsewhere or finished."""
        now = self._clock()
        upd = Update()
        for attr, value in meta.items():
            upd.set_if_absent(attr, value)
        upd.set_if_absent("status", Status.RECEIVED.value)
        upd.set_if_absent("held_at", now)
        upd.assign({"hold": hold, "attn": HELD, "attn_at": now, "updated_at": now})
        condition = (
            f"{upd.item_exists('mail_id', exists=False)}"
            f" OR {upd.one_of('status', (Status.RECEIVED.value, Status.RETRYING.value))}"
        )
        return await self._update_or_none("ddb.hold", key, upd, condition) is not None

    async def unhold_delivery(self, key: DeliveryKey) -> dict[str, Any] | None:
        """Back from the hold queue: `attn` is the status again, due now. None if not held."""
        now = self._clock()
        upd = Update()
        attn = upd.name("attn")
        upd.set_raw(f"{attn} = {upd.name('status')}")
        upd.assign({"attn_at": now, "updated_at": now, "hold": None, "held_at": None})
        condition = f"{attn} = {upd.value('held', HELD)}"
        return await self._update_or_none("ddb.unhold", key, upd, condition)

    # --- the operator's and the reconciler's writes -----------------------------------------

    async def transition(
        self,
        key: DeliveryKey,
        *,
        expect: tuple[Status, ...],
        status: Status,
        fields: Mapping[str, Any],
        attention: bool = True,
    ) -> dict[str, Any] | None:
        """Move a delivery from one of `expect` to `status`; None if it was not in `expect`."""
        now = self._clock()
        upd = Update()
        upd.set("status", status.value)
        upd.set("updated_at", now)
        if attention:
            upd.set("attn", status.value)
            upd.set("attn_at", fields.get("next_attempt_at") or now)
        else:
            upd.remove("attn")
            upd.remove("attn_at")
        upd.assign(fields)
        condition = upd.one_of("status", [s.value for s in expect])
        return await self._update_or_none("ddb.transition", key, upd, condition)

    # --- reads ------------------------------------------------------------------------------

    async def get_mail(self, mail_id: str) -> list[dict[str, Any]]:
        """Every delivery of one mail (strongly consistent)."""
        return await self._pages(
            "ddb.Query",
            self._ddb.query,
            limit=1_000_000,
            TableName=self.table,
            KeyConditionExpression="mail_id = :m",
            ExpressionAttributeValues={":m": {"S": mail_id}},
            ConsistentRead=True,
        )

    async def get(self, key: DeliveryKey) -> dict[str, Any]:
        """One delivery (strongly consistent read); {} when there is none."""
        resp = await aws.call(
            "ddb.GetItem",
            self._ddb.get_item,
            TableName=self.table,
            Key=key.as_key(),
            ConsistentRead=True,
        )
        return deserialize(resp.get("Item"))

    async def needing_attention(
        self,
        status: Status | str,
        *,
        before_s: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Items in `status` (not archived) from the sparse index, oldest first."""
        names = {"#attn": "attn"}  # DynamoDB refuses names the expression does not use
        values: dict[str, Any] = {":s": {"S": str(status)}}
        cond = "#attn = :s"
        if before_s is not None:
            names["#at"] = "attn_at"
            cond += " AND #at <= :t"
            values[":t"] = attribute_value(before_s)
        return await self._pages(
            "ddb.Query",
            self._ddb.query,
            limit=limit,
            TableName=self.table,
            IndexName=ATTENTION_INDEX,
            KeyConditionExpression=cond,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            Limit=min(1000, limit),
        )

    async def reconcile_state(self) -> dict[str, Any]:
        """The orphan scan's state ({} before the first pass): `cursor` (the last key looked
        at, "" to start over) and `queue_empty_at` (when the queue was last seen empty)."""
        resp = await aws.call(
            "ddb.GetItem",
            self._ddb.get_item,
            TableName=self.table,
            Key=serialize(RECONCILE_STATE_KEY),
            ConsistentRead=True,
        )
        return deserialize(resp.get("Item"))

    async def save_reconcile_state(self, *, cursor: str, queue_empty_at: float | None) -> None:
        """Store the orphan scan's state (last writer wins: two passes at once only repeat
        a stretch of the listing, and every orphan write is conditional)."""
        upd = Update()
        upd.set("cursor", cursor)
        upd.set("updated_at", self._clock())
        if queue_empty_at is not None:
            upd.set("queue_empty_at", queue_empty_at)
        await aws.call(
            "ddb.UpdateItem",
            self._ddb.update_item,
            TableName=self.table,
            Key=serialize(RECONCILE_STATE_KEY),
            UpdateExpression=upd.expression(),
            ExpressionAttributeNames=upd.names,
            ExpressionAttributeValues=upd.values,
        )

    async def scan(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Every item, for archived listings and small tables only."""
        return await self._pages("ddb.Scan", self._ddb.scan, limit=limit, TableName=self.table)

    # --- the reconciler's and the operator's guarded writes (reconcile.py, ops.py) ----------

    async def lock_mail(self, key: DeliveryKey, owner: str, hold_s: float) -> bool:
        """Take the per-mail lock shared by archive moves and operator retries. It lives on
        one existing delivery of the mail (callers pick the lowest recipient) and expires, so
        a crashed holder blocks nobody for long. Re-entrant for the same owner."""
        now = self._clock()
        upd = Update()
        upd.set("mail_lock", owner)
        upd.set("mail_lock_until", now + hold_s)
        lock, until = upd.name("mail_lock"), upd.name("mail_lock_until")
        condition = (
            f"{upd.item_exists('mail_id')} AND (attribute_not_exists({until})"
            f" OR {until} < {upd.value('now', now)} OR {lock} = {upd.value('owner', owner)})"
        )
        return await self._update_or_none("ddb.lock_mail", key, upd, condition) is not None

    async def unlock_mail(self, key: DeliveryKey, owner: str) -> None:
        """Release the per-mail lock if `owner` still holds it (a lock taken over is left alone)."""
        upd = Update()
        upd.remove("mail_lock")
        upd.remove("mail_lock_until")
        condition = f"{upd.name('mail_lock')} = {upd.value('owner', owner)}"
        with contextlib.suppress(ConditionFailedError):  # expired and taken over: not ours
            await self._update("ddb.unlock_mail", key, upd, condition)

    async def create_received(self, key: DeliveryKey, fields: Mapping[str, Any]) -> bool:
        """A `received` delivery for a mail found without records (a lost notification);
        False if any record for this key exists."""
        now = self._clock()
        item = {
            "created_at": now,
            **fields,
            "mail_id": key.mail_id,
            "recipient": key.recipient,
            "status": Status.RECEIVED.value,
            "updated_at": now,
            "attn": Status.RECEIVED.value,
            "attn_at": now,
        }
        try:
            await aws.call(
                "ddb.PutItem",
                self._ddb.put_item,
                TableName=self.table,
                Item=serialize(item),
                ConditionExpression="attribute_not_exists(mail_id)",
            )
        except ConditionFailedError:
            return False
        return True

    def _stale_guard(self, upd: Update, expect: Status, seen_requeues: int, now: float) -> str:
        """Still as the reconciler saw it: same status, no requeue since, lease/retry due."""
        count = upd.name("requeue_count")
        cond = f"{upd.name('status')} = {upd.value('expect', expect.value)} AND " + (
            f"{count} = {upd.value('seen', seen_requeues)}"
            if seen_requeues
            else f"attribute_not_exists({count})"
        )
        if expect is Status.PROCESSING:
            cond += f" AND {upd.name('lease_expires_at')} < {upd.value('guard_now', now)}"
        elif expect is Status.RETRYING:
            cond += f" AND {upd.name('next_attempt_at')} <= {upd.value('guard_now', now)}"
        return cond

    async def mark_requeued(
        self,
        key: DeliveryKey,
        *,
        expect: Status,
        seen_requeues: int,
        recheck_at: float,
    ) -> dict[str, Any] | None:
        """Record a re-enqueue; None if another reconciler (or a worker) got there first.
        `attn_at` moves to `recheck_at`, so the index does not offer the item again before."""
        now = self._clock()
        upd = Update()
        upd.set("requeued_at", now)
        upd.set("requeue_count", seen_requeues + 1)
        upd.set("attn_at", recheck_at)
        return await self._update_or_none(
            "ddb.mark_requeued", key, upd, self._stale_guard(upd, expect, seen_requeues, now)
        )

    async def fail_stale(
        self,
        key: DeliveryKey,
        *,
        expect: Status,
        seen_requeues: int,
        fields: Mapping[str, Any],
        entry: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        """Unclaimed or abandoned work that cannot run (its object is gone): `failed`."""
        now = self._clock()
        upd = Update()
        values = {
            **fields,
            "status": Status.FAILED.value,
            "outcome": Status.FAILED.value,
            "finished_at": now,
            "updated_at": now,
            "attn": Status.FAILED.value,
            "attn_at": now,
        }
        for attr, value in values.items():
            upd.set(attr, value)
        for attr in ("lease_owner", "lease_expires_at", "next_attempt_at"):
            upd.remove(attr)
        upd.append_history(entry)
        return await self._update_or_none(
            "ddb.fail_stale", key, upd, self._stale_guard(upd, expect, seen_requeues, now)
        )

    async def reopen(
        self,
        key: DeliveryKey,
        *,
        expect: tuple[Status, ...],
        fields: Mapping[str, Any],
        entry: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        """Operator retry: a finished delivery back to `retrying`, due now, `attempts` from
        zero so max_attempts applies afresh; the history is kept and gains `entry`."""
        now = self._clock()
        upd = Update()
        values = {
            "status": Status.RETRYING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "updated_at": now,
            "attn": Status.RETRYING.value,
            "attn_at": now,
        }
        upd.assign({**fields, **values})
        upd.append_history(entry)
        condition = upd.one_of("status", [s.value for s in expect])
        return await self._update_or_none("ddb.reopen", key, upd, condition)

    async def attention_stats(
        self,
        status: Status | str,
        limit: int = 100_000,
    ) -> tuple[int, dict[str, Any] | None]:
        """(count, the delivery received longest ago) of one non-archived status, read from
        the sparse index with a small projection."""
        items = await self._pages(
            "ddb.Query",
            self._ddb.query,
            limit=limit,
            TableName=self.table,
            IndexName=ATTENTION_INDEX,
            KeyConditionExpression="#attn = :s",
            ProjectionExpression="mail_id, recipient, received_at, created_at",
            ExpressionAttributeNames={"#attn": "attn"},
            ExpressionAttributeValues={":s": {"S": str(status)}},
        )
        count, oldest, oldest_at = len(items), None, float("inf")
        for item in items:
            at = float(item.get("received_at") or item.get("created_at") or oldest_at)
            if at < oldest_at:
                oldest, oldest_at = item, at
        return count, oldest

    async def item_count_estimate(self) -> int:
        """The table's item count as DynamoDB last published it (refreshed about every 6 h)."""
        table = await aws.call("ddb.DescribeTable", self._ddb.describe_table, TableName=self.table)
        return int(table["Table"].get("ItemCount", 0))


def _busy(old: dict[str, Any], now: float) -> Busy:
    status = old.get("status")
    if status in TERMINAL:
        return Busy(old, "terminal", None)
    if status == Status.RETRYING:
        return Busy(old, "not_due", float(old.get("next_attempt_at", now)))
    if status == Status.PROCESSING:
        return Busy(old, "leased", float(old.get("lease_expires_at", now)))
    # `received` cannot lose a claim; an item of unknown shape is someone else's business.
    return Busy(old, "unknown", now + 30)


def history_entry(
    *,
    attempt: int,
    worker: str,
    started_at: float,
    finished_at: float,
    status: Status,
    reason: str,
    exit_code: int | None,
    stderr_tail: str,
) -> dict[str, Any]:
    """One attempt as the delivery's `history` list keeps it (times in epoch seconds); the
    stderr tail is cut to its last HISTORY_TAIL_CHARS characters."""
    entry: dict[str, Any] = {
        "attempt": attempt,
        "worker": worker,
        "started_at": started_at,
        "finished_at": finished_at,
        "status": status.value,
        "reason": reason,
        "stderr_tail": stderr_tail[-HISTORY_TAIL_CHARS:],
    }
    if exit_code is not None:
        entry["exit_code"] = exit_code
    return entry
