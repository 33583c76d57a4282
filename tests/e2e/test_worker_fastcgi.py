"""The worker on the `fastcgi` transport: moto server + a real php-fpm (sidecar/run-local)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from mailflow.aws import open_clients
from mailflow.config import Route
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
