"""What SES receiving does, on the fakes: store the mail, publish its notification via SNS."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from mailflow.config import Settings
from mailflow.dev.ses import new_message_id, received_notification, ses_headers
from mailflow.testing.queue import FakeQueue
from mailflow.testing.store import FakeStore

TOPIC_ARN = "arn:aws:sns:us-east-1:000000000000:mailflow"


def sns_envelope(message: str, topic_arn: str = TOPIC_ARN) -> str:
    """The SQS body SNS delivers (raw message delivery off)."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": topic_arn,
            "Subject": "Amazon SES Email Receipt Notification",
            "Message": message,
        },
    )


async def receive_mail(
    store: FakeStore,
    queue: FakeQueue,
    settings: Settings,
    raw: bytes,
    recipients: Sequence[str],
    sender: str = "shop@example.com",
    *,
    verdict: str = "PASS",
) -> str:
    """Store `raw` (with SES's headers) under the incoming prefix and enqueue its
    notification; the mail id (SES messageId)."""
    mail_id = new_message_id()
    now = datetime.now(UTC)
    key = f"{settings.incoming_prefix}{mail_id}"
    store.put(settings.bucket, key, ses_headers(mail_id, sender, recipients, now, verdict) + raw)
    notification = received_notification(
        mail_id=mail_id,
        bucket=settings.bucket,
        key=key,
        prefix=settings.incoming_prefix,
        topic_arn=TOPIC_ARN,
        sender=sender,
        recipients=recipients,
        common_headers={},
        now=now,
        verdict=verdict,
    )
    await queue.send(sns_envelope(json.dumps(notification, ensure_ascii=False)))
    return mail_id
