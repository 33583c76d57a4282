"""The queue, the same on every backend: visibility timeouts, receive counts, the redrive to the
DLQ at maxReceiveCount, the DLQ reason attributes, and what a handle can still do."""

from __future__ import annotations

import json

from support.backends import MAX_RECEIVE_COUNT


async def receive_one(b, visibility_s: int = 1, wait_s: int = 0):
    (msg,) = await b.queue.receive(10, wait_s, visibility_s)
    return msg


#: After a visibility timeout has passed, a server may take a moment to show the message
#: again (LocalStack checks on a timer): such receives long-poll this long.
SETTLE_WAIT_S = 3


def test_a_received_message_is_hidden_for_its_visibility_timeout(backend) -> None:
    async def scenario(b) -> None:
        message_id = await b.queue.send('{"n": 1}')
        msg = await receive_one(b)
        assert (msg.message_id, msg.body, msg.receive_count) == (message_id, '{"n": 1}', 1)
        assert await b.queue.receive(10, 0, 1) == []
        assert await b.counts() == {"visible": 0, "in_flight": 1}
        await b.pass_time(1.2)
        again = await receive_one(b, wait_s=SETTLE_WAIT_S)
        assert again.message_id == message_id
        assert again.receive_count == 2
        assert again.receipt_handle != msg.receipt_handle
        await b.queue.delete(again)
        assert await b.counts() == {"visible": 0, "in_flight": 0}

    backend.run(scenario)


def test_visibility_changes_defer_and_give_back(backend) -> None:
    async def scenario(b) -> None:
        await b.queue.send("a")
        msg = await receive_one(b, visibility_s=30)
        assert await b.queue.set_visibility(msg, 0) is True  # given back: visible at once
        back = await receive_one(b, visibility_s=30)
        assert back.receive_count == 2
        assert await b.queue.extend_batch([back], 60) == []
        await b.queue.delete(back)
        assert await b.queue.set_visibility(back, 0) is False  # deleted: nothing to change
        assert await b.counts() == {"visible": 0, "in_flight": 0}

    backend.run(scenario)


def test_a_long_poll_returns_as_soon_as_a_message_is_visible(backend) -> None:
    async def scenario(b) -> None:
        await b.queue.send("x")
        got = await b.queue.receive(10, 5, 30)  # a message is there: no waiting
        assert [m.body for m in got] == ["x"]

    backend.run(scenario)


def test_receives_past_max_receive_count_move_the_message_to_the_dlq(backend) -> None:
    async def scenario(b) -> None:
        body = json.dumps({"mail": "poison"})
        await b.queue.send(body)
        for count in range(1, MAX_RECEIVE_COUNT + 1):
            msg = await receive_one(b, wait_s=SETTLE_WAIT_S)
            assert msg.receive_count == count
            await b.pass_time(1.2)
        # the next receive moves it instead of returning it
        assert await b.queue.receive(10, SETTLE_WAIT_S, 1) == []
        assert await b.counts() == {"visible": 0, "in_flight": 0}
        assert [body_ for body_, _ in await b.dead_letters()] == [body]

    backend.run(scenario)


def test_dead_letter_carries_the_reason_as_attributes(backend) -> None:
    async def scenario(b) -> None:
        await b.queue.send("not json")
        msg = await receive_one(b, visibility_s=30)
        await b.queue.dead_letter(msg, "bad_json", "Expecting value: line 1\x00 column 1")
        assert await b.counts() == {"visible": 0, "in_flight": 0}
        ((body, attrs),) = await b.dead_letters()
        assert body == "not json"
        assert attrs["mailflow_reason"] == "bad_json"
        assert attrs["mailflow_detail"].startswith("Expecting value: line 1")
        assert "\x00" not in attrs["mailflow_detail"]  # SQS refuses it; the queue escapes it
        assert attrs["mailflow_source_message_id"] == msg.message_id

    backend.run(scenario)


def test_batches_over_ten_are_split(backend) -> None:
    async def scenario(b) -> None:
        for i in range(12):
            await b.queue.send(str(i))
        first = await b.queue.receive(25, 0, 30)
        assert len(first) == 10  # SQS's own cap
        rest = await b.queue.receive(25, 0, 30)
        while len(first) + len(rest) < 12:  # a server may answer with fewer than are there
            more = await b.queue.receive(10, 0, 30)
            assert more
            rest += more
        held = first + rest
        assert sorted(int(m.body) for m in held) == list(range(12))
        assert await b.queue.extend_batch(held, 60) == []
        for m in held:
            await b.queue.delete(m)
        assert await b.counts() == {"visible": 0, "in_flight": 0}

    backend.run(scenario)
