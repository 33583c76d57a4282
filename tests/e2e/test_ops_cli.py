"""Operator commands as real processes (`python -m mailflow ...`) against the moto server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mailflow.aws import open_clients
from mailflow.aws.ledger import DeliveryKey, Ledger
from mailflow.config import Route
from mailflow.dev.ses import ses_headers
from support.harness import (
    BACKENDS,
    BEHAVE,
    SIMPLE_MAIL,
    Env,
    all_terminal,
    cli_env,
    mail_to,
    obj,
    run_worker_until,
)

#: "The legacy script was fixed": every store address now runs behave.php in `ok` mode.
FIXED_ROUTE = Route(
    name="fixed",
    match=r"[a-z0-9]+-(?P<store>[0-9]{3})@orders\.example\.com",
    command=f"php {BEHAVE} ok {{store}}",
)


pytestmark = pytest.mark.php


def mailflow(
    env: Env | None,
    *args: str,
    code: int = 0,
    extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    run_env = cli_env(env, **(extra or {})) if env else {**os.environ, **(extra or {})}
    done = subprocess.run(
        [sys.executable, "-m", "mailflow", *args],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr[-2000:])
    return done


def mailflow_json(env: Env | None, *args: str, code: int = 0, **kw: Any) -> Any:
    return json.loads(mailflow(env, *args, "--json", code=code, **kw).stdout)


def deliver(env: Env, *to: str, settings: Any = None, quarantined: str = "") -> list[str]:
    """One mail per recipient, all through one worker run; the `quarantined` recipient's mail
    carries an SES virus verdict FAIL."""

    async def scenario() -> list[str]:
        async with open_clients() as clients:
            ids = [
                await env.send(
                    clients, SIMPLE_MAIL, [t], verdict="FAIL" if t == quarantined else "PASS"
                )
                for t in to
            ]
            await run_worker_until(settings or env.settings, clients, all_terminal(env, ids))
            # The stopped worker's last long poll may still be open on the server; a message
            # sent now (by `retry`) could vanish into it for the visibility timeout.
            await asyncio.sleep(env.settings.wait_time_s + 0.2)
            return ids

    return asyncio.run(scenario())


def records(env: Env, mail_id: str) -> list[dict[str, Any]]:
    async def scenario() -> list[dict[str, Any]]:
        async with open_clients() as clients:
            return await env.records(clients, mail_id)

    return asyncio.run(scenario())


def test_status_counts_states_oldest_unfinished_and_queue_depth(env: Env) -> None:
    env.publish_raw("not a notification")  # the worker dead-letters it
    ok_id, _ = deliver(env, "ok-001@orders.example.com", "exit1-002@orders.example.com")

    async def claim_without_finishing() -> None:
        async with open_clients() as clients:
            ledger = Ledger(clients.dynamodb, env.settings.table)
            await ledger.claim(
                DeliveryKey("m-unfinished", "ok-003@orders.example.com"),
                worker="w",
                token="t",
                lease_s=600,
                meta={"received_at": time.time() - 120},
            )

    asyncio.run(claim_without_finishing())
    status = mailflow_json(env, "status")
    assert status["counts"] == {
        "received": 0,
        "processing": 1,
        "retrying": 0,
        "succeeded": 1,
        "failed": 1,
        "archived": 0,
    }
    assert status["unfinished"] == 1
    assert status["awaiting_archive"] == 2
    oldest = status["oldest_unfinished"]
    assert (oldest["mail_id"], oldest["status"]) == ("m-unfinished", "processing")
    assert 119 <= oldest["age_s"] < 200
    assert status["queue"]["queue_visible"] == 0
    assert status["queue"]["dlq_visible"] == 1

    mailflow(env, "reconcile", "--archive-grace", "0", "--only", "archive")
    status = mailflow_json(env, "status", "--exact")
    assert status["archived_count"] == "exact"
    assert status["counts"]["archived"] == 2
    assert (status["counts"]["succeeded"], status["counts"]["failed"]) == (0, 0)
    table = mailflow(env, "status").stdout
    assert "保管" in table
    assert "m-unfinished" in table
    assert ok_id not in table


def test_list_and_show_say_where_the_object_is(env: Env) -> None:
    (mail_id,) = deliver(env, "ok-004@orders.example.com")
    (shown,) = mailflow_json(env, "show", mail_id)
    assert shown["status"] == "succeeded"
    assert shown["object"]["now"] == "incoming"
    assert shown["object"]["original"]["exists"] is True
    assert shown["object"]["archived"] is None

    mailflow(env, "reconcile", "--archive-grace", "0")
    (shown,) = mailflow_json(env, "show", mail_id)
    assert (shown["status"], shown["outcome"]) == ("archived", "succeeded")
    assert shown["archived_key"] == f"processed/{mail_id}"
    assert shown["object"]["now"] == "archive"
    assert shown["object"]["original"]["exists"] is False
    assert shown["object"]["archived"]["exists"] is True
    assert shown["object"]["archived"]["size_bytes"] > len(SIMPLE_MAIL)
    assert (
        f"s3://{env.settings.bucket}/processed/{mail_id} present"
        in mailflow(env, "show", mail_id).stdout
    )
    listed = mailflow_json(env, "list", "--status", "archived")
    assert [r["mail_id"] for r in listed] == [mail_id]
    assert mailflow_json(env, "list") == []  # nothing needs attention any more
    mailflow(env, "show", "no-such-mail", code=1)


def test_retry_restores_archived_mail_and_delivers_it(env: Env) -> None:
    (mail_id,) = deliver(env, "exit1-005@orders.example.com")
    original = obj(env, f"incoming/{mail_id}")
    mailflow(env, "reconcile", "--archive-grace", "0")
    assert obj(env, f"failed/{mail_id}") == original
    assert obj(env, f"incoming/{mail_id}") is None

    (planned,) = mailflow_json(env, "retry", mail_id, "--dry-run")
    assert planned["result"] == "would_retry"
    assert records(env, mail_id)[0]["status"] == "archived"

    (done,) = mailflow_json(env, "retry", mail_id)
    assert done["result"] == "retried"
    assert done["recipients"] == ["exit1-005@orders.example.com"]
    assert done["restored_from"] == f"s3://{env.settings.bucket}/failed/{mail_id}"
    assert obj(env, f"incoming/{mail_id}") == original  # back, byte for byte
    assert obj(env, f"failed/{mail_id}") is None
    (rec,) = records(env, mail_id)
    assert (rec["status"], rec["attempts"], rec["reason"]) == ("retrying", 0, "operator_retry")
    assert rec["last_reason"] == "exit_1"
    assert "archived_key" not in rec
    assert [h["reason"] for h in rec["history"]] == ["exit_1", "operator_retry"]
    assert env.queue_counts()["visible"] == 1

    async def run_fixed() -> None:
        async with open_clients() as clients:
            await run_worker_until(
                env.with_settings(routes=(FIXED_ROUTE,)), clients, all_terminal(env, [mail_id])
            )

    asyncio.run(run_fixed())
    (rec,) = records(env, mail_id)
    assert (rec["status"], rec["attempts"], rec["route"]) == ("succeeded", 1, "behave")
    report = mailflow_json(env, "reconcile", "--archive-grace", "0")
    assert report["counts"]["archived"]["processed"] == 1
    assert obj(env, f"processed/{mail_id}") == original
    assert obj(env, f"failed/{mail_id}") is None
    mailflow_json(env, "retry", mail_id, code=1)  # succeeded now: nothing to retry


def test_retry_by_status_failed_and_quarantine_needs_force(env: Env) -> None:
    failed_id, quarantined_id, _ = deliver(
        env,
        "exit1-006@orders.example.com",
        "ok-007@orders.example.com",
        "ok-008@orders.example.com",
        quarantined="ok-007@orders.example.com",
    )
    results = mailflow_json(env, "retry", "--status", "failed", "--since", "1h")
    by_id = {r["mail_id"]: r for r in results}
    assert set(by_id) == {failed_id, quarantined_id}
    assert by_id[failed_id]["result"] == "retried"
    assert by_id[failed_id]["restored_from"] is None  # never archived: nothing to restore
    assert by_id[quarantined_id]["result"] == "nothing_to_retry"
    assert "--force" in by_id[quarantined_id]["skipped"][0]["why"]
    assert records(env, failed_id)[0]["status"] == "retrying"
    assert records(env, quarantined_id)[0]["status"] == "failed"

    (forced,) = mailflow_json(env, "retry", quarantined_id, "--force")
    assert forced["result"] == "retried"
    mailflow(env, "retry", code=2)  # neither MAIL_IDs nor --status

    async def run_fixed() -> None:
        async with open_clients() as clients:
            await run_worker_until(
                env.with_settings(routes=(FIXED_ROUTE,)),
                clients,
                all_terminal(env, [failed_id, quarantined_id]),
            )

    asyncio.run(run_fixed())
    assert records(env, failed_id)[0]["status"] == "succeeded"
    assert records(env, quarantined_id)[0]["status"] == "succeeded"  # forced past the verdict


@pytest.mark.parametrize("backend", BACKENDS)
def test_redrive_moves_dlq_messages_back(env: Env, backend: str) -> None:
    async def notification_in_dlq() -> str:
        async with open_clients() as clients:
            mail_id = await env.send(clients, SIMPLE_MAIL, ["ok-009@orders.example.com"])
        (msg,) = env.drain_queue(wait_s=1)  # SNS to SQS is asynchronous on LocalStack
        sqs = env.boto("sqs")
        sqs.send_message(
            QueueUrl=env.queue_url(dlq=True),
            MessageBody=msg["Body"],
            MessageAttributes={"mailflow_reason": {"DataType": "String", "StringValue": "test"}},
        )
        sqs.delete_message(QueueUrl=env.queue_url(), ReceiptHandle=msg["ReceiptHandle"])
        return mail_id

    mail_id = asyncio.run(notification_in_dlq())
    env.boto("sqs").send_message(QueueUrl=env.queue_url(dlq=True), MessageBody="not json")
    dry = mailflow_json(env, "redrive", "--dry-run")
    assert (dry["method"], dry["moved"], dry["dlq_before"]) == ("dry_run", 0, 2)
    assert env.queue_counts()["visible"] == 0

    moved = mailflow_json(env, "redrive")
    assert moved["moved"] == 2
    assert moved["dlq_after"] == 0
    # moto lacks StartMessageMoveTask; SQS (and LocalStack) run SQS's own redrive.
    expected = "receive_send_delete" if backend == "moto" else "move_task"
    assert moved["method"] == expected, moved
    assert env.queue_counts()["visible"] == 2
    assert "moved 0 messages" in mailflow(env, "redrive").stdout

    async def work() -> None:
        async with open_clients() as clients:
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))

    asyncio.run(work())
    assert records(env, mail_id)[0]["status"] == "succeeded"
    (dead,) = env.drain_queue(dlq=True, wait_s=1)  # the garbage went back where it belongs
    assert dead["Body"] == "not json"


def test_parse_shows_summary_and_route_without_aws(env: Env, tmp_path: Path) -> None:
    from datetime import UTC, datetime  # noqa: PLC0415

    path = tmp_path / "order.eml"
    head = ses_headers("m1", "shop@example.com", ["ok-010@orders.example.com"], datetime.now(UTC))
    path.write_bytes(head + SIMPLE_MAIL)
    no_aws = {k: v for k, v in cli_env(env).items() if not k.startswith("AWS_")}
    no_aws["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens: any call would fail
    doc = json.loads(
        subprocess.run(
            [sys.executable, "-m", "mailflow", "parse", str(path), "--json"],
            env=no_aws,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert doc["summary"]["subject"] == "order"
    assert doc["sender"] == "shop@example.com"
    assert doc["recipients_from"] == "received_header"
    (d,) = doc["deliveries"]
    assert (d["recipient"], d["decision"], d["route"], d["key"]) == (
        "ok-010@orders.example.com",
        "deliver",
        "behave",
        "010",
    )
    assert d["argv"] == ["php", str(BEHAVE), "ok", "010"]

    plain = tmp_path / "plain.eml"
    plain.write_bytes(mail_to("info@orders.example.com", "exit1-011@orders.example.com"))
    doc = mailflow_json(env, "parse", str(plain))  # some routable To: exit 0
    assert [d["decision"] for d in doc["deliveries"]] == ["unroutable", "deliver"]
    doc = mailflow_json(env, "parse", str(plain), "--to", "info@orders.example.com", code=1)
    assert doc["recipients_from"] == "--to"
    assert "exit1-011" in mailflow(env, "parse", str(plain)).stdout
    mailflow(env, "parse", str(tmp_path / "missing.eml"), code=2)


def test_show_escapes_terminal_controls_in_processor_output(env: Env) -> None:
    """Processor output is hostile text: a terminal must get escapes, not control sequences
    (clear screen, retitle the window, right-to-left override), from `show`."""
    hostile = "done\x1b[2J\x1b]0;pwned\x07 \x9b31m \u202eevil\r\nnext line\tend"
    env.boto("dynamodb").put_item(
        TableName=env.settings.table,
        Item={
            "mail_id": {"S": "m-hostile-output"},
            "recipient": {"S": "ok-001@orders.example.com"},
            "status": {"S": "failed"},
            "reason": {"S": "exit_1\x1b[8m"},
            "stdout_tail": {"S": hostile},
            "stderr_tail": {"S": hostile},
            "history": {
                "L": [
                    {
                        "M": {
                            "attempt": {"N": "1"},
                            "status": {"S": "failed"},
                            "stderr_tail": {"S": hostile},
                        }
                    }
                ]
            },
        },
    )
    out = mailflow(env, "show", "m-hostile-output").stdout
    for control in ("\x1b", "\x07", "\x9b", "\u202e", "\r"):
        assert control not in out, repr(control)
    assert "done\\x1b[2J\\x1b]0;pwned\\x07 \\x9b31m \\u202eevil\\x0d\nnext line" in out
    assert "exit_1\\x1b[8m" in out
    # the JSON output is for programs: exact, escaped by JSON itself
    (shown,) = mailflow_json(env, "show", "m-hostile-output")
    assert shown["stdout_tail"] == hostile


def test_list_and_show_errors_go_to_stderr(env: Env) -> None:
    done = mailflow(env, "list", "--status", "bogus", code=2)
    assert (done.stdout, "unknown status" in done.stderr) == ("", True)
    done = mailflow(env, "list", "--since", "yesterday", code=2)
    assert (done.stdout, "--since" in done.stderr) == ("", True)
    done = mailflow(env, "show", "no-such-mail", code=1)
    assert (done.stdout, "no deliveries" in done.stderr) == ("", True)
