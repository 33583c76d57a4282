"""`mailflow redrive`: move the DLQ's messages back to the main queue.

SQS's own move task where the backend has it; otherwise receive, send, then delete.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mailflow.aws import AwsClients
from mailflow.aws.queue import Queue
from mailflow.config import Settings
from mailflow.errors import PermanentError

REDRIVE_WAIT_S = 60.0
#: How long a message received from the DLQ stays hidden while it is being moved.
MOVE_VISIBILITY_S = 60


async def _move_task(queue: Queue, wait_s: float) -> dict[str, Any] | None:
    """SQS's own redrive (StartMessageMoveTask); None where the backend does not have it."""
    started = await queue.start_redrive()
    if started is None:
        return None
    source_arn, handle = started
    deadline = time.monotonic() + wait_s
    while True:
        task = await queue.redrive_progress(source_arn)
        if task.get("Status") != "RUNNING" or time.monotonic() > deadline:
            return {
                "method": "move_task",
                "task_status": task.get("Status"),
                "task_handle": handle,
                "moved": int(task.get("ApproximateNumberOfMessagesMoved", 0)),
            }
        await asyncio.sleep(1.0)


async def _receive_send_delete(queue: Queue, limit: int) -> dict[str, Any]:
    """Portable redrive, in batches, counting the reasons mailflow dead-lettered them for."""
    moved, failed = 0, 0
    reasons: dict[str, int] = {}
    while moved + failed < limit:
        messages = await queue.receive_dead(limit - moved - failed, MOVE_VISIBILITY_S)
        if not messages:  # a long poll asks every SQS server: the DLQ is empty
            break
        for m in messages:
            attrs = m.get("MessageAttributes") or {}
            reason = attrs.get("mailflow_reason", {}).get("StringValue", "redrive_policy")
            reasons[reason] = reasons.get(reason, 0) + 1
        ok = await queue.requeue_dead(messages)
        moved += ok
        failed += len(messages) - ok
    return {"method": "receive_send_delete", "moved": moved, "failed": failed, "reasons": reasons}


async def redrive(
    clients: AwsClients,
    settings: Settings,
    *,
    dry_run: bool,
    limit: int,
    wait_s: float = REDRIVE_WAIT_S,
) -> dict[str, Any]:
    """Move the DLQ's messages back to the main queue."""
    queue = await Queue.resolve(clients.sqs, settings.queue, settings.dlq)
    if queue.dlq_url is None:
        raise PermanentError(f"queue {settings.queue} has no DLQ named {settings.dlq}")
    before = await queue.depth()
    out: dict[str, Any] | None = {"method": "dry_run", "moved": 0} if dry_run else None
    if out is None:
        out = await _move_task(queue, wait_s)
    if out is None:
        out = await _receive_send_delete(queue, limit)
    return {
        **out,
        "dry_run": dry_run,
        "dlq_before": before.get("dlq_visible", 0),
        "dlq_after": (await queue.depth()).get("dlq_visible", 0),
    }
