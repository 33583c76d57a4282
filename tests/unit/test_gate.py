"""The worker's per-key gate: the limit, SES receipt order among waiters, cancellation."""

from __future__ import annotations

import asyncio

from mailflow.worker.gate import KeyGate


async def _run(gate: KeyGate, started: list[str], name: str, order: float | None) -> None:
    async with gate.slot("store", "001", 1, order=order):
        started.append(name)
        await asyncio.sleep(0.01)


def test_waiters_of_one_key_start_in_ses_receipt_order_not_arrival_order() -> None:
    async def go() -> list[str]:
        gate, started = KeyGate(), []
        first = asyncio.create_task(_run(gate, started, "first", 5.0))
        await asyncio.sleep(0)  # holds the slot
        # Arrive in the wrong order: the cancellation (t=30) before the order (t=20).
        tasks = [
            asyncio.create_task(_run(gate, started, name, t))
            for name, t in (("cancel", 30.0), ("untimed", None), ("order", 20.0), ("tie", 30.0))
        ]
        await asyncio.sleep(0)
        assert gate.busy("store", "001", 1)
        await asyncio.gather(first, *tasks)
        assert not gate.busy("store", "001", 1)
        assert gate.waiting("store", "001") == 0  # idle keys are forgotten
        return started

    assert asyncio.run(go()) == ["first", "order", "cancel", "tie", "untimed"]


def test_a_cancelled_waiter_neither_runs_nor_loses_the_slot() -> None:
    async def go() -> list[str]:
        gate, started = KeyGate(), []
        first = asyncio.create_task(_run(gate, started, "first", 1.0))
        await asyncio.sleep(0)
        gone = asyncio.create_task(_run(gate, started, "gone", 2.0))
        later = asyncio.create_task(_run(gate, started, "later", 3.0))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(first, later)
        assert gone.cancelled()
        return started

    assert asyncio.run(go()) == ["first", "later"]


def test_a_limit_of_two_runs_two_at_once_and_no_key_passes_straight_through() -> None:
    async def go() -> int:
        gate, running, peak = KeyGate(), 0, 0

        async def one(key: str | None) -> None:
            nonlocal running, peak
            async with gate.slot("store", key, 2 if key else None, order=1.0):
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.01)
                running -= 1

        await asyncio.gather(*(one("001") for _ in range(6)))
        limited = peak
        peak = 0
        await asyncio.gather(*(one(None) for _ in range(6)))
        assert peak == 6
        return limited

    assert asyncio.run(go()) == 2
