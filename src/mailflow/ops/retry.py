"""`mailflow retry`: reopen a mail's failed deliveries and send it through the queue again.

An archived mail is restored to the incoming prefix first; quarantined mail needs `force`.
Returns plain data (what `--json` prints); nothing here prints.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from mailflow.aws import AwsClients
from mailflow.aws.ledger import DeliveryKey, Ledger, Status
from mailflow.aws.queue import Queue
from mailflow.aws.store import S3Store
from mailflow.config import Settings
from mailflow.ops.archive import Archiver, mail_lock, source
from mailflow.ops.reconcile import UNKNOWN_RECIPIENT, requeue_body

log = structlog.get_logger("mailflow.ops.retry")

#: Upper bound on the deliveries a `retry --status failed` looks through (a table scan).
RETRY_SCAN_LIMIT = 100_000


def operator_id() -> str:
    """Who an operator command acts as, for the history entries it writes."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        user = str(os.getuid())
    return f"operator:{user}@{socket.gethostname()}"


@dataclass(slots=True)
class RetryResult:
    """What `mailflow retry` did for one mail: `result` (see the field's values), the recipients
    reopened, where the object was restored from (None if it was still in incoming) and the
    deliveries refused with why."""

    mail_id: str
    result: str  # retried | would_retry | nothing_to_retry | not_found | busy | object_missing
    recipients: list[str] = field(default_factory=list)
    restored_from: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the mail was retried (or would be, in a dry run)."""
        return self.result in {"retried", "would_retry"}

    def as_json(self) -> dict[str, Any]:
        """The result as `mailflow retry --json` prints it."""
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
    """Reopens a mail's failed deliveries (restoring its archived object) and queues it again.

    Works under the mail's ledger lock and re-reads the deliveries under it, so it is safe
    against a reconciler archiving the same mail. Quarantined deliveries need `force`, which
    also sends the mail without its SES verdicts so the worker does not quarantine it again."""

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
        self.settings = settings
        self.queue = queue
        self.force = force
        self.dry_run = dry_run
        self.owner = owner or operator_id()
        self._clock = clock
        self.ledger = Ledger(clients.dynamodb, settings.table, clock=clock)
        self.archiver = Archiver(
            settings, S3Store(clients.s3), self.ledger, owner=self.owner, clock=clock
        )

    async def retry(self, mail_id: str) -> RetryResult:
        """Retry one mail's failed deliveries; returns what happened, never raises for a mail that
        cannot be retried (`not_found`, `nothing_to_retry`, `busy`, `object_missing`).

        Each delivery is reopened by a conditional write (it must still be failed or archived),
        then the object is put back at its incoming key, then one notification for the reopened
        recipients is queued. Backend errors raise `MailflowError`."""
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
                    where=source(self.settings, records),
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
