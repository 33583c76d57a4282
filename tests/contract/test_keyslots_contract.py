"""Key slots and holds, the same on every backend: a slot is taken once, expires, is fenced by
its token on renew and release; holds are written, listed, checked and lifted."""

from __future__ import annotations

from mailflow.aws.ledger import DeliveryKey

LEASE_S = 30.0


async def take(slots, token: str, limit: int = 1):
    return await slots.take(
        "behave",
        "001",
        limit,
        holder=DeliveryKey("m", f"r-{token}@x"),
        worker="w",
        token=token,
        lease_s=LEASE_S,
    )


def test_a_slot_is_taken_once_until_it_expires_and_fences_its_old_holder(backend) -> None:
    async def scenario(b) -> None:
        slots = b.keyslots
        first = await take(slots, "t1")
        assert first is not None
        assert await take(slots, "t2") is None  # the only slot is held
        assert await take(slots, "t1") == first  # a retried take of our own
        assert await slots.renew(first, LEASE_S) is True
        b.clock.advance(LEASE_S + 1)
        second = await take(slots, "t2")
        assert second is not None
        assert await slots.renew(first, LEASE_S) is False  # expired and taken
        await slots.release(first)  # not ours any more: nothing happens
        assert await take(slots, "t3") is None
        await slots.release(second)
        assert await take(slots, "t3") is not None

    backend.run(scenario)


def test_a_limit_of_two_admits_two_and_release_all_frees_by_token(backend) -> None:
    async def scenario(b) -> None:
        slots = b.keyslots
        a = await take(slots, "ta", limit=2)
        c = await take(slots, "tc", limit=2)
        assert a is not None
        assert c is not None
        assert a.index != c.index
        assert await take(slots, "td", limit=2) is None
        await slots.release_all("behave", "001", 2, "tc")
        assert await take(slots, "td", limit=2) is not None

    backend.run(scenario)


def test_holds_are_listed_checked_and_lifted(backend) -> None:
    async def scenario(b) -> None:
        slots = b.keyslots
        assert await slots.holds() == []
        hold = await slots.put_hold("behave", "001", by="ops", note="stock count")
        again = await slots.put_hold("behave", "001", by="ops2")
        assert again.held_at == hold.held_at  # the first hold's time is kept
        assert [h.name for h in await slots.holds()] == ["behave#001"]
        assert await slots.hold_exists(hold) is True
        assert await slots.delete_hold("behave", "001") is True
        assert await slots.delete_hold("behave", "001") is False
        assert await slots.hold_exists(hold) is False

    backend.run(scenario)
