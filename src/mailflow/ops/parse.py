"""`mailflow parse FILE`: a local mail's header summary, and what each recipient would run.

No AWS: the routes come from the settings, the mail from a file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from email.utils import parseaddr
from pathlib import Path
from typing import Any

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
