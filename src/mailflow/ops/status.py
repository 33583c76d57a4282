"""`mailflow status`: counts by state, the oldest unfinished delivery, queue and DLQ depth.

Returns plain data (what `--json` prints); nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mailflow.aws import AwsClients
from mailflow.aws.ledger import ORPHAN, Ledger, Status
from mailflow.aws.queue import Queue
from mailflow.config import Settings

UNFINISHED = (Status.RECEIVED, Status.PROCESSING, Status.RETRYING)
#: Upper bound on the deliveries an exact count looks through (a table scan).
SCAN_LIMIT = 100_000


async def status_report(
    clients: AwsClients,
    settings: Settings,
    *,
    exact: bool = False,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Counts by state, the oldest unfinished delivery, queue and DLQ depth."""
    ledger = Ledger(clients.dynamodb, settings.table)
    counts: dict[str, int] = {}
    oldest: dict[str, Any] | None = None
    for status in Status:
        if status is Status.ARCHIVED:
            continue
        count, first = await ledger.attention_stats(status)
        counts[status.value] = count
        if status in UNFINISHED and first is not None:
            at = float(first.get("received_at") or first.get("created_at") or 0)
            if oldest is None or at < oldest["_at"]:
                oldest = {**first, "status": status.value, "_at": at}
    # Orphans only their To/Cc name, never delivered: they wait for an operator (failed, but
    # filed apart so they are not archived).
    orphans, _ = await ledger.attention_stats(ORPHAN)
    if exact:
        records = await ledger.scan(limit=SCAN_LIMIT)
        counts["archived"] = sum(1 for r in records if r.get("status") == Status.ARCHIVED)
    else:  # DynamoDB refreshes ItemCount about every six hours: an estimate
        total = await ledger.item_count_estimate()
        counts["archived"] = max(0, total - sum(counts.values()) - orphans)
    queue = await Queue.resolve(clients.sqs, settings.queue, settings.dlq)
    now = clock()
    return {
        "counts": counts,
        "archived_count": "exact" if exact else "estimate",
        "unfinished": sum(counts[s.value] for s in UNFINISHED),
        "awaiting_archive": counts["succeeded"] + counts["failed"],
        "orphans_for_operator": orphans,
        "oldest_unfinished": None
        if oldest is None
        else {
            "mail_id": oldest.get("mail_id"),
            "recipient": oldest.get("recipient"),
            "status": oldest["status"],
            "age_s": round(now - oldest["_at"], 1),
        },
        "queue": await queue.depth(),
    }
