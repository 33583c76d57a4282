"""SQS message body → `MailRef`. Pure.

Accepted shapes (all carry an SES `Received` notification with an S3 action):
- an SNS envelope (`{"Type": "Notification", "Message": "<json>"}`): the default subscription;
- the notification itself: SNS raw message delivery, and the reconciler's synthetic re-sends,
  which add a `"mailflow"` member saying why they exist.

Everything else raises `BadNotificationError` with a short machine reason; the worker moves
such a message to the DLQ with that reason and deletes it from the main queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailflow.errors import BadNotificationError

#: Bodies above this are not SES notifications (SES truncates headers at 10 KB): refuse early.
MAX_BODY_CHARS = 256 * 1024
#: A recipient is a DynamoDB sort key (at most 1024 bytes); SMTP paths end at 256 octets.
MAX_RECIPIENT_BYTES = 512

#: The verdicts SES puts in a `Received` notification's receipt, by their field names.
SES_VERDICTS = ("spamVerdict", "virusVerdict", "spfVerdict", "dkimVerdict", "dmarcVerdict")


@dataclass(frozen=True, slots=True)
class MailRef:
    """One received mail as the notification names it: where SES stored it and who it is for.

    `recipients` are lower-cased, stripped and de-duplicated in order (one delivery each);
    `received_at_s` is epoch seconds, None when the notification carried no readable timestamp;
    `verdicts` maps `spam`/`virus`/`spf`/`dkim`/`dmarc` to SES's status; `synthetic` is the
    reconciler's reason when the reconciler, not SES, sent it."""

    mail_id: str
    bucket: str
    key: str
    recipients: tuple[str, ...]
    sender: str
    received_at_s: float | None
    verdicts: dict[str, str] = field(default_factory=dict)
    subject: str = ""
    synthetic: str | None = None


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadNotificationError("missing_field", f"{where} is not an object")
    return value


def _str(container: dict[str, Any], name: str, where: str) -> str:
    value = container.get(name)
    if not isinstance(value, str) or not value:
        raise BadNotificationError("missing_field", f"{where}.{name} missing or not a string")
    return value


def _timestamp_s(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def parse_body(body: str) -> MailRef:
    """Parse one SQS message body (SNS envelope or raw notification) into a `MailRef`.

    Pure and total: any body that is not an SES `Received` notification with an S3 action, or
    that could not be stored in the ledger, raises `BadNotificationError` with a short machine
    `reason` (the worker dead-letters the message with it); nothing else is raised. It does not
    check that the object is ours: call `check_trusted` on the result."""
    if len(body) > MAX_BODY_CHARS:
        raise BadNotificationError("too_large", f"body of {len(body)} chars")
    try:
        doc = json.loads(body)
    # ValueError, not only JSONDecodeError: an integer literal past Python's int-parsing
    # limit (4300 digits) raises a plain ValueError from json.loads.
    except (ValueError, RecursionError) as exc:
        raise BadNotificationError("not_json", str(exc)[:200]) from None
    if not isinstance(doc, dict):
        raise BadNotificationError("not_json_object", type(doc).__name__)
    if "Type" in doc and "Message" in doc:  # SNS envelope
        if doc["Type"] != "Notification":
            raise BadNotificationError("sns_type", str(doc["Type"])[:64])
        message = doc["Message"]
        if not isinstance(message, str):
            raise BadNotificationError("sns_message", "Message is not a string")
        try:
            doc = json.loads(message)
        except (ValueError, RecursionError) as exc:
            raise BadNotificationError("sns_message_not_json", str(exc)[:200]) from None
        if not isinstance(doc, dict):
            raise BadNotificationError("sns_message_not_json", "not an object")
    return parse_ses_notification(doc)


def parse_ses_notification(doc: dict[str, Any]) -> MailRef:
    """Parse an already decoded SES notification (the document inside the SNS envelope).

    Raises `BadNotificationError` as `parse_body` does."""
    kind = doc.get("notificationType") or doc.get("eventType")
    if kind != "Received":
        raise BadNotificationError("not_ses_received", f"notificationType={str(kind)[:64]}")
    mail = _obj(doc.get("mail"), "mail")
    receipt = _obj(doc.get("receipt"), "receipt")
    action = _obj(receipt.get("action"), "receipt.action")
    if action.get("type") != "S3":
        raise BadNotificationError("not_s3_action", f"action.type={str(action.get('type'))[:32]}")
    recipients = receipt.get("recipients")
    if (
        not isinstance(recipients, list)
        or not recipients
        or not all(isinstance(r, str) and r for r in recipients)
    ):
        raise BadNotificationError("missing_field", "receipt.recipients is not a list of strings")
    verdicts = {}
    for name in SES_VERDICTS:
        verdict = receipt.get(name)
        if isinstance(verdict, dict) and isinstance(verdict.get("status"), str):
            verdicts[name.removesuffix("Verdict")] = verdict["status"]
    headers = mail.get("commonHeaders")
    subject = headers.get("subject") if isinstance(headers, dict) else None
    marker = doc.get("mailflow")
    ref = MailRef(
        mail_id=_str(mail, "messageId", "mail"),
        bucket=_str(action, "bucketName", "receipt.action"),
        key=_str(action, "objectKey", "receipt.action"),
        # Order kept, duplicates dropped: one delivery per distinct recipient.
        recipients=tuple(dict.fromkeys(r.strip().lower() for r in recipients)),
        sender=str(mail.get("source") or ""),
        received_at_s=_timestamp_s(receipt.get("timestamp") or mail.get("timestamp")),
        verdicts=verdicts,
        subject=subject if isinstance(subject, str) else "",
        synthetic=str(marker.get("reason", "synthetic")) if isinstance(marker, dict) else None,
    )
    _check_storable(ref)
    return ref


def _check_storable(ref: MailRef) -> None:
    """What the ledger will hand DynamoDB must be storable there, or every write of this
    message fails the same way until the redrive policy dead-letters it without a reason."""
    texts = (
        ref.mail_id,
        ref.bucket,
        ref.key,
        ref.sender,
        ref.subject,
        *ref.recipients,
        *ref.verdicts.values(),
    )
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadNotificationError("bad_encoding", "a lone surrogate in a text field") from None
    for recipient in ref.recipients:
        if not recipient:
            raise BadNotificationError("missing_field", "an empty recipient")
        size = len(recipient.encode("utf-8"))
        if size > MAX_RECIPIENT_BYTES:  # SMTP paths end at 256 octets: not from SES
            raise BadNotificationError("bad_recipient", f"a recipient of {size} bytes")


def check_trusted(ref: MailRef, allowed_buckets: tuple[str, ...], incoming_prefix: str) -> None:
    """A notification names an object; only objects we own, under the incoming prefix, count,
    and only the one SES wrote for this very mail: `<incoming prefix><messageId>`. Any other
    key is a replay of an older object under a fresh messageId, which would run the processor
    again with a new delivery id (past the legacy script's duplicate check)."""
    if ref.bucket not in allowed_buckets:
        raise BadNotificationError("bucket_not_allowed", ref.bucket[:128])
    if not ref.key.startswith(incoming_prefix) or ".." in ref.key.split("/"):
        raise BadNotificationError("key_not_allowed", ref.key[:256])
    if ref.key.startswith("/") or "\x00" in ref.key:
        raise BadNotificationError("key_not_allowed", ref.key[:256])
    if (
        "/" in ref.mail_id
        or len(ref.mail_id) > 128
        or any(ord(ch) <= 0x20 or ord(ch) == 0x7F for ch in ref.mail_id)  # reaches env and argv
    ):
        raise BadNotificationError("bad_mail_id", ref.mail_id[:128])
    if ref.key != incoming_prefix + ref.mail_id:
        raise BadNotificationError(
            "key_not_mail_id", f"{ref.key[:256]} is not {incoming_prefix}{ref.mail_id}"
        )


def check_recipient_count(ref: MailRef, max_recipients: int) -> None:
    """One notification, at most `max_recipients` deliveries: a flood of recipients is
    refused whole (the DLQ keeps it for an operator) rather than run in part."""
    if len(ref.recipients) > max_recipients:
        raise BadNotificationError(
            "too_many_recipients", f"{len(ref.recipients)} recipients (max {max_recipients})"
        )


def synthetic_notification(
    *,
    mail_id: str,
    bucket: str,
    key: str,
    recipients: list[str],
    sender: str,
    received_at: str,
    reason: str,
) -> dict[str, Any]:
    """What the reconciler sends to re-enqueue work: SES-shaped, marked as ours."""
    return {
        "notificationType": "Received",
        "mailflow": {"reason": reason},
        "mail": {"messageId": mail_id, "source": sender, "timestamp": received_at},
        "receipt": {
            "timestamp": received_at,
            "recipients": recipients,
            "action": {"type": "S3", "bucketName": bucket, "objectKey": key},
        },
    }
