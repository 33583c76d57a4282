"""The worker end to end: moto server over HTTP, real php-cli processors.

What these keep covering is the I/O: the mail's bytes from S3 to the processor's stdin, real
processes (timeouts kill the group, the environment is clean), DynamoDB's item size, SQS's
attribute rules, the long poll. The logic (outcomes, retries, duplicates, the DLQ, fairness)
is tested on the in-memory fakes in tests/unit/test_worker_logic.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from datetime import UTC, datetime

import pytest

from mailflow.aws import open_clients
from mailflow.aws.queue import Queue
from mailflow.dev.ses import received_notification
from mailflow.routing import delivery_id
from mailflow.worker.loop import Worker
from support.harness import BACKENDS, SIMPLE_MAIL, Env, all_terminal, run_worker_until

pytestmark = pytest.mark.php


def mail_to(*to: str, body: bytes = b"hello\r\n") -> bytes:
    return (
        b"From: Shop <shop@example.com>\r\nTo: "
        + ", ".join(to).encode()
        + b"\r\nSubject: test\r\n\r\n"
        + body
    )


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("backend", BACKENDS)
def test_success_records_outcome_and_deletes_message(env: Env) -> None:
    async def scenario() -> None:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["ok-001@orders.example.com"])
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            assert rec["status"] == "succeeded"
            assert rec["attempts"] == 1
            assert rec["exit_code"] == 0
            assert rec["route"] == "behave"
            assert rec["argv"][-2:] == ["ok", "001"]
            assert rec["subject"] == "order"
            assert rec["size_bytes"] > len(SIMPLE_MAIL)  # SES headers prepended

    run(scenario())
    assert env.queue_counts() == {"visible": 0, "in_flight": 0}


def test_timeout_kills_the_whole_process_group(env: Env) -> None:
    settings = env.with_settings(processor_timeout_s=2, max_attempts=1)

    async def scenario() -> None:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["grandchild-006@orders.example.com"])
            await run_worker_until(settings, clients, all_terminal(env, [mail_id]), timeout_s=40)
            (rec,) = await env.records(clients, mail_id)
            assert rec["reason"] == "attempts_exhausted"
            assert rec["last_reason"] == "timeout"

    run(scenario())
    pid = int((env.ledger_dir / "grandchild.pid").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} survived the timeout")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_control_character_in_a_field_reaches_the_dlq_with_its_reason(env: Env) -> None:
    """The dead-letter reason quotes the hostile field. Real SQS (and LocalStack) refuse a
    control character in a message attribute; escaped, the message is in the DLQ with its
    reason at the first receive instead of looping until the redrive policy takes it."""
    mail_id = "a\x01b\x1b[31m"
    doc = received_notification(
        mail_id=mail_id,
        bucket=env.settings.bucket,
        key=f"{env.settings.incoming_prefix}{mail_id}",
        prefix=env.settings.incoming_prefix,
        topic_arn="arn:aws:sns:us-east-1:123456789012:t",
        sender="shop@example.com",
        recipients=["ok-001@orders.example.com"],
        common_headers={},
        now=datetime.now(UTC),
    )
    env.publish_raw(json.dumps(doc))  # JSON escapes the controls in the body itself

    async def scenario() -> None:
        async with open_clients() as clients:

            async def dead(_c) -> bool:
                return env.queue_counts() == {"visible": 0, "in_flight": 0}

            await run_worker_until(env.settings, clients, dead, timeout_s=15)

    run(scenario())
    (msg,) = env.drain_queue(dlq=True)
    attrs = {k: v["StringValue"] for k, v in msg["MessageAttributes"].items()}
    assert attrs["mailflow_reason"] == "bad_mail_id"
    assert attrs["mailflow_detail"] == "a\\x01b\\x1b[31m"
    assert json.loads(msg["Body"]) == doc


def test_tails_of_invalid_utf8_fit_the_item_and_run_once(env: Env) -> None:
    """64 KiB tails of bytes that are not UTF-8 are escaped (4 characters a byte): uncapped,
    two of them passed DynamoDB's 400 KB item limit, the outcome could not be written and
    the processor ran again until attempts_exhausted."""
    settings = env.with_settings(output_tail_bytes=65536)
    recipient = "noisy-007@orders.example.com"

    async def scenario() -> dict:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, [recipient])
            await run_worker_until(settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            return rec

    rec = run(scenario())
    assert (rec["status"], rec["reason"], rec["attempts"]) == ("succeeded", "ok", 1)
    assert len(env.starts()) == 1
    for name in ("stdout_tail", "stderr_tail"):
        assert 60_000 < len(rec[name].encode()) <= 65536, name
        assert rec[name].endswith("\\xff" if name == "stdout_tail" else "\\xfe")


def test_too_many_recipients_go_to_the_dlq_with_a_reason(env: Env) -> None:
    """A notification over max_recipients (22,000 were accepted once, each delivery item
    storing the whole list) is refused whole: nothing recorded, nothing run."""
    settings = env.with_settings(max_recipients=5)
    recipients = [f"ok-{i:03d}@orders.example.com" for i in range(6)]

    async def scenario() -> None:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, recipients)

            async def dead(_c) -> bool:
                return env.queue_counts() == {"visible": 0, "in_flight": 0}

            await run_worker_until(settings, clients, dead)
            assert await env.records(clients, mail_id) == []

    run(scenario())
    (msg,) = env.drain_queue(dlq=True)
    attrs = {k: v["StringValue"] for k, v in msg["MessageAttributes"].items()}
    assert attrs["mailflow_reason"] == "too_many_recipients"
    assert attrs["mailflow_detail"] == "6 recipients (max 5)"
    assert env.starts() == []


def test_the_recipient_list_is_stored_once_per_mail(env: Env) -> None:
    recipients = [f"ok-{i:03d}@orders.example.com" for i in range(3)]

    async def scenario() -> list[dict]:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, recipients)
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id], 3))
            return await env.records(clients, mail_id)

    records = {r["recipient"]: r for r in run(scenario())}
    assert set(records) == set(recipients)
    assert records[recipients[0]]["recipients"] == recipients
    assert all("recipients" not in records[r] for r in recipients[1:])
    assert {r["recipient_count"] for r in records.values()} == {3}


@pytest.mark.parametrize(
    "name", ["order-001-iso2022jp.eml", "order-002-shiftjis.eml", "order-003-multipart.eml"]
)
def test_processor_stdin_is_the_stored_object_byte_for_byte(env: Env, name: str) -> None:
    from support.harness import sample  # noqa: PLC0415

    raw = sample(name)

    async def scenario() -> tuple[str, bytes]:
        async with open_clients() as clients:
            mail_id = await env.send(clients, raw, ["ok-007@orders.example.com"])
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            obj = env.boto("s3").get_object(Bucket=rec["bucket"], Key=rec["key"])["Body"].read()
            return mail_id, obj

    mail_id, stored = run(scenario())
    did = delivery_id(mail_id, "ok-007@orders.example.com")
    safe = "".join(c if c.isalnum() else "_" for c in did)
    seen = (env.ledger_dir / "stdin" / f"{safe}.1").read_bytes()
    assert seen == stored
    assert stored.endswith(raw)
    assert hashlib.sha256(seen).hexdigest() == hashlib.sha256(stored).hexdigest()


def test_processor_env_is_clean(env: Env, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "not-a-real-token")

    async def scenario() -> str:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["ok-008@orders.example.com"])
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))
            return mail_id

    mail_id = run(scenario())
    did = delivery_id(mail_id, "ok-008@orders.example.com")
    safe = "".join(c if c.isalnum() else "_" for c in did)
    names = set((env.ledger_dir / "env" / safe).read_text().split())
    assert not {n for n in names if n.startswith("AWS_")}
    assert {
        "SENDER",
        "RECIPIENT",
        "ORIGINAL_RECIPIENT",
        "LOCAL",
        "DOMAIN",
        "EXTENSION",
        "MAILFLOW_MAIL_ID",
        "MAILFLOW_DELIVERY_ID",
        "MAILFLOW_ATTEMPT",
        "PATH",
        "LEDGER_DIR",
    } <= names


def test_message_arriving_during_the_last_long_poll_is_given_back(env: Env, monkeypatch) -> None:
    settings = env.with_settings(wait_time_s=4, visibility_timeout_s=60, lease_s=60)
    polling = asyncio.Event()
    receive = Queue.receive

    async def observed(self: Queue, *args, **kwargs):
        polling.set()
        return await receive(self, *args, **kwargs)

    monkeypatch.setattr(Queue, "receive", observed)

    async def scenario() -> int:
        async with open_clients() as clients:
            worker = Worker(settings, clients)
            task = asyncio.create_task(worker.run())
            await asyncio.wait_for(polling.wait(), 10)  # the first long poll is in flight
            worker.request_stop()
            await env.send(clients, SIMPLE_MAIL, ["ok-001@orders.example.com"])
            return await task

    assert run(scenario()) == 0
    # Not hidden for the 60 s visibility timeout: another worker can take it right away.
    assert env.queue_counts() == {"visible": 1, "in_flight": 0}
    assert env.starts() == []
