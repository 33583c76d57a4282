"""The ledger's conditional writes, the same on every backend: claim, renew and finish fenced by
the lease token; the item as it was (ALL_OLD) when a condition fails; the reconciler's guarded
writes; the attention index, its order and its pages."""

from __future__ import annotations

import pytest

from mailflow.aws.ledger import Busy, Claimed, DeliveryKey, Status, history_entry
from mailflow.errors import LeaseLostError

KEY = DeliveryKey("mail-1", "ok-001@orders.example.com")
META = {"bucket": "b", "key": "incoming/mail-1", "sender": "shop@example.com"}
LEASE_S = 30.0


def entry(attempt: int, status: Status = Status.SUCCEEDED) -> dict:
    return history_entry(
        attempt=attempt,
        worker="w",
        started_at=1.0,
        finished_at=2.5,
        status=status,
        reason="ok",
        exit_code=0,
        stderr_tail="",
    )


async def claim(b, token: str, key: DeliveryKey = KEY, worker: str = "w1") -> Claimed | Busy:
    return await b.ledger.claim(key, worker=worker, token=token, lease_s=LEASE_S, meta=META)


def test_first_claim_wins_and_a_second_sees_the_lease(backend) -> None:
    async def scenario(b) -> None:
        first = await claim(b, "t1")
        assert isinstance(first, Claimed)
        assert first.attempt == 1
        assert first.record["status"] == "processing"
        assert first.record["lease_token"] == "t1"
        assert first.record["bucket"] == "b"
        second = await claim(b, "t2", worker="w2")
        assert isinstance(second, Busy)
        assert second.why == "leased"
        assert second.until_s == pytest.approx(b.clock() + LEASE_S, abs=0.01)
        assert second.record["lease_owner"] == "w1"  # ALL_OLD: the item as it was

    backend.run(scenario)


def test_an_expired_lease_is_taken_over_and_fences_the_old_holder(backend) -> None:
    async def scenario(b) -> None:
        assert isinstance(await claim(b, "t1"), Claimed)
        b.clock.advance(LEASE_S + 1)
        taken = await claim(b, "t2", worker="w2")
        assert isinstance(taken, Claimed)
        assert taken.attempt == 2
        assert await b.ledger.renew(KEY, "t1", LEASE_S) is False
        assert await b.ledger.renew(KEY, "t2", LEASE_S) is True
        with pytest.raises(LeaseLostError, match="lease lost"):
            await b.ledger.finish(KEY, "t1", Status.SUCCEEDED, {"reason": "ok"}, entry(1))
        rec = await b.ledger.get(KEY)
        assert (rec["status"], rec["lease_token"], rec["lease_owner"]) == ("processing", "t2", "w2")

    backend.run(scenario)


def test_our_own_claim_is_recognised_when_retried(backend) -> None:
    """A retried claim whose first try landed fails its condition, and finds our token."""

    async def scenario(b) -> None:
        assert isinstance(await claim(b, "t1"), Claimed)
        again = await claim(b, "t1")
        assert isinstance(again, Claimed)
        assert again.attempt == 1

    backend.run(scenario)


def test_finish_records_the_outcome_and_a_retried_finish_is_our_own(backend) -> None:
    async def scenario(b) -> None:
        assert isinstance(await claim(b, "t1"), Claimed)
        fields = {"reason": "ok", "exit_code": 0, "finished_at": b.clock(), "next_attempt_at": None}
        assert await b.ledger.finish(KEY, "t1", Status.SUCCEEDED, fields, entry(1)) == {}
        rec = await b.ledger.get(KEY)
        assert rec["status"] == "succeeded"
        assert rec["outcome_token"] == "t1"
        assert "lease_owner" not in rec
        assert "lease_expires_at" not in rec
        assert [h["attempt"] for h in rec["history"]] == [1]
        assert rec["history"][0]["finished_at"] == 2.5
        # the same write again (its response was lost): recognised, the item as it was
        old = await b.ledger.finish(KEY, "t1", Status.SUCCEEDED, fields, entry(1))
        assert old["status"] == "succeeded"
        assert len(old["history"]) == 1
        # a renewal racing our own outcome is not a lost lease
        assert await b.ledger.renew(KEY, "t1", LEASE_S) is True
        # a terminal delivery is a duplicate for anyone else
        busy = await claim(b, "t9")
        assert isinstance(busy, Busy)
        assert (busy.why, busy.until_s) == ("terminal", None)

    backend.run(scenario)


def test_a_retry_is_claimable_only_when_due(backend) -> None:
    async def scenario(b) -> None:
        assert isinstance(await claim(b, "t1"), Claimed)
        due = b.clock() + 60
        fields = {"reason": "tempfail", "next_attempt_at": due}
        await b.ledger.finish(KEY, "t1", Status.RETRYING, fields, entry(1, Status.RETRYING))
        early = await claim(b, "t2")
        assert isinstance(early, Busy)
        assert early.why == "not_due"
        assert early.until_s == pytest.approx(due, abs=0.01)
        b.clock.advance(60)
        later = await claim(b, "t2")
        assert isinstance(later, Claimed)
        assert later.attempt == 2
        assert "next_attempt_at" not in later.record

    backend.run(scenario)


def test_record_without_claim_only_on_an_untouched_delivery(backend) -> None:
    async def scenario(b) -> None:
        fields = {"reason": "unroutable", "bucket": "b"}
        assert await b.ledger.record_without_claim(KEY, Status.FAILED, fields) is True
        rec = await b.ledger.get(KEY)
        assert (rec["status"], rec["attempts"], rec["reason"]) == ("failed", 0, "unroutable")
        assert await b.ledger.record_without_claim(KEY, Status.FAILED, fields) is False
        other = DeliveryKey("mail-1", "b@x")
        assert await b.ledger.create_received(other, {"bucket": "b"}) is True
        assert await b.ledger.create_received(other, {"bucket": "b"}) is False
        assert await b.ledger.record_without_claim(other, Status.FAILED, fields) is True

    backend.run(scenario)


def test_transition_and_reopen_only_from_the_expected_states(backend) -> None:
    async def scenario(b) -> None:
        assert (
            await b.ledger.transition(
                KEY, expect=(Status.SUCCEEDED,), status=Status.ARCHIVED, fields={}
            )
            is None
        )  # no item: no transition
        await b.ledger.record_without_claim(KEY, Status.FAILED, {"reason": "x", "gone": 1})
        assert (
            await b.ledger.transition(
                KEY, expect=(Status.SUCCEEDED,), status=Status.ARCHIVED, fields={}
            )
            is None
        )
        moved = await b.ledger.transition(
            KEY,
            expect=(Status.SUCCEEDED, Status.FAILED),
            status=Status.ARCHIVED,
            fields={"archived_key": "failed/mail-1", "gone": None},
            attention=False,
        )
        assert moved is not None
        assert moved["status"] == "archived"
        assert "gone" not in moved
        assert "attn" not in moved
        reopened = await b.ledger.reopen(
            KEY, expect=(Status.ARCHIVED,), fields={"reason": None}, entry=entry(0, Status.FAILED)
        )
        assert reopened is not None
        assert (reopened["status"], reopened["attempts"]) == ("retrying", 0)
        assert "reason" not in reopened
        assert len(reopened["history"]) == 1
        assert await b.ledger.reopen(KEY, expect=(Status.ARCHIVED,), fields={}, entry={}) is None

    backend.run(scenario)


def test_mail_lock_expires_and_is_reentrant(backend) -> None:
    async def scenario(b) -> None:
        assert await b.ledger.lock_mail(KEY, "a", 10) is False  # no delivery carries it yet
        await b.ledger.create_received(KEY, {})
        assert await b.ledger.lock_mail(KEY, "a", 10) is True
        assert await b.ledger.lock_mail(KEY, "a", 10) is True
        assert await b.ledger.lock_mail(KEY, "b", 10) is False
        await b.ledger.unlock_mail(KEY, "b")  # not b's: nothing happens
        assert await b.ledger.lock_mail(KEY, "b", 10) is False
        b.clock.advance(11)
        assert await b.ledger.lock_mail(KEY, "b", 10) is True
        await b.ledger.unlock_mail(KEY, "b")
        assert "mail_lock" not in await b.ledger.get(KEY)

    backend.run(scenario)


def test_the_reconcilers_writes_hold_only_on_what_it_saw(backend) -> None:
    async def scenario(b) -> None:
        assert isinstance(await claim(b, "t1"), Claimed)
        # the lease is alive: not stuck yet
        assert (
            await b.ledger.mark_requeued(
                KEY, expect=Status.PROCESSING, seen_requeues=0, recheck_at=b.clock() + 99
            )
            is None
        )
        b.clock.advance(LEASE_S + 1)
        marked = await b.ledger.mark_requeued(
            KEY, expect=Status.PROCESSING, seen_requeues=0, recheck_at=b.clock() + 99
        )
        assert marked is not None
        assert marked["requeue_count"] == 1
        # another reconciler that saw the same item loses
        assert (
            await b.ledger.mark_requeued(
                KEY, expect=Status.PROCESSING, seen_requeues=0, recheck_at=b.clock() + 99
            )
            is None
        )
        failed = await b.ledger.fail_stale(
            KEY,
            expect=Status.PROCESSING,
            seen_requeues=1,
            fields={"reason": "object_missing"},
            entry=entry(1, Status.FAILED),
        )
        assert failed is not None
        assert (failed["status"], failed["outcome"]) == ("failed", "failed")
        assert "lease_owner" not in failed
        assert len(failed["history"]) == 1

    backend.run(scenario)


def test_attention_index_is_sparse_ordered_bounded_and_paged(backend) -> None:
    async def scenario(b) -> None:
        keys = [DeliveryKey(f"mail-{i}", "r@x") for i in range(5)]
        for key in keys:
            await b.ledger.create_received(key, {})
            b.clock.advance(1)
        archived = DeliveryKey("mail-9", "r@x")
        await b.ledger.create_received(archived, {})
        await b.ledger.transition(
            archived, expect=(Status.RECEIVED,), status=Status.ARCHIVED, fields={}, attention=False
        )
        found = await b.ledger.needing_attention(Status.RECEIVED, limit=100)
        assert [r["mail_id"] for r in found] == [k.mail_id for k in keys]  # oldest first
        # a limit below the number of items takes more than one page
        assert [
            r["mail_id"] for r in await b.ledger.needing_attention(Status.RECEIVED, limit=2)
        ] == [
            "mail-0",
            "mail-1",
        ]
        before = await b.ledger.needing_attention(Status.RECEIVED, before_s=b.clock() - 3.5)
        assert [r["mail_id"] for r in before] == ["mail-0", "mail-1"]
        assert await b.ledger.needing_attention(Status.ARCHIVED) == []

    backend.run(scenario)


def test_deliveries_of_a_mail_come_back_in_recipient_order(backend) -> None:
    async def scenario(b) -> None:
        for r in ("c@x", "a@x", "b@x"):
            await b.ledger.create_received(DeliveryKey("m", r), {"n": 1.23456, "big": 10**12})
        await b.ledger.create_received(DeliveryKey("other", "a@x"), {})
        records = await b.ledger.get_mail("m")
        assert [r["recipient"] for r in records] == ["a@x", "b@x", "c@x"]
        assert records[0]["n"] == 1.235  # DynamoDB's number, as the ledger stores it
        assert records[0]["big"] == 10**12
        assert isinstance(records[0]["big"], int)
        assert await b.ledger.get_mail("none") == []
        assert await b.ledger.get(DeliveryKey("none", "x")) == {}

    backend.run(scenario)
