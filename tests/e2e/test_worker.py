"""The worker end to end: moto server over HTTP, real php-cli processors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from datetime import UTC, datetime

import pytest

from mailflow.aws import AwsPermanentError, open_clients
from mailflow.aws.ledger import Ledger
from mailflow.aws.queue import Queue
from mailflow.dev.ses import new_message_id, received_notification
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_copies_of_one_notification_run_once(env: Env, monkeypatch) -> None:
    async def scenario() -> str:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["slow-001@orders.example.com"])
            # Two more copies of the exact SNS envelope: what SNS/SQS duplicates look like.
            (msg,) = env.drain_queue()
            env.boto("sqs").change_message_visibility(
                QueueUrl=env.queue_url(),
                ReceiptHandle=msg["ReceiptHandle"],
                VisibilityTimeout=0,
            )
            env.publish_raw(msg["Body"])
            env.publish_raw(json.loads(msg["Body"])["Message"])  # raw-delivery shape too
            monkeypatch.setenv("SLOW_S", "1")

            async def settled(c) -> bool:
                return await all_terminal(env, [mail_id])(c) and env.queue_counts() == {
                    "visible": 0,
                    "in_flight": 0,
                }

            await run_worker_until(env.settings, clients, settled, timeout_s=40)
            return mail_id

    mail_id = run(scenario())
    did = delivery_id(mail_id, "slow-001@orders.example.com")
    assert len(env.starts(did)) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_tempfail_is_retried_then_succeeds(env: Env) -> None:
    async def scenario() -> None:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["flaky-002@orders.example.com"])
            await run_worker_until(
                env.settings, clients, all_terminal(env, [mail_id]), timeout_s=40
            )
            (rec,) = await env.records(clients, mail_id)
            assert rec["status"] == "succeeded"
            assert rec["attempts"] == 2
            assert [h["status"] for h in rec["history"]] == ["retrying", "succeeded"]
            assert rec["history"][0]["reason"] == "tempfail_exit_75"
            assert rec["history"][0]["exit_code"] == 75

    run(scenario())


def test_permanent_failure_keeps_exit_code_and_stderr(env: Env) -> None:
    async def scenario() -> None:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["exit1-003@orders.example.com"])
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            assert (rec["status"], rec["exit_code"], rec["reason"]) == ("failed", 1, "exit_1")
            assert "broken order" in rec["stderr_tail"]
            assert rec["attempts"] == 1

    run(scenario())


def test_enhanced_status_codes_beat_exit_status(env: Env) -> None:
    async def scenario() -> None:
        async with open_clients() as clients:
            retry_id = await env.send(clients, SIMPLE_MAIL, ["print4-004@orders.example.com"])
            perm_id = await env.send(clients, SIMPLE_MAIL, ["print5-005@orders.example.com"])
            settings = env.with_settings(max_attempts=2)
            await run_worker_until(
                settings, clients, all_terminal(env, [retry_id, perm_id]), timeout_s=40
            )
            (retry,) = await env.records(clients, retry_id)
            (perm,) = await env.records(clients, perm_id)
            # exit 1 + "4.3.0 ..." → retried (until max_attempts), never a permanent exit_1
            assert retry["attempts"] == 2
            assert retry["reason"] == "attempts_exhausted"
            assert retry["last_reason"] == "enhanced_status_4.3.0"
            # exit 75 + "5.1.1 ..." → permanent at once
            assert (perm["status"], perm["attempts"]) == ("failed", 1)
            assert perm["reason"] == "enhanced_status_5.1.1"

    run(scenario())


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


def test_unroutable_is_failed_without_running(env: Env) -> None:
    async def scenario() -> None:
        async with open_clients() as clients:
            mail_id = await env.send(
                clients, mail_to("info@orders.example.com"), ["info@orders.example.com"]
            )
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            assert (rec["status"], rec["reason"], rec["attempts"]) == ("failed", "unroutable", 0)
            assert rec["key"].startswith(env.settings.incoming_prefix)  # the mail stays in S3

    run(scenario())
    assert env.starts() == []
    assert env.queue_counts() == {"visible": 0, "in_flight": 0}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json at all", "not_json"),
        (json.dumps({"Type": "Notification", "Message": "{broken"}), "sns_message_not_json"),
        (json.dumps({"notificationType": "Bounce", "mail": {}}), "not_ses_received"),
        (
            json.dumps(
                {
                    "notificationType": "Received",
                    "mail": {"messageId": "x"},
                    "receipt": {"recipients": ["a@b"], "action": {"type": "SNS"}},
                }
            ),
            "not_s3_action",
        ),
    ],
)
def test_malformed_notification_goes_to_dlq_with_reason(env: Env, body: str, reason: str) -> None:
    env.publish_raw(body)

    async def scenario() -> None:
        async with open_clients() as clients:

            async def dead(_c) -> bool:
                return env.queue_counts() == {"visible": 0, "in_flight": 0}

            await run_worker_until(env.settings, clients, dead)

    run(scenario())
    (msg,) = env.drain_queue(dlq=True)
    assert msg["Body"] == body
    assert msg["MessageAttributes"]["mailflow_reason"]["StringValue"] == reason


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


def test_foreign_bucket_is_never_fetched(env: Env) -> None:
    async def scenario() -> None:
        async with open_clients() as clients:
            await env.send(clients, SIMPLE_MAIL, ["ok-001@orders.example.com"])
            (msg,) = env.drain_queue()
            env.boto("sqs").delete_message(
                QueueUrl=env.queue_url(), ReceiptHandle=msg["ReceiptHandle"]
            )
            doc = json.loads(json.loads(msg["Body"])["Message"])
            doc["receipt"]["action"]["bucketName"] = "someone-elses-bucket"
            env.publish_raw(json.dumps(doc))

            async def dead(_c) -> bool:
                return env.queue_counts() == {"visible": 0, "in_flight": 0}

            await run_worker_until(env.settings, clients, dead)

    run(scenario())
    (msg,) = env.drain_queue(dlq=True)
    assert msg["MessageAttributes"]["mailflow_reason"]["StringValue"] == "bucket_not_allowed"
    assert env.starts() == []


def test_a_replayed_object_under_a_new_message_id_is_dead_lettered(env: Env) -> None:
    """A notification naming an earlier mail's object under a fresh messageId would run the
    processor again with a new delivery id (past the legacy script's duplicate check)."""
    recipient = "ok-001@orders.example.com"

    async def scenario() -> str:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, [recipient])
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))
            doc = received_notification(
                mail_id=new_message_id(),  # a fresh id ...
                bucket=env.settings.bucket,
                key=f"{env.settings.incoming_prefix}{mail_id}",  # ... naming the old object
                prefix=env.settings.incoming_prefix,
                topic_arn="arn:aws:sns:us-east-1:123456789012:t",
                sender="shop@example.com",
                recipients=[recipient],
                common_headers={},
                now=datetime.now(UTC),
            )
            env.publish_raw(json.dumps(doc))

            async def dead(_c) -> bool:
                return env.queue_counts() == {"visible": 0, "in_flight": 0}

            await run_worker_until(env.settings, clients, dead)
            return mail_id

    mail_id = run(scenario())
    (msg,) = env.drain_queue(dlq=True)
    assert msg["MessageAttributes"]["mailflow_reason"]["StringValue"] == "key_not_mail_id"
    assert [e[0] for e in env.starts()] == [delivery_id(mail_id, recipient)]


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


def test_an_outcome_dynamodb_refuses_is_recorded_smaller_never_run_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes DynamoDB refuse a full outcome (an item past 400 KB), the processor
    has run: its verdict is recorded without the bulky fields, and it never runs again."""
    finish = Ledger.finish
    refused: list[str] = []

    async def refusing_finish(self: Ledger, key, token, status, fields, entry):
        if fields.get("stdout_tail") is not None:
            refused.append(key.recipient)
            raise AwsPermanentError("ddb.finish", "ValidationException", "Item size too large")
        return await finish(self, key, token, status, fields, entry)

    monkeypatch.setattr(Ledger, "finish", refusing_finish)
    recipient = "exit1-008@orders.example.com"

    async def scenario() -> dict:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, [recipient])
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            return rec

    rec = run(scenario())
    assert refused == [recipient]
    assert (rec["status"], rec["reason"], rec["attempts"], rec["exit_code"]) == (
        "failed",
        "exit_1",
        1,
        1,
    )
    assert "ValidationException" in rec["detail"]
    assert "stdout_tail" not in rec
    assert "subject" not in rec
    assert len(env.starts()) == 1


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


def test_oversize_mail_fails_too_large(env: Env) -> None:
    settings = env.with_settings(max_mail_bytes=10_000)

    async def scenario() -> None:
        async with open_clients() as clients:
            mail_id = await env.send(
                clients,
                mail_to("ok-001@orders.example.com", body=b"x" * 20_000),
                ["ok-001@orders.example.com"],
            )
            await run_worker_until(settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            assert (rec["status"], rec["reason"]) == ("failed", "too_large")

    run(scenario())
    assert env.starts() == []


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


@pytest.mark.parametrize(
    "recipient",
    [
        "ok-001;rm -rf /@orders.example.com",
        "ok-$(touch pwned)-001@orders.example.com",
        "ok-001\n-x@orders.example.com",
        "`id`-001@orders.example.com",
        "ok-001@orders.example.com\r\nX-Injected: 1",
    ],
)
def test_hostile_recipients_never_reach_a_shell_or_the_processor(env: Env, recipient: str) -> None:
    async def scenario() -> None:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, [recipient])
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            assert rec["status"] == "failed"
            assert rec["reason"] in {"unroutable", "unsafe_argument"}

    run(scenario())
    assert env.starts() == []
    assert not (env.ledger_dir / "pwned").exists()


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
