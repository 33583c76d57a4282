"""The deliveries table in memory, with the ledger's conditional writes (LedgerPort).

Every method states the same condition as `mailflow.aws.ledger.Ledger` writes as a DynamoDB
ConditionExpression, evaluated here against a dict, and answers the same way when it fails:
the item as it was (ALL_OLD) decides between "our own earlier write", a lost lease and a busy
delivery. Values pass through the same DynamoDB type conversion as the real ledger's (floats
kept to the millisecond, whole numbers read back as int), so what a test reads back is what
DynamoDB would have stored.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mailflow.aws.expressions import deserialize, serialize
from mailflow.aws.ledger import (
    HELD,
    RECONCILE_STATE_KEY,
    TERMINAL,
    Busy,
    Claimed,
    DeliveryKey,
    Status,
)
from mailflow.errors import LeaseLostError

Item = dict[str, Any]
_STATE_KEY = DeliveryKey(RECONCILE_STATE_KEY["mail_id"], RECONCILE_STATE_KEY["recipient"])


def _stored(value: Any) -> Any:
    """`value` as DynamoDB gives it back."""
    return deserialize(serialize({"v": value}))["v"]


def _busy(old: Item, now: float) -> Busy:
    # The same verdicts as mailflow.aws.ledger._busy; duplicated so the fake never calls into
    # the implementation it is checked against.
    status = old.get("status")
    if status in TERMINAL:
        return Busy(old, "terminal", None)
    if status == Status.RETRYING:
        return Busy(old, "not_due", float(old.get("next_attempt_at", now)))
    if status == Status.PROCESSING:
        return Busy(old, "leased", float(old.get("lease_expires_at", now)))
    return Busy(old, "unknown", now + 30)


def _lt(item: Item, attr: str, value: float) -> bool:
    """DynamoDB's `attr < value`: false when the attribute is missing."""
    return attr in item and item[attr] < value


def _le(item: Item, attr: str, value: float) -> bool:
    return attr in item and item[attr] <= value


class FakeLedger:
    """In-memory `LedgerPort`. `items` is the table, keyed by (mail_id, recipient); `writes`
    counts the conditional writes by operation, for tests that assert on traffic."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.items: dict[tuple[str, str], Item] = {}
        self.writes: dict[str, int] = {}

    # --- the table ----------------------------------------------------------------------------

    def _now(self) -> float:
        return float(_stored(self._clock()))

    def _old(self, key: DeliveryKey) -> Item:
        """ALL_OLD: a copy of the item as it is ({} if there is none)."""
        return copy.deepcopy(self.items.get((key.mail_id, key.recipient), {}))

    def _write(
        self,
        op: str,
        key: DeliveryKey,
        sets: Mapping[str, Any],
        removes: Iterable[str] = (),
        *,
        history: Mapping[str, Any] | None = None,
    ) -> Item:
        """Apply SET/REMOVE to the item (creating it), as one atomic update; ALL_NEW."""
        self.writes[op] = self.writes.get(op, 0) + 1
        item = self.items.setdefault(
            (key.mail_id, key.recipient), {"mail_id": key.mail_id, "recipient": key.recipient}
        )
        for attr, value in sets.items():
            item[attr] = _stored(value)
        for attr in removes:
            item.pop(attr, None)
        if history is not None:
            item["history"] = [*item.get("history", []), _stored(dict(history))]
        return copy.deepcopy(item)

    @staticmethod
    def _assign(fields: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Update.assign: a None value removes the attribute instead of setting it."""
        sets = {k: v for k, v in fields.items() if v is not None}
        return sets, [k for k, v in fields.items() if v is None]

    # --- the worker's writes ------------------------------------------------------------------

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
        """Claimable: new, received, retrying and due, or processing with an expired lease."""
        now = self._now()
        old = self._old(key)
        status = old.get("status")
        if not (
            not old
            or status == Status.RECEIVED
            or (status == Status.RETRYING and _le(old, "next_attempt_at", now))
            or (status == Status.PROCESSING and _lt(old, "lease_expires_at", now))
        ):
            if old.get("lease_token") == token and status == Status.PROCESSING:
                return Claimed(old, token)
            return _busy(old, now)
        sets: dict[str, Any] = {
            attr: value for attr, value in meta.items() if attr not in old
        }  # if_not_exists
        sets |= {
            "status": Status.PROCESSING.value,
            "lease_owner": worker,
            "lease_token": token,
            "lease_expires_at": now + lease_s,
            "started_at": now,
            "updated_at": now,
            "attn": Status.PROCESSING.value,
            "attn_at": now + lease_s,
            "attempts": int(old.get("attempts", 0)) + 1,
        }
        removes = ["next_attempt_at"]
        if carrier is not None:
            sets["lease_message"] = carrier
        else:
            removes.append("lease_message")
        return Claimed(self._write("claim", key, sets, removes), token)

    async def renew(
        self,
        key: DeliveryKey,
        token: str,
        lease_s: float,
        *,
        deadline_s: float | None = None,  # noqa: ARG002 - in memory, nothing to bound
    ) -> bool:
        """Extend our lease; True also when our own outcome already landed."""
        now = self._now()
        old = self._old(key)
        if old.get("lease_token") != token or old.get("status") != Status.PROCESSING:
            return old.get("lease_token") == old.get("outcome_token") == token
        self._write("renew", key, {"lease_expires_at": now + lease_s, "attn_at": now + lease_s})
        return True

    async def finish(
        self,
        key: DeliveryKey,
        token: str,
        status: Status,
        fields: Mapping[str, Any],
        history_entry: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Record an outcome under our lease; LeaseLostError if it is not ours any more."""
        now = self._now()
        old = self._old(key)
        if old.get("lease_token") != token or old.get("status") != Status.PROCESSING:
            if old.get("lease_token") == old.get("outcome_token") == token and (
                old.get("status") == status.value
            ):
                return old
            raise LeaseLostError(
                f"{key.mail_id}/{key.recipient}: lease lost"
                f" (now {old.get('status')} by {old.get('lease_owner')})",
            )
        sets, removes = self._assign(fields)
        base = {
            "status": status.value,
            "updated_at": now,
            "attn": status.value,
            "attn_at": fields.get("next_attempt_at") or now,
        }
        self._write(
            "finish",
            key,
            {**base, **sets, "outcome_token": token},
            [*removes, "lease_expires_at", "lease_owner"],
            history=history_entry,
        )
        return {}

    async def record_without_claim(
        self,
        key: DeliveryKey,
        status: Status,
        fields: Mapping[str, Any],
        *,
        attn: str | None = None,
    ) -> bool:
        """A final state for a delivery nobody has touched; False if it existed."""
        now = self._now()
        old = self._old(key)
        if old and old.get("status") != Status.RECEIVED:
            return False
        values = {"created_at": now, "finished_at": now, "attempts": 0, **fields}
        values |= {
            "status": status.value,
            "updated_at": now,
            "attn": attn or status.value,
            "attn_at": now,
        }
        self._write("record", key, values)
        return True

    async def hold_delivery(self, key: DeliveryKey, *, hold: str, meta: Mapping[str, Any]) -> bool:
        """Park an unclaimed delivery (absent, received, retrying) in the hold queue."""
        now = self._now()
        old = self._old(key)
        if old and old.get("status") not in {Status.RECEIVED.value, Status.RETRYING.value}:
            return False
        absent = {**meta, "status": Status.RECEIVED.value, "held_at": now}  # if_not_exists
        sets = {attr: value for attr, value in absent.items() if attr not in old}
        sets |= {"hold": hold, "attn": HELD, "attn_at": now, "updated_at": now}
        self._write("hold", key, sets)
        return True

    async def unhold_delivery(self, key: DeliveryKey) -> dict[str, Any] | None:
        """Out of the hold queue: `attn` is the status again, due now; None if not held."""
        now = self._now()
        old = self._old(key)
        if old.get("attn") != HELD:
            return None
        sets = {"attn": old.get("status"), "attn_at": now, "updated_at": now}
        return self._write("unhold", key, sets, ["hold", "held_at"])

    # --- the operator's and the reconciler's writes -------------------------------------------

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
        now = self._now()
        old = self._old(key)
        if old.get("status") not in {s.value for s in expect}:
            return None
        sets: dict[str, Any] = {"status": status.value, "updated_at": now}
        removes: list[str] = []
        if attention:
            sets |= {"attn": status.value, "attn_at": fields.get("next_attempt_at") or now}
        else:
            removes += ["attn", "attn_at"]
        field_sets, field_removes = self._assign(fields)
        return self._write("transition", key, sets | field_sets, removes + field_removes)

    async def lock_mail(self, key: DeliveryKey, owner: str, hold_s: float) -> bool:
        """The expiring per-mail lock on an existing delivery; re-entrant for `owner`."""
        now = self._now()
        old = self._old(key)
        if not old or not (
            "mail_lock_until" not in old
            or old["mail_lock_until"] < now
            or old.get("mail_lock") == owner
        ):
            return False
        self._write("lock_mail", key, {"mail_lock": owner, "mail_lock_until": now + hold_s})
        return True

    async def unlock_mail(self, key: DeliveryKey, owner: str) -> None:
        """Release the lock if it is still ours."""
        if self._old(key).get("mail_lock") == owner:
            self._write("unlock_mail", key, {}, ["mail_lock", "mail_lock_until"])

    async def create_received(self, key: DeliveryKey, fields: Mapping[str, Any]) -> bool:
        """A `received` delivery (PutItem if the key does not exist)."""
        now = self._now()
        if self._old(key):
            return False
        item = {
            "created_at": now,
            **fields,
            "status": Status.RECEIVED.value,
            "updated_at": now,
            "attn": Status.RECEIVED.value,
            "attn_at": now,
        }
        self._write("create_received", key, item)
        return True

    def _stale(self, old: Item, expect: Status, seen_requeues: int, now: float) -> bool:
        """Not as the reconciler saw it any more (the real ledger's `_stale_guard`, negated)."""
        if old.get("status") != expect.value:
            return True
        if seen_requeues:
            if old.get("requeue_count") != seen_requeues:
                return True
        elif "requeue_count" in old:
            return True
        if expect is Status.PROCESSING:
            return not _lt(old, "lease_expires_at", now)
        if expect is Status.RETRYING:
            return not _le(old, "next_attempt_at", now)
        return False

    async def mark_requeued(
        self, key: DeliveryKey, *, expect: Status, seen_requeues: int, recheck_at: float
    ) -> dict[str, Any] | None:
        """Record a re-enqueue if the delivery is still as seen; None otherwise."""
        now = self._now()
        if self._stale(self._old(key), expect, seen_requeues, now):
            return None
        sets = {"requeued_at": now, "requeue_count": seen_requeues + 1, "attn_at": recheck_at}
        return self._write("mark_requeued", key, sets)

    async def fail_stale(
        self,
        key: DeliveryKey,
        *,
        expect: Status,
        seen_requeues: int,
        fields: Mapping[str, Any],
        entry: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        """Fail abandoned work whose object is gone, if still as seen; None otherwise."""
        now = self._now()
        if self._stale(self._old(key), expect, seen_requeues, now):
            return None
        values = {
            **fields,
            "status": Status.FAILED.value,
            "outcome": Status.FAILED.value,
            "finished_at": now,
            "updated_at": now,
            "attn": Status.FAILED.value,
            "attn_at": now,
        }
        return self._write(
            "fail_stale",
            key,
            values,
            ["lease_owner", "lease_expires_at", "next_attempt_at"],
            history=entry,
        )

    async def reopen(
        self,
        key: DeliveryKey,
        *,
        expect: tuple[Status, ...],
        fields: Mapping[str, Any],
        entry: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        """Operator retry: back to `retrying`, due now, attempts from zero."""
        now = self._now()
        if self._old(key).get("status") not in {s.value for s in expect}:
            return None
        values = {
            "status": Status.RETRYING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "updated_at": now,
            "attn": Status.RETRYING.value,
            "attn_at": now,
        }
        sets, removes = self._assign({**fields, **values})
        return self._write("reopen", key, sets, removes, history=entry)

    # --- reads --------------------------------------------------------------------------------

    async def get_mail(self, mail_id: str) -> list[dict[str, Any]]:
        """Every delivery of one mail, in recipient order (the table's sort key)."""
        return [copy.deepcopy(item) for (m, _), item in sorted(self.items.items()) if m == mail_id]

    async def get(self, key: DeliveryKey) -> dict[str, Any]:
        """One delivery, {} if there is none."""
        return self._old(key)

    def _attention(self, status: Status | str) -> list[Item]:
        """The sparse index: items carrying both `attn` and `attn_at`, by `attn_at`."""
        found = [i for i in self.items.values() if i.get("attn") == str(status) and "attn_at" in i]
        return sorted(found, key=lambda i: i["attn_at"])

    async def needing_attention(
        self, status: Status | str, *, before_s: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Items in `status` from the sparse index, oldest first."""
        before = None if before_s is None else _stored(before_s)
        found = [i for i in self._attention(status) if before is None or i["attn_at"] <= before]
        return copy.deepcopy(found[:limit])

    async def reconcile_state(self) -> dict[str, Any]:
        """The orphan scan's saved state ({} before the first pass)."""
        return self._old(_STATE_KEY)

    async def save_reconcile_state(self, *, cursor: str, queue_empty_at: float | None) -> None:
        """Save the orphan scan's state (last writer wins)."""
        sets: dict[str, Any] = {"cursor": cursor, "updated_at": self._now()}
        if queue_empty_at is not None:
            sets["queue_empty_at"] = queue_empty_at
        self._write("save_reconcile_state", _STATE_KEY, sets)

    async def scan(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Every item (at most `limit`)."""
        return copy.deepcopy(list(self.items.values())[:limit])

    async def attention_stats(
        self, status: Status, limit: int = 100_000
    ) -> tuple[int, dict[str, Any] | None]:
        """(count, the delivery received longest ago) of one non-archived status."""
        projected: list[dict[str, Any]] = [
            {k: i[k] for k in ("mail_id", "recipient", "received_at", "created_at") if k in i}
            for i in self._attention(status)[:limit]
        ]
        oldest, oldest_at = None, float("inf")
        for item in projected:
            at = float(item.get("received_at") or item.get("created_at") or oldest_at)
            if at < oldest_at:
                oldest, oldest_at = item, at
        return len(projected), oldest

    async def item_count_estimate(self) -> int:
        """The number of items (DynamoDB's figure lags; this one does not)."""
        return len(self.items)
