"""`mailflow hold` / `release`: stop one key (a store) or a whole route during maintenance.

As postfix's `postsuper -h`: held mail moves to a hold queue, here the deliveries table
(`attn = held`, its SQS message deleted), so it waits without a receive count however long the
hold lasts. `release` lifts the hold and queues every delivery it covered again, in SES
receipt order. Runs already started when the hold was placed finish; `hold` returns once every
worker has re-read the holds (one heartbeat interval and a margin). A worker checks the holds
when a message arrives and again once its delivery has its slots, just before the claim, so
after that only a run that had passed that last check (claim and fetch: milliseconds) starts.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import structlog

from mailflow.aws import AwsClients
from mailflow.aws.keyslots import ANY, Hold, KeySlots
from mailflow.aws.ledger import HELD, DeliveryKey, Ledger
from mailflow.aws.queue import Queue
from mailflow.aws.store import Location
from mailflow.config import Settings
from mailflow.errors import MailflowError
from mailflow.ops.reconcile import requeue_body
from mailflow.routing import SAFE_VALUE

log = structlog.get_logger("mailflow.ops.holds")

#: `hold` waits one heartbeat interval and this much more before it returns.
HOLD_SETTLE_MARGIN_S = 2.0
#: Held deliveries read per pass of `release` (the attention index, oldest first).
RELEASE_PAGE = 1000
#: The attention index is eventually consistent: `release` reads it again until a pass
#: finds nothing more to queue, at most this many passes, this far apart.
RELEASE_PASSES = 3
RELEASE_PASS_GAP_S = 0.5


def hold_target(settings: Settings, key: str | None, route: str | None) -> tuple[str, str]:
    """(route, key) of a hold, `*` for 'every'; a clear error for names that cannot match."""
    if key is None and route is None:
        raise MailflowError("name a KEY, a --route, or both")
    if route is not None and route not in {r.name for r in settings.routes}:
        known = ", ".join(r.name for r in settings.routes)
        raise MailflowError(f"no route named {route!r} (routes: {known})")
    if key is not None and not SAFE_VALUE.fullmatch(key):
        raise MailflowError(f"{key!r} cannot be a route key (letters, digits, ._+=@%-)")
    return route or ANY, key or ANY


async def place_hold(
    clients: AwsClients,
    settings: Settings,
    route: str,
    key: str,
    *,
    by: str,
    note: str = "",
    settle_s: float | None = None,
) -> dict[str, Any]:
    """Place the hold, then wait until every worker has re-read the holds."""
    slots = KeySlots(clients.dynamodb, settings.table)
    hold = await slots.put_hold(route, key, by=by, note=note)
    # Workers re-read the holds every heartbeat interval (plus the Query's own time): wait
    # that, with a margin, so that every worker has seen the hold when this returns.
    wait_s = settings.heartbeat_interval_s + HOLD_SETTLE_MARGIN_S if settle_s is None else settle_s
    await asyncio.sleep(wait_s)
    log.info("hold_placed", hold=hold.name, by=by)
    return {"hold": _hold_json(hold), "settled_s": wait_s}


async def lift_hold(
    clients: AwsClients,
    settings: Settings,
    route: str,
    key: str,
) -> dict[str, Any]:
    """Lift the hold, then queue again every held delivery no other hold still covers."""
    slots = KeySlots(clients.dynamodb, settings.table)
    ledger = Ledger(clients.dynamodb, settings.table)
    existed = await slots.delete_hold(route, key)
    remaining = await slots.holds()
    lifted = Hold(route, key, 0.0, "")
    queue = await Queue.resolve(clients.sqs, settings.queue, settings.dlq)
    requeued: list[dict[str, Any]] = []
    for _ in range(RELEASE_PASSES):
        found = await ledger.needing_attention(HELD, limit=RELEASE_PAGE)
        mine = [
            r
            for r in found
            if lifted.covers(str(r.get("route")), _key_of(r))
            and not any(h.covers(str(r.get("route")), _key_of(r)) for h in remaining)
        ]
        if not mine:
            break
        requeued.extend(await _requeue(ledger, queue, settings, mine))
        await asyncio.sleep(RELEASE_PASS_GAP_S)
    log.info("hold_lifted", hold=lifted.name, existed=existed, requeued=len(requeued))
    return {"hold": lifted.name, "existed": existed, "requeued": requeued}


def _key_of(record: dict[str, Any]) -> str | None:
    value = record.get("route_key")
    return None if value is None else str(value)


async def _requeue(
    ledger: Ledger, queue: Queue, settings: Settings, records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Out of the hold queue (attn back to its status: the reconciler covers it from now on,
    should the send below fail), then one notification per mail, oldest SES receipt first."""
    by_mail: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        taken = await ledger.unhold_delivery(
            DeliveryKey(str(record["mail_id"]), str(record["recipient"]))
        )
        if taken is not None:
            by_mail[str(record["mail_id"])].append(taken)
    out: list[dict[str, Any]] = []
    for mail_id, recs in sorted(by_mail.items(), key=lambda kv: _received(kv[1][0])):
        first = recs[0]
        where = Location(
            str(first.get("bucket") or settings.bucket),
            str(first.get("key") or f"{settings.incoming_prefix}{mail_id}"),
        )
        recipients = [str(r["recipient"]) for r in recs]
        await queue.send(
            requeue_body(
                mail_id=mail_id,
                where=where,
                recipients=recipients,
                sender=str(first.get("sender") or ""),
                received_at_s=first.get("received_at") or first.get("created_at"),
                reason="released",
                verdicts=first.get("verdicts"),
            )
        )
        out.append({"mail_id": mail_id, "recipients": recipients})
    return out


def _received(record: dict[str, Any]) -> float:
    return float(record.get("received_at") or record.get("created_at") or 0.0)


async def holds_report(clients: AwsClients, settings: Settings) -> dict[str, Any]:
    """What is held: the holds, and the held deliveries per route key, since when."""
    slots = KeySlots(clients.dynamodb, settings.table)
    ledger = Ledger(clients.dynamodb, settings.table)
    holds = await slots.holds()
    held = await ledger.needing_attention(HELD, limit=100_000)
    keys: dict[tuple[str, str], dict[str, Any]] = {}
    for record in held:
        name = (str(record.get("route")), _key_of(record) or "-")
        entry = keys.setdefault(name, {"route": name[0], "key": name[1], "deliveries": 0})
        entry["deliveries"] += 1
        since = float(record.get("held_at") or record.get("attn_at") or 0.0)
        entry["held_since"] = min(entry.get("held_since", since), since)
    return {
        "holds": [_hold_json(h) for h in sorted(holds, key=lambda h: h.held_at)],
        "held_deliveries": sum(e["deliveries"] for e in keys.values()),
        "held_keys": sorted(keys.values(), key=lambda e: e["held_since"]),
        # Held deliveries no hold covers any more: a release that was interrupted. Running
        # `mailflow release` for them again queues them.
        "unreleased": sum(
            e["deliveries"]
            for e in keys.values()
            if not any(h.covers(e["route"], e["key"]) for h in holds)
        ),
    }


def _hold_json(hold: Hold) -> dict[str, Any]:
    return {
        "route": hold.route,
        "key": hold.key,
        "held_at": hold.held_at,
        "held_by": hold.held_by,
        "note": hold.note,
    }
