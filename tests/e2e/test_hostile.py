"""The hostile corpus end to end, through a real `mailflow worker` process.

Every hostile mail must end recorded with a reason; every hostile notification must end in
the DLQ with a reason; the worker must never crash. The worker's peak RSS (VmHWM) while the
corpus runs is measured and printed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from chaos.procs import log_events, reap, start_worker, vm_hwm_kib, wait_for
from mailflow.aws import open_clients
from mailflow.aws.ledger import TERMINAL
from mailflow.dev.ses import new_message_id, received_notification
from mailflow.exitcodes import EXIT_OK
from mailflow.routing import delivery_id
from support.harness import Env
from support.hostile_corpus import hostile_mails

MAX_MAIL_BYTES = 512 * 1024
TOPIC_ARN = "arn:aws:sns:us-east-1:123456789012:hostile"


def _notification(env: Env, mail_id: str, recipients: list[str], **over: Any) -> dict[str, Any]:
    doc = received_notification(
        mail_id=mail_id,
        bucket=env.settings.bucket,
        key=f"{env.settings.incoming_prefix}{mail_id}",
        prefix=env.settings.incoming_prefix,
        topic_arn=TOPIC_ARN,
        sender="shop@example.com",
        recipients=recipients,
        common_headers={"subject": "hostile"},
        now=datetime.now(UTC),
    )
    doc.update(over)
    return doc


def _sns(message: str) -> str:
    return json.dumps(
        {"Type": "Notification", "MessageId": "x", "TopicArn": TOPIC_ARN, "Message": message}
    )


def hostile_notifications(env: Env) -> dict[str, str]:
    """body → the reason the worker must give it in the DLQ."""
    bodies: dict[str, str] = {}
    base = _notification(env, new_message_id(), ["ok-001@orders.example.com"])

    def variant(reason: str, change: Any) -> None:
        doc = json.loads(json.dumps(base))
        change(doc)
        bodies[json.dumps(doc)] = reason

    bodies["not json at all"] = "not_json"
    bodies[""] = "not_json"
    bodies["[1, 2, 3]"] = "not_json_object"
    bodies["1" * 5000] = "not_json"
    bodies["[" * 50_000] = "not_json"
    bodies[_sns("{broken")] = "sns_message_not_json"
    bodies[_sns("9" * 5000)] = "sns_message_not_json"
    bodies[json.dumps({"Type": "SubscriptionConfirmation", "Message": "{}"})] = "sns_type"
    bodies[json.dumps({"notificationType": "Bounce", "mail": {}})] = "not_ses_received"
    bodies[_sns(json.dumps({"eventType": "Delivery"}))] = "not_ses_received"
    variant("not_s3_action", lambda d: d["receipt"]["action"].update(type="Lambda"))
    variant("missing_field", lambda d: d["receipt"].update(recipients="ok-001@x"))
    variant("missing_field", lambda d: d["mail"].pop("messageId"))
    variant(
        "bucket_not_allowed",
        lambda d: d["receipt"]["action"].update(bucketName="someone-elses-bucket"),
    )
    variant(
        "key_not_allowed",
        lambda d: d["receipt"]["action"].update(objectKey="incoming/../processed/x"),
    )
    variant("key_not_allowed", lambda d: d["receipt"]["action"].update(objectKey="failed/x"))
    variant("key_not_allowed", lambda d: d["receipt"]["action"].update(objectKey="/etc/passwd"))
    variant("bad_mail_id", lambda d: d["mail"].update(messageId="../../x"))
    variant("bad_mail_id", lambda d: d["mail"].update(messageId="a\x00b"))
    # no DynamoDB sort key holds these: refused up front, not retried until the redrive
    variant(
        "bad_recipient",
        lambda d: d["receipt"].update(
            recipients=["ok-001@orders.example.com", "x" * 2000 + "@orders.example.com"]
        ),
    )
    variant(
        "missing_field",
        lambda d: d["receipt"].update(recipients=["ok-001@orders.example.com", "   "]),
    )
    variant("bad_encoding", lambda d: d["mail"].update(source="shop\ud800@example.com"))
    return bodies


@pytest.mark.php
def test_hostile_corpus_end_to_end(env: Env, tmp_path: Path) -> None:
    settings = env.with_settings(
        max_mail_bytes=MAX_MAIL_BYTES, concurrency=4, visibility_timeout_s=20, lease_s=20
    )
    corpus = hostile_mails(MAX_MAIL_BYTES)
    corpus.append(("max-plus-one-byte", b"Subject: big\r\n\r\n".ljust(MAX_MAIL_BYTES + 1, b"x")))
    assert max(len(raw) for _, raw in corpus) == MAX_MAIL_BYTES + 1

    # mails whose *recipients* are hostile: recorded as failed with a reason, never run
    hostile_recipients = {
        "ok-001;rm -rf /@orders.example.com": "unroutable",
        "ok-001@orders.example.com\x00": "unroutable",
        ("x" * 400) + "@orders.example.com": "unroutable",  # past routing's cap, keyable
        "ok-$(id)-001@orders.example.com": "unroutable",
    }
    notifications = hostile_notifications(env)
    expected: dict[tuple[str, str], tuple[str, str]] = {}
    sha: dict[str, str] = {}
    log = tmp_path / "worker.log"
    proc = start_worker(settings, log, tmp_path)
    peak_kib: list[int] = []
    try:
        wait_for(
            lambda: any(e.get("event") == "worker_started" for e in log_events(log)),
            30,
            "worker start",
        )
        idle_kib = vm_hwm_kib(proc.pid)

        async def feed() -> None:
            async with open_clients() as clients:
                for n, (name, raw) in enumerate(corpus):
                    mail_id = new_message_id()
                    recipient = f"ok-{n % 1000:03d}@orders.example.com"
                    await clients.s3.put_object(
                        Bucket=settings.bucket, Key=f"{settings.incoming_prefix}{mail_id}", Body=raw
                    )
                    doc = _notification(env, mail_id, [recipient])
                    await clients.sqs.send_message(
                        QueueUrl=env.queue_url(), MessageBody=_sns(json.dumps(doc))
                    )
                    want = (
                        ("failed", "too_large")
                        if len(raw) > MAX_MAIL_BYTES
                        else ("succeeded", "ok")
                    )
                    expected[(mail_id, recipient)] = (*want, name)  # type: ignore[assignment]
                    sha[delivery_id(mail_id, recipient)] = hashlib.sha256(raw).hexdigest()
                mail_id = new_message_id()
                await clients.s3.put_object(
                    Bucket=settings.bucket,
                    Key=f"{settings.incoming_prefix}{mail_id}",
                    Body=b"Subject: x\r\n\r\nx\r\n",
                )
                doc = _notification(env, mail_id, list(hostile_recipients))
                # a header summary SES never sends: types and sizes out of spec
                doc["mail"]["commonHeaders"] = {
                    "subject": ["not", "a", "string"],
                    "from": "x" * 100_000,
                    "to": None,
                }
                await clients.sqs.send_message(
                    QueueUrl=env.queue_url(), MessageBody=json.dumps(doc)
                )
                for recipient, reason in hostile_recipients.items():
                    key = recipient.strip().lower()
                    expected[(mail_id, key)] = ("failed", reason, f"recipient {recipient[:30]!r}")
                for body in notifications:
                    await clients.sqs.send_message(
                        QueueUrl=env.queue_url(), MessageBody=body or " "
                    )

        started = time.monotonic()
        asyncio.run(feed())

        async def records() -> dict[tuple[str, str], dict[str, Any]]:
            out = {}
            async with open_clients() as clients:
                for mail_id in {m for m, _ in expected}:
                    for rec in await env.records(clients, mail_id):
                        out[(rec["mail_id"], rec["recipient"])] = rec
            return out

        def settled() -> dict[tuple[str, str], dict[str, Any]] | None:
            if proc.poll() is not None:
                raise AssertionError(f"the worker died: exit {proc.returncode}")
            hwm = vm_hwm_kib(proc.pid)
            if hwm:
                peak_kib.append(hwm)
            recs = asyncio.run(records())
            done = len(recs) == len(expected) and all(
                r.get("status") in TERMINAL for r in recs.values()
            )
            return recs if done and env.queue_counts() == {"visible": 0, "in_flight": 0} else None

        try:
            recs = wait_for(settled, 240, "every hostile delivery recorded", poll_s=1.0)
        except AssertionError as exc:
            recs = asyncio.run(records())
            missing = [
                (expected[k][2], recs.get(k, {}).get("status"))
                for k in expected
                if recs.get(k, {}).get("status") not in TERMINAL
            ]
            raise AssertionError(
                f"{exc}: not terminal: {missing}; queue {env.queue_counts()}"
            ) from None
        took = time.monotonic() - started
        peak_kib.append(vm_hwm_kib(proc.pid) or 0)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        reap(proc)
    print(
        f"\nhostile corpus: {len(corpus)} mails (largest {MAX_MAIL_BYTES + 1} bytes),"
        f" {len(hostile_recipients)} hostile recipients, {len(notifications)} hostile"
        f" notifications in {took:.1f}s; worker VmHWM idle {idle_kib} KiB,"
        f" peak {max(peak_kib)} KiB ({max(peak_kib) / 1024:.1f} MiB)"
    )
    assert code == EXIT_OK
    events = log_events(log)
    assert not [e for e in events if e.get("event") == "message_failed"]
    wrong = []
    for key, (status, reason, name) in expected.items():
        rec = recs[key]
        if (rec["status"], rec["reason"]) != (status, reason):
            wrong.append((name, rec["status"], rec["reason"], rec.get("detail")))
    assert wrong == []
    # what ran got the stored bytes exactly
    for line in env.effects():
        if line[-1] == "start" and line[0] in sha:
            assert line[3] == sha[line[0]], line[0]
    # every hostile notification in the DLQ, with its reason
    dlq = env.drain_queue(dlq=True)
    got = sorted(
        (m["Body"].strip(), m["MessageAttributes"]["mailflow_reason"]["StringValue"]) for m in dlq
    )
    want = sorted((body.strip(), reason) for body, reason in notifications.items())
    assert [r for _, r in got] == [r for _, r in want]
    assert got == want
    assert max(peak_kib) < 512 * 1024, "peak RSS should not grow with mail size x concurrency"


@pytest.mark.php
@pytest.mark.parametrize("max_mail_bytes", [1, 100])
def test_max_mail_bytes_boundary(env: Env, max_mail_bytes: int) -> None:
    """Exactly max is delivered; max + 1 is `too_large` and never reaches the processor."""
    from support.harness import run_worker_until  # noqa: PLC0415

    settings = env.with_settings(max_mail_bytes=max_mail_bytes)

    async def scenario() -> None:
        async with open_clients() as clients:
            ids = {}
            for size in (max_mail_bytes, max_mail_bytes + 1):
                mail_id = new_message_id()
                await clients.s3.put_object(
                    Bucket=settings.bucket,
                    Key=f"{settings.incoming_prefix}{mail_id}",
                    Body=b"x" * size,
                )
                doc = _notification(env, mail_id, ["ok-001@orders.example.com"])
                env.publish_raw(json.dumps(doc))
                ids[size] = mail_id

            async def done(c: Any) -> bool:
                recs = [r for m in ids.values() for r in await env.records(c, m)]
                return len(recs) == 2 and all(r["status"] in TERMINAL for r in recs)

            await run_worker_until(settings, clients, done, timeout_s=30)
            (ok,) = await env.records(clients, ids[max_mail_bytes])
            (big,) = await env.records(clients, ids[max_mail_bytes + 1])
            assert (ok["status"], ok["size_bytes"]) == ("succeeded", max_mail_bytes)
            assert (big["status"], big["reason"]) == ("failed", "too_large")
            assert str(max_mail_bytes) in big["detail"]

    asyncio.run(scenario())
    assert len([e for e in env.effects() if e[-1] == "start"]) == 1
