"""Lease fencing and duplicate handling on the in-memory fakes: a stale worker's outcome is
fenced, a duplicate never runs a retry early.

These ran on a moto server with php and real waits for leases and backoffs; on the fakes the
clock is moved instead. The conditional writes they rest on are held to DynamoDB by
tests/contract; crashes, signals and AWS faults stay in tests/e2e/test_reliability.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from mailflow.aws.ledger import Busy
from mailflow.exitcodes import EXIT_OK
from mailflow.routing import delivery_id
from mailflow.worker.loop import Worker
from support.fakes import SIMPLE_MAIL, make_world


def _freeze_heartbeat(worker: Worker) -> None:
    """The worker's heartbeat never renews anything (a stalled event loop, as seen from
    outside): its lease runs out while its processor still runs."""

    async def frozen() -> None:
        await asyncio.Event().wait()

    worker._beat = frozen  # type: ignore[method-assign]


async def _until(predicate, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.005)


def test_a_stale_worker_cannot_overwrite_the_newer_attempt(tmp_path) -> None:
    """A's heartbeat never comes back: its processor finishes, but its outcome write is
    fenced by the lease token; B's attempt is the one recorded."""
    world = make_world(tmp_path, visibility_timeout_s=3, lease_s=3, processor_timeout_s=60)
    world.processor.slow_s = 0.3
    recipient = "slow-003@orders.example.com"

    async def scenario() -> tuple[str, dict, list[dict[str, Any]], int]:
        mail_id = await world.send(SIMPLE_MAIL, [recipient])
        a = world.worker(worker_id="A")
        _freeze_heartbeat(a)
        with structlog.testing.capture_logs() as logs:
            task_a = asyncio.create_task(a.run(handle_signals=False))
            await _until(lambda: world.processor.running == 1)
            a._capacity = lambda: 0  # type: ignore[method-assign]  # B is the taker
            world.clock.advance(4)  # A's lease and its message's visibility run out
            (worker_b,) = await world.run_until(world.settled([mail_id]), worker_ids=("B",))
            a.request_stop()
            await task_a
        (rec,) = await world.records(mail_id)
        return mail_id, rec, list(logs), worker_b.exit_code  # type: ignore[attr-defined]

    mail_id, rec, logs, code_b = asyncio.run(scenario())
    assert code_b == EXIT_OK
    assert any(e["event"] == "lease_lost_at_finish" for e in logs)
    assert rec["status"] == "succeeded"
    assert [h["worker"] for h in rec["history"]] == ["B"]
    did = delivery_id(mail_id, recipient)
    assert [r.delivery_id for r in world.processor.runs] == [did, did]  # the known window


def test_duplicate_does_not_run_a_retry_early(tmp_path) -> None:
    # next try in 2..4 s; a short lease, so the copy that loses to the retry is back soon
    world = make_world(
        tmp_path, retry_base_s=4.0, retry_max_s=4.0, visibility_timeout_s=6, lease_s=6
    )
    recipient = "flaky-005@orders.example.com"
    whys: list[str] = []
    claim = world.ledger.claim

    async def spy_claim(*args: Any, **kwargs: Any):
        result = await claim(*args, **kwargs)
        if isinstance(result, Busy):
            whys.append(result.why)
        return result

    world.ledger.claim = spy_claim  # type: ignore[method-assign]
    state: dict[str, Any] = {}

    async def scenario() -> dict[str, Any]:
        mail_id = await world.send(SIMPLE_MAIL, [recipient])
        (copy,) = world.queue.messages()
        settled = world.settled([mail_id])

        async def done() -> bool:
            (rec,) = await world.records(mail_id) or [{}]
            if rec.get("status") == "retrying" and "due" not in state:
                state["due"] = rec["next_attempt_at"]
                await world.queue.send(copy.body)  # a duplicate, while the retry is not due
            return await settled()

        await world.run_until(done)
        (rec,) = await world.records(mail_id)
        return rec

    rec = asyncio.run(scenario())
    assert "not_due" in whys  # the copy arrived while the retry was not yet due
    assert [h["status"] for h in rec["history"]] == ["retrying", "succeeded"]
    assert rec["history"][1]["started_at"] >= state["due"]
    assert [r.attempt for r in world.processor.runs] == [1, 2]
