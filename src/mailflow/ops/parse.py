"""`mailflow parse FILE`: a mail's header summary, and what each recipient would run.

The routes come from the settings, the mail from a local file (no AWS), or from a stored object
(`s3://bucket/key`), fetched into a private spool file the way the worker fetches it:
decrypted when SES stored it encrypted, the tag verified, the file removed afterwards.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from mailflow.aws import AwsClients
from mailflow.aws.store import KeyRing, make_spool_dir, spooled
from mailflow.config import Settings
from mailflow.mail.summary import header_addresses, received_for, split_head, summarize
from mailflow.ops.reconcile import orphan_envelope
from mailflow.routing import DeliveryPlan, normalize_recipient, plan_delivery


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


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/key` → (bucket, key); ValueError when it is not one."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket or not key:
        raise ValueError(f"{url}: not s3://BUCKET/KEY")
    return bucket, key


async def parse_object(
    clients: AwsClients,
    url: str,
    to: Sequence[str],
    settings: Settings,
) -> dict[str, Any]:
    """`parse_file` for a stored object: fetched (and decrypted) as the worker would."""
    bucket, key = split_s3_url(url)
    spool_dir = make_spool_dir(settings.spool_dir)
    try:
        async with spooled(
            clients.s3,
            bucket,
            key,
            spool_dir=spool_dir,
            max_bytes=settings.max_mail_bytes,
            keys=KeyRing(clients.kms_in, settings.kms_key),
        ) as mail:
            doc = parse_file(mail.path, to, settings)
        return doc | {"file": url, "encrypted": mail.encrypted}
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)
