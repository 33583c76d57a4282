"""One delivery, one attempt: claim → fetch → run the processor → record the outcome.

What the SQS message should do afterwards is returned as a `Settlement`; the worker combines the
fates of all deliveries of a mail into one decision about the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mailflow.aws import AwsPermanentError, shapes
from mailflow.aws.envelope import DecryptError
from mailflow.aws.ledger import Busy, Claimed, DeliveryKey, Status, history_entry
from mailflow.backoff import retry_delay_s
from mailflow.config import Settings
from mailflow.errors import LeaseLostError, ObjectMissingError, TooLargeError, TransientError
from mailflow.mail.notification import MailRef
from mailflow.mail.summary import MailSummary, summarize
from mailflow.metrics import emf
from mailflow.outcome import Outcome, ProcessResult, Verdict, classify
from mailflow.ports import LedgerPort, MailStorePort
from mailflow.processors.exec import Processor, ProcessRequest
from mailflow.routing import DeliveryPlan, Unroutable, plan_delivery

log = structlog.get_logger("mailflow.worker.delivery")

#: Per-delivery wall-clock stamps for the canonical line's latency breakdown. The worker sets a
#: fresh dict (`received`, `admitted`) before it starts each delivery task; the deliverer adds
#: `spawn`, `exit` and `recorded`. Unset (None) outside a worker: nothing is stamped.
STAMPS: ContextVar[dict[str, float] | None] = ContextVar("mailflow_stamps", default=None)
#: (from, to) stamp pairs → the `timing_ms` fields of the canonical line.
TIMING_PHASES = {
    "queued": ("received", "admitted"),  # prefetched / parked, waiting for a run slot
    "pre": ("admitted", "spawn"),  # claim, S3 fetch to spool, header summary
    "run": ("spawn", "exit"),  # the processor, as the transport sees it
    "post": ("exit", "recorded"),  # classify, outcome write
}


def _stamp(name: str, now: float) -> None:
    stamps = STAMPS.get()
    if stamps is not None:
        stamps[name] = now


@dataclass(frozen=True, slots=True)
class Settlement:
    """`done`: terminal, nothing left for this message. `defer_until_s`: look again then.
    `transient`: the backend failed us; let SQS redeliver after a short pause."""

    done: bool = False
    defer_until_s: float | None = None
    transient: bool = False


DONE = Settlement(done=True)


def tail_text(data: bytes, max_bytes: int) -> str:
    """The end of a stream as text of at most `max_bytes` UTF-8 bytes. Bytes that are not
    UTF-8 are escaped (`\\xff`: four bytes each), so the cap is applied after escaping, at a
    character boundary: two 64 KiB tails of such bytes would otherwise pass DynamoDB's 400 KB
    item limit and make the outcome unwritable."""
    text = data[-max_bytes:].decode("utf-8", errors="backslashreplace")
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[-max_bytes:].decode("utf-8", errors="ignore")


#: What a smaller outcome leaves out when DynamoDB refuses the full one: the bulky, optional
#: fields (tails, header summary). Set to None, they are also removed from the item, which
#: frees the room earlier attempts' tails took.
BULKY_FIELDS = (
    "stdout_tail",
    "stderr_tail",
    "from",
    "to",
    "subject",
    "date",
    "message_id_header",
    "content_type",
    "parse_defects",
)


def new_token() -> str:
    """A fresh lease token: fences one attempt's writes (and the key slot it holds)."""
    return secrets.token_hex(16)


def base_env(settings: Settings) -> dict[str, str]:
    """What the processor gets of our environment: the contract, never our AWS credentials."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/"),
    }
    for name in settings.pass_env:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


class Deliverer:
    """Runs attempts. Holds no per-delivery state: the caller passes the dict in which a
    claimed lease is published for the heartbeat (and removed when the attempt ends).

    Contract per attempt: claim in the ledger (a lost claim is settled as a duplicate or a
    deferral, nothing runs), spool the mail from S3, run the processor, classify, and record
    the outcome fenced by the lease; the returned `Settlement` says what the SQS message
    should do. What the mail or the processor does is recorded (retrying or failed with a
    reason), never raised; a lost lease cancels the run and leaves the outcome to the new
    owner. On a forced shutdown the delivery is handed back as `retrying` at once."""

    def __init__(
        self,
        settings: Settings,
        ledger: LedgerPort,
        store: MailStorePort,
        processor: Processor,
        *,
        worker_id: str,
        spool_dir: Path,
        shutting_down: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.store = store
        self.processor = processor
        self.worker_id = worker_id
        self.spool_dir = spool_dir
        self._shutting_down = shutting_down
        self._clock = clock
        self._env = base_env(settings)

    def plan(self, ref: MailRef, recipient: str) -> DeliveryPlan | Unroutable:
        """The routing decision for `recipient` of this mail (argv and environment, or why not)."""
        return plan_delivery(
            self.settings.routes,
            recipient,
            sender=ref.sender,
            mail_id=ref.mail_id,
            base_env=self._env,
        )

    def _meta(self, ref: MailRef, route: str | None, recipient: str) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "bucket": ref.bucket,
            "key": ref.key,
            "sender": ref.sender,
            "created_at": self._clock(),
            "verdicts": ref.verdicts,
            # How many recipients the mail has: the reconciler archives a mail only once all
            # of them have a terminal delivery, not just the ones that happen to exist yet.
            "recipient_count": len(ref.recipients),
        }
        if recipient == ref.recipients[0]:
            # The envelope itself, once per mail: on the first recipient's delivery only.
            meta["recipients"] = list(ref.recipients)
        if ref.received_at_s is not None:
            meta["received_at"] = ref.received_at_s
        if route:
            meta["route"] = route
        return meta

    def quarantine_reason(self, ref: MailRef) -> str | None:
        """Why the mail is held back without a processor run (`spam verdict FAIL`...), per the
        configured quarantine verdicts; None to deliver it."""
        for name in self.settings.quarantine_verdicts:
            if ref.verdicts.get(name, "").upper() == "FAIL":
                return f"{name} verdict FAIL"
        return None

    async def record_final(
        self,
        ref: MailRef,
        recipient: str,
        reason: str,
        detail: str,
        route: str | None,
    ) -> Settlement:
        """Unroutable or quarantined: a terminal record with no processor run."""
        key = DeliveryKey(ref.mail_id, recipient)
        fields = self._meta(ref, route, recipient) | {
            "outcome": Status.FAILED.value,
            "subject": ref.subject[:998],  # from SES's commonHeaders: the mail is not fetched
            "reason": reason,
            "detail": detail,
            shapes.TTL_ATTRIBUTE: self.settings.expires_at(self._clock()),
        }
        created = await self.ledger.record_without_claim(key, Status.FAILED, fields)
        self._log_outcome(
            ref,
            recipient,
            route or "-",
            Status.FAILED if created else "duplicate",
            attempt=0,
            reason=reason,
            detail=detail,
        )
        if created:
            return DONE
        record = await self.ledger.get(key)
        return (
            DONE
            if record.get("status") in {"succeeded", "failed", "archived"}
            else Settlement(
                defer_until_s=self._clock() + 30,
            )
        )

    async def deliver(
        self,
        ref: MailRef,
        plan: DeliveryPlan,
        recipient: str,
        leases: dict[DeliveryKey, str] | None = None,
        *,
        message_id: str | None = None,
        token: str | None = None,
    ) -> Settlement:
        """One attempt for the SQS message `message_id` (recorded as the lease's carrier).
        `token`: the lease token to claim with (the one a key slot was taken with, so both
        are fenced by the same token)."""
        key = DeliveryKey(ref.mail_id, recipient)
        token = token or new_token()
        claim = await self.ledger.claim(
            key,
            worker=self.worker_id,
            token=token,
            lease_s=self.settings.lease_s,
            meta=self._meta(ref, plan.route, recipient) | {"argv": list(plan.argv)},
            carrier=message_id,
        )
        if isinstance(claim, Busy):
            return self._busy_fate(ref, recipient, claim, message_id)
        if leases is not None:
            leases[key] = token  # from now on the heartbeat renews it
        try:
            return await self._attempt(ref, plan, key, claim)
        finally:
            if leases is not None:
                leases.pop(key, None)

    async def hold(self, ref: MailRef, recipient: str, plan: DeliveryPlan, hold: str) -> bool:
        """Park the delivery in the table because an operator holds its key (`hold` names
        the hold). False: it could not be held (claimed elsewhere, finished): run it normally."""
        key = DeliveryKey(ref.mail_id, recipient)
        meta = self._meta(ref, plan.route, recipient) | {"argv": list(plan.argv)}
        if plan.key is not None:
            meta["route_key"] = plan.key
        held = await self.ledger.hold_delivery(key, hold=hold, meta=meta)
        if held:
            log.info(
                "held",
                mail_id=ref.mail_id,
                recipient=recipient,
                route=plan.route,
                key=plan.key,
                hold=hold,
            )
        return held

    def _busy_fate(
        self, ref: MailRef, recipient: str, busy: Busy, message_id: str | None
    ) -> Settlement:
        carrier = busy.record.get("lease_message")
        # A live run for another SQS message holds the lease: that message carries the
        # delivery (it stays queued until the delivery is terminal, and comes back if the run
        # dies), so this copy is not needed. Deferred instead, it would come back every
        # lease period and could pass maxReceiveCount into the DLQ during a long run.
        covered = busy.why == "leased" and carrier is not None and carrier != message_id
        log.info(
            "duplicate" if busy.why == "terminal" or covered else "deferred",
            mail_id=ref.mail_id,
            recipient=recipient,
            why="live_run_elsewhere" if covered else busy.why,
            status=busy.record.get("status"),
            until_s=busy.until_s,
        )
        if busy.why == "terminal" or covered:
            return DONE
        return Settlement(defer_until_s=busy.until_s)

    async def _attempt(
        self,
        ref: MailRef,
        plan: DeliveryPlan,
        key: DeliveryKey,
        claim: Claimed,
    ) -> Settlement:
        attempt = claim.attempt
        started = self._clock()
        if attempt > self.settings.max_attempts:
            # Earlier attempts died without an outcome (worker killed mid-run): stop here.
            outcome = Outcome(Verdict.PERMANENT, "attempts_exhausted")
            return await self._record(ref, plan, key, claim, outcome, None, None, started)
        summary: MailSummary | None = None
        size_bytes: int | None = None
        result: ProcessResult | None = None
        try:
            async with self.store.spooled(
                ref.bucket,
                ref.key,
                spool_dir=self.spool_dir,
                max_bytes=self.settings.max_mail_bytes,
                mail_id=ref.mail_id,
            ) as mail:
                size_bytes = mail.size_bytes
                summary = summarize(mail.head)
                env = plan.env | {"MAILFLOW_ATTEMPT": str(attempt)}  # the plan has no attempt
                _stamp("spawn", self._clock())
                result = await self.processor.run(
                    ProcessRequest(
                        argv=plan.argv,
                        env=env,
                        stdin_path=mail.path,
                        timeout_s=self.settings.processor_timeout_s,
                        kill_grace_s=self.settings.kill_grace_s,
                        cwd=self.settings.workdir,
                        tail_bytes=self.settings.output_tail_bytes,
                    ),
                )
            _stamp("exit", self._clock())
            outcome = classify(result, self.settings.tempfail_codes)
        except ObjectMissingError as exc:
            missing_final = attempt >= self.settings.missing_object_attempts
            verdict = Verdict.PERMANENT if missing_final else Verdict.RETRY
            outcome = Outcome(verdict, "object_missing")
            result = ProcessResult(transport_error=str(exc))
        except TooLargeError as exc:
            outcome = Outcome(Verdict.PERMANENT, "too_large")
            result = ProcessResult(transport_error=str(exc))
        except DecryptError as exc:  # the processor never saw it; the spool file is gone
            outcome = Outcome(Verdict.PERMANENT, exc.reason)
            result = ProcessResult(transport_error=str(exc))
        except TransientError as exc:
            outcome = Outcome(Verdict.RETRY, "backend_unavailable")
            result = ProcessResult(transport_error=str(exc))
        except asyncio.CancelledError:
            # Lost lease (the other worker owns the outcome) or forced shutdown: in the latter
            # case hand the delivery back instead of waiting for the lease to expire, due as
            # soon as the cancelled processor is surely gone (a sidecar's runner may still be
            # killing it: two runs must never overlap).
            task = asyncio.current_task()
            if task is not None and task.cancelling() and self._shutting_down():
                outcome = Outcome(Verdict.RETRY, "worker_shutdown")
                settle_s = self.processor.settle_s(self.settings.kill_grace_s)
                with contextlib.suppress(Exception):
                    await asyncio.shield(
                        self._record(
                            ref, plan, key, claim, outcome, None, None, started, retry_in_s=settle_s
                        ),
                    )
            raise
        return await self._record(
            ref, plan, key, claim, outcome, result, summary, started, size_bytes=size_bytes
        )

    async def _record(  # noqa: C901, PLR0912 - one field per outcome detail, flat on purpose
        self,
        ref: MailRef,
        plan: DeliveryPlan,
        key: DeliveryKey,
        claim: Claimed,
        outcome: Outcome,
        result: ProcessResult | None,
        summary: MailSummary | None,
        started: float,
        *,
        size_bytes: int | None = None,
        retry_in_s: float | None = None,
    ) -> Settlement:
        attempt = claim.attempt
        finished = self._clock()
        fields: dict[str, Any] = {"reason": outcome.reason, "finished_at": finished}
        if outcome.verdict is Verdict.SUCCESS:
            status = Status.SUCCEEDED
        elif outcome.verdict is Verdict.RETRY and attempt < self.settings.max_attempts:
            status = Status.RETRYING
            delay = (
                retry_in_s
                if retry_in_s is not None
                else retry_delay_s(
                    attempt,
                    base_s=self.settings.retry_base_s,
                    max_s=self.settings.retry_max_s,
                )
            )
            fields["next_attempt_at"] = finished + delay
        else:
            status = Status.FAILED
            if outcome.verdict is Verdict.RETRY:
                fields["reason"] = "attempts_exhausted"
                fields["last_reason"] = outcome.reason
        if status is not Status.RETRYING:
            fields["outcome"] = status.value
            fields["next_attempt_at"] = None
            fields[shapes.TTL_ATTRIBUTE] = self.settings.expires_at(finished)
        if result is not None:
            fields["exit_code"] = result.exit_code
            fields["signal"] = result.signal
            fields["stdout_tail"] = tail_text(result.stdout_tail, self.settings.output_tail_bytes)
            fields["stderr_tail"] = tail_text(result.stderr_tail, self.settings.output_tail_bytes)
            fields["duration_ms"] = round(result.duration_s * 1000, 1)
            if result.transport_error:
                fields["detail"] = result.transport_error[:1000]
        if outcome.enhanced_status:
            fields["enhanced_status"] = outcome.enhanced_status
        if size_bytes is not None:
            fields["size_bytes"] = size_bytes
        if summary is not None:
            fields.update(summary.as_record())
        entry = history_entry(
            attempt=attempt,
            worker=self.worker_id,
            started_at=started,
            finished_at=finished,
            status=status,
            reason=str(fields["reason"]),
            exit_code=result.exit_code if result else None,
            stderr_tail=fields.get("stderr_tail", ""),
        )
        try:
            try:
                await self._write_outcome(key, claim, status, fields, entry)
            except AwsPermanentError as exc:
                # DynamoDB refused this outcome (item too large, ...): not a reason to run the
                # processor again. Record the verdict without the bulky fields instead.
                log.error(  # noqa: TRY400 - the refusal is the news, not a traceback
                    "outcome_unwritable",
                    mail_id=ref.mail_id,
                    recipient=key.recipient,
                    error=str(exc),
                )
                note = f"full outcome refused ({exc.code}); tails and header summary dropped"
                fields |= dict.fromkeys(BULKY_FIELDS) | {
                    "detail": f"{fields.get('detail') or ''} [{note}]".strip()[:1000]
                }
                entry = {**entry, "stderr_tail": "", "note": note}
                await self._write_outcome(key, claim, status, fields, entry)
            _stamp("recorded", self._clock())
        except LeaseLostError as exc:
            log.warning(
                "lease_lost_at_finish", mail_id=ref.mail_id, recipient=key.recipient, error=str(exc)
            )
            return Settlement(defer_until_s=self._clock() + self.settings.lease_s)
        self._log_outcome(
            ref,
            key.recipient,
            plan.route,
            status,
            attempt=attempt,
            reason=str(fields["reason"]),
            exit_code=result.exit_code if result else None,
            duration_ms=fields.get("duration_ms"),
            size_bytes=size_bytes,
            detail=fields.get("detail"),
            started_s=started,
        )
        if status is Status.RETRYING:
            return Settlement(defer_until_s=float(fields["next_attempt_at"]))
        return DONE

    async def _write_outcome(
        self,
        key: DeliveryKey,
        claim: Claimed,
        status: Status,
        fields: dict[str, Any],
        entry: dict[str, Any],
    ) -> None:
        # Shielded: once the processor has run, its outcome must be written even if we are
        # being cancelled; a lost outcome would run the legacy script again.
        write = asyncio.ensure_future(self.ledger.finish(key, claim.token, status, fields, entry))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await write
            raise

    def _log_outcome(
        self,
        ref: MailRef,
        recipient: str,
        route: str,
        status: Status | str,
        *,
        attempt: int,
        reason: str,
        exit_code: int | None = None,
        duration_ms: float | None = None,
        size_bytes: int | None = None,
        detail: str | None = None,
        started_s: float | None = None,
    ) -> None:
        now = self._clock()
        # Queue lag: SES receipt → this attempt's start (the time the mail waited for us).
        lag_ms = ((started_s or now) - ref.received_at_s) * 1000 if ref.received_at_s else None
        stamps = STAMPS.get() or {}
        timing = {
            phase: round((stamps[b] - stamps[a]) * 1000, 2)
            for phase, (a, b) in TIMING_PHASES.items()
            if a in stamps and b in stamps
        }
        log.info(
            "delivery",
            mail_id=ref.mail_id,
            recipient=recipient,
            reason=reason,
            exit_code=exit_code,
            duration_ms=duration_ms,
            size_bytes=size_bytes,
            detail=detail,
            timing_ms=timing or None,
            processor_started_at=round(stamps["spawn"], 6) if "spawn" in stamps else None,
            **emf(
                self.settings.metrics_namespace,
                route=route,
                status=str(status),
                attempt=attempt,
                processor_ms=duration_ms,
                queue_lag_ms=lag_ms,
                now_ms=int(now * 1000),
            ),
        )
