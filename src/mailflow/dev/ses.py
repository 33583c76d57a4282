"""SES receiving, emulated: store the raw mail in S3 and publish the notification SES would.

LocalStack and moto do not implement SES *receiving*, so `mailflow send` and `mailflow smtp`
use this to put mail into the pipeline exactly as production SES does: the object under the
incoming prefix with SES's own headers prepended (Return-Path, Received, verdicts), then a
`Received` notification with an S3 action published to the SNS topic.

With `MAILFLOW_KMS_KEY` set, the object is stored the way a receipt rule with `KmsKeyArn`
stores it: encrypted by the Amazon S3 encryption client (AES-GCM, the data key wrapped by KMS
under SES's encryption context, the envelope in the object's metadata; see aws/envelope.py).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import secrets
import string
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from mailflow import aws
from mailflow.aws import AwsClients
from mailflow.aws.envelope import describe_key_arn, key_region, seal, ses_context
from mailflow.config import Settings
from mailflow.errors import MailflowError
from mailflow.mail.notification import SES_VERDICTS
from mailflow.mail.summary import split_head, summarize

_ID_ALPHABET = string.ascii_lowercase + string.digits
SES_HOST = "inbound-smtp.mailflow.invalid"
#: The receipt rule the emulator pretends to be (it names the rule in the encryption context).
RULE_NAME = "mailflow-dev"


def new_message_id() -> str:
    """SES-style id: 20-ish lowercase alphanumerics, unique enough to be an S3 key."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(32))


def ses_headers(
    mail_id: str,
    sender: str,
    recipients: Sequence[str],
    now: datetime,
    verdict: str = "PASS",
) -> bytes:
    """The header lines SES prepends to the object it stores."""
    stamp = email.utils.format_datetime(now)
    rcpt = f"\r\n for {recipients[0]}" if len(recipients) == 1 else ""
    lines = [
        f"Return-Path: <{sender}>",
        f"Received: from mailflow-emulator by {SES_HOST} with SMTP id {mail_id}{rcpt};\r\n {stamp}",
        f"X-SES-Spam-Verdict: {verdict}",
        f"X-SES-Virus-Verdict: {verdict}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def _common_headers(raw: bytes) -> dict[str, Any]:
    summary = summarize(split_head(raw))
    return {
        "from": [summary.from_] if summary.from_ else [],
        "to": [summary.to] if summary.to else [],
        "subject": summary.subject,
        "date": summary.date,
        "messageId": summary.message_id_header,
    }


def received_notification(
    *,
    mail_id: str,
    bucket: str,
    key: str,
    prefix: str,
    topic_arn: str,
    sender: str,
    recipients: Sequence[str],
    common_headers: dict[str, Any],
    now: datetime,
    verdict: str = "PASS",
) -> dict[str, Any]:
    """An SES `Received` notification with an S3 action, as SES publishes it."""
    stamp = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    verdicts = {name: {"status": verdict} for name in SES_VERDICTS}
    return {
        "notificationType": "Received",
        "mail": {
            "timestamp": stamp,
            "source": sender,
            "messageId": mail_id,
            "destination": list(recipients),
            "headersTruncated": False,
            "commonHeaders": {"returnPath": sender, **common_headers},
        },
        "receipt": {
            "timestamp": stamp,
            "processingTimeMillis": 1,
            "recipients": list(recipients),
            **verdicts,
            "action": {
                "type": "S3",
                "topicArn": topic_arn,
                "bucketName": bucket,
                "objectKeyPrefix": prefix,
                "objectKey": key,
            },
        },
    }


async def topic_arn(clients: AwsClients, settings: Settings) -> str:
    """The ARN of the configured SNS topic (`settings.topic` may already be one).

    Resolved by CreateTopic, which is idempotent: this creates the topic if it does not exist."""
    if settings.topic.startswith("arn:"):
        return settings.topic
    # CreateTopic is idempotent and returns the ARN: the cheapest lookup by name.
    resp = await aws.call("sns.CreateTopic", clients.sns.create_topic, Name=settings.topic)
    return str(resp["TopicArn"])


async def encrypt_as_ses(
    clients: AwsClients,
    key_id: str,
    mail_id: str,
    stored: bytes,
) -> tuple[bytes, dict[str, str]]:
    """What SES's S3 action with `KmsKeyArn` stores: ciphertext and the envelope metadata."""
    kms = await clients.kms_in(key_region(key_id))
    arn = await describe_key_arn(kms, key_id)
    account = arn.split(":")[4]
    context = ses_context(mail_id=mail_id, rule_name=RULE_NAME, account=account, key_id=key_id)
    return await seal(kms, stored, key_id=key_id, context=context)


async def receive_mail(
    clients: AwsClients,
    settings: Settings,
    raw: bytes,
    recipients: Sequence[str],
    sender: str,
    *,
    verdict: str = "PASS",
    arn: str | None = None,
) -> str:
    """Do what SES receiving does for one mail; return its mail id (SES messageId)."""
    mail_id = new_message_id()
    now = datetime.now(UTC)
    key = f"{settings.incoming_prefix}{mail_id}"
    stored = ses_headers(mail_id, sender, recipients, now, verdict) + raw
    metadata: dict[str, str] = {}
    if settings.kms_key:
        stored, metadata = await encrypt_as_ses(clients, settings.kms_key, mail_id, stored)
    await aws.call(
        "s3.PutObject",
        clients.s3.put_object,
        Bucket=settings.bucket,
        Key=key,
        Body=stored,
        Metadata=metadata,
    )
    notification = received_notification(
        mail_id=mail_id,
        bucket=settings.bucket,
        key=key,
        prefix=settings.incoming_prefix,
        topic_arn=arn or await topic_arn(clients, settings),
        sender=sender,
        recipients=recipients,
        common_headers=_common_headers(raw),
        now=now,
        verdict=verdict,
    )
    try:
        await aws.call(
            "sns.Publish",
            clients.sns.publish,
            TopicArn=notification["receipt"]["action"]["topicArn"],
            Subject="Amazon SES Email Receipt Notification",
            Message=json.dumps(notification, ensure_ascii=False),
        )
    except MailflowError:
        # The sender is told "try again" (SMTP 451) and will resend under a new id: without
        # this, the orphan scan would also deliver the unannounced first copy.
        with contextlib.suppress(MailflowError):
            await aws.call(
                "s3.DeleteObject",
                clients.s3.delete_object,
                Bucket=settings.bucket,
                Key=key,
            )
        raise
    return mail_id
