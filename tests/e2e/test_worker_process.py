"""The worker as a real OS process: real signals, two workers racing."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mailflow.aws import open_clients
from mailflow.exitcodes import EXIT_OK
from mailflow.processors.child import Child
from mailflow.routing import delivery_id
from support.harness import SIMPLE_MAIL, Env, all_terminal, start_worker_process

pytestmark = pytest.mark.php


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _send(env: Env, to: str) -> str:
    async def go() -> str:
        async with open_clients() as clients:
            return await env.send(clients, SIMPLE_MAIL, [to])

    return asyncio.run(go())


def _terminal(env: Env, mail_ids: list[str]) -> bool:
    async def go() -> bool:
        async with open_clients() as clients:
            return await all_terminal(env, mail_ids)(clients)

    return asyncio.run(go())


def _records(env: Env, mail_id: str) -> list[dict]:
    async def go() -> list[dict]:
        async with open_clients() as clients:
            return await env.records(clients, mail_id)

    return asyncio.run(go())


def test_sigterm_lets_the_running_processor_finish_then_exits_0(
    env: Env, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("SLOW_S", "3")
    mail_id = _send(env, "slow-010@orders.example.com")
    proc = start_worker_process(env.settings, tmp_path / "worker.log")
    try:
        _wait(lambda: len(env.starts()) == 1, 30, "the processor to start")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        drain_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(f"drain_s={drain_s:.2f}")
    assert code == EXIT_OK, (tmp_path / "worker.log").read_text()
    (rec,) = _records(env, mail_id)
    assert (rec["status"], rec["attempts"]) == ("succeeded", 1)
    assert any("exit=0" in " ".join(e) for e in env.effects())
    assert env.queue_counts() == {"visible": 0, "in_flight": 0}


def test_two_workers_racing_run_a_delivery_once(env: Env, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLOW_S", "1")
    mail_ids = [_send(env, f"slow-{i:03d}@orders.example.com") for i in range(20, 26)]
    # Duplicate every notification: both workers see copies of every mail.
    for msg in env.drain_queue():
        env.publish_raw(msg["Body"])
        env.publish_raw(msg["Body"])
        env.boto("sqs").change_message_visibility(
            QueueUrl=env.queue_url(),
            ReceiptHandle=msg["ReceiptHandle"],
            VisibilityTimeout=0,
        )
    workers = [start_worker_process(env.settings, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        _wait(lambda: _terminal(env, mail_ids), 90, "all deliveries to finish")
        _wait(
            lambda: env.queue_counts() == {"visible": 0, "in_flight": 0}, 60, "the queue to empty"
        )
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            assert w.wait(timeout=30) == EXIT_OK
    for mail_id in mail_ids:
        to = _records(env, mail_id)[0]["recipient"]
        assert len(env.starts(delivery_id(mail_id, to))) == 1


def test_process_waits_without_pidfd_leave_the_default_executor_free(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without pidfd a thread waits for each child's exit. Those threads must not be the
    default executor's: there they starve DNS lookups and every other to_thread call for as
    long as the processors run."""

    def no_pidfd(_pid: int) -> int:
        raise OSError(38, "pidfd_open not available")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    stdin = tmp_path / "stdin"
    stdin.write_bytes(b"")
    sleep = shutil.which("sleep") or "/bin/sleep"

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
        children = [
            await Child.start([sleep, "2"], stdin_path=stdin, env={}, cwd=None, read_limit=1024)
            for _ in range(4)
        ]
        try:
            started = time.monotonic()
            # What getaddrinfo does: one call on the default executor.
            await asyncio.wait_for(loop.run_in_executor(None, time.monotonic), 1.5)
            waited_s = time.monotonic() - started
            await asyncio.wait_for(asyncio.gather(*(c.exited for c in children)), 10)
        finally:
            for child in children:
                child.signal_group(signal.SIGKILL)
            for child in children:
                await asyncio.shield(child.exited)
                child.close()
        assert all(c.returncode() == 0 for c in children)
        return waited_s

    assert asyncio.run(scenario()) < 0.5
