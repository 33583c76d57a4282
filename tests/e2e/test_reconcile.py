"""The reconciler against the moto server: archive moves, orphans, races, the CLI.

The re-enqueue logic (stuck and overdue work, objects gone) runs on the in-memory fakes in
tests/unit/test_reconcile_logic.py, with the archive race once more."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from mailflow.aws import AwsClients, open_clients
from mailflow.aws.ledger import Ledger, Status
from mailflow.aws.queue import Queue
from mailflow.dev.ses import new_message_id, ses_headers
from mailflow.ops.reconcile import PassReport, ReconcileOptions, Reconciler
from support.harness import SIMPLE_MAIL, Env, all_terminal, cli_env, mail_to, obj, run_worker_until

NOW_OPTIONS = ReconcileOptions(grace_s=0, archive_grace_s=0, orphan_age_s=0)


pytestmark = pytest.mark.php


async def reconcile(
    env: Env, clients: AwsClients, options: ReconcileOptions = NOW_OPTIONS
) -> PassReport:
    queue = await Queue.resolve(clients.sqs, env.settings.queue, env.settings.dlq)
    return await Reconciler(env.settings, clients, queue, options).run_pass()


def put_orphan(env: Env, raw: bytes, recipients: list[str]) -> str:
    """What SES stores when its notification is then lost: the object, and nothing else."""
    mail_id = new_message_id()
    stored = ses_headers(mail_id, "shop@example.com", recipients, datetime.now(UTC)) + raw
    env.boto("s3").put_object(
        Bucket=env.settings.bucket,
        Key=f"{env.settings.incoming_prefix}{mail_id}",
        Body=stored,
    )
    return mail_id


async def finished_mails(env: Env, clients: AwsClients) -> dict[str, str]:
    """ok → succeeded, exit1 → failed, info@ → unroutable, virus FAIL → quarantined."""
    mails = {
        "processed": await env.send(clients, SIMPLE_MAIL, ["ok-001@orders.example.com"]),
        "failed": await env.send(clients, SIMPLE_MAIL, ["exit1-002@orders.example.com"]),
        "unroutable": await env.send(clients, mail_to("info@orders.example.com"),
                                     ["info@orders.example.com"]),
        "quarantine": await env.send(clients, SIMPLE_MAIL, ["ok-003@orders.example.com"],
                                     verdict="FAIL"),
    }  # fmt: skip
    await run_worker_until(env.settings, clients, all_terminal(env, list(mails.values())))
    return mails


EXPECTED_PREFIX = {"processed": "processed/", "failed": "failed/", "unroutable": "failed/",
                   "quarantine": "quarantine/"}  # fmt: skip


def check_archived_once(env: Env, mails: dict[str, str], originals: dict[str, bytes]) -> None:
    async def scenario() -> None:
        async with open_clients() as clients:
            ledger = Ledger(clients.dynamodb, env.settings.table)
            for name, mail_id in mails.items():
                dest = EXPECTED_PREFIX[name] + mail_id
                assert obj(env, dest) == originals[name], name  # byte-identical
                assert obj(env, f"incoming/{mail_id}") is None, name
                head = env.boto("s3").head_object(Bucket=env.settings.bucket, Key=dest)
                assert head["Metadata"]["mailflow-mail-id"] == mail_id
                expected = {"processed": "succeeded", "quarantine": "quarantined"}.get(
                    name, "failed"
                )
                assert head["Metadata"]["mailflow-outcome"] == expected
                for rec in await ledger.get_mail(mail_id):
                    assert rec["status"] == "archived", (name, rec["status"])
                    assert rec["archived_key"] == dest
                    assert rec["archived_bucket"] == env.settings.bucket
                    assert rec["outcome"] == ("succeeded" if name == "processed" else "failed")
                    assert "attn" not in rec
            for status in (Status.SUCCEEDED, Status.FAILED):
                assert await ledger.needing_attention(status) == []

    asyncio.run(scenario())


def test_two_racing_passes_archive_each_mail_exactly_once(env: Env) -> None:
    async def scenario() -> tuple[dict[str, str], dict[str, bytes], list[PassReport]]:
        async with open_clients() as clients:
            mails = await finished_mails(env, clients)
            originals = {n: obj(env, f"incoming/{m}") or b"" for n, m in mails.items()}
            only_archive = ReconcileOptions(archive_grace_s=0, phases=("archive",))
            reports = await asyncio.gather(
                reconcile(env, clients, only_archive), reconcile(env, clients, only_archive)
            )
            again = await reconcile(env, clients, only_archive)  # nothing left to do
            assert again.counts()["archived"] == {"processed": 0, "failed": 0, "quarantine": 0}
            return mails, originals, list(reports)

    mails, originals, reports = asyncio.run(scenario())
    done = [a for r in reports for a in r.actions if a.result == "done"]
    assert sorted(a.mail_id for a in done) == sorted(mails.values())  # each once, no doubles
    assert not [a for r in reports for a in r.actions if a.result == "error"]
    kinds = {a.mail_id: a.what for a in done}
    assert kinds[mails["processed"]] == "processed"
    assert kinds[mails["unroutable"]] == "failed"
    assert kinds[mails["quarantine"]] == "quarantine"
    check_archived_once(env, mails, originals)


def test_two_reconcile_processes_at_once_dry_run_first(env: Env) -> None:
    async def scenario() -> dict[str, str]:
        async with open_clients() as clients:
            return await finished_mails(env, clients)

    mails = asyncio.run(scenario())
    originals = {n: obj(env, f"incoming/{m}") or b"" for n, m in mails.items()}
    base = [sys.executable, "-m", "mailflow", "reconcile", "--json", "--archive-grace", "0"]
    dry = subprocess.run(
        [*base, "--dry-run"],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True
    assert sum(planned["counts"]["archived"].values()) == len(mails)
    assert {a["result"] for a in planned["actions"]} == {"would"}
    assert all(obj(env, f"incoming/{m}") is not None for m in mails.values())  # nothing moved

    procs = [
        subprocess.Popen(
            base, env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    docs = [json.loads(out) for out, _ in outs]
    archived = [
        a["mail_id"]
        for d in docs
        for a in d["actions"]
        if a["phase"] == "archive" and a["result"] == "done"
    ]
    assert sorted(archived) == sorted(mails.values())
    assert sum(sum(d["counts"]["archived"].values()) for d in docs) == len(mails)
    check_archived_once(env, mails, originals)


def test_orphan_objects_are_recovered_and_delivered(env: Env) -> None:
    single = put_orphan(env, SIMPLE_MAIL, ["ok-011@orders.example.com"])
    # Two envelope recipients: SES writes no `for` clause; To/Cc are only a guess (a Bcc
    # recipient is missing, a listed one may not be ours): never delivered, an operator's.
    double = put_orphan(
        env,
        mail_to("ok-012@orders.example.com", "someone@example.org", "ok-013@orders.example.com"),
        ["ok-012@orders.example.com", "ok-013@orders.example.com"],
    )
    nobody = put_orphan(env, mail_to("someone@example.org"), ["a@x.example", "b@x.example"])

    async def scenario() -> None:
        async with open_clients() as clients:
            report = await reconcile(env, clients)
            recovered = {a.mail_id: a for a in report.actions if a.phase == "orphans"}
            assert recovered[single].what == "recovered"
            assert recovered[single].detail == "from received_header"
            assert recovered[double].what == "needs_operator"
            assert "ok-012@orders.example.com, ok-013@orders.example.com" in (
                recovered[double].detail
            )
            assert report.counts()["orphans_for_operator"] == 1
            assert recovered[nobody].what == "no_recipient"
            # The one without a recipient is failed and archived to failed/ in the same pass.
            (unknown,) = await env.records(clients, nobody)
            assert (unknown["status"], unknown["reason"]) == ("archived", "orphan_no_recipient")
            assert unknown["archived_key"] == f"failed/{nobody}"
            # The guessed one: failed, filed for an operator, not archived, nothing queued.
            (guessed,) = await env.records(clients, double)
            assert (guessed["status"], guessed["attn"]) == ("failed", "orphan")
            assert guessed["reason"] == "orphan_recipients_unverified"
            assert guessed["candidates"] == [
                "ok-012@orders.example.com",
                "ok-013@orders.example.com",
            ]
            for rec in await env.records(clients, single):
                assert rec["status"] == "received"
                assert rec["sender"] == "shop@example.com"
            assert (await reconcile(env, clients)).counts()["orphans_recovered"] == 0
            await run_worker_until(env.settings, clients, all_terminal(env, [single]))
            for rec in await env.records(clients, single):
                assert (rec["status"], rec["attempts"]) == ("succeeded", 1)
            assert (await env.records(clients, double))[0]["status"] == "failed"

    asyncio.run(scenario())
    assert len(env.starts()) == 1  # only the envelope recipient ran
    assert obj(env, f"incoming/{double}") is not None  # kept where the operator finds it
    status = json.loads(_mailflow(env, "status", "--json"))
    assert status["orphans_for_operator"] == 1
    listed = json.loads(_mailflow(env, "list", "--status", "orphan", "--json"))
    assert [(r["mail_id"], r["reason"]) for r in listed] == [
        (double, "orphan_recipients_unverified")
    ]


def _mailflow(env: Env, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mailflow", *args],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_no_orphan_while_the_queue_may_still_hold_its_notification(env: Env) -> None:
    """An object without a record is an orphan only if its notification cannot be queued
    any more: stored (orphan_age_s) before a moment the queue was seen empty."""

    async def scenario() -> None:
        async with open_clients() as clients:
            # A backlog: a notification the worker has not received yet.
            queued = await env.send(clients, SIMPLE_MAIL, ["ok-021@orders.example.com"])
            lost = put_orphan(env, SIMPLE_MAIL, ["ok-022@orders.example.com"])
            report = await reconcile(env, clients)
            assert report.counts()["orphans_recovered"] == 0, report.actions
            (skipped,) = [a for a in report.actions if a.phase == "orphans"]
            assert "never seen empty" in skipped.detail
            assert await env.records(clients, queued) == []  # not "recovered" from its object
            assert await env.records(clients, lost) == []
            await run_worker_until(env.settings, clients, all_terminal(env, [queued]))
            await asyncio.sleep(env.settings.wait_time_s + 0.2)  # the last long poll ends
            # The queue is empty now: what was stored before is an orphan.
            report = await reconcile(env, clients)
            assert [a.mail_id for a in report.actions if a.what == "recovered"] == [lost]
            # A backlog again: an object stored after the queue was last seen empty waits.
            time.sleep(1.1)  # S3's LastModified has whole seconds
            await env.send(clients, SIMPLE_MAIL, ["ok-023@orders.example.com"])
            later = put_orphan(env, SIMPLE_MAIL, ["ok-024@orders.example.com"])
            report = await reconcile(env, clients)
            assert report.counts()["orphans_recovered"] == 0, report.actions
            assert await env.records(clients, later) == []

    asyncio.run(scenario())


def test_the_orphan_scan_goes_on_where_the_last_pass_stopped(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pass lists a bounded stretch of keys (here 2); the next pass goes on from there
    instead of listing the same first keys again, and starts over at the end."""
    import mailflow.ops.reconcile as reconcile_module  # noqa: PLC0415

    monkeypatch.setattr(reconcile_module, "MAX_LIST_PAGES", 1)
    monkeypatch.setattr(reconcile_module, "LIST_PAGE_KEYS", 2)
    orphans = sorted(
        put_orphan(env, SIMPLE_MAIL, [f"ok-03{i}@orders.example.com"]) for i in range(5)
    )

    async def scenario() -> list[list[str]]:
        async with open_clients() as clients:
            found = []
            for _ in range(3):
                report = await reconcile(env, clients)
                found.append(sorted(a.mail_id for a in report.actions if a.what == "recovered"))
            state = await Ledger(clients.dynamodb, env.settings.table).reconcile_state()
            assert state["cursor"] == ""  # the third pass reached the end: start over
            return found

    assert asyncio.run(scenario()) == [orphans[0:2], orphans[2:4], orphans[4:5]]


def test_archive_bucket_and_per_pass_limit(env: Env) -> None:
    settings = env.with_settings(archive_bucket=f"{env.settings.bucket}-archive")
    env.boto("s3").create_bucket(Bucket=settings.archive_bucket)

    async def scenario() -> None:
        async with open_clients() as clients:
            ids = [await env.send(clients, SIMPLE_MAIL, [f"ok-04{i}@orders.example.com"])
                   for i in range(3)]  # fmt: skip
            await run_worker_until(env.settings, clients, all_terminal(env, ids))
            queue = await Queue.resolve(clients.sqs, env.settings.queue, env.settings.dlq)
            options = ReconcileOptions(limit=2, archive_grace_s=0, phases=("archive",))
            first = await Reconciler(settings, clients, queue, options).run_pass()
            second = await Reconciler(settings, clients, queue, options).run_pass()
            assert (first.count("processed"), second.count("processed")) == (2, 1)
            for mail_id in ids:
                (rec,) = await env.records(clients, mail_id)
                assert rec["archived_bucket"] == settings.archive_bucket
                got = env.boto("s3").get_object(
                    Bucket=settings.archive_bucket, Key=f"processed/{mail_id}"
                )
                assert got["Body"].read().endswith(SIMPLE_MAIL)
                assert obj(env, f"incoming/{mail_id}") is None

    asyncio.run(scenario())


# --- pure parts -------------------------------------------------------------------------------
