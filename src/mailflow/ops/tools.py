"""Operator commands' work: `status`, `retry`, `redrive`, `parse` (cli_ops.py renders it).

Each returns plain data (what `--json` prints); nothing here prints.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import structlog

from mailflow import aws
from mailflow.aws import AwsClients
from mailflow.aws.ledger import DeliveryKey, Ledger, Status
from mailflow.aws.queue import Queue
from mailflow.config import Settings
from mailflow.errors import PermanentError
from mailflow.mail.summary import header_addresses, received_for, split_head, summarize
from mailflow.ops.archive import Archiver, mail_lock, source
from mailflow.ops.reconcile import UNKNOWN_RECIPIENT, orphan_envelope, requeue_body
from mailflow.routing import DeliveryPlan, normalize_recipient, plan_delivery

log = structlog.get_logger("mailflow.ops.tools")

UNFINISHED = (Status.RECEIVED, Status.PROCESSING, Status.RETRYING)
#: Upper bound on the deliveries a `retry --status failed` looks through (a table scan).
RETRY_SCAN_LIMIT = 100_000
REDRIVE_WAIT_S = 60.0


def operator_id() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        user = str(os.getuid())
    return f"operator:{user}@{socket.gethostname()}"


# --- status -----------------------------------------------------------------------------------


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
    if exact:
        records = await ledger.scan(limit=RETRY_SCAN_LIMIT)
        counts["archived"] = sum(1 for r in records if r.get("status") == Status.ARCHIVED)
    else:  # DynamoDB refreshes ItemCount about every six hours: an estimate
        table = await aws.call(
            "ddb.DescribeTable",
            clients.dynamodb.describe_table,
            TableName=settings.table,
        )
        total = int(table["Table"].get("ItemCount", 0))
        counts["archived"] = max(0, total - sum(counts.values()))
    queue = await Queue.resolve(clients.sqs, settings.queue, settings.dlq)
    now = clock()
    return {
        "counts": counts,
        "archived_count": "exact" if exact else "estimate",
        "unfinished": sum(counts[s.value] for s in UNFINISHED),
        "awaiting_archive": counts["succeeded"] + counts["failed"],
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


# --- retry ------------------------------------------------------------------------------------


@dataclass(slots=True)
class RetryResult:
    mail_id: str
    result: str  # retried | would_retry | nothing_to_retry | not_found | busy | object_missing
    recipients: list[str] = field(default_factory=list)
    restored_from: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result in {"retried", "would_retry"}

    def as_json(self) -> dict[str, Any]:
        return {
            "mail_id": self.mail_id,
            "result": self.result,
            "recipients": self.recipients,
            "restored_from": self.restored_from,
            "skipped": self.skipped,
        }


def retry_targets(
    records: Sequence[dict[str, Any]],
    force: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Which failed deliveries of a mail a retry reopens, and which it refuses, and why."""
    targets, skipped = [], []
    for r in records:
        status = r.get("status")
        if not (
            status == Status.FAILED
            or (status == Status.ARCHIVED and r.get("outcome") == Status.FAILED)
        ):
            continue
        why = None
        if r.get("recipient") == UNKNOWN_RECIPIENT:
            why = "no envelope recipient: nothing to deliver to"
        elif r.get("reason") == "quarantined" and not force:
            why = "quarantined by an SES verdict: use --force to deliver it anyway"
        if why:
            skipped.append({"recipient": str(r["recipient"]), "why": why})
        else:
            targets.append(r)
    return targets, skipped


async def failed_mail_ids(ledger: Ledger, since: float | None, limit: int) -> list[str]:
    """Mails with a failed delivery, archived or not, finished since `since`, oldest first."""
    found = await ledger.needing_attention(Status.FAILED, limit=RETRY_SCAN_LIMIT)
    found += [
        r
        for r in await ledger.scan(limit=RETRY_SCAN_LIMIT)
        if r.get("status") == Status.ARCHIVED and r.get("outcome") == Status.FAILED
    ]
    stamp = {id(r): float(r.get("finished_at") or r.get("updated_at") or 0) for r in found}
    found = [r for r in found if since is None or stamp[id(r)] >= since]
    found.sort(key=lambda r: stamp[id(r)])
    return list(dict.fromkeys(str(r["mail_id"]) for r in found))[:limit]


class Retrier:
    def __init__(
        self,
        settings: Settings,
        clients: AwsClients,
        queue: Queue,
        *,
        force: bool = False,
        dry_run: bool = False,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.s = settings
        self.queue = queue
        self.force = force
        self.dry_run = dry_run
        self.owner = owner or operator_id()
        self._clock = clock
        self.ledger = Ledger(clients.dynamodb, settings.table, clock=clock)
        self.archiver = Archiver(settings, clients.s3, self.ledger, owner=self.owner, clock=clock)

    async def retry(self, mail_id: str) -> RetryResult:
        records = await self.ledger.get_mail(mail_id)
        if not records:
            return RetryResult(mail_id, "not_found")
        targets, skipped = retry_targets(records, self.force)
        if not targets:
            return RetryResult(mail_id, "nothing_to_retry", skipped=skipped)
        if self.dry_run:
            return RetryResult(
                mail_id, "would_retry", [str(r["recipient"]) for r in targets], skipped=skipped
            )
        async with mail_lock(self.ledger, records, self.owner) as held:
            if not held:
                return RetryResult(mail_id, "busy", skipped=skipped)
            return await self._retry_locked(mail_id)

    async def _retry_locked(self, mail_id: str) -> RetryResult:
        records = await self.ledger.get_mail(mail_id)  # as it is now, under the lock
        targets, skipped = retry_targets(records, self.force)
        if not targets:
            return RetryResult(mail_id, "nothing_to_retry", skipped=skipped)
        found = await self.archiver.find(records)
        if found is None:  # neither in incoming nor in any archive location: refuse
            return RetryResult(mail_id, "object_missing", skipped=skipped)
        now = self._clock()
        reopened = []
        for r in targets:
            key = DeliveryKey(str(r["mail_id"]), str(r["recipient"]))
            entry = {
                "attempt": int(r.get("attempts") or 0),
                "worker": self.owner,
                "started_at": now,
                "finished_at": now,
                "status": Status.RETRYING.value,
                "reason": "operator_retry",
                "stderr_tail": "",
            }
            fields = dict.fromkeys(
                (
                    "outcome",
                    "archived_key",
                    "archived_bucket",
                    "archived_at",
                    "archive_note",
                    "requeue_count",
                    "requeued_at",
                    "detail",
                    "expires_at",
                ),
            ) | {"reason": "operator_retry", "last_reason": r.get("reason")}
            if await self.ledger.reopen(
                key, expect=(Status.FAILED, Status.ARCHIVED), fields=fields, entry=entry
            ):
                reopened.append(key.recipient)
        # Reopened first, restored second: a crash in between leaves deliveries that fail
        # `object_missing` and get archived again, never an object nobody accounts for.
        restored = await self.archiver.restore(found, records)
        if reopened:
            first = records[0]
            await self.queue.send(
                requeue_body(
                    mail_id=mail_id,
                    where=source(self.s, records),
                    recipients=reopened,
                    sender=str(first.get("sender") or ""),
                    received_at_s=first.get("received_at") or first.get("created_at"),
                    reason="operator_retry",
                    verdicts=None if self.force else first.get("verdicts"),
                )
            )
        log.info("retried", mail_id=mail_id, recipients=reopened, restored_from=restored)
        return RetryResult(
            mail_id, "retried" if reopened else "nothing_to_retry", reopened, restored, skipped
        )


# --- redrive ----------------------------------------------------------------------------------


async def _queue_arn(clients: AwsClients, url: str) -> str:
    resp = await aws.call(
        "sqs.GetQueueAttributes",
        clients.sqs.get_queue_attributes,
        QueueUrl=url,
        AttributeNames=["QueueArn"],
    )
    return str(resp["Attributes"]["QueueArn"])


async def _move_task(
    clients: AwsClients, queue: Queue, dlq_url: str, wait_s: float
) -> dict[str, Any] | None:
    """SQS's own redrive (StartMessageMoveTask); None where the backend does not have it."""
    source_arn = await _queue_arn(clients, dlq_url)
    dest_arn = await _queue_arn(clients, queue.url)
    try:  # a capability probe: one try, no retry layer, any failure means "fall back"
        started = await clients.sqs.start_message_move_task(
            SourceArn=source_arn,
            DestinationArn=dest_arn,
        )
    except Exception as exc:
        log.info(
            "move_task_unavailable", error=str(aws.map_error("sqs.StartMessageMoveTask", exc))[:200]
        )
        return None
    deadline = time.monotonic() + wait_s
    while True:
        resp = await aws.call(
            "sqs.ListMessageMoveTasks",
            clients.sqs.list_message_move_tasks,
            SourceArn=source_arn,
            MaxResults=1,
        )
        task = (resp.get("Results") or [{}])[0]
        if task.get("Status") != "RUNNING" or time.monotonic() > deadline:
            return {
                "method": "move_task",
                "task_status": task.get("Status"),
                "task_handle": started.get("TaskHandle"),
                "moved": int(task.get("ApproximateNumberOfMessagesMoved", 0)),
            }
        await asyncio.sleep(1.0)


async def _receive_send_delete(
    clients: AwsClients, queue: Queue, dlq_url: str, limit: int
) -> dict[str, Any]:
    """Portable redrive: receive from the DLQ, send to the queue, then delete (never lost;
    a crash between send and delete leaves a duplicate, which the claim absorbs)."""
    moved, failed = 0, 0
    reasons: dict[str, int] = {}
    while moved + failed < limit:
        got = await aws.call(
            "sqs.ReceiveMessage",
            clients.sqs.receive_message,
            QueueUrl=dlq_url,
            MaxNumberOfMessages=min(10, limit - moved - failed),
            WaitTimeSeconds=1,
            VisibilityTimeout=60,
            MessageAttributeNames=["All"],
        )
        messages = got.get("Messages", [])
        if not messages:  # a long poll asks every SQS server: the DLQ is empty
            break
        entries = []
        for i, m in enumerate(messages):
            attrs = m.get("MessageAttributes") or {}
            reason = attrs.get("mailflow_reason", {}).get("StringValue", "redrive_policy")
            reasons[reason] = reasons.get(reason, 0) + 1
            kept = {
                k: {f: v[f] for f in ("DataType", "StringValue", "BinaryValue") if f in v}
                for k, v in attrs.items()
                if not k.startswith("mailflow_")
            }
            entry: dict[str, Any] = {"Id": str(i), "MessageBody": m["Body"]}
            if kept:
                entry["MessageAttributes"] = kept
            entries.append(entry)
        sent = await aws.call(
            "sqs.SendMessageBatch",
            clients.sqs.send_message_batch,
            QueueUrl=queue.url,
            Entries=entries,
        )
        ok = [messages[int(s["Id"])] for s in sent.get("Successful", [])]
        failed += len(messages) - len(ok)
        if ok:
            await aws.call(
                "sqs.DeleteMessageBatch",
                clients.sqs.delete_message_batch,
                QueueUrl=dlq_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(ok)
                ],
            )
        moved += len(ok)
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
    dlq_url = queue.dlq_url
    before = await queue.depth()
    out: dict[str, Any] | None = {"method": "dry_run", "moved": 0} if dry_run else None
    if out is None:
        out = await _move_task(clients, queue, dlq_url, wait_s)
    if out is None:
        out = await _receive_send_delete(clients, queue, dlq_url, limit)
    return {
        **out,
        "dry_run": dry_run,
        "dlq_before": before.get("dlq_visible", 0),
        "dlq_after": (await queue.depth()).get("dlq_visible", 0),
    }


# --- parse ------------------------------------------------------------------------------------


def parse_file(path: Path, to: Sequence[str], settings: Settings) -> dict[str, Any]:
    """A local mail file: its header summary, and what each recipient would run. No AWS."""
    raw = path.read_bytes()
    head = split_head(raw)
    summary = summarize(head)
    sender, verdicts = orphan_envelope(head)
    sender = sender or parseaddr(summary.from_)[1]
    if to:
        recipients, found_in = [normalize_recipient(t) for t in to], "--to"
    elif envelope := received_for(head):
        recipients, found_in = envelope, "received_header"
    else:
        recipients, found_in = header_addresses(head), "to_cc_headers"
    digest = hashlib.sha256(raw).hexdigest()
    mail_id = f"parse-{digest[:16]}"
    deliveries = []
    for recipient in recipients:
        plan = plan_delivery(settings.routes, recipient, sender=sender, mail_id=mail_id)
        if isinstance(plan, DeliveryPlan):
            deliveries.append(
                {
                    "recipient": recipient,
                    "decision": "deliver",
                    "route": plan.route,
                    "argv": list(plan.argv),
                    "key": plan.key,
                    "max_in_flight_per_key": plan.max_in_flight_per_key,
                }
            )
        else:
            deliveries.append(
                {"recipient": recipient, "decision": plan.reason, "detail": plan.detail}
            )
    return {
        "file": str(path),
        "size_bytes": len(raw),
        "sha256": digest,
        "mail_id": mail_id,
        "sender": sender,
        "verdicts": verdicts,
        "summary": summary.as_record(),
        "recipients_from": found_in,
        "deliveries": deliveries,
    }
