"""`max_in_flight_per_key` across several workers and operator holds, on the in-memory fakes.

The same properties run with three worker processes on real backends in
tests/e2e/test_keyslots.py; here they run in milliseconds with many more mails.
"""

from __future__ import annotations

import asyncio

from mailflow.testing import behave_route
from support.fakes import SIMPLE_MAIL, make_world


def test_three_workers_share_one_limit_and_other_stores_flow(tmp_path) -> None:
    world = make_world(tmp_path, concurrency=2, routes=(behave_route(max_in_flight_per_key=1),))
    world.processor.slow_s = 0.02

    async def scenario() -> tuple[list[str], list[str], list]:
        flood = [await world.send(SIMPLE_MAIL, ["slow-001@orders.example.com"]) for _ in range(30)]
        others = [
            await world.send(SIMPLE_MAIL, [f"ok-{s:03d}@orders.example.com"]) for s in range(2, 7)
        ]
        workers = await world.run_until(world.settled(flood + others), workers=3, timeout_s=30)
        return flood, others, workers

    flood, others, workers = asyncio.run(scenario())
    runs = world.processor.runs
    assert world.processor.overlaps == 0  # without the table's slots: one run per worker
    ran = sorted(r.env["MAILFLOW_MAIL_ID"] for r in runs)
    assert ran == sorted(flood + others)  # each ran once
    order = [r.store for r in runs]
    assert max(order.index(f"{s:03d}") for s in range(2, 7)) < len(order) - 10
    assert sum(w.stats["key_slot_busy"] for w in workers) > 0  # the workers did contend
    assert world.dlq.messages() == []
    assert all(s.token is None or s.until_s < world.clock() for s in _slots(world))


def test_a_held_store_goes_to_the_hold_queue_and_others_run(tmp_path) -> None:
    world = make_world(tmp_path, routes=(behave_route(max_in_flight_per_key=1),))

    async def scenario() -> tuple[list[str], str]:
        await world.backend.keyslots.put_hold("behave", "001", by="test")
        held = [await world.send(SIMPLE_MAIL, ["ok-001@orders.example.com"]) for _ in range(3)]
        other = await world.send(SIMPLE_MAIL, ["ok-002@orders.example.com"])
        (worker,) = await world.run_until(world.settled([other]), timeout_s=10)
        assert worker.stats["held"] == 3
        return held, other

    held, other = asyncio.run(scenario())
    assert [r.env["MAILFLOW_MAIL_ID"] for r in world.processor.runs] == [other]
    assert world.queue.counts() == {"visible": 0, "in_flight": 0}  # out of SQS, in the table
    records = [asyncio.run(world.records(m))[0] for m in held]
    assert {(r["status"], r["attn"], r["hold"]) for r in records} == {
        ("received", "held", "behave#001")
    }
    assert world.dlq.messages() == []


def _slots(world) -> list:
    return list(getattr(world.backend.keyslots, "slots", {}).values())


def test_a_mail_waiting_for_its_store_when_the_hold_comes_does_not_run(tmp_path) -> None:
    """It passed the hold check on arrival, then waited behind its store's running mail; the
    hold placed meanwhile still stops it (checked again once it has its slots)."""
    world = make_world(tmp_path, heartbeat_s=0.02, routes=(behave_route(max_in_flight_per_key=1),))
    world.processor.slow_s = 0.3
    placed: list[bool] = []

    async def scenario() -> tuple[str, str]:
        running = await world.send(SIMPLE_MAIL, ["slow-001@orders.example.com"])
        waiting = await world.send(SIMPLE_MAIL, ["ok-001@orders.example.com"])

        async def hold_then_settled() -> bool:
            if world.processor.running and not placed:
                await world.backend.keyslots.put_hold("behave", "001", by="test")
                placed.append(True)
            records = await world.records(waiting)
            return bool(placed) and bool(records) and records[0].get("attn") == "held"

        await world.run_until(hold_then_settled, timeout_s=10)
        return running, waiting

    running, waiting = asyncio.run(scenario())
    assert [r.mode for r in world.processor.runs] == ["slow"]
    (record,) = asyncio.run(world.records(waiting))
    assert (record["status"], record["attn"]) == ("received", "held")
    assert asyncio.run(world.records(running))[0]["status"] == "succeeded"


def test_a_route_without_a_limit_makes_no_key_slot_or_hold_call_per_delivery(tmp_path) -> None:
    world = make_world(tmp_path, routes=(behave_route(),))  # a key, but no limit
    calls: list[str] = []
    slots = world.backend.keyslots
    for name in ("take", "renew", "release", "release_all", "hold_exists"):
        original = getattr(slots, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(slots, name, counted)

    async def scenario() -> None:
        mail_ids = [await world.send(SIMPLE_MAIL, ["ok-001@orders.example.com"]) for _ in range(10)]
        await world.run_until(world.settled(mail_ids), timeout_s=10)

    asyncio.run(scenario())
    assert len(world.processor.runs) == 10
    assert calls == []  # only the holds' refresh, once per heartbeat per worker, not per mail
