"""`mailflow reconcile`: one bounded pass over what the worker cannot see by itself.

Three phases, in this order, each at most `limit` items:
- orphans: objects under the incoming prefix with no record whose notification cannot be
  in the queue any more: stored `orphan_age_s` before a moment the queue was seen empty (see
  `_orphans`). The listing resumes from a cursor kept in the table. The envelope recipient
  comes from the stored mail (SES's top `Received: ... for <addr>`, written for
  single-recipient mail only): the delivery is created `received` and a synthetic
  notification is queued. Recipients only the To/Cc headers name are a guess and never
  delivered: one `failed` delivery for `unknown` (reason `orphan_recipients_unverified`, the
  addresses in `candidates`) filed under `attn = orphan` for an operator (`mailflow status`,
  `mailflow list --status orphan`), not archived. No recipient at all: one `failed` delivery
  for `unknown` (reason `orphan_no_recipient`), so it shows and gets archived.
- requeue: `received` never claimed, `retrying` past due, `processing` with an expired lease,
  each older than `grace_s` (so the worker's own deferred SQS message gets its chance first):
  if the object is still there, mark the delivery requeued (conditional: one reconciler wins)
  and queue a synthetic notification; if it is gone, the delivery fails `object_missing`.
  A requeued delivery moves down the attention index by `requeue_every_s`.
- archive: mails whose deliveries are all terminal (see archive.py).

Two reconcilers at once are safe: every write is conditional, archive moves take a per-mail
lock. `dry_run` reads everything and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol

import structlog

from mailflow.aws import AwsClients, shapes
from mailflow.aws.ledger import ORPHAN, DeliveryKey, Ledger, Status, history_entry
from mailflow.aws.store import KeyRing, Listed, Location, S3Store
from mailflow.config import Settings
from mailflow.errors import MailflowError
from mailflow.mail.notification import synthetic_notification
from mailflow.mail.summary import HEAD_BUDGET_BYTES, header_addresses, received_for, split_head
from mailflow.ops.archive import Archiver
from mailflow.ports import LedgerPort, MailStorePort, QueuePort
from mailflow.routing import DeliveryPlan, normalize_recipient, plan_delivery
from mailflow.timestamps import iso

log = structlog.get_logger("mailflow.ops.reconcile")

PHASES = ("orphans", "requeue", "archive")
#: Recipients recovered from To/Cc per orphan, at most (a mail may carry a long Cc list).
MAX_ORPHAN_RECIPIENTS = 50
#: Pages of the incoming listing per pass (1000 keys each).
MAX_LIST_PAGES = 20
UNKNOWN_RECIPIENT = "unknown"
#: Keys per page of the incoming listing (S3's maximum).
LIST_PAGE_KEYS = 1000
#: The reason of an orphan whose recipients only its To/Cc headers name.
ORPHAN_UNVERIFIED = "orphan_recipients_unverified"

_RETURN_PATH = re.compile(r"^Return-Path:[ \t]*<([^<>\r\n]*)>", re.IGNORECASE | re.MULTILINE)
_SES_VERDICT = re.compile(r"^X-SES-(Spam|Virus)-Verdict:[ \t]*(\w+)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class ReconcileOptions:
    """How one reconciler pass runs (the `mailflow reconcile` flags); all durations in seconds.

    `limit` bounds each phase; `grace_s` is how long a stale delivery is left to the worker's
    own retry before it is requeued; `requeue_every_s` spaces repeated requeues of one delivery;
    `archive_grace_s` is how long after the last delivery finished a mail is archived;
    `orphan_age_s` is how old an unrecorded object must be to count as an orphan."""

    limit: int = 100
    dry_run: bool = False
    grace_s: float = 60.0
    requeue_every_s: float = 300.0
    archive_grace_s: float = 60.0
    orphan_age_s: float | None = None  # None: the setting MAILFLOW_ORPHAN_AGE_S
    phases: tuple[str, ...] = PHASES


@dataclass(frozen=True, slots=True)
class Action:
    """One thing a pass did or would do to one mail or delivery, as reported to the operator:
    `result` is done, would (dry run), skipped or error, with the why in `detail`."""

    phase: str  # orphans | requeue | archive
    what: str  # processed|failed|quarantine | requeued|object_missing | recovered|no_recipient
    result: str  # done | would | skipped | error
    mail_id: str
    recipient: str | None = None
    dest: str | None = None
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        """The action as a JSON object (every field, nulls included)."""
        return asdict(self)


@dataclass(slots=True)
class PassReport:
    """What one pass did: its actions in order, when it started (epoch s) and how long it took."""

    dry_run: bool
    started_at: float
    duration_s: float = 0.0
    actions: list[Action] = field(default_factory=list)

    def count(self, what: str | None = None, result: str | None = None) -> int:
        """How many actions have `what` (any when None) and `result` (by default: `done`, or
        `would` in a dry run)."""
        want = result or ("would" if self.dry_run else "done")
        return sum(1 for a in self.actions if (what is None or a.what == what) and a.result == want)

    @property
    def errors(self) -> int:
        """How many items failed on a backend error (reported, the pass went on)."""
        return self.count(result="error")

    def counts(self) -> dict[str, Any]:
        """The totals by kind, as `--json` and the log line report them."""
        return {
            "archived": {k: self.count(k) for k in ("processed", "failed", "quarantine")},
            "requeued": self.count("requeued"),
            "object_missing": self.count("object_missing"),
            "orphans_recovered": self.count("recovered"),
            "orphans_no_recipient": self.count("no_recipient"),
            "orphans_for_operator": self.count("needs_operator"),
            "skipped": self.count(result="skipped"),
            "errors": self.errors,
        }

    def as_json(self) -> dict[str, Any]:
        """The report as `mailflow reconcile --json` prints it: counts and every action."""
        return {
            "dry_run": self.dry_run,
            "started_at": iso(self.started_at),
            "duration_ms": round(self.duration_s * 1000, 1),
            "counts": self.counts(),
            "actions": [a.as_json() for a in self.actions],
        }

    def summary_line(self) -> str:
        """The one-line summary for people: what was (or would be) archived, requeued, recovered."""
        c = self.counts()
        archived = c["archived"]
        verb = "would " if self.dry_run else ""
        return (
            f"reconcile{' (dry run)' if self.dry_run else ''}: {verb}archive"
            f" {sum(archived.values())} (processed {archived['processed']},"
            f" failed {archived['failed']}, quarantine {archived['quarantine']}),"
            f" {verb}requeue {c['requeued']}, object_missing {c['object_missing']},"
            f" orphans {c['orphans_recovered']} (+{c['orphans_no_recipient']} without"
            f" recipient, +{c['orphans_for_operator']} for an operator);"
            f" skipped {c['skipped']}, errors {c['errors']}"
            f" in {self.duration_s:.2f}s"
        )


class Tracker(Protocol):
    """Progress of a pass (a rich progress bar on a TTY; nothing otherwise)."""

    def phase(self, name: str, total: int) -> None:
        """Phase `name` starts, with `total` items to go through."""

    def advance(self) -> None:
        """One item of the current phase is done (whatever its result)."""


class NullTracker:
    """A tracker that shows nothing (JSON output, no terminal, tests)."""

    def phase(self, name: str, total: int) -> None:
        """Nothing to show."""

    def advance(self) -> None:
        """Nothing to show."""


def new_owner() -> str:
    """A lock owner name unique to this reconciler process (`reconcile:host:pid:random`), as it
    appears on the per-mail locks it takes."""
    return f"reconcile:{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def requeue_body(
    *,
    mail_id: str,
    where: Location,
    recipients: Sequence[str],
    sender: str,
    received_at_s: float | None,
    reason: str,
    verdicts: dict[str, str] | None = None,
) -> str:
    """A synthetic SES notification, carrying the stored verdicts so quarantine still holds."""
    doc = synthetic_notification(
        mail_id=mail_id,
        bucket=where.bucket,
        key=where.key,
        recipients=list(recipients),
        sender=sender,
        received_at=iso(received_at_s) or "",
        reason=reason,
    )
    for name, status in (verdicts or {}).items():
        doc["receipt"][f"{name}Verdict"] = {"status": status}
    return json.dumps(doc, ensure_ascii=False)


def orphan_recipients(head_bytes: bytes, settings: Settings) -> tuple[list[str], str]:
    """(recipients, where they came from) for an orphan mail's header block.

    Only `received_header` is SES's envelope; `to_cc_headers` is a guess (a Bcc recipient is
    missing, a listed one may not be ours) that is never delivered, only shown to an operator."""
    envelope = received_for(head_bytes)
    if envelope:
        return envelope[:MAX_ORPHAN_RECIPIENTS], "received_header"
    routed = [
        a
        for a in header_addresses(head_bytes)
        if isinstance(plan_delivery(settings.routes, a, sender="", mail_id="orphan"), DeliveryPlan)
    ]
    return routed[:MAX_ORPHAN_RECIPIENTS], "to_cc_headers"


def orphan_envelope(head_bytes: bytes) -> tuple[str, dict[str, str]]:
    """(sender from Return-Path, SES verdicts from X-SES-*-Verdict) of a stored mail."""
    text = head_bytes.decode("latin-1")
    found = _RETURN_PATH.search(text)
    verdicts: dict[str, str] = {}
    for name, status in _SES_VERDICT.findall(text):
        verdicts.setdefault(name.lower(), status.upper())  # the first (SES's own) wins
    return (found.group(1).strip() if found else ""), verdicts


class Reconciler:
    """Runs reconciler passes: recover orphans, requeue stuck deliveries, archive finished mails.

    Safe to run beside workers and beside another reconciler: every ledger write is conditional
    and archive moves take the per-mail lock. `should_stop` is polled between items, so a
    signal ends a pass early with the work done so far reported."""

    def __init__(
        self,
        settings: Settings,
        clients: AwsClients | None,
        queue: QueuePort,
        options: ReconcileOptions,
        *,
        owner: str | None = None,
        tracker: Tracker | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
        ledger: LedgerPort | None = None,
        store: MailStorePort | None = None,
    ) -> None:
        """On AWS through `clients`, or on the `ledger` and `store` given (the fakes)."""
        self.settings = settings
        self.queue = queue
        self.options = options
        self.owner = owner or new_owner()
        self.tracker = tracker or NullTracker()
        self.should_stop = should_stop
        self._clock = clock
        if clients is not None:
            ledger = ledger or Ledger(clients.dynamodb, settings.table, clock=clock)
            # SES may have stored a mail encrypted: the orphan scan reads its header.
            store = store or S3Store(clients.s3, KeyRing(clients.kms_in, settings.kms_key))
        if ledger is None or store is None:
            raise ValueError("Reconciler needs AWS clients, or a ledger and a store")
        self.ledger: LedgerPort = ledger
        self.store: MailStorePort = store
        self.archiver = Archiver(
            settings,
            self.store,
            self.ledger,
            owner=self.owner,
            grace_s=options.archive_grace_s,
            clock=clock,
        )

    async def run_pass(self) -> PassReport:
        """Run the selected phases once (orphans, requeue, archive, in that order), each bounded by
        `options.limit`; with `dry_run` nothing is written.

        A backend error on one item is an `error` action and the pass goes on; one that stops a
        whole phase (listing the table or the bucket) raises `MailflowError`."""
        report = PassReport(dry_run=self.options.dry_run, started_at=self._clock())
        steps = {"orphans": self._orphans, "requeue": self._requeue, "archive": self._archive}
        for phase in PHASES:
            if phase in self.options.phases and not self.should_stop():
                report.actions.extend(await steps[phase]())
        report.duration_s = self._clock() - report.started_at
        log.info("reconcile_pass", dry_run=self.options.dry_run, **report.counts())
        return report

    async def _each(
        self, phase: str, items: Sequence[Any], one: Callable[[Any], Any]
    ) -> list[Action]:
        """Run `one` per item; a backend failure on one item is reported, not fatal."""
        self.tracker.phase(phase, len(items))
        out: list[Action] = []
        for item in items:
            if self.should_stop():
                break
            try:
                out.append(await one(item))
            except MailflowError as exc:
                mail_id = item if isinstance(item, str) else str(item.get("mail_id", "?"))
                log.warning("reconcile_error", phase=phase, mail_id=mail_id, error=str(exc))
                out.append(Action(phase, phase, "error", mail_id, detail=str(exc)[:500]))
            self.tracker.advance()
        return out

    # --- archive ----------------------------------------------------------------------------

    async def _archive(self) -> list[Action]:
        before = self._clock() - self.options.archive_grace_s
        mail_ids: dict[str, None] = {}
        for status in (Status.SUCCEEDED, Status.FAILED):
            found = await self.ledger.needing_attention(
                status, before_s=before, limit=self.options.limit
            )
            mail_ids.update((str(r["mail_id"]), None) for r in found)
        return await self._each("archive", list(mail_ids)[: self.options.limit], self._archive_one)

    async def _archive_one(self, mail_id: str) -> Action:
        done = await self.archiver.archive_mail(mail_id, dry_run=self.options.dry_run)
        dest = done.destination
        url = dest.where.url if dest else None
        return Action(
            "archive", dest.kind if dest else "-", done.result, mail_id, None, url, done.detail
        )

    # --- requeue ----------------------------------------------------------------------------

    async def _requeue(self) -> list[Action]:
        before = self._clock() - self.options.grace_s
        items: list[dict[str, Any]] = []
        for status in (Status.RECEIVED, Status.RETRYING, Status.PROCESSING):
            if (left := self.options.limit - len(items)) > 0:
                found = await self.ledger.needing_attention(status, before_s=before, limit=left)
                items.extend(r for r in found if _stale(r, before))
        return await self._each("requeue", items, self._requeue_one)

    async def _requeue_one(self, record: dict[str, Any]) -> Action:
        status = Status(record["status"])
        key = DeliveryKey(str(record["mail_id"]), str(record["recipient"]))
        where = Location(
            str(record.get("bucket") or self.settings.bucket),
            str(record.get("key") or f"{self.settings.incoming_prefix}{key.mail_id}"),
        )
        seen = int(record.get("requeue_count") or 0)
        gone = await self.store.head(where) is None
        act = partial(
            Action,
            "requeue",
            "object_missing" if gone else "requeued",
            mail_id=key.mail_id,
            recipient=key.recipient,
            dest=where.url,
        )
        if self.options.dry_run:
            return act("would", detail=f"{status.value}, object {'gone' if gone else 'there'}")
        if gone:
            now = self._clock()
            entry = history_entry(
                attempt=int(record.get("attempts") or 0),
                worker=self.owner,
                started_at=now,
                finished_at=now,
                status=Status.FAILED,
                reason="object_missing",
                exit_code=None,
                stderr_tail="",
            )
            fields = {
                "reason": "object_missing",
                "detail": f"{where.url} not found",
                shapes.TTL_ATTRIBUTE: self.settings.expires_at(now),
            }
            failed = await self.ledger.fail_stale(
                key, expect=status, seen_requeues=seen, fields=fields, entry=entry
            )
            return act("done" if failed else "skipped", detail=f"was {status.value}")
        recheck_at = self._clock() + self.options.requeue_every_s
        if not await self.ledger.mark_requeued(
            key, expect=status, seen_requeues=seen, recheck_at=recheck_at
        ):
            return act("skipped", detail="changed meanwhile (claimed, or requeued by another)")
        await self.queue.send(
            requeue_body(
                mail_id=key.mail_id,
                where=where,
                recipients=[key.recipient],
                sender=str(record.get("sender") or ""),
                received_at_s=record.get("received_at") or record.get("created_at"),
                reason=f"reconcile_{status.value}",
                verdicts=record.get("verdicts"),
            )
        )
        log.info("requeued", mail_id=key.mail_id, recipient=key.recipient, was=status.value)
        return act("done", detail=f"was {status.value}")

    # --- orphans ----------------------------------------------------------------------------

    async def _orphans(self) -> list[Action]:
        """Unrecorded objects whose notification cannot be in the queue any more.

        SQS tells no message's age, so the queue must have been seen *empty* (nothing visible,
        nothing in flight) at some time T; an object stored `orphan_age_s` before T had its
        notification in the queue before T, so by T it was processed (a record exists) or
        dead-lettered, or it never came. Objects after that wait for a later empty queue.
        The listing goes on from where the last pass stopped (a cursor in the table) and
        starts over at the end of the prefix."""
        age_s = (
            self.settings.orphan_age_s
            if self.options.orphan_age_s is None
            else self.options.orphan_age_s
        )
        now = self._clock()
        state = await self.ledger.reconcile_state()
        depth = await self.queue.depth()
        backlog = depth.get("queue_visible", 0) + depth.get("queue_in_flight", 0)
        seen_empty = state.get("queue_empty_at")
        empty_at = now if backlog == 0 else (float(seen_empty) if seen_empty else None)
        if empty_at is None:
            return [
                Action(
                    "orphans",
                    "orphan_scan",
                    "skipped",
                    "-",
                    detail=f"the queue holds {backlog} messages and was never seen empty:"
                    " an unrecorded object may still have its notification there",
                )
            ]
        cutoff = empty_at - age_s
        prefix = self.settings.incoming_prefix
        cursor = str(state.get("cursor") or "")
        orphans: list[Listed] = []
        listed, stopped = 0, False
        async with contextlib.aclosing(
            self.store.list_objects(
                self.settings.bucket,
                prefix,
                max_pages=MAX_LIST_PAGES,
                start_after=cursor or None,
                page_keys=LIST_PAGE_KEYS,
            )
        ) as objects:
            async for obj in objects:
                if len(orphans) >= self.options.limit or self.should_stop():
                    stopped = True
                    break
                listed += 1
                cursor = obj.key
                mail_id = obj.key.removeprefix(prefix)
                if not mail_id or "/" in mail_id or obj.modified_at > cutoff:
                    continue
                if not await self.ledger.get_mail(mail_id):
                    orphans.append(obj)
        if not stopped and listed < MAX_LIST_PAGES * LIST_PAGE_KEYS:
            cursor = ""  # the end of the prefix: the next pass starts over
        if not self.options.dry_run:
            await self.ledger.save_reconcile_state(cursor=cursor, queue_empty_at=empty_at)
        return await self._each("orphans", orphans, self._orphan_one)

    async def _orphan_one(self, obj: Listed) -> Action:
        where = Location(self.settings.bucket, obj.key)
        mail_id = where.key.removeprefix(self.settings.incoming_prefix)
        head_bytes = split_head(await self.store.read_prefix(where, HEAD_BUDGET_BYTES))
        recipients, found_in = orphan_recipients(head_bytes, self.settings)
        sender, verdicts = orphan_envelope(head_bytes)
        received_at = obj.modified_at
        fields: dict[str, Any] = {
            "bucket": where.bucket,
            "key": where.key,
            "sender": sender,
            "received_at": received_at,
            "size_bytes": obj.size_bytes,
            "verdicts": verdicts,
            "recovered_by": "reconcile_orphan",
            "recipients_from": found_in,
        }
        if not recipients:
            return await self._orphan_unknown(mail_id, where, fields)
        recipients = [normalize_recipient(r) for r in recipients]
        if found_in != "received_header":
            return await self._orphan_for_operator(mail_id, where, fields, recipients)
        act = partial(Action, "orphans", "recovered", mail_id=mail_id, dest=where.url)
        if self.options.dry_run:
            return act("would", recipient=",".join(recipients), detail=f"from {found_in}")
        created = [
            r
            for r in recipients
            if await self.ledger.create_received(DeliveryKey(mail_id, r), fields)
        ]
        if not created:
            return act(
                "skipped",
                recipient=",".join(recipients),
                detail="records exist now (another reconciler, or the worker)",
            )
        await self.queue.send(
            requeue_body(
                mail_id=mail_id,
                where=where,
                recipients=created,
                sender=sender,
                received_at_s=received_at,
                reason="reconcile_orphan",
                verdicts=verdicts,
            )
        )
        log.info("orphan_recovered", mail_id=mail_id, recipients=created, found_in=found_in)
        return act("done", recipient=",".join(created), detail=f"from {found_in}")

    async def _orphan_unknown(
        self, mail_id: str, where: Location, fields: dict[str, Any]
    ) -> Action:
        detail = "no envelope recipient in Received:, no routable To/Cc address"
        act = partial(
            Action,
            "orphans",
            "no_recipient",
            mail_id=mail_id,
            recipient=UNKNOWN_RECIPIENT,
            dest=where.url,
            detail=detail,
        )
        if self.options.dry_run:
            return act("would")
        expires_at = self.settings.expires_at(self._clock())
        created = await self.ledger.record_without_claim(
            DeliveryKey(mail_id, UNKNOWN_RECIPIENT),
            Status.FAILED,
            fields
            | {
                "outcome": Status.FAILED.value,
                "reason": "orphan_no_recipient",
                "detail": detail,
                shapes.TTL_ATTRIBUTE: expires_at,
            },
        )
        log.warning("orphan_without_recipient", mail_id=mail_id, key=where.key)
        return act("done" if created else "skipped")

    async def _orphan_for_operator(
        self, mail_id: str, where: Location, fields: dict[str, Any], candidates: list[str]
    ) -> Action:
        """A mail whose only recipients are To/Cc guesses: recorded, never delivered."""
        detail = (
            "no envelope recipient (SES names it only for single-recipient mail); To/Cc name "
            + ", ".join(candidates)
            + ": not delivered, check and deliver by hand"
        )[:1000]
        act = partial(
            Action,
            "orphans",
            "needs_operator",
            mail_id=mail_id,
            recipient=UNKNOWN_RECIPIENT,
            dest=where.url,
            detail=detail,
        )
        if self.options.dry_run:
            return act("would")
        created = await self.ledger.record_without_claim(
            DeliveryKey(mail_id, UNKNOWN_RECIPIENT),
            Status.FAILED,
            fields
            | {
                "outcome": Status.FAILED.value,
                "reason": ORPHAN_UNVERIFIED,
                "detail": detail,
                "candidates": candidates,
            },
            attn=ORPHAN,  # not archived: the object stays under incoming/ for the operator
        )
        log.warning("orphan_needs_operator", mail_id=mail_id, key=where.key, to_cc=candidates)
        return act("done" if created else "skipped")


def _stale(record: dict[str, Any], before: float) -> bool:
    """Double-check of what the index said: the retry is due, the lease expired."""
    status = record.get("status")
    if status == Status.RETRYING:
        return float(record.get("next_attempt_at") or 0) <= before
    if status == Status.PROCESSING:
        return float(record.get("lease_expires_at") or 0) <= before
    return status == Status.RECEIVED
