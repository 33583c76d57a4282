"""mailflow's own exceptions. Foreign ones (botocore, aiohttp, OSError) are mapped at the edge.

The worker decides what to do by *kind*, never by parsing a foreign message:
- `TransientError`: try again later (throttling, 5xx, connection trouble).
- `PermanentError`: trying again cannot help (access denied, validation, missing resource).
"""

from __future__ import annotations


class MailflowError(Exception):
    """Base of everything mailflow raises on purpose."""


class ConfigError(MailflowError):
    """A setting is wrong; the process cannot start."""


class TransientError(MailflowError):
    """Worth retrying: the backend is busy, slow or briefly unreachable."""


class PermanentError(MailflowError):
    """Retrying cannot help."""


class ObjectMissingError(PermanentError):
    """The S3 object named by a notification is not there (yet, or any more)."""


class TooLargeError(PermanentError):
    """The mail is larger than MAILFLOW_MAX_MAIL_BYTES."""


class LeaseLostError(MailflowError):
    """Another worker holds the delivery now; this worker must not write its outcome."""


class BadNotificationError(MailflowError):
    """An SQS body that is not a notification mailflow can act on. Goes to the DLQ."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
