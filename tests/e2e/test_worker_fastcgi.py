"""The worker on the `fastcgi` transport: moto server + a real php-fpm (sidecar/run-local)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from mailflow.aws import open_clients
from mailflow.config import Route
from mailflow.worker.loop import Worker
from support.harness import (
    BEHAVE,
    SIMPLE_MAIL,
    Env,
    all_terminal,
    require_binary,
    run_worker_until,
    sample,
)
from support.php_fpm import running_php_fpm

pytestmark = [pytest.mark.php, pytest.mark.phpfpm]


@pytest.fixture
def fpm(tmp_path: Path):
    php = require_binary("php")
    with running_php_fpm(
        tmp_path / "fpm",
        allow=[["php", str(BEHAVE)], [php, str(BEHAVE)]],
        extra_env={"LEDGER_DIR": str(tmp_path / "ledger")},
    ) as running:
        yield running


def test_worker_delivers_through_php_fpm(env: Env, fpm, tmp_path: Path) -> None:
    settings = env.with_settings(
        processor_transport="fastcgi",
        fastcgi_address=fpm.address,
        runner_script=fpm.runner_script,
    )
    raw = sample("order-002-shiftjis.eml")

    async def scenario() -> dict[str, list[dict]]:
        async with open_clients() as clients:
            ids = {
                "ok": await env.send(clients, raw, ["ok-101@orders.example.com"]),
                "flaky": await env.send(clients, SIMPLE_MAIL, ["flaky-102@orders.example.com"]),
                "print5": await env.send(clients, SIMPLE_MAIL, ["print5-103@orders.example.com"]),
            }
            await run_worker_until(
                settings, clients, all_terminal(env, list(ids.values())), timeout_s=60
            )
            return {k: await env.records(clients, v) for k, v in ids.items()}

    recs = asyncio.run(scenario())
    assert recs["ok"][0]["status"] == "succeeded"
    assert recs["flaky"][0]["status"] == "succeeded"
    assert recs["flaky"][0]["attempts"] == 2
    assert (recs["print5"][0]["status"], recs["print5"][0]["reason"]) == (
        "failed",
        "enhanced_status_5.1.1",
    )
    # The runner ran behave.php with the stored bytes on stdin, exactly.
    stored = (
        env.boto("s3")
        .get_object(Bucket=recs["ok"][0]["bucket"], Key=recs["ok"][0]["key"])["Body"]
        .read()
    )
    copies = list((env.ledger_dir / "stdin").glob("*.1"))
    assert stored in [p.read_bytes() for p in copies]


def test_command_outside_the_allow_list_is_refused_and_recorded(env: Env, fpm) -> None:
    route = Route(
        name="other",
        match=r"x-(?P<store>[0-9]{3})@orders\.example\.com",
        command=f"{shutil.which('php') or 'php'} -r {{store}}",
    )
    settings = env.with_settings(
        processor_transport="fastcgi",
        fastcgi_address=fpm.address,
        runner_script=fpm.runner_script,
        routes=(route,),
    )

    async def scenario() -> dict:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["x-104@orders.example.com"])
            await run_worker_until(settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            return rec

    rec = asyncio.run(scenario())
    assert (rec["status"], rec["reason"], rec["attempts"]) == ("failed", "refused", 1)
    assert "allow" in rec["stderr_tail"]
    assert json.dumps(rec["argv"])  # the refused argv is on the record for the operator


def _alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False


def test_forced_shutdown_never_overlaps_the_retry_with_the_killed_run(
    env: Env, fpm, tmp_path: Path
) -> None:
    """The runner is still killing the first run (SIGTERM ignored, kill grace) when the worker
    gives up: the retry must not start before that run is gone."""
    kill_grace_s = 3.0
    settings = env.with_settings(
        processor_transport="fastcgi",
        fastcgi_address=fpm.address,
        runner_script=fpm.runner_script,
        kill_grace_s=kill_grace_s,
        processor_timeout_s=60,
        shutdown_grace_s=0.2,
    )
    overlaps: list[str] = []

    async def scenario() -> None:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["stubborn-201@orders.example.com"])
            worker = Worker(settings, clients)
            task = asyncio.create_task(worker.run())
            while not env.starts():
                assert not task.done()
                await asyncio.sleep(0.05)
            first_pid = int(env.starts()[0][5])
            worker.request_stop()
            await task
            (rec,) = await env.records(clients, mail_id)
            assert (rec["status"], rec["reason"]) == ("retrying", "worker_shutdown")
            assert rec["next_attempt_at"] >= rec["finished_at"] + kill_grace_s

            async def second_run_started(_c) -> bool:
                if len(env.starts()) > 1 and _alive(first_pid):
                    overlaps.append(f"attempt 2 started while pid {first_pid} still ran")
                return await all_terminal(env, [mail_id])(_c)

            await run_worker_until(settings, clients, second_run_started, timeout_s=60, poll_s=0.02)

    asyncio.run(scenario())
    assert overlaps == []
    assert [e[1] for e in env.starts()] == ["1", "2"]
