"""What a processor run means for the delivery: postfix pipe(8) semantics. Pure.

- exit 0: success.
- non-zero exit whose output *begins* with an RFC 3463 enhanced status code: the code's class
  decides (4.x.x retry, 5.x.x permanent), whatever the exit status says.
- exit status in the tempfail set (default 75 EX_TEMPFAIL, 71 EX_OSERR): retry.
- any other exit status: permanent.
- killed by a signal, timed out, or the transport failed before an exit status: retry.
"""

from __future__ import annotations

import enum
import re
import signal
from dataclasses import dataclass

ENHANCED_STATUS = re.compile(rb"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


class Verdict(enum.StrEnum):
    """What the delivery does next: record success, schedule a retry, or record a permanent
    failure (never retried)."""

    SUCCESS = "success"
    RETRY = "retry"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class ProcessResult:
    """What a transport reports about one processor run. Tails are the *last* bytes."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    stdout_tail: bytes = b""
    stderr_tail: bytes = b""
    #: The first bytes too: an enhanced status code is read from the *start* of the output.
    stdout_head: bytes = b""
    stderr_head: bytes = b""
    duration_s: float = 0.0
    #: Set when no exit status exists: spawn failed, the FastCGI peer broke, the runner refused.
    transport_error: str | None = None
    #: The transport refused on policy (runner allow-list): retrying will not help.
    refused: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """The classification of one run: the verdict, a machine `reason` for the record and logs
    (`ok`, `timeout`, `exit_1`, `enhanced_status_5.1.1`...), and the RFC 3463 code when the
    output began with one."""

    verdict: Verdict
    reason: str
    enhanced_status: str | None = None


def enhanced_status(output: bytes) -> str | None:
    """The RFC 3463 code (`4.2.0`, `5.1.1`) the output begins with, after optional whitespace;
    None when it does not begin with one."""
    found = ENHANCED_STATUS.match(output)
    if found is None:
        return None
    return b".".join(found.groups()).decode("ascii")


def classify(  # noqa: C901, PLR0911 - the postfix table above, one rung per line
    result: ProcessResult,
    tempfail_codes: tuple[int, ...] = (75, 71),
) -> Outcome:
    """Decide what one processor run means, by the postfix pipe(8) table in the module docstring.

    Pure and total: every `ProcessResult` maps to an `Outcome`. A policy refusal is permanent; a
    transport error, timeout or signal is a retry (the processor may not have finished); then
    exit 0 is success; then a 4.x.x (retry) or 5.x.x (permanent) enhanced status code at the
    start of stdout (else stderr) overrides the exit status; then an exit status in
    `tempfail_codes` retries and any other is permanent."""
    if result.refused:
        return Outcome(Verdict.PERMANENT, "refused")
    if result.transport_error is not None:
        return Outcome(Verdict.RETRY, "transport_error")
    if result.timed_out:
        return Outcome(Verdict.RETRY, "timeout")
    if result.signal is not None:
        try:
            name = signal.Signals(result.signal).name
        except ValueError:
            name = f"signal_{result.signal}"
        return Outcome(Verdict.RETRY, f"killed_by_{name}")
    code = result.exit_code
    if code == 0:
        return Outcome(Verdict.SUCCESS, "ok")
    status = enhanced_status(result.stdout_head or result.stdout_tail) or enhanced_status(
        result.stderr_head or result.stderr_tail,
    )
    if status is not None:
        if status.startswith("4"):
            return Outcome(Verdict.RETRY, f"enhanced_status_{status}", status)
        if status.startswith("5"):
            return Outcome(Verdict.PERMANENT, f"enhanced_status_{status}", status)
    if code in tempfail_codes:
        return Outcome(Verdict.RETRY, f"tempfail_exit_{code}")
    return Outcome(Verdict.PERMANENT, f"exit_{code}")
