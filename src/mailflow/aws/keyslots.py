"""Key slots and operator holds: items of the deliveries table that are not deliveries.

`max_in_flight_per_key` across every worker of the service. A route key (one store) with a
limit of N owns N slot items, `mail_id = "keyslot#<route>#<key>"`, `recipient = "slot#<i>"`.
A delivery may start its processor only while it holds one of them. A slot is taken with one
conditional write that wins when the item is absent, its holder's lease has expired, or it is
already ours (a retried write whose response was lost). The write installs the holder's
delivery, worker and lease token (the same token as the delivery's lease) and an expiry of
`lease_s`; the worker's heartbeat renews it together with the delivery lease, fenced by that
token, and the holder empties it (fenced again) right after the outcome write. A holder that
dies leaves its slot taken until the expiry passes; then the next conditional write wins.

Operator holds (`mailflow hold`) live in one partition, `mail_id = "hold#"`, one item per
`<route>#<key>` where either part may be `*`. Workers read the whole partition with one
Query per heartbeat, never per delivery.

Route names and key values cannot contain `#` or `*` (config.py and routing.SAFE_VALUE), and
SES message ids are alphanumeric, so these items never collide with a delivery. They carry no
`attn`, so the attention index, the reconciler and `mailflow list` never see them.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailflow import aws
from mailflow.aws import ConditionFailedError
from mailflow.aws.expressions import deserialize, serialize
from mailflow.aws.ledger import DeliveryKey
from mailflow.aws.shapes import TTL_ATTRIBUTE

SLOT_PREFIX = "keyslot#"
#: An emptied slot item stays (the worker's role has no DeleteItem); the table's TTL removes it
#: this long after it was last taken. Longer than any run can hold it.
IDLE_SLOT_TTL_S = 7 * 86400
HOLD_PARTITION = "hold#"
ANY = "*"


def slot_partition(route: str, key: str) -> str:
    """The partition key of one route key's slot items."""
    return f"{SLOT_PREFIX}{route}#{key}"


def hold_name(route: str, key: str) -> str:
    """The sort key of a hold: `<route>#<key>`, either part `*` for every route or key."""
    return f"{route}#{key}"


@dataclass(frozen=True, slots=True)
class SlotRef:
    """A slot this worker holds: which item, and the token that fences it."""

    route: str
    key: str
    index: int
    token: str

    def as_key(self) -> dict[str, Any]:
        """The slot item's primary key."""
        return {
            "mail_id": {"S": slot_partition(self.route, self.key)},
            "recipient": {"S": f"slot#{self.index}"},
        }


@dataclass(frozen=True, slots=True)
class Hold:
    """An operator hold on one key of a route, a whole route, or one key on every route."""

    route: str
    key: str
    held_at: float
    held_by: str
    note: str = ""

    @property
    def name(self) -> str:
        """`<route>#<key>` (the item's sort key)."""
        return hold_name(self.route, self.key)

    def covers(self, route: str, key: str | None) -> bool:
        """Does this hold stop a delivery of `route` with route key `key`?"""
        if self.route not in (ANY, route):
            return False
        return self.key == ANY or (key is not None and self.key == key)


class KeySlots:
    """Slot and hold items of the deliveries table."""

    def __init__(self, client: Any, table: str, clock: Callable[[], float] = time.time) -> None:
        self._ddb = client
        self.table = table
        self._clock = clock

    # --- slots ------------------------------------------------------------------------------

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
        """Take one of the key's `limit` slots; None when every one is held and unexpired.

        Costs one conditional write when the first slot tried is free. The first slot tried
        depends on the token, so the holders of a limit above 1 spread over the slots."""
        start = zlib.crc32(token.encode()) % limit
        for step in range(limit):
            ref = SlotRef(route, key, (start + step) % limit, token)
            if await self._take_one(ref, holder, worker, lease_s):
                return ref
        return None

    async def _take_one(
        self, ref: SlotRef, holder: DeliveryKey, worker: str, lease_s: float
    ) -> bool:
        now = self._clock()
        fields = {
            "slot_token": ref.token,
            "slot_until": now + lease_s,
            "slot_worker": worker,
            "slot_mail_id": holder.mail_id,
            "slot_recipient": holder.recipient,
            "slot_taken_at": now,
            # The table's TTL removes a slot item nobody took for a week: stores come and go.
            TTL_ATTRIBUTE: int(now + IDLE_SLOT_TTL_S),
        }
        try:
            await aws.call(
                "ddb.take_slot",
                self._ddb.update_item,
                TableName=self.table,
                Key=ref.as_key(),
                UpdateExpression="SET " + ", ".join(f"{name} = :{name}" for name in fields),
                ConditionExpression=(
                    "attribute_not_exists(slot_token) OR slot_until < :now"
                    " OR slot_token = :slot_token"
                ),
                ExpressionAttributeValues=serialize(
                    {f":{name}": value for name, value in fields.items()} | {":now": now}
                ),
            )
        except ConditionFailedError:
            return False
        return True

    async def renew(self, ref: SlotRef, lease_s: float, *, deadline_s: float | None = None) -> bool:
        """Extend the slot's expiry; False when it is no longer ours (expired and taken).
        `deadline_s` bounds the call, as for the lease renewal it rides with."""
        try:
            await aws.call(
                "ddb.renew_slot",
                self._ddb.update_item,
                deadline_s=deadline_s,
                TableName=self.table,
                Key=ref.as_key(),
                UpdateExpression="SET slot_until = :until",
                ConditionExpression="slot_token = :token",
                ExpressionAttributeValues=serialize(
                    {":until": self._clock() + lease_s, ":token": ref.token},
                ),
            )
        except ConditionFailedError:
            return False
        return True

    async def release(self, ref: SlotRef) -> None:
        """Free the slot, only if it is still ours (a taken-over slot is left alone)."""
        # A failed condition: expired and taken over, or a retried release that had landed.
        # The item stays, empty, until the table's TTL removes it (IDLE_SLOT_TTL_S): the
        # worker's role has UpdateItem, not DeleteItem.
        with contextlib.suppress(ConditionFailedError):
            await aws.call(
                "ddb.release_slot",
                self._ddb.update_item,
                TableName=self.table,
                Key=ref.as_key(),
                UpdateExpression=(
                    "REMOVE slot_token, slot_until, slot_worker, slot_mail_id, slot_recipient,"
                    " slot_taken_at"
                ),
                ConditionExpression="slot_token = :token",
                ExpressionAttributeValues=serialize({":token": ref.token}),
            )

    async def release_all(self, route: str, key: str, limit: int, token: str) -> None:
        """Free whichever of the key's slots carries `token` (after an interrupted take)."""
        for index in range(limit):
            await self.release(SlotRef(route, key, index, token))

    async def holders(self, route: str, key: str) -> list[dict[str, Any]]:
        """The key's taken slots as they are (held or expired), for `status` and tests."""
        resp = await aws.call(
            "ddb.Query",
            self._ddb.query,
            TableName=self.table,
            KeyConditionExpression="mail_id = :m",
            ExpressionAttributeValues={":m": {"S": slot_partition(route, key)}},
            ConsistentRead=True,
        )
        items = [deserialize(i) for i in resp.get("Items", [])]
        return [i for i in items if "slot_token" in i]

    # --- holds ------------------------------------------------------------------------------

    async def holds(self) -> list[Hold]:
        """Every operator hold (one Query: holds are few)."""
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "mail_id = :m",
            "ExpressionAttributeValues": {":m": {"S": HOLD_PARTITION}},
            "ConsistentRead": True,
        }
        while True:
            resp = await aws.call("ddb.Query", self._ddb.query, **kwargs)
            items.extend(deserialize(i) for i in resp.get("Items", []))
            if "LastEvaluatedKey" not in resp:
                break
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
        return [
            Hold(
                route=str(i["hold_route"]),
                key=str(i["hold_key"]),
                held_at=float(i["held_at"]),
                held_by=str(i.get("held_by", "")),
                note=str(i.get("note", "")),
            )
            for i in items
        ]

    async def put_hold(self, route: str, key: str, *, by: str, note: str = "") -> Hold:
        """Hold a key or a route; holding what is already held keeps the first `held_at`."""
        now = self._clock()
        name = hold_name(route, key)
        resp = await aws.call(
            "ddb.put_hold",
            self._ddb.update_item,
            TableName=self.table,
            Key={"mail_id": {"S": HOLD_PARTITION}, "recipient": {"S": name}},
            UpdateExpression=(
                "SET hold_route = :r, hold_key = :k, held_by = :by, note = :note,"
                " held_at = if_not_exists(held_at, :now)"
            ),
            ExpressionAttributeValues=serialize(
                {":r": route, ":k": key, ":by": by, ":note": note, ":now": now},
            ),
            ReturnValues="ALL_NEW",
        )
        item = deserialize(resp.get("Attributes"))
        return Hold(route, key, float(item["held_at"]), by, note)

    async def hold_exists(self, hold: Hold) -> bool:
        """Is this hold still in force (a consistent read of its item)?"""
        resp = await aws.call(
            "ddb.GetItem",
            self._ddb.get_item,
            TableName=self.table,
            Key={"mail_id": {"S": HOLD_PARTITION}, "recipient": {"S": hold.name}},
            ConsistentRead=True,
        )
        return bool(resp.get("Item"))

    async def delete_hold(self, route: str, key: str) -> bool:
        """Lift a hold; False if there was none."""
        resp = await aws.call(
            "ddb.delete_hold",
            self._ddb.delete_item,
            TableName=self.table,
            Key={"mail_id": {"S": HOLD_PARTITION}, "recipient": {"S": hold_name(route, key)}},
            ReturnValues="ALL_OLD",
        )
        return bool(resp.get("Attributes"))
