"""Read-only views of the ledger: `mailflow list` and `mailflow show`."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from typing import Any

from mailflow.aws import open_clients
from mailflow.aws.ledger import ORPHAN, Ledger, Status
from mailflow.cli.render import (
    deliveries_table,
    delivery_json,
    print_json,
    print_record,
    print_table,
)
from mailflow.config import Settings
from mailflow.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from mailflow.ops.archive import describe_location, locate

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: float | None = None) -> float:
    """`30m`, `2h`, `1d` (an age) or an ISO-8601 time → epoch seconds."""
    found = _AGE.match(value.strip())
    if found:
        return (now or time.time()) - float(found.group(1)) * _UNIT_S[found.group(2)]
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        msg = f"--since {value!r}: expected an age like 30m/2h/1d or an ISO time"
        raise ValueError(msg) from None


async def query(
    ledger: Ledger,
    *,
    status: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Deliveries in `status` (every status but archived when None), at most `limit` per status.

    Archived deliveries have no index to query: that case scans the table (slow on a big one)."""
    if status == Status.ARCHIVED.value:
        return [r for r in await ledger.scan(limit=100_000) if r.get("status") == status][:limit]
    if status == ORPHAN:  # failed, filed apart for an operator (see ops/reconcile.py)
        return await ledger.needing_attention(ORPHAN, limit=limit)
    statuses = [Status(status)] if status else [s for s in Status if s is not Status.ARCHIVED]
    out: list[dict[str, Any]] = []
    for st in statuses:
        out.extend(await ledger.needing_attention(st, limit=limit))
    return out


async def list_deliveries(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow list`: the newest-updated deliveries matching the options, as a table or JSON.

    Exit 2 on an unknown `--status` or an unreadable `--since`."""
    if args.status and args.status not in {s.value for s in Status} | {ORPHAN}:
        sys.stderr.write(f"mailflow list: unknown status {args.status!r}\n")
        return EXIT_CONFIG
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        sys.stderr.write(f"mailflow list: {exc}\n")
        return EXIT_CONFIG
    async with open_clients(mail_region=settings.mail_region) as clients:
        ledger = Ledger(clients.dynamodb, settings.table)
        records = await query(ledger, status=args.status, limit=max(args.limit, 1) * 4)
    if args.route:
        records = [r for r in records if r.get("route") == args.route]
    if args.recipient:
        records = [r for r in records if r.get("recipient") == args.recipient.lower()]
    if since is not None:
        records = [r for r in records if float(r.get("updated_at", 0)) >= since]
    records.sort(key=lambda r: float(r.get("updated_at", 0)), reverse=True)
    records = records[: args.limit]
    if args.json:
        print_json([delivery_json(r) for r in records])
    else:
        print_table(deliveries_table(records, title=f"{len(records)} deliveries"))
    return EXIT_OK


async def show_mail(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow show`: every delivery of one mail with its history, and where its object is now
    (original or archived key). Exit 1 when the mail has no deliveries."""
    async with open_clients(mail_region=settings.mail_region) as clients:
        records = await Ledger(clients.dynamodb, settings.table).get_mail(args.mail_id)
        # Where the object is now: HEAD of the original key and of the archived key.
        where = await locate(clients.s3, settings, records) if records else None
    if args.json:
        print_json([delivery_json(r) | {"object": where} for r in records])
    else:
        for record in records:
            print_record(record)
            print()  # noqa: T201
        if where is not None:
            print(describe_location(where))  # noqa: T201
    if not records:
        if not args.json:
            sys.stderr.write(f"mailflow show: no deliveries for mail {args.mail_id}\n")
        return EXIT_FAILURE
    return EXIT_OK
