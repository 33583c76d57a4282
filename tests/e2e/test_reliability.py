"""Leases, heartbeat, fencing, duplicates, crash loops, AWS faults, shutdown.

Two scenarios that are logic only (a stale worker's fenced outcome, a duplicate that must not
run a retry early) run on the in-memory fakes in tests/unit/test_reliability_logic.py.

In-process workers where the test needs to reach inside (a blocked heartbeat, a spy on the
queue); `mailflow worker` subprocesses where the test needs signals (SIGKILL, SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import pytest
import structlog

from chaos.procs import alive, kill_tree, log_events, reap, start_worker, wait_for
from chaos.proxy import FaultPlan, FaultProxy
from mailflow import aws
from mailflow.aws import AwsClients, AwsPermanentError, client_config, open_clients
from mailflow.aws.ledger import Busy, Claimed, DeliveryKey, Ledger, Status
from mailflow.aws.queue import Queue
from mailflow.config import Settings
from mailflow.dev.ses import received_notification
from mailflow.errors import LeaseLostError, TransientError
from mailflow.exitcodes import EXIT_DRAIN_TIMEOUT, EXIT_OK
from mailflow.routing import delivery_id
from mailflow.worker.loop import Worker
from support.harness import SIMPLE_MAIL, Env, all_terminal, require_binary


@pytest.fixture
def php() -> str:
    return require_binary("php")


@pytest.fixture
def proxy(moto_url: str):
    with FaultProxy(moto_url, FaultPlan(rate=0.0)) as p:
        yield p


@contextlib.asynccontextmanager
async def clients_via(url: str):
    """AwsClients whose every call goes to `url` (the fault proxy)."""
    session = aioboto3.Session()
    config = client_config()
    async with contextlib.AsyncExitStack() as stack:
        made = [
            await stack.enter_async_context(session.client(name, endpoint_url=url, config=config))
            for name in ("s3", "sqs", "sns", "dynamodb")
        ]
        yield AwsClients(*made)


Until = Callable[[AwsClients], Awaitable[bool]]


async def run_workers_until(
    workers: list[Worker],
    clients: AwsClients,
    until: Until,
    *,
    timeout_s: float = 60,
) -> list[int]:
    tasks = [asyncio.create_task(w.run()) for w in workers]
    deadline = time.monotonic() + timeout_s
    try:
        while not await until(clients):
            for task in tasks:
                if task.done():
                    raise AssertionError(f"worker exited early: {task.result()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout_s}s")
            await asyncio.sleep(0.2)
    finally:
        for w in workers:
            w.request_stop()
        codes = await asyncio.gather(*tasks, return_exceptions=True)
    return [c if isinstance(c, int) else -1 for c in codes]


def effects(env: Env, did: str | None = None) -> list[list[str]]:
    return [e for e in env.effects() if did is None or e[0] == did]


def starts(env: Env, did: str) -> list[list[str]]:
    return [e for e in effects(env, did) if e[-1] == "start"]


def ends(env: Env, did: str) -> list[list[str]]:
    return [e for e in effects(env, did) if e[-1].startswith("exit=")]


def notification_body(env: Env, mail_id: str, recipients: list[str]) -> str:
    """The SES notification for a mail `env.send` stored: what a raw-delivery copy carries."""
    return json.dumps(
        received_notification(
            mail_id=mail_id,
            bucket=env.settings.bucket,
            key=f"{env.settings.incoming_prefix}{mail_id}",
            prefix=env.settings.incoming_prefix,
            topic_arn="arn:aws:sns:us-east-1:123456789012:t",
            sender="shop@example.com",
            recipients=recipients,
            common_headers={},
            now=datetime.now(UTC),
        )
    )


def queue_settled(env: Env) -> bool:
    return env.queue_counts() == {"visible": 0, "in_flight": 0}


# --- AWS errors: one retry layer, mapped, the nasty lost-response case --------------------------


def test_aws_call_has_exactly_one_retry_layer(proxy: FaultProxy) -> None:
    """tenacity is the only retry layer: botocore must not retry underneath it (a botocore
    `max_attempts: 1` means one *retry*, i.e. two tries per tenacity attempt)."""
    proxy.plan.kinds = ("http503",)
    proxy.set_rate(1.0)

    async def scenario() -> None:
        async with clients_via(proxy.url) as clients:
            with pytest.raises(TransientError):
                await aws.call("ddb.ListTables", clients.dynamodb.list_tables)

    asyncio.run(scenario())
    assert proxy.stats.calls["dynamodb"] == aws.CALL_ATTEMPTS


@pytest.mark.parametrize(
    "faults",
    [("throttle", "http500", "reset_before"), ("reset_after", "http503", "latency")],
)
def test_transient_faults_are_retried_until_success(
    env: Env,
    proxy: FaultProxy,
    faults: tuple[str, ...],
) -> None:
    proxy.plan.latency_s = (0.2, 0.3)

    async def scenario() -> None:
        async with clients_via(proxy.url) as clients:
            for service, call, kwargs in (
                ("dynamodb", clients.dynamodb.describe_table, {"TableName": env.settings.table}),
                ("sqs", clients.sqs.get_queue_url, {"QueueName": env.settings.queue}),
                ("s3", clients.s3.head_bucket, {"Bucket": env.settings.bucket}),
            ):
                before = proxy.stats.calls[service]
                proxy.script(*faults)
                await aws.call(f"{service}.op", call, **kwargs)
                assert proxy.stats.calls[service] - before == len(faults) + (
                    0 if "latency" in faults else 1
                )

    asyncio.run(scenario())


def test_definite_errors_are_mapped_and_not_retried(env: Env, proxy: FaultProxy) -> None:
    async def scenario() -> None:
        async with clients_via(proxy.url) as clients:
            with pytest.raises(AwsPermanentError) as caught:
                await aws.call(
                    "ddb.GetItem",
                    clients.dynamodb.get_item,
                    TableName="no-such-table",
                    Key={"mail_id": {"S": "x"}, "recipient": {"S": "y"}},
                )
            assert caught.value.code == "ResourceNotFoundException"

    asyncio.run(scenario())
    assert proxy.stats.calls["dynamodb"] == 1


T1, T2 = "token-1", "token-2"


def test_lost_responses_of_conditional_writes_are_recognised_as_our_own(
    env: Env,
    proxy: FaultProxy,
) -> None:
    """The nasty case: the write lands, the response is lost, the retry fails its condition.
    claim/renew/finish must recognise their own token instead of reporting a loss."""
    key = DeliveryKey("lostresponse", "ok-001@orders.example.com")

    async def scenario() -> None:
        async with clients_via(proxy.url) as clients:
            ledger = Ledger(clients.dynamodb, env.settings.table)
            proxy.script("reset_after", operation="UpdateItem")
            claim = await ledger.claim(key, worker="w1", token=T1, lease_s=30, meta={})
            assert isinstance(claim, Claimed)
            assert claim.attempt == 1
            proxy.script("reset_after", operation="UpdateItem")
            assert await ledger.renew(key, T1, 30) is True
            proxy.script("reset_after", operation="UpdateItem")
            await ledger.finish(
                key, T1, Status.SUCCEEDED, {"reason": "ok"}, {"attempt": 1, "status": "succeeded"}
            )
            record = await ledger.get(key)
            assert record["status"] == "succeeded"
            assert record["attempts"] == 1
            assert len(record["history"]) == 1
            # and another claimer still loses to the terminal state
            other = await ledger.claim(key, worker="w2", token=T2, lease_s=30, meta={})
            assert isinstance(other, Busy)
            assert other.why == "terminal"

    asyncio.run(scenario())
    assert proxy.stats.faults["reset_after"] == 3


def test_a_renewal_racing_our_own_outcome_is_not_a_lost_lease(env: Env) -> None:
    """The heartbeat snapshots its leases, the delivery records its outcome, then the renewal
    arrives: nothing was lost (no warning, no cancel). Another worker's claim is a loss."""
    key = DeliveryKey("renewrace", "ok-001@orders.example.com")

    async def scenario() -> None:
        async with open_clients() as clients:
            ledger = Ledger(clients.dynamodb, env.settings.table)
            assert isinstance(
                await ledger.claim(key, worker="w1", token=T1, lease_s=30, meta={}), Claimed
            )
            await ledger.finish(
                key,
                T1,
                Status.RETRYING,
                {"reason": "x", "next_attempt_at": 0.0},
                {"attempt": 1, "status": "retrying"},
            )
            assert await ledger.renew(key, T1, 30) is True  # our own outcome, not a loss
            assert isinstance(
                await ledger.claim(key, worker="w2", token=T2, lease_s=30, meta={}), Claimed
            )
            assert await ledger.renew(key, T1, 30) is False  # now it is someone else's
            assert await ledger.renew(key, T2, 30) is True
            record = await ledger.get(key)
            assert (record["lease_token"], record["status"]) == (T2, "processing")
            # someone else ends the run (an operator, the reconciler) but keeps the token:
            # still a loss for the runner
            await ledger.transition(
                key,
                expect=(Status.PROCESSING,),
                status=Status.FAILED,
                fields={"reason": "operator"},
            )
            assert await ledger.renew(key, T2, 30) is False
            with pytest.raises(LeaseLostError):
                await ledger.finish(
                    key,
                    T2,
                    Status.FAILED,
                    {"reason": "exit_1"},
                    {"attempt": 2, "status": "failed"},
                )

    asyncio.run(scenario())


def test_worker_survives_a_storm_of_aws_faults(env: Env, proxy: FaultProxy, php: str) -> None:
    """30% of the worker's AWS calls fail in every way the proxy knows; it never crashes and
    every delivery ends with the outcome its processor chose."""
    proxy.plan.latency_s = (0.2, 0.6)
    proxy.set_rate(0.3)
    to = {
        "ok-001@orders.example.com": ("succeeded", "ok"),
        "flaky-002@orders.example.com": ("succeeded", "ok"),
        "exit1-003@orders.example.com": ("failed", "exit_1"),
        "ok-004@orders.example.com": ("succeeded", "ok"),
    }
    settings = env.with_settings(visibility_timeout_s=6, lease_s=6)

    async def scenario() -> None:
        async with open_clients() as direct, clients_via(proxy.url) as clients:
            mail_ids = [await env.send(direct, SIMPLE_MAIL, [r]) for r in to]
            worker = Worker(settings, clients)

            async def done(_c: AwsClients) -> bool:
                return await all_terminal(env, mail_ids)(direct)

            with structlog.testing.capture_logs() as logs:
                codes = await run_workers_until([worker], clients, done, timeout_s=120)
            assert codes == [EXIT_OK]
            assert not [e for e in logs if e["event"] == "message_failed"]
            for mail_id, (recipient, want) in zip(mail_ids, to.items(), strict=True):
                (rec,) = await env.records(direct, mail_id)
                assert (rec["status"], rec["reason"]) == want, recipient

    asyncio.run(scenario())
    print(f"\nproxy: {proxy.stats.summary()}")
    assert proxy.stats.total_faults >= 5


def test_a_control_character_reaches_the_dlq_with_its_reason(env: Env, proxy: FaultProxy) -> None:
    """The dead-letter reason quotes the hostile field; SQS refuses control characters in a
    message attribute (moto does not: the proxy validates as SQS does). Escaped, the send
    goes through, and the message is in the DLQ with its reason at the first receive."""
    proxy.strict_sqs = True
    doc = json.loads(notification_body(env, "a\x01b\x1b[31m", ["ok-001@orders.example.com"]))
    env.publish_raw(json.dumps(doc))  # JSON escapes the controls in the body itself

    async def scenario() -> Worker:
        async with clients_via(proxy.url) as clients:

            async def dead(_c: AwsClients) -> bool:
                return queue_settled(env)

            (worker,) = [Worker(env.settings, clients)]
            await run_workers_until([worker], clients, dead, timeout_s=15)
            return worker

    worker = asyncio.run(scenario())
    (msg,) = env.drain_queue(dlq=True)
    attrs = {k: v["StringValue"] for k, v in msg["MessageAttributes"].items()}
    assert attrs["mailflow_reason"] == "bad_mail_id"
    assert attrs["mailflow_detail"] == "a\\x01b\\x1b[31m"
    assert json.loads(msg["Body"]) == doc
    assert worker.stats["dead_lettered"] == 1
    assert proxy.stats.faults["sqs_refused_attribute"] == 0


def test_a_refused_dead_letter_send_is_sent_again_with_the_reason_alone(
    env: Env, proxy: FaultProxy
) -> None:
    """Should SQS refuse the dead-letter send for its attributes anyway (a rule we do not
    know of), the message goes once more with the reason alone, ASCII: in the DLQ with a
    reason, not looping until the redrive policy takes it without one."""
    env.publish_raw("not json at all")
    proxy.script("invalid_parameter", operation="SendMessage")

    async def scenario() -> None:
        async with clients_via(proxy.url) as clients:

            async def dead(_c: AwsClients) -> bool:
                return queue_settled(env)

            await run_workers_until([Worker(env.settings, clients)], clients, dead, timeout_s=15)

    asyncio.run(scenario())
    (msg,) = env.drain_queue(dlq=True)
    attrs = {k: v["StringValue"] for k, v in msg["MessageAttributes"].items()}
    assert attrs["mailflow_reason"] == "not_json"
    assert attrs["mailflow_detail"].startswith("attributes refused (InvalidParameterValue)")
    assert msg["Body"] == "not json at all"
    assert proxy.stats.faults["invalid_parameter"] == 1


# --- leases and heartbeat -----------------------------------------------------------------------


def test_processor_running_three_visibility_timeouts_runs_once(
    env: Env, php: str, monkeypatch
) -> None:
    settings = env.with_settings(visibility_timeout_s=2, lease_s=3)  # heartbeat every 0.5 s
    monkeypatch.setenv("SLOW_S", "7")

    async def scenario() -> tuple[str, list[Worker]]:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["slow-001@orders.example.com"])
            workers = [Worker(settings, clients), Worker(settings, clients)]
            codes = await run_workers_until(
                workers, clients, all_terminal(env, [mail_id]), timeout_s=60
            )
            assert codes == [EXIT_OK, EXIT_OK]
            (rec,) = await env.records(clients, mail_id)
            assert (rec["status"], rec["attempts"]) == ("succeeded", 1)
            return mail_id, workers

    mail_id, workers = asyncio.run(scenario())
    did = delivery_id(mail_id, "slow-001@orders.example.com")
    assert len(starts(env, did)) == 1
    # received once, by one of the two workers: no redelivery while it ran 3.5 visibilities
    assert sum(w.stats["received"] for w in workers) == 1


def test_an_sqs_brownout_does_not_stop_lease_renewal(
    env: Env, proxy: FaultProxy, php: str, monkeypatch
) -> None:
    """SQS refuses ChangeMessageVisibility for three leases while a delivery runs: the
    message comes back, but the DynamoDB lease is renewed all along, so the copy is deferred
    and the processor runs exactly once (it ran four times when the lease renewal waited for
    the visibility call)."""
    # heartbeat every 1 s (each call's deadline 0.8 s); the brownout lasts 12 s, three leases
    settings = env.with_settings(visibility_timeout_s=4, lease_s=4, processor_timeout_s=30)
    monkeypatch.setenv("SLOW_S", "14")
    recipient = "slow-006@orders.example.com"

    async def scenario() -> str:
        async with open_clients() as direct, clients_via(proxy.url) as clients:
            mail_id = await env.send(direct, SIMPLE_MAIL, [recipient])
            did = delivery_id(mail_id, recipient)
            worker = Worker(settings, clients)

            async def done(_c: AwsClients) -> bool:
                if starts(env, did) and not proxy.refused and not state.get("ended"):
                    proxy.refused = {"ChangeMessageVisibilityBatch", "ChangeMessageVisibility"}
                    state["brownout"] = time.monotonic()
                if proxy.refused and time.monotonic() - state["brownout"] > 12:
                    proxy.refused = set()
                    state["ended"] = True
                return await all_terminal(env, [mail_id])(direct)

            state: dict[str, Any] = {}
            codes = await run_workers_until([worker], clients, done, timeout_s=60)
            assert codes == [EXIT_OK]
            assert state.get("ended"), "the brownout outlasted the delivery"
            (rec,) = await env.records(direct, mail_id)
            assert (rec["status"], rec["attempts"]) == ("succeeded", 1)
            return did

    did = asyncio.run(scenario())
    assert proxy.stats.faults["refused"] >= 3
    assert len(starts(env, did)) == 1


def _pause_first_beat_with_a_lease(worker: Worker, pause_s: float | None) -> None:
    """Block the worker's heartbeat once it holds a lease: for `pause_s`, or for good."""
    original = worker._beat
    state = {"paused": False}

    async def beat() -> None:
        holding = any(h.leases for h in worker._held.values())
        if holding and not state["paused"]:
            state["paused"] = True
            if pause_s is None:
                await asyncio.Event().wait()
            await asyncio.sleep(pause_s)
        if pause_s is not None:
            await original()

    worker._beat = beat  # type: ignore[method-assign]


async def _wait_for_start(env: Env, did: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not starts(env, did):
        assert time.monotonic() < deadline, "processor never started"
        await asyncio.sleep(0.1)


def test_taken_over_lease_stops_the_processor_and_fences_its_outcome(
    env: Env, php: str, monkeypatch
) -> None:
    """Worker A's heartbeat stalls past the lease; B takes the delivery over. When A's
    heartbeat comes back it finds the lease gone, kills its processor, and writes nothing."""
    settings = env.with_settings(
        visibility_timeout_s=3,
        lease_s=3,  # heartbeat 0.75 s
        processor_timeout_s=60,
    )
    monkeypatch.setenv("SLOW_S", "10")
    recipient = "slow-002@orders.example.com"

    async def scenario() -> tuple[str, str, str]:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, [recipient])
            did = delivery_id(mail_id, recipient)
            a, b = (
                Worker(settings, clients, worker_id="A"),
                Worker(settings, clients, worker_id="B"),
            )
            _pause_first_beat_with_a_lease(a, pause_s=6.0)
            with structlog.testing.capture_logs() as logs:
                task_a = asyncio.create_task(a.run())
                await _wait_for_start(env, did)
                a._capacity = lambda: 0  # type: ignore[method-assign]  # B is the taker
                codes = await run_workers_until(
                    [b], clients, all_terminal(env, [mail_id]), timeout_s=60
                )
                a.request_stop()
                code_a = await task_a
            assert codes == [EXIT_OK]
            assert code_a == EXIT_OK
            assert any(e["event"] == "lease_lost" for e in logs)
            (rec,) = await env.records(clients, mail_id)
            assert rec["status"] == "succeeded"
            # one outcome, B's; A's attempt left no trace but the attempt counter
            assert [h["worker"] for h in rec["history"]] == ["B"]
            assert rec["history"][0]["attempt"] == rec["attempts"] >= 2
            return mail_id, did, rec["history"][0]["worker"]

    _, did, _ = asyncio.run(scenario())
    runs = starts(env, did)
    assert len(runs) == 2
    first_pid = int(runs[0][-2])
    # A's processor was killed (no exit line) and is gone; B's ran to its end
    assert [int(e[-2]) for e in ends(env, did)] == [int(runs[1][-2])]
    assert not alive(first_pid)


def test_a_worker_that_takes_over_its_own_stalled_run_stops_the_stale_one(
    env: Env, php: str, monkeypatch
) -> None:
    """One worker, heartbeat stalled past the visibility and the lease: its own receiver gets
    the message again and claims the delivery anew. Once the heartbeat is back, each run's
    lease is checked on its own: the stale runs are killed, one outcome is written."""
    settings = env.with_settings(visibility_timeout_s=3, lease_s=3, processor_timeout_s=60)
    monkeypatch.setenv("SLOW_S", "12")
    recipient = "slow-008@orders.example.com"

    async def scenario() -> tuple[str, dict[str, Any]]:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, [recipient])
            a = Worker(settings, clients, worker_id="A")
            _pause_first_beat_with_a_lease(a, pause_s=5.0)
            with structlog.testing.capture_logs() as logs:
                await run_workers_until([a], clients, all_terminal(env, [mail_id]), timeout_s=90)
            assert any(e["event"] == "lease_lost" for e in logs)
            assert not any(e["event"] == "lease_lost_at_finish" for e in logs)
            (rec,) = await env.records(clients, mail_id)
            return mail_id, rec

    mail_id, rec = asyncio.run(scenario())
    did = delivery_id(mail_id, recipient)
    runs = starts(env, did)
    assert len(runs) >= 2  # the stall let the delivery be claimed again
    assert rec["status"] == "succeeded"
    assert len(rec["history"]) == 1
    # only the newest run finished; every stale one was killed when its lease proved lost
    (finished,) = ends(env, did)
    assert int(finished[1]) == rec["attempts"]
    for run in runs:
        assert not alive(int(run[-2]))


class QueueSpy:
    """Records what the worker does with each SQS message, then lets it happen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.actions: list[tuple[str, str, float | None]] = []
        delete, set_visibility = Queue.delete, Queue.set_visibility
        spy = self

        async def spy_delete(self: Queue, msg: Any) -> None:
            spy.actions.append((msg.message_id, "delete", None))
            await delete(self, msg)

        async def spy_set_visibility(self: Queue, msg: Any, seconds: float) -> bool:
            spy.actions.append((msg.message_id, "defer", seconds))
            return await set_visibility(self, msg, seconds)

        monkeypatch.setattr(Queue, "delete", spy_delete)
        monkeypatch.setattr(Queue, "set_visibility", spy_set_visibility)

    def by_message(self) -> dict[str, list[tuple[str, float | None]]]:
        out: dict[str, list[tuple[str, float | None]]] = {}
        for message_id, action, seconds in self.actions:
            out.setdefault(message_id, []).append((action, seconds))
        return out


def test_in_flight_duplicate_is_deleted_while_its_live_run_holds_the_lease(
    env: Env,
    php: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = env.with_settings(visibility_timeout_s=6, lease_s=6)
    monkeypatch.setenv("SLOW_S", "3")
    recipient = "slow-004@orders.example.com"
    spy = QueueSpy(monkeypatch)

    async def scenario() -> str:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, [recipient])
            env.publish_raw(notification_body(env, mail_id, [recipient]))

            async def settled(c: AwsClients) -> bool:
                return await all_terminal(env, [mail_id])(c) and queue_settled(env)

            await run_workers_until([Worker(settings, clients)], clients, settled, timeout_s=60)
            return mail_id

    mail_id = asyncio.run(scenario())
    assert len(starts(env, delivery_id(mail_id, recipient))) == 1
    # the copy whose run holds the lease: deleted once its delivery was terminal; the other
    # copy: deleted at once. The lease names the message that carries the run, and that
    # message is not deleted before the delivery is terminal: it survives a crash of the run.
    assert sorted(spy.by_message().values()) == [[("delete", None)], [("delete", None)]]


def test_a_duplicate_of_a_long_run_never_reaches_the_redrive_limit(
    env: Env, php: str, monkeypatch
) -> None:
    """A copy deferred while another message's run holds the lease came back every lease
    period and, during a run longer than maxReceiveCount leases, went to the DLQ without a
    reason (and fired the DLQ alarm) although the work completed."""
    settings = env.with_settings(visibility_timeout_s=3, lease_s=3, processor_timeout_s=30)
    monkeypatch.setenv("SLOW_S", "14")  # over four leases: a deferred copy is received 4+ times
    recipient = "slow-009@orders.example.com"
    sqs = env.boto("sqs")
    policy = json.loads(
        sqs.get_queue_attributes(QueueUrl=env.queue_url(), AttributeNames=["RedrivePolicy"])[
            "Attributes"
        ]["RedrivePolicy"]
    )
    sqs.set_queue_attributes(
        QueueUrl=env.queue_url(),
        Attributes={"RedrivePolicy": json.dumps(policy | {"maxReceiveCount": 3})},
    )

    async def scenario() -> tuple[str, list[Worker]]:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, [recipient])
            env.publish_raw(notification_body(env, mail_id, [recipient]))

            async def settled(c: AwsClients) -> bool:
                return await all_terminal(env, [mail_id])(c) and queue_settled(env)

            workers = [Worker(settings, clients), Worker(settings, clients)]
            await run_workers_until(workers, clients, settled, timeout_s=60)
            return mail_id, workers

    mail_id, workers = asyncio.run(scenario())
    assert len(starts(env, delivery_id(mail_id, recipient))) == 1
    assert env.drain_queue(dlq=True) == []
    assert sum(w.stats["received"] for w in workers) == 2


# --- crash loops --------------------------------------------------------------------------------


def _set_max_receive_count(env: Env, count: int) -> None:
    sqs = env.boto("sqs")
    dlq_arn = sqs.get_queue_attributes(
        QueueUrl=env.queue_url(dlq=True),
        AttributeNames=["QueueArn"],
    )["Attributes"]["QueueArn"]
    sqs.set_queue_attributes(
        QueueUrl=env.queue_url(),
        Attributes={
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": count}),
        },
    )


def _dlq_depth(env: Env) -> int:
    attrs = env.boto("sqs").get_queue_attributes(
        QueueUrl=env.queue_url(dlq=True),
        AttributeNames=["ApproximateNumberOfMessages"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"])


def _lapsed(env: Env, did: str) -> bool:
    """The killed run's message is visible again and its lease has expired."""
    if env.queue_counts()["visible"] == 0:
        return False
    mail_id, recipient = did.split(":", 1)
    item = env.boto("dynamodb").get_item(
        TableName=env.settings.table,
        Key={"mail_id": {"S": mail_id}, "recipient": {"S": recipient}},
        ConsistentRead=True,
    )["Item"]
    expires = item.get("lease_expires_at", {}).get("N")
    return expires is None or float(expires) < time.time()


def _crash_every_run(
    env: Env, settings: Settings, tmp_path: Path, did: str, stop: Callable[[], bool], rounds: int
) -> int:
    """Start a worker; SIGKILL it (and its processor) as soon as the processor starts; again.
    Returns how many processor runs were killed."""
    killed = 0
    for n in range(rounds):
        log = tmp_path / f"worker-{n}.log"
        proc = start_worker(settings, log, tmp_path, SLOW_S="60")
        try:
            try:
                wait_for(
                    lambda: len(starts(env, did)) > killed or stop(),  # noqa: B023 - called here
                    60,
                    "a processor start or the end",
                )
            except AssertionError as exc:
                tail = log.read_text(errors="replace")[-3000:]
                raise AssertionError(
                    f"{exc}; round {n}, killed {killed}, queue {env.queue_counts()},"
                    f" dlq {_dlq_depth(env)}, worker log:\n{tail}",
                ) from None
        finally:
            if len(starts(env, did)) > killed:
                kill_tree(proc.pid)
                killed += 1
            else:
                proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        # Let lease and visibility lapse before the next worker polls: its receive then claims
        # (one receive, one run), instead of finding the lease alive and deferring.
        wait_for(lambda: _lapsed(env, did) or stop(), 60, "the lease and visibility to lapse")
        if stop():
            break
    return killed


def test_a_message_that_kills_every_worker_ends_in_the_dlq(
    env: Env, php: str, tmp_path: Path
) -> None:
    """Crash loop, SQS bound: the worker dies before any outcome is written, every time.
    After maxReceiveCount receives the redrive policy moves the message to the DLQ."""
    max_receive = 3
    _set_max_receive_count(env, max_receive)
    settings = env.with_settings(visibility_timeout_s=2, lease_s=2, max_attempts=10)
    recipient = "slow-006@orders.example.com"

    async def send() -> str:
        async with open_clients() as clients:
            return await env.send(clients, SIMPLE_MAIL, [recipient])

    mail_id = asyncio.run(send())
    did = delivery_id(mail_id, recipient)
    killed = _crash_every_run(env, settings, tmp_path, did, lambda: _dlq_depth(env) > 0, 6)
    (msg,) = env.drain_queue(dlq=True)
    assert json.loads(json.loads(msg["Body"])["Message"])["mail"]["messageId"] == mail_id
    # At most one run per receive. (A receive can also be spent without a run: a killed
    # worker's long poll that SQS answered into a dead socket.)
    assert 1 <= killed <= max_receive
    assert queue_settled(env)

    async def record() -> dict[str, Any]:
        async with open_clients() as clients:
            (rec,) = await env.records(clients, mail_id)
            return rec

    rec = asyncio.run(record())
    # not terminal: nothing ever recorded an outcome; the reconciler's and the operator's case
    assert (rec["status"], rec["attempts"]) == ("processing", killed)


def test_a_delivery_that_kills_every_worker_stops_at_max_attempts(
    env: Env,
    php: str,
    tmp_path: Path,
) -> None:
    """Crash loop, ledger bound: with max_attempts below maxReceiveCount the claim after the
    last attempt records `attempts_exhausted` without running the processor again."""
    settings = env.with_settings(visibility_timeout_s=2, lease_s=2, max_attempts=2)
    recipient = "slow-007@orders.example.com"

    async def send() -> str:
        async with open_clients() as clients:
            return await env.send(clients, SIMPLE_MAIL, [recipient])

    mail_id = asyncio.run(send())
    did = delivery_id(mail_id, recipient)
    killed = _crash_every_run(env, settings, tmp_path, did, lambda: False, 2)
    assert killed == 2

    async def finish() -> dict[str, Any]:
        async with open_clients() as clients:
            worker_settings = settings
            from support.harness import run_worker_until  # noqa: PLC0415

            await run_worker_until(
                worker_settings, clients, all_terminal(env, [mail_id]), timeout_s=30
            )
            (rec,) = await env.records(clients, mail_id)
            return rec

    rec = asyncio.run(finish())
    assert (rec["status"], rec["reason"], rec["attempts"]) == ("failed", "attempts_exhausted", 3)
    assert len(starts(env, did)) == 2
    assert queue_settled(env)


# --- shutdown -----------------------------------------------------------------------------------


def _drained_s(log_path: Path) -> float | None:
    for event in log_events(log_path):
        if event.get("event") in {"drained", "grace_exceeded"}:
            return float(event["drain_s"])
    return None


def _send_all(env: Env, recipients: list[str]) -> list[str]:
    async def send() -> list[str]:
        async with open_clients() as clients:
            return [await env.send(clients, SIMPLE_MAIL, [r]) for r in recipients]

    return asyncio.run(send())


def _records(env: Env, mail_ids: list[str]) -> list[dict[str, Any]]:
    async def get() -> list[dict[str, Any]]:
        async with open_clients() as clients:
            return [r for m in mail_ids for r in await env.records(clients, m)]

    return asyncio.run(get())


def _started(env: Env, count: int) -> list[list[str]]:
    return wait_for(
        lambda: (s := [e for e in env.effects() if e[-1] == "start"]) and len(s) >= count and s,
        40,
        f"{count} processor starts",
    )


def test_sigterm_drains_running_deliveries_and_hands_back_the_rest(
    env: Env,
    php: str,
    tmp_path: Path,
) -> None:
    settings = env.with_settings(concurrency=2, prefetch=2, shutdown_grace_s=60)
    recipients = [f"slow-{n:03d}@orders.example.com" for n in range(11, 15)]
    mail_ids = _send_all(env, recipients)
    log = tmp_path / "worker.log"
    proc = start_worker(settings, log, tmp_path, SLOW_S="3")
    try:
        # two run, two wait for a run slot (prefetched)
        wait_for(lambda: env.queue_counts()["in_flight"] == 4, 30, "4 messages held")
        _started(env, 2)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(45)  # well before the 60 s grace: only the running two are awaited
        took = time.monotonic() - signalled
    finally:
        reap(proc)
    print(f"\nSIGTERM → exit {code} in {took:.1f}s (worker's drain_s={_drained_s(log)})")
    assert code == EXIT_OK
    records = _records(env, mail_ids)
    assert len(records) == 2
    assert all(r["status"] == "succeeded" for r in records)
    # the two prefetched messages went straight back: visible now, not 20 s from now
    wait_for(
        lambda: env.queue_counts() == {"visible": 2, "in_flight": 0},
        5,
        "the prefetched messages visible again",
    )
    assert len([e for e in env.effects() if e[-1] == "start"]) == 2


def test_drain_past_the_grace_kills_processors_and_another_worker_finishes(
    env: Env, php: str, tmp_path: Path, monkeypatch
) -> None:
    settings = env.with_settings(concurrency=2, shutdown_grace_s=2)
    recipients = ["slow-021@orders.example.com", "slow-022@orders.example.com"]
    mail_ids = _send_all(env, recipients)
    log = tmp_path / "worker.log"
    proc = start_worker(settings, log, tmp_path, SLOW_S="30")
    try:
        first = _started(env, 2)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(40)
        took = time.monotonic() - signalled
    finally:
        reap(proc)
    print(
        f"\nSIGTERM past the grace → exit {code} in {took:.1f}s"
        f" (worker's drain_s={_drained_s(log)})"
    )
    assert code == EXIT_DRAIN_TIMEOUT
    for run in first:
        assert not alive(int(run[-2])), "processor outlived the worker"
    records = _records(env, mail_ids)
    assert all((r["status"], r["reason"]) == ("retrying", "worker_shutdown") for r in records)
    assert env.queue_counts()["in_flight"] == 0  # handed back at once

    monkeypatch.setenv("SLOW_S", "1")

    async def finish() -> None:
        from support.harness import run_worker_until  # noqa: PLC0415

        async with open_clients() as clients:
            await run_worker_until(env.settings, clients, all_terminal(env, mail_ids), timeout_s=30)

    asyncio.run(finish())
    for rec in _records(env, mail_ids):
        assert rec["status"] == "succeeded"
        assert [h["reason"] for h in rec["history"]] == ["worker_shutdown", "ok"]


def test_a_second_signal_hurries_the_drain(env: Env, php: str, tmp_path: Path) -> None:
    settings = env.with_settings(concurrency=2, shutdown_grace_s=90)
    mail_ids = _send_all(env, ["slow-031@orders.example.com"])
    log = tmp_path / "worker.log"
    proc = start_worker(settings, log, tmp_path, SLOW_S="40")
    try:
        _started(env, 1)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # still draining: the processor runs on
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)  # the processor would run 40 s, the grace is 90 s
        took = time.monotonic() - signalled
    finally:
        reap(proc)
    print(f"\nSIGTERM, SIGTERM → exit {code} in {took:.1f}s (worker's drain_s={_drained_s(log)})")
    assert code == EXIT_DRAIN_TIMEOUT
    (rec,) = _records(env, mail_ids)
    assert (rec["status"], rec["reason"]) == ("retrying", "worker_shutdown")
    assert any(e.get("event") == "shutdown_hurried" for e in log_events(log))


def test_sigterm_with_nothing_running_exits_at_once(env: Env, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    proc = start_worker(env.settings, log, tmp_path)
    try:
        wait_for(
            lambda: any(e.get("event") == "worker_started" for e in log_events(log)),
            30,
            "worker start",
        )
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    finally:
        reap(proc)
    assert code == EXIT_OK


def test_kill_tree_helper_kills_processors_in_their_own_groups() -> None:
    """The chaos harness's container kill reaches the processor's own process group."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import subprocess,time; subprocess.Popen(['sleep','60'],"
                " process_group=0); time.sleep(60)"
            ),
        ],
        start_new_session=True,
    )
    try:
        kids = wait_for(
            lambda: __import__("chaos.procs").procs.children_of(parent.pid), 10, "child"
        )
        killed = kill_tree(parent.pid)
        parent.wait(10)
        assert set(kids) <= killed
        wait_for(lambda: not any(alive(k) for k in kids), 10, "children dead")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


def test_the_carrier_finishes_the_delivery_after_its_worker_dies(
    env: Env, php: str, tmp_path: Path
) -> None:
    """A duplicate copy is deleted because the copy whose run holds the lease carries the
    delivery. Then that run's worker is SIGKILLed: the carrier comes back after one
    visibility timeout, the next worker claims and completes the delivery, and the DLQ
    stays empty."""
    settings = env.with_settings(visibility_timeout_s=3, lease_s=3, processor_timeout_s=30)
    recipient = "slow-010@orders.example.com"

    async def send() -> str:
        async with open_clients() as clients:
            return await env.send(clients, SIMPLE_MAIL, [recipient])

    mail_id = asyncio.run(send())
    did = delivery_id(mail_id, recipient)
    first_log, second_log = tmp_path / "w1.log", tmp_path / "w2.log"
    first = start_worker(settings, first_log, tmp_path, SLOW_S="60")
    second = None
    try:
        wait_for(lambda: starts(env, did), 30, "the first run")
        env.publish_raw(notification_body(env, mail_id, [recipient]))
        wait_for(
            lambda: any(
                e.get("event") == "duplicate" and e.get("why") == "live_run_elsewhere"
                for e in log_events(first_log)
            ),
            30,
            "the copy deleted as a duplicate of the live run",
        )
        kill_tree(first.pid)
        first.wait(10)
        second = start_worker(settings, second_log, tmp_path, SLOW_S="1")
        wait_for(
            lambda: [r["status"] for r in _records(env, [mail_id])] == ["succeeded"],
            60,
            "the carrier to bring the delivery to its end",
        )
        wait_for(lambda: queue_settled(env), 30, "the queue to settle")
    finally:
        reap(first)
        if second is not None:
            second.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                second.wait(30)
            reap(second)
    assert _dlq_depth(env) == 0
    assert len(starts(env, did)) == 2  # the killed run and the one that completed
