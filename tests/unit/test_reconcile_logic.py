"""The reconciler's logic on the in-memory fakes: stuck work re-enqueued once, abandoned work
whose object is gone failed, finished mails archived exactly once by racing passes.

The same passes against a moto server over HTTP (S3 copies, listings, the CLI's processes)
stay in tests/e2e/test_reconcile.py; the fakes are held to those services by tests/contract.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from mailflow.aws.ledger import DeliveryKey, Status
from mailflow.dev.ses import ses_headers
from mailflow.ops.reconcile import PassReport, ReconcileOptions, Reconciler
from support.fakes import SIMPLE_MAIL, World, mail_to, make_world

NOW_OPTIONS = ReconcileOptions(grace_s=0, archive_grace_s=0, orphan_age_s=0)


async def reconcile(world: World, options: ReconcileOptions = NOW_OPTIONS) -> PassReport:
    reconciler = Reconciler(
        world.settings,
        None,
        world.queue,
        options,
        ledger=world.ledger,
        store=world.store,
        clock=world.clock,
    )
    return await reconciler.run_pass()


async def stuck(world: World, recipient: str) -> tuple[str, DeliveryKey]:
    """A mail whose SQS message is gone and whose delivery a dead worker claimed."""
    mail_id = await world.send(SIMPLE_MAIL, [recipient])
    world.queue._messages.clear()  # the message is gone
    key = DeliveryKey(mail_id, recipient)
    meta = {
        "bucket": world.settings.bucket,
        "key": f"{world.settings.incoming_prefix}{mail_id}",
        "sender": "shop@example.com",
        "created_at": world.clock(),
    }
    await world.ledger.claim(key, worker="dead-worker", token="t0", lease_s=1, meta=meta)
    return mail_id, key


def test_stuck_processing_and_overdue_retry_are_requeued_once_and_completed(tmp_path) -> None:
    world = make_world(tmp_path)

    async def scenario() -> list[dict]:
        processing_id, _ = await stuck(world, "ok-021@orders.example.com")
        retrying_id, key = await stuck(world, "ok-022@orders.example.com")
        await world.ledger.finish(
            key,
            "t0",
            Status.RETRYING,
            {"next_attempt_at": world.clock() + 1, "reason": "tempfail_exit_75"},
            {"attempt": 1, "status": "retrying"},
        )
        world.clock.advance(2)  # the lease ran out, the retry is due
        reports = await asyncio.gather(reconcile(world), reconcile(world))
        requeued = [a for r in reports for a in r.actions if a.what == "requeued"]
        assert sorted(a.mail_id for a in requeued if a.result == "done") == sorted(
            [processing_id, retrying_id]
        )  # each once, though two passes raced
        assert world.queue.counts()["visible"] == 2
        # The next pass leaves them alone: requeued recently.
        assert (await reconcile(world)).counts()["requeued"] == 0
        await world.run_until(world.settled([processing_id, retrying_id]))
        return [r for m in (processing_id, retrying_id) for r in await world.records(m)]

    records = asyncio.run(scenario())
    for rec in records:
        assert (rec["status"], rec["attempts"], rec["requeue_count"]) == ("succeeded", 2, 1)
    assert len(world.processor.runs) == 2  # the dead worker never ran anything


def test_a_live_lease_is_not_requeued(tmp_path) -> None:
    world = make_world(tmp_path)

    async def scenario() -> PassReport:
        await stuck(world, "ok-023@orders.example.com")
        return await reconcile(world)  # the lease (1 s) has not run out

    assert asyncio.run(scenario()).counts()["requeued"] == 0
    assert world.queue.counts()["visible"] == 0


def test_stuck_delivery_whose_object_is_gone_fails_object_missing(tmp_path) -> None:
    world = make_world(tmp_path)

    async def scenario() -> tuple[PassReport, dict]:
        mail_id, _ = await stuck(world, "ok-031@orders.example.com")
        world.store.objects.clear()
        world.clock.advance(2)
        report = await reconcile(world)
        (rec,) = await world.records(mail_id)
        return report, rec

    report, rec = asyncio.run(scenario())
    (action,) = [a for a in report.actions if a.phase == "requeue"]
    assert (action.what, action.result) == ("object_missing", "done")
    assert (rec["status"], rec["reason"]) == ("archived", "object_missing")
    assert rec["archive_note"] == "object_missing"
    assert rec["outcome"] == "failed"
    assert rec["history"][-1]["reason"] == "object_missing"
    assert world.queue.counts()["visible"] == 0


EXPECTED_PREFIX = {"processed": "processed/", "failed": "failed/", "unroutable": "failed/",
                   "quarantine": "quarantine/"}  # fmt: skip


def test_two_racing_passes_archive_each_mail_exactly_once(tmp_path) -> None:
    world = make_world(tmp_path)
    bucket = world.settings.bucket

    async def scenario() -> tuple[dict[str, str], dict[str, bytes], list[PassReport]]:
        mails = {
            "processed": await world.send(SIMPLE_MAIL, ["ok-001@orders.example.com"]),
            "failed": await world.send(SIMPLE_MAIL, ["exit1-002@orders.example.com"]),
            "unroutable": await world.send(mail_to("info@orders.example.com"),
                                           ["info@orders.example.com"]),
            "quarantine": await world.send(SIMPLE_MAIL, ["ok-003@orders.example.com"],
                                           verdict="FAIL"),
        }  # fmt: skip
        await world.run_until(world.settled(list(mails.values())))
        originals = {
            n: world.store.get_bytes(bucket, f"incoming/{m}") or b"" for n, m in mails.items()
        }
        only_archive = ReconcileOptions(archive_grace_s=0, phases=("archive",))
        reports = await asyncio.gather(
            reconcile(world, only_archive), reconcile(world, only_archive)
        )
        again = await reconcile(world, only_archive)  # nothing left to do
        assert again.counts()["archived"] == {"processed": 0, "failed": 0, "quarantine": 0}
        return mails, originals, list(reports)

    mails, originals, reports = asyncio.run(scenario())
    done = [a for r in reports for a in r.actions if a.result == "done"]
    assert sorted(a.mail_id for a in done) == sorted(mails.values())  # each once, no doubles
    assert not [a for r in reports for a in r.actions if a.result == "error"]
    for name, mail_id in mails.items():
        dest = EXPECTED_PREFIX[name] + mail_id
        assert world.store.get_bytes(bucket, dest) == originals[name], name
        assert world.store.get_bytes(bucket, f"incoming/{mail_id}") is None, name
        assert world.store.objects[(bucket, dest)].metadata["mailflow-mail-id"] == mail_id
        for rec in asyncio.run(world.records(mail_id)):
            assert rec["status"] == "archived", (name, rec["status"])
            assert rec["archived_key"] == dest
            assert "attn" not in rec


def test_not_ready_waits_for_every_recipient_and_the_grace() -> None:
    from mailflow.ops.archive import not_ready  # noqa: PLC0415

    done = {"mail_id": "m", "recipient": "a@x", "status": "succeeded", "finished_at": 100.0}
    assert not_ready([done], now=200, grace_s=60) is None
    assert "grace" in (not_ready([done], now=120, grace_s=60) or "")
    open_ = {"mail_id": "m", "recipient": "b@x", "status": "retrying"}
    assert "still open" in (not_ready([done, open_], now=200, grace_s=0) or "")
    envelope = done | {"recipients": ["a@x", "b@x"]}  # when the worker records the envelope
    assert "no delivery yet for b@x" in (not_ready([envelope], now=200, grace_s=0) or "")
    assert not_ready([done | {"status": "archived"}], now=200, grace_s=0) == "already archived"
    # the envelope is stored once per mail (on the first recipient's delivery); every
    # delivery knows how many there are, so a missing one is seen whichever exist yet
    counted = done | {"recipient_count": 3}
    other = counted | {"recipient": "c@x"}
    assert "1 of 3" in (not_ready([counted, other], now=200, grace_s=0) or "")
    assert not_ready([counted, other, counted | {"recipient": "b@x"}], now=200, grace_s=0) is None


def test_orphan_envelope_and_requeue_body_keep_ses_verdicts() -> None:
    from mailflow.aws.store import Location  # noqa: PLC0415
    from mailflow.mail.notification import parse_body  # noqa: PLC0415
    from mailflow.ops.reconcile import orphan_envelope, requeue_body  # noqa: PLC0415

    head = ses_headers(
        "m1",
        "bounce@shop.example",
        ["ok-001@orders.example.com"],
        datetime.now(UTC),
        verdict="FAIL",
    )
    forged = head + b"X-SES-Virus-Verdict: PASS\r\n"  # a sender's own header comes later
    sender, verdicts = orphan_envelope(forged)
    assert (sender, verdicts) == ("bounce@shop.example", {"spam": "FAIL", "virus": "FAIL"})
    ref = parse_body(
        requeue_body(
            mail_id="m1",
            where=Location("b", "incoming/m1"),
            recipients=["ok-001@orders.example.com"],
            sender=sender,
            received_at_s=1.5,
            reason="reconcile_orphan",
            verdicts=verdicts,
        )
    )
    assert (ref.synthetic, ref.verdicts["virus"], ref.key) == (
        "reconcile_orphan",
        "FAIL",
        "incoming/m1",
    )
