"""Archive moves: a finished mail's object out of `incoming/`, verified, and back for a retry.

A mail is archived once every delivery of it is terminal: its object is copied to
`processed/<mail_id>` (every delivery succeeded), `failed/<mail_id>` (any failed) or
`quarantine/<mail_id>` (held back by an SES verdict), in `MAILFLOW_ARCHIVE_BUCKET` when set;
the copy is verified (size, then ETag or SHA-256) before the original is deleted; then the
deliveries become `archived`, keeping `outcome`, and leave the attention index.

Safe when two reconcilers (or a reconciler and `mailflow retry`) meet on one mail: both take
the per-mail lock in the ledger first, and re-read the deliveries under it. Each step is
idempotent besides: the destination key is fixed, the copy is skipped when an identical one
is there, a source already gone with its copy in place counts as moved, and the `archived`
transition is conditional. A holder that crashes leaves a lock that expires.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from mailflow.aws.ledger import TERMINAL, DeliveryKey, Status
from mailflow.aws.store import CopyMismatchError, Location, ObjectInfo, head
from mailflow.config import Settings
from mailflow.ports import LedgerPort, MailStorePort

log = structlog.get_logger("mailflow.ops.archive")

#: How long a per-mail lock holds when its owner dies without releasing it.
LOCK_HOLD_S = 300.0
METADATA_VALUE_CHARS = 512


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a finished mail's object goes: `kind` is processed, failed or quarantine."""

    kind: str  # processed | failed | quarantine
    where: Location


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    """What one archive attempt did: `done` (moved and marked), `would` (dry run), or
    `skipped` with the reason in `detail` (not ready, locked by another, changed meanwhile)."""

    result: str  # done | would | skipped
    destination: Destination | None
    detail: str


# --- what goes where (pure) -------------------------------------------------------------------


def source(settings: Settings, records: Sequence[dict[str, Any]]) -> Location:
    """The mail's object as SES stored it (every delivery names the same one)."""
    for record in records:
        if record.get("key"):
            return Location(str(record.get("bucket") or settings.bucket), str(record["key"]))
    mail_id = str(records[0]["mail_id"]) if records else ""
    return Location(settings.bucket, f"{settings.incoming_prefix}{mail_id}")


def outcome_of(record: dict[str, Any]) -> str:
    """A delivery's final outcome: its stored `outcome` once archived, else its status."""
    return str(record.get("outcome") or record.get("status") or "")


def destination(settings: Settings, records: Sequence[dict[str, Any]]) -> Destination:
    """Where the mail's object is archived: `quarantine/` if any delivery was quarantined,
    `processed/` if all succeeded, `failed/` otherwise; in the archive bucket when one is set,
    else next to the original."""
    mail_id = str(records[0]["mail_id"])
    bucket = settings.archive_bucket or source(settings, records).bucket
    if any(r.get("reason") == "quarantined" for r in records):
        kind, prefix = "quarantine", settings.quarantine_prefix
    elif all(outcome_of(r) == Status.SUCCEEDED for r in records):
        kind, prefix = "processed", settings.processed_prefix
    else:
        kind, prefix = "failed", settings.failed_prefix
    return Destination(kind, Location(bucket, f"{prefix}{mail_id}"))


def archived_at(record: dict[str, Any], settings: Settings) -> Location | None:
    """Where the delivery record says its mail's object was archived; None if it was not."""
    if not record.get("archived_key"):
        return None
    bucket = record.get("archived_bucket") or settings.archive_bucket or record.get("bucket")
    return Location(str(bucket or settings.bucket), str(record["archived_key"]))


def not_ready(records: Sequence[dict[str, Any]], now: float, grace_s: float) -> str | None:
    """Why the mail cannot be archived yet; None when it can."""
    if not records:
        return "no deliveries recorded"
    open_ = [
        f"{r['recipient']}={r.get('status')}" for r in records if r.get("status") not in TERMINAL
    ]
    if open_:
        return "deliveries still open: " + ", ".join(open_)
    if all(r.get("status") == Status.ARCHIVED for r in records):
        return "already archived"
    missing = _missing_recipients(records)
    if missing:
        return missing
    last = max(float(r.get("finished_at") or r.get("updated_at") or 0) for r in records)
    if now - last < grace_s:
        return f"finished {now - last:.0f}s ago (grace {grace_s:.0f}s)"
    return None


def _missing_recipients(records: Sequence[dict[str, Any]]) -> str | None:
    """Which recipients have no delivery yet. The worker records the envelope on the first
    recipient's delivery (before, it stored it on every delivery) and the recipient count
    on each, so a missing delivery shows whichever deliveries exist yet."""
    known = {str(r["recipient"]) for r in records}
    for record in records:
        waiting = [x for x in record.get("recipients") or [] if str(x).lower() not in known]
        if waiting:
            return "no delivery yet for " + ", ".join(map(str, waiting))
    expected = max(int(r.get("recipient_count") or 0) for r in records)
    if expected > len(known):
        return f"no delivery yet for {expected - len(known)} of {expected} recipients"
    return None


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")[:METADATA_VALUE_CHARS]


def archive_metadata(
    mail_id: str,
    kind: str,
    src: Location,
    records: Sequence[dict[str, Any]],
    now: float,
) -> dict[str, str]:
    """The S3 user metadata put on the archived copy: mail id, outcome, each delivery's outcome,
    reasons, source and time; ASCII only (as S3 metadata must be), long values cut to 512 chars."""
    outcome = {"processed": "succeeded", "quarantine": "quarantined"}.get(kind, "failed")
    reasons = sorted({str(r.get("reason")) for r in records if r.get("reason")})
    return {
        "mailflow-mail-id": mail_id,
        "mailflow-outcome": outcome,
        "mailflow-deliveries": _ascii(
            ",".join(f"{r['recipient']}={outcome_of(r)}" for r in records),
        ),
        "mailflow-reasons": _ascii(",".join(reasons)),
        "mailflow-source": _ascii(src.url),
        "mailflow-archived-at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
    }


def lock_anchor(records: Sequence[dict[str, Any]]) -> DeliveryKey:
    """The delivery that carries the mail's lock: the lowest recipient, the same for all."""
    first = min(records, key=lambda r: str(r["recipient"]))
    return DeliveryKey(str(first["mail_id"]), str(first["recipient"]))


@contextlib.asynccontextmanager
async def mail_lock(
    ledger: LedgerPort,
    records: Sequence[dict[str, Any]],
    owner: str,
    hold_s: float = LOCK_HOLD_S,
) -> AsyncIterator[bool]:
    """`async with mail_lock(...) as held:` — held is False when someone else has the mail."""
    anchor = lock_anchor(records)
    held = await ledger.lock_mail(anchor, owner, hold_s)
    try:
        yield held
    finally:
        if held:
            await ledger.unlock_mail(anchor, owner)


# --- the moves --------------------------------------------------------------------------------


class Archiver:
    """Moves finished mails' objects from `incoming/` to their archive location and marks their
    deliveries `archived` (and back, for `mailflow retry`).

    Every move happens under the mail's ledger lock (owned by `owner`) and re-reads the
    deliveries under it; the copy is verified before the original is deleted. `grace_s`
    is how long after the last delivery finished a mail is left alone."""

    def __init__(
        self,
        settings: Settings,
        store: MailStorePort,
        ledger: LedgerPort,
        *,
        owner: str,
        grace_s: float = 0.0,
        clock: Any = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.ledger = ledger
        self.owner = owner
        self.grace_s = grace_s
        self._clock = clock

    def candidates(
        self,
        records: Sequence[dict[str, Any]],
        dest: Location | None = None,
    ) -> list[Location]:
        """Where the mail's object may be: incoming first, then every archive location."""
        found = [source(self.settings, records)]
        found += [loc for r in records if (loc := archived_at(r, self.settings)) is not None]
        bucket = self.settings.archive_bucket or found[0].bucket
        mail_id = str(records[0]["mail_id"])
        for prefix in (
            self.settings.failed_prefix,
            self.settings.processed_prefix,
            self.settings.quarantine_prefix,
        ):
            found.append(Location(bucket, f"{prefix}{mail_id}"))
        return [loc for loc in dict.fromkeys(found) if loc != dest]

    async def find(
        self,
        records: Sequence[dict[str, Any]],
        exclude: Location | None = None,
    ) -> ObjectInfo | None:
        """The first place the object actually is (incoming first)."""
        for where in self.candidates(records, exclude):
            info = await self.store.head(where)
            if info is not None:
                return info
        return None

    async def archive_mail(self, mail_id: str, *, dry_run: bool = False) -> ArchiveResult:
        """Archive one mail if every delivery of it is terminal (and finished `grace_s` ago).

        Idempotent and safe against a concurrent archiver or retry: returns `skipped` with the
        reason rather than wait. A missing object is recorded as `archive_note=object_missing`,
        not an error. Raises `CopyMismatchError` when the copy does not verify (the original is
        then kept) or the destination is the incoming key itself (misconfigured prefixes)."""
        records = await self.ledger.get_mail(mail_id)
        why = not_ready(records, self._clock(), self.grace_s)
        if why is not None:
            return ArchiveResult("skipped", None, why)
        if dry_run:
            dest = destination(self.settings, records)
            return ArchiveResult("would", dest, f"from {source(self.settings, records).url}")
        async with mail_lock(self.ledger, records, self.owner) as held:
            if not held:
                return ArchiveResult("skipped", None, "busy: the mail is locked by another")
            records = await self.ledger.get_mail(mail_id)  # as it is now, under the lock
            why = not_ready(records, self._clock(), self.grace_s)
            if why is not None:
                return ArchiveResult("skipped", None, why)
            dest = destination(self.settings, records)
            if dest.where == source(self.settings, records):  # a copy onto itself, then a delete
                raise CopyMismatchError(f"{dest.where.url} is the incoming key: check prefixes")
            note = await self._move(mail_id, records, dest)
            marked = await self._mark(records, dest, note)
        log.info("archived", mail_id=mail_id, dest=dest.where.url, note=note, marked=marked)
        if not marked:
            return ArchiveResult("skipped", dest, f"{note}; deliveries changed meanwhile")
        return ArchiveResult("done", dest, note)

    async def _move(
        self,
        mail_id: str,
        records: Sequence[dict[str, Any]],
        dest: Destination,
    ) -> str:
        src = await self.find(records, exclude=dest.where)
        dst = await self.store.head(dest.where)
        if src is None:
            return "already in place" if dst is not None else "object_missing"
        how = ""
        if dst is not None:  # an earlier run copied, then stopped short of the delete
            with contextlib.suppress(CopyMismatchError):
                how = await self.store.verify_copy(src, dst)
        if dst is None or not how:
            meta = archive_metadata(mail_id, dest.kind, src.where, records, self._clock())
            dst, how = await self.store.copy_verified(src, dest.where, meta)
        await self.store.delete(src.where)
        # Copies left at other archive locations (an earlier archive, then a retry).
        for where in self.candidates(records, dest.where):
            stale = await self.store.head(where)
            if stale is None:
                continue
            try:
                await self.store.verify_copy(stale, dst)
            except CopyMismatchError as exc:
                log.warning("archive_stale_copy_kept", mail_id=mail_id, error=str(exc))
                continue
            await self.store.delete(where)
        return f"moved from {src.where.url} (verified by {how})"

    async def _mark(
        self,
        records: Sequence[dict[str, Any]],
        dest: Destination,
        note: str,
    ) -> bool:
        now = self._clock()
        missing = note == "object_missing"
        fields: dict[str, Any] = {
            "archived_key": None if missing else dest.where.key,
            "archived_bucket": None if missing else dest.where.bucket,
            "archived_at": now,
            "archive_note": "object_missing" if missing else None,
        }
        marked = False
        for record in records:
            status = record.get("status")
            key = DeliveryKey(str(record["mail_id"]), str(record["recipient"]))
            if status in (Status.SUCCEEDED, Status.FAILED):
                expect: tuple[Status, ...] = (Status(status),)
            elif status == Status.ARCHIVED and archived_at(record, self.settings) != dest.where:
                expect = (Status.ARCHIVED,)  # archived before a retry: point at the new copy
            else:
                continue
            done = await self.ledger.transition(
                key,
                expect=expect,
                status=Status.ARCHIVED,
                attention=False,
                fields=fields | {"outcome": outcome_of(record)},
            )
            marked = marked or done is not None
        return marked

    async def restore(self, info: ObjectInfo, records: Sequence[dict[str, Any]]) -> str | None:
        """Put the object back at its incoming key (for a retry); None if it is there."""
        home = source(self.settings, records)
        if info.where == home:
            return None
        restored_from = {"mailflow-restored-from": _ascii(info.where.url)}
        await self.store.copy_verified(info, home, restored_from)
        await self.store.delete(info.where)
        log.info("restored", mail_id=records[0]["mail_id"], source=info.where.url, to=home.url)
        return info.where.url


async def locate(s3: Any, settings: Settings, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Where a mail's object is now: HEAD of the original key and of the archived key."""
    if not records:
        return {"now": "unknown", "original": None, "archived": None}
    original = source(settings, records)
    archived = next((loc for r in records if (loc := archived_at(r, settings))), None)
    out: dict[str, Any] = {}
    for name, where in (("original", original), ("archived", archived)):
        if where is None:
            out[name] = None
            continue
        info = await head(s3, where)
        out[name] = {
            "url": where.url,
            "exists": info is not None,
            "size_bytes": info.size_bytes if info else None,
            "encrypted": info.encrypted if info else None,
        }
    in_original = bool(out["original"] and out["original"]["exists"])
    in_archive = bool(out["archived"] and out["archived"]["exists"])
    out["now"] = (
        "both"
        if in_original and in_archive
        else "incoming"
        if in_original
        else "archive"
        if in_archive
        else "missing"
    )
    return out


def describe_location(where: dict[str, Any]) -> str:
    """`locate()` in one line for people."""
    parts = [f"object: {where['now']}"]
    for name in ("original", "archived"):
        if where.get(name):
            state = "present" if where[name]["exists"] else "absent"
            if where[name].get("encrypted"):
                state += ", encrypted (KMS)"
            parts.append(f"{name} {where[name]['url']} {state}")
    return "; ".join(parts)
