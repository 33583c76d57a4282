"""The worker's logic on the in-memory fakes: outcomes, retries, duplicates, the DLQ.

The same scenarios once ran on a moto server with php; what they check is logic (which
outcome, which message fate), so they run here in milliseconds. The I/O paths they crossed
stay covered: the fakes by tests/contract, the real transports by tests/e2e (success, stdin
byte for byte, timeouts and process groups, the processor's environment, the long poll).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest

from mailflow.aws import AwsPermanentError
from mailflow.dev.ses import new_message_id, received_notification
from mailflow.routing import delivery_id
from mailflow.testing import behave_route
from mailflow.testing.ses import sns_envelope
from support.fakes import SIMPLE_MAIL, World, mail_to, make_world


@pytest.fixture
def world(tmp_path) -> World:
    return make_world(tmp_path)


def run(coro):
    return asyncio.run(coro)


def test_success_records_outcome_and_deletes_message(world: World) -> None:
    async def scenario() -> dict:
        mail_id = await world.send(SIMPLE_MAIL, ["ok-001@orders.example.com"])
        await world.run_until(world.settled([mail_id]))
        (rec,) = await world.records(mail_id)
        return rec

    rec = run(scenario())
    assert (rec["status"], rec["attempts"], rec["exit_code"]) == ("succeeded", 1, 0)
    assert rec["route"] == "behave"
    assert rec["argv"][-2:] == ["ok", "001"]
    assert rec["subject"] == "order"
    assert rec["size_bytes"] > len(SIMPLE_MAIL)  # SES headers prepended
    (only,) = world.processor.runs
    assert only.stdin.endswith(SIMPLE_MAIL)
    assert only.env["MAILFLOW_ATTEMPT"] == "1"
    assert world.queue.counts() == {"visible": 0, "in_flight": 0}


def test_three_copies_of_one_notification_run_once(world: World) -> None:
    world.processor.slow_s = 0.3
    recipient = "slow-001@orders.example.com"

    async def scenario() -> str:
        mail_id = await world.send(SIMPLE_MAIL, [recipient])
        (msg,) = world.queue.messages()
        await world.queue.send(msg.body)  # the exact SNS envelope again
        await world.queue.send(json.loads(msg.body)["Message"])  # raw-delivery shape too
        await world.run_until(world.settled([mail_id]))
        return mail_id

    mail_id = run(scenario())
    assert [r.delivery_id for r in world.processor.runs] == [delivery_id(mail_id, recipient)]


def test_tempfail_is_retried_then_succeeds(world: World) -> None:
    async def scenario() -> dict:
        mail_id = await world.send(SIMPLE_MAIL, ["flaky-002@orders.example.com"])
        await world.run_until(world.settled([mail_id]))
        (rec,) = await world.records(mail_id)
        return rec

    rec = run(scenario())
    assert (rec["status"], rec["attempts"]) == ("succeeded", 2)
    assert [h["status"] for h in rec["history"]] == ["retrying", "succeeded"]
    assert rec["history"][0]["reason"] == "tempfail_exit_75"
    assert rec["history"][0]["exit_code"] == 75
    assert [r.attempt for r in world.processor.runs] == [1, 2]


def test_permanent_failure_keeps_exit_code_and_stderr(world: World) -> None:
    async def scenario() -> dict:
        mail_id = await world.send(SIMPLE_MAIL, ["exit1-003@orders.example.com"])
        await world.run_until(world.settled([mail_id]))
        (rec,) = await world.records(mail_id)
        return rec

    rec = run(scenario())
    assert (rec["status"], rec["exit_code"], rec["reason"]) == ("failed", 1, "exit_1")
    assert "broken order" in rec["stderr_tail"]
    assert rec["attempts"] == 1


def test_enhanced_status_codes_beat_exit_status(tmp_path) -> None:
    world = make_world(tmp_path, max_attempts=2)

    async def scenario() -> tuple[dict, dict]:
        retry_id = await world.send(SIMPLE_MAIL, ["print4-004@orders.example.com"])
        perm_id = await world.send(SIMPLE_MAIL, ["print5-005@orders.example.com"])
        await world.run_until(world.settled([retry_id, perm_id]))
        ((retry,), (perm,)) = [await world.records(m) for m in (retry_id, perm_id)]
        return retry, perm

    retry, perm = run(scenario())
    # exit 1 + "4.3.0 ..." → retried (until max_attempts), never a permanent exit_1
    assert retry["attempts"] == 2
    assert retry["reason"] == "attempts_exhausted"
    assert retry["last_reason"] == "enhanced_status_4.3.0"
    # exit 75 + "5.1.1 ..." → permanent at once
    assert (perm["status"], perm["attempts"]) == ("failed", 1)
    assert perm["reason"] == "enhanced_status_5.1.1"


def test_a_timeout_is_retried_until_attempts_run_out(tmp_path) -> None:
    world = make_world(tmp_path, processor_timeout_s=0.05, max_attempts=1)

    async def scenario() -> dict:
        mail_id = await world.send(SIMPLE_MAIL, ["hang-006@orders.example.com"])
        await world.run_until(world.settled([mail_id]))
        (rec,) = await world.records(mail_id)
        return rec

    rec = run(scenario())
    assert rec["reason"] == "attempts_exhausted"
    assert rec["last_reason"] == "timeout"


def test_unroutable_is_failed_without_running(world: World) -> None:
    async def scenario() -> dict:
        mail_id = await world.send(mail_to("info@orders.example.com"), ["info@orders.example.com"])
        await world.run_until(world.settled([mail_id]))
        (rec,) = await world.records(mail_id)
        return rec

    rec = run(scenario())
    assert (rec["status"], rec["reason"], rec["attempts"]) == ("failed", "unroutable", 0)
    assert rec["key"].startswith(world.settings.incoming_prefix)  # the mail stays in S3
    assert world.processor.runs == []


def _queue_empty(world: World):
    async def check() -> bool:
        return world.queue.counts() == {"visible": 0, "in_flight": 0}

    return check


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
def test_malformed_notification_goes_to_dlq_with_reason(
    world: World, body: str, reason: str
) -> None:
    async def scenario() -> None:
        await world.queue.send(body)
        await world.run_until(_queue_empty(world))

    run(scenario())
    (msg,) = world.dlq.messages()
    assert msg.body == body
    assert msg.attributes["mailflow_reason"] == reason


def test_foreign_bucket_is_never_fetched(world: World) -> None:
    async def scenario() -> None:
        await world.send(SIMPLE_MAIL, ["ok-001@orders.example.com"])
        (msg,) = world.queue.messages()
        doc = json.loads(json.loads(msg.body)["Message"])
        doc["receipt"]["action"]["bucketName"] = "someone-elses-bucket"
        world.queue._messages.clear()
        await world.queue.send(json.dumps(doc))
        await world.run_until(_queue_empty(world))

    run(scenario())
    (msg,) = world.dlq.messages()
    assert msg.attributes["mailflow_reason"] == "bucket_not_allowed"
    assert world.processor.runs == []


def test_a_replayed_object_under_a_new_message_id_is_dead_lettered(world: World) -> None:
    """A notification naming an earlier mail's object under a fresh messageId would run the
    processor again with a new delivery id (past the legacy script's duplicate check)."""
    recipient = "ok-001@orders.example.com"

    async def scenario() -> str:
        mail_id = await world.send(SIMPLE_MAIL, [recipient])
        await world.run_until(world.settled([mail_id]))
        doc = received_notification(
            mail_id=new_message_id(),  # a fresh id ...
            bucket=world.settings.bucket,
            key=f"{world.settings.incoming_prefix}{mail_id}",  # ... naming the old object
            prefix=world.settings.incoming_prefix,
            topic_arn="arn:aws:sns:us-east-1:123456789012:t",
            sender="shop@example.com",
            recipients=[recipient],
            common_headers={},
            now=datetime.now(UTC),
        )
        await world.queue.send(sns_envelope(json.dumps(doc)))
        await world.run_until(_queue_empty(world))
        return mail_id

    mail_id = run(scenario())
    (msg,) = world.dlq.messages()
    assert msg.attributes["mailflow_reason"] == "key_not_mail_id"
    assert [r.delivery_id for r in world.processor.runs] == [delivery_id(mail_id, recipient)]


def test_an_outcome_the_ledger_refuses_is_recorded_smaller_never_run_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes DynamoDB refuse a full outcome (an item past 400 KB), the processor
    has run: its verdict is recorded without the bulky fields, and it never runs again."""
    finish = world.ledger.finish
    refused: list[str] = []

    async def refusing_finish(key, token, status, fields, entry):
        if fields.get("stdout_tail") is not None:
            refused.append(key.recipient)
            raise AwsPermanentError("ddb.finish", "ValidationException", "Item size too large")
        return await finish(key, token, status, fields, entry)

    monkeypatch.setattr(world.ledger, "finish", refusing_finish)
    recipient = "exit1-008@orders.example.com"

    async def scenario() -> dict:
        mail_id = await world.send(SIMPLE_MAIL, [recipient])
        await world.run_until(world.settled([mail_id]))
        (rec,) = await world.records(mail_id)
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
    assert len(world.processor.runs) == 1


def test_oversize_mail_fails_too_large(tmp_path) -> None:
    world = make_world(tmp_path, max_mail_bytes=10_000)

    async def scenario() -> dict:
        mail_id = await world.send(
            mail_to("ok-001@orders.example.com", body=b"x" * 20_000),
            ["ok-001@orders.example.com"],
        )
        await world.run_until(world.settled([mail_id]))
        (rec,) = await world.records(mail_id)
        return rec

    rec = run(scenario())
    assert (rec["status"], rec["reason"]) == ("failed", "too_large")
    assert world.processor.runs == []


def test_a_missing_object_fails_object_missing_without_running(world: World) -> None:
    async def scenario() -> dict:
        mail_id = await world.send(SIMPLE_MAIL, ["ok-001@orders.example.com"])
        world.store.objects.clear()
        await world.run_until(world.settled([mail_id]))
        (rec,) = await world.records(mail_id)
        return rec

    rec = run(scenario())
    assert (rec["status"], rec["reason"]) == ("failed", "object_missing")
    assert world.processor.runs == []


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
def test_hostile_recipients_never_reach_the_processor(world: World, recipient: str) -> None:
    async def scenario() -> dict:
        mail_id = await world.send(SIMPLE_MAIL, [recipient])
        await world.run_until(world.settled([mail_id]))
        (rec,) = await world.records(mail_id)
        return rec

    rec = run(scenario())
    assert rec["status"] == "failed"
    assert rec["reason"] in {"unroutable", "unsafe_argument"}
    assert world.processor.runs == []


#: The lone store's mail may wait for at most this many flood deliveries.
K_DELIVERIES = 10


def test_a_flood_of_one_store_does_not_starve_another(tmp_path) -> None:
    """Per-key fairness: 200 mails of store 001 queued ahead of one of store 002; the lone
    mail runs after fewer than K_DELIVERIES flood deliveries, because the flood goes past the
    parking cap and is deferred."""
    world = make_world(tmp_path, concurrency=4, routes=(behave_route(max_in_flight_per_key=1),))
    world.processor.slow_s = 0.05  # much slower than a receive: the flood piles up
    flood_size = 200

    async def scenario() -> tuple[dict, list]:
        for _ in range(flood_size):
            await world.send(SIMPLE_MAIL, ["slow-001@orders.example.com"])
        lone = await world.send(SIMPLE_MAIL, ["ok-002@orders.example.com"])
        (worker,) = await world.run_until(world.all_terminal([lone]), timeout_s=30)
        return worker.stats, await world.records(lone)

    stats, (lone,) = run(scenario())
    assert lone["status"] == "succeeded"
    order = [r.store for r in world.processor.runs]
    before = order.index("002")
    assert before < K_DELIVERIES, f"lone mail ran after {before} flood deliveries"
    assert stats["deferred_busy_key"] > 0  # the flood went past the parking cap
    assert world.dlq.messages() == []


def test_a_deferred_flood_completes_once_each_without_burning_receive_counts(tmp_path) -> None:
    # 2 run slots + 2 prefetch: parking cap 16, so most of the flood is deferred.
    world = make_world(tmp_path, concurrency=2, routes=(behave_route(max_in_flight_per_key=1),))
    world.processor.slow_s = 0.01
    flood_size = 60

    async def scenario() -> tuple[dict, list]:
        mail_ids = [
            await world.send(SIMPLE_MAIL, ["slow-003@orders.example.com"])
            for _ in range(flood_size)
        ]
        (worker,) = await world.run_until(world.settled(mail_ids), timeout_s=30)
        return worker.stats, [r for m in mail_ids for r in await world.records(m)]

    stats, records = run(scenario())
    assert len(records) == flood_size
    assert {r["status"] for r in records} == {"succeeded"}
    assert {r["attempts"] for r in records} == {1}
    assert len(world.processor.runs) == flood_size  # each ran exactly once
    assert world.processor.overlaps == 0  # max_in_flight_per_key=1
    assert stats["deferred_busy_key"] > 0
    # Paced deferrals: a deferred message comes back about when the store has room, so it
    # is received about twice, nowhere near the redrive threshold.
    assert stats["max_receive_count"] <= 3 < world.settings.max_receive_count
    assert world.dlq.messages() == []
