"""`max_in_flight_per_key` across worker processes, and operator holds.

Three `python -m mailflow worker` processes against the moto server (and LocalStack +
dynalite, the second backend), real php-cli processors
that log each run's start and end: the runs of one key never overlap, every mail runs once,
the other keys' mails finish while the flood still runs, a SIGKILLed holder's slot is taken
over once its lease has expired, nothing reaches the DLQ from waiting, and a held key's mail
waits through several visibility timeouts and runs once after `mailflow release`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mailflow.aws import open_clients
from mailflow.aws.keyslots import KeySlots, slot_partition
from mailflow.aws.ledger import TERMINAL, DeliveryKey
from mailflow.config import Route, Settings
from mailflow.exitcodes import EXIT_OK
from support.harness import (
    BACKENDS,
    SIMPLE_MAIL,
    Env,
    all_terminal,
    require_binary,
    settings_env,
    start_worker_process,
)

#: start line: `S store mail_id pid t`; end line: `E store mail_id start end`. Sleeps SLEEP_MS,
#: or a minute while the file `<log>.hang` exists (the SIGKILL test's stuck holder).
PROCESSOR = """<?php
$t0 = microtime(true);
file_put_contents($argv[3], sprintf("S %s %s %d %.6f\\n", $argv[1], getenv('MAILFLOW_MAIL_ID'),
    getmypid(), $t0), FILE_APPEND | LOCK_EX);
stream_get_contents(STDIN);
usleep((file_exists($argv[3] . '.hang') ? 60000 : (int) $argv[2]) * 1000);
file_put_contents($argv[3], sprintf("E %s %s %.6f %.6f\\n", $argv[1], getenv('MAILFLOW_MAIL_ID'),
    $t0, microtime(true)), FILE_APPEND | LOCK_EX);
"""


@pytest.fixture(autouse=True)
def _php() -> None:
    require_binary("php")


def limited(env: Env, tmp_path: Path, sleep_ms: int, **overrides: Any) -> tuple[Settings, Path]:
    script = tmp_path / "store.php"
    script.write_text(PROCESSOR)
    log = tmp_path / "runs.log"
    route = Route(
        name="store",
        match=r"ne-(?P<store>[0-9]{3})@orders\.example\.com",
        command=f"php {script} {{store}} {sleep_ms} {log}",
        key="store",
        max_in_flight_per_key=1,
    )
    return env.with_settings(routes=(route,), **overrides), log


def ends(log: Path) -> list[tuple[str, str, float, float]]:
    """Finished runs: (store, mail_id, start, end)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("E "):
            _, store, mail_id, start, end = line.split()
            out.append((store, mail_id, float(start), float(end)))
    return out


def starts(log: Path) -> list[tuple[str, str, int, float]]:
    """Started runs: (store, mail_id, pid, start)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("S "):
            _, store, mail_id, pid, start = line.split()
            out.append((store, mail_id, int(pid), float(start)))
    return out


def overlaps(runs: list[tuple[str, str, float, float]]) -> list[tuple[str, str]]:
    ordered = sorted(runs, key=lambda r: r[2])
    return [(a[1], b[1]) for a, b in itertools.pairwise(ordered) if b[2] < a[3]]


def send_many(env: Env, recipients: list[str]) -> list[str]:
    async def go() -> list[str]:
        async with open_clients() as clients:
            return [await env.send(clients, SIMPLE_MAIL, [to]) for to in recipients]

    return asyncio.run(go())


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def terminal(env: Env, mail_ids: list[str]) -> bool:
    async def go() -> bool:
        async with open_clients() as clients:
            return await all_terminal(env, mail_ids)(clients)

    return asyncio.run(go())


def records(env: Env, mail_ids: list[str]) -> dict[str, dict[str, Any]]:
    async def go() -> dict[str, dict[str, Any]]:
        async with open_clients() as clients:
            return {m: (await env.records(clients, m) or [{}])[0] for m in mail_ids}

    return asyncio.run(go())


def slot_items(env: Env, store: str) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        async with open_clients() as clients:
            return await KeySlots(clients.dynamodb, env.settings.table).holders("store", store)

    return asyncio.run(go())


def stop_all(workers: list[subprocess.Popen[bytes]]) -> list[int]:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    codes = []
    for w in workers:
        try:
            codes.append(w.wait(timeout=40))
        except subprocess.TimeoutExpired:
            os.killpg(w.pid, signal.SIGKILL)
            codes.append(w.wait())
    return codes


def started(log: Path) -> bool:
    """Has this worker process logged `worker_started`?"""
    return log.exists() and '"worker_started"' in log.read_text()


def worker_stopped(log: Path) -> dict[str, Any]:
    """The worker's final `worker_stopped` line: its counters and AWS requests."""
    for line in reversed(log.read_text().splitlines()):
        if '"worker_stopped"' in line:
            return dict(json.loads(line))
    raise AssertionError(f"no worker_stopped line in {log}")


def mailflow(settings: Settings, *args: str) -> dict[str, Any]:
    """`python -m mailflow ARGS --json` as an operator runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "mailflow", *args, "--json"],
        env=settings_env(settings),
        capture_output=True,
        check=True,
        timeout=60,
    )
    return dict(json.loads(out.stdout))


# --- the slot items themselves ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_slot_is_taken_once_fenced_by_its_token_and_free_again_after_its_lease(
    env: Env,
) -> None:
    now = [1000.0]

    async def go() -> None:
        async with open_clients() as clients:
            slots = KeySlots(clients.dynamodb, env.settings.table, clock=lambda: now[0])
            holder = DeliveryKey("m1", "ne-001@orders.example.com")
            take = {"holder": holder, "worker": "w", "lease_s": 10.0}
            mine = await slots.take("store", "001", 1, token="a" * 32, **take)  # type: ignore[arg-type]
            assert mine is not None
            assert await slots.take("store", "001", 1, token="b" * 32, **take) is None  # type: ignore[arg-type]
            # A retried take whose first write landed is recognised by its token.
            assert await slots.take("store", "001", 1, token="a" * 32, **take) is not None  # type: ignore[arg-type]
            assert await slots.take("store", "002", 1, token="b" * 32, **take) is not None  # type: ignore[arg-type]
            now[0] += 9
            assert await slots.renew(mine, 10.0)
            now[0] += 9  # renewed: still ours
            assert await slots.take("store", "001", 1, token="b" * 32, **take) is None  # type: ignore[arg-type]
            now[0] += 2  # expired: the next taker wins, the old holder's writes are fenced
            theirs = await slots.take("store", "001", 1, token="b" * 32, **take)  # type: ignore[arg-type]
            assert theirs is not None
            assert not await slots.renew(mine, 10.0)
            await slots.release(mine)  # not ours any more: left alone
            assert [i["slot_token"] for i in await slots.holders("store", "001")] == ["b" * 32]
            await slots.release(theirs)
            assert await slots.holders("store", "001") == []
            # A limit of 2 is two slots.
            two = [
                await slots.take("store", "003", 2, token=t * 32, **take)  # type: ignore[arg-type]
                for t in "cde"
            ]
            assert [s is not None for s in two] == [True, True, False]

    asyncio.run(go())


# --- three worker processes -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_workers_never_overlap_one_key_and_the_other_keys_flow(
    env: Env, tmp_path: Path
) -> None:
    settings, log = limited(env, tmp_path, sleep_ms=600, concurrency=2, wait_time_s=1)
    workers = [start_worker_process(settings, tmp_path / f"w{i}.log") for i in range(3)]
    try:
        # Mail arrives while all three poll, one at a time: each worker gets some of the
        # flood (sent before the workers start, one receive may take all of it).
        wait_for(lambda: all(started(tmp_path / f"w{i}.log") for i in range(3)), 60, "workers")
        flood = send_many(env, ["ne-001@orders.example.com"] * 6)
        others = send_many(env, [f"ne-{s:03d}@orders.example.com" for s in range(2, 8)])
        flood += send_many(env, ["ne-001@orders.example.com"] * 6)
        wait_for(lambda: terminal(env, flood + others), 150, "every mail to finish")
    finally:
        codes = stop_all(workers)
    assert codes == [EXIT_OK] * 3, [(tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(3)]
    runs = ends(log)
    flood_runs = [r for r in runs if r[0] == "001"]
    other_runs = [r for r in runs if r[0] != "001"]
    stopped = [worker_stopped(tmp_path / f"w{i}.log") for i in range(3)]
    updates = sum(s["aws_requests"].get("ddb.update_item", 0) for s in stopped)
    polls = sum(s["key_slot_busy"] for s in stopped)
    print(
        f"\n{len(runs)} deliveries (all of a limited route): {updates / len(runs):.2f}"
        f" DynamoDB UpdateItem each (claim + outcome + slot take + slot release + renewals"
        f" + slot polls); slot polls per delivery {polls / len(runs):.2f}"
    )
    assert overlaps(flood_runs) == []
    assert Counter(r[1] for r in runs) == Counter(dict.fromkeys(flood + others, 1))
    recs = records(env, flood + others)
    assert {(r["status"], r["attempts"]) for r in recs.values()} == {("succeeded", 1)}
    # Several workers ran store 001 (else this proves nothing about processes).
    assert len({recs[m]["history"][0]["worker"] for m in flood}) >= 2
    # The other stores were not held up behind the flood.
    last_flood_start = max(r[2] for r in flood_runs)
    assert all(r[3] < last_flood_start for r in other_runs), (other_runs, last_flood_start)
    assert env.drain_queue(dlq=True) == []
    assert slot_items(env, "001") == []  # released after each outcome


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sigkilled_holders_slot_is_taken_over_after_its_lease(env: Env, tmp_path: Path) -> None:
    lease_s = 3.0
    settings, log = limited(
        env, tmp_path, sleep_ms=200, lease_s=lease_s, visibility_timeout_s=3, wait_time_s=1
    )
    hang = Path(f"{log}.hang")
    hang.touch()
    (first,) = send_many(env, ["ne-001@orders.example.com"])
    holder = start_worker_process(settings, tmp_path / "holder.log")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: len(starts(log)) == 1, 60, "the first run to start")
        (pid,) = [s[2] for s in starts(log)]
        os.killpg(holder.pid, signal.SIGKILL)  # the worker, and (below) its processor
        os.kill(pid, signal.SIGKILL)
        holder.wait()
        killed_at = time.time()
        hang.unlink()
        (slot,) = slot_items(env, "001")
        (second,) = send_many(env, ["ne-001@orders.example.com"])
        workers = [start_worker_process(settings, tmp_path / f"w{i}.log") for i in range(2)]
        wait_for(lambda: terminal(env, [first, second]), 90, "both mails to finish")
    finally:
        stop_all([holder, *workers])
    runs = ends(log)
    assert overlaps(runs) == []
    # The killed run never ended; the key's next run (either mail) started only once the
    # dead holder's slot had expired, and soon after.
    takeover = min(r[2] for r in runs)
    assert takeover >= float(slot["slot_until"]) - 0.05, (runs, slot)
    assert takeover < killed_at + lease_s + 10
    recs = records(env, [first, second])
    assert (recs[first]["status"], recs[first]["attempts"]) == ("succeeded", 2)
    assert (recs[second]["status"], recs[second]["attempts"]) == ("succeeded", 1)
    assert env.drain_queue(dlq=True) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_held_key_waits_through_visibility_timeouts_and_runs_once_after_release(
    env: Env, tmp_path: Path
) -> None:
    visibility_s = 2
    settings, log = limited(
        env, tmp_path, sleep_ms=100, lease_s=2.0, visibility_timeout_s=visibility_s, wait_time_s=1
    )
    held = mailflow(settings, "hold", "001", "--route", "store", "--note", "stock count")
    assert held["hold"]["key"] == "001"
    workers = [start_worker_process(settings, tmp_path / f"w{i}.log") for i in range(3)]
    try:
        waiting = send_many(env, ["ne-001@orders.example.com"] * 3)
        (other,) = send_many(env, ["ne-002@orders.example.com"])
        wait_for(lambda: terminal(env, [other]), 60, "the other store's mail")
        time.sleep(4 * visibility_s)  # several visibility timeouts
        assert [r for r in ends(log) if r[0] == "001"] == []
        assert env.queue_counts() == {"visible": 0, "in_flight": 0}  # parked in the table
        status = mailflow(settings, "status")["holds"]
        assert [(h["route"], h["key"], h["note"]) for h in status["holds"]] == [
            ("store", "001", "stock count")
        ]
        (key,) = status["held_keys"]
        assert (key["route"], key["key"], key["deliveries"]) == ("store", "001", 3)
        assert key["held_since"] <= time.time()
        released = mailflow(settings, "release", "001", "--route", "store")
        assert sorted(m["mail_id"] for m in released["requeued"]) == sorted(waiting)
        wait_for(lambda: terminal(env, waiting), 60, "the held mail to run")
    finally:
        codes = stop_all(workers)
    assert codes == [EXIT_OK] * 3
    assert Counter(r[1] for r in ends(log) if r[0] == "001") == Counter(dict.fromkeys(waiting, 1))
    recs = records(env, waiting)
    assert {(r["status"], r["attempts"]) for r in recs.values()} == {("succeeded", 1)}
    assert all(r["status"] in TERMINAL and "hold" not in r for r in recs.values())
    assert env.drain_queue(dlq=True) == []
    assert mailflow(settings, "status")["holds"]["holds"] == []


def test_hold_refuses_an_unknown_route(env: Env) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mailflow", "hold", "001", "--route", "nope"],
        env=settings_env(env.settings),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode != 0
    assert b"no route named 'nope'" in proc.stderr
    assert slot_partition("store", "001") == "keyslot#store#001"
