"""An SQS standard queue and its DLQ in memory (QueuePort), with SQS's own rules.

What is modelled, because the worker's correctness rests on it:
- a receive hides a message for the visibility timeout and gives it a new receipt handle;
  any handle the message has had deletes it or changes its visibility, as in moto (AWS may
  refuse an older handle; mailflow never relies on either: its fence is the ledger's lease
  token), and a deleted message's handle changes nothing;
- every receive counts (`ApproximateReceiveCount`); with a redrive policy, the receive that
  would go past `max_receive_count` moves the message to the DLQ instead of returning it;
- message attributes (the DLQ reason) and send times;
- long polling: a receive returns as soon as a message is visible (a send, a visibility
  change, a `ManualClock.advance`), else after `wait_s` real seconds × `poll_time_scale`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailflow.aws import AwsPermanentError
from mailflow.aws.queue import (
    BATCH,
    DETAIL_MAX_BYTES,
    REASON_MAX_BYTES,
    Message,
    clamp_visibility,
    sqs_text,
)
from mailflow.testing.clock import ManualClock


@dataclass(slots=True)
class QueuedMessage:
    """One message as the queue holds it."""

    message_id: str
    body: str
    sent_at_s: float
    attributes: dict[str, str] = field(default_factory=dict)
    visible_at_s: float = 0.0
    receive_count: int = 0
    handles: set[str] = field(default_factory=set)  # every receipt handle it has had


class FakeQueue:
    """In-memory `QueuePort`. `dlq` is another FakeQueue (or None, as a queue without DLQ);
    `max_receive_count` is the redrive policy's (None: no policy)."""

    def __init__(
        self,
        name: str = "mailflow",
        *,
        clock: Callable[[], float] = time.time,
        dlq: FakeQueue | None = None,
        max_receive_count: int | None = None,
        poll_time_scale: float = 1.0,
    ) -> None:
        self.url = f"https://sqs.fake.local/000000000000/{name}"
        self.dlq = dlq
        self.dlq_url = dlq.url if dlq else None
        self.max_receive_count = max_receive_count
        self._clock = clock
        # A long poll with nothing to return lasts wait_s × this: logic tests shorten it, so a
        # worker that is told to stop finishes its last poll at once.
        self.poll_time_scale = poll_time_scale
        self._messages: dict[str, QueuedMessage] = {}  # in send order
        self._changed = asyncio.Event()
        self.calls: dict[str, int] = {}
        if isinstance(clock, ManualClock):
            clock.on_advance(self._changed.set)

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    # --- what a test looks at -----------------------------------------------------------------

    def messages(self) -> list[QueuedMessage]:
        """Every message still in the queue, visible or not."""
        return list(self._messages.values())

    def counts(self) -> dict[str, int]:
        """{"visible": n, "in_flight": n}, as ApproximateNumberOfMessages(NotVisible)."""
        now = self._clock()
        visible = sum(1 for m in self._messages.values() if m.visible_at_s <= now)
        return {"visible": visible, "in_flight": len(self._messages) - visible}

    # --- QueuePort ----------------------------------------------------------------------------

    async def send(self, body: str, attributes: dict[str, str] | None = None) -> str:
        """Enqueue a body (with string attributes); its message id."""
        self._count("send")
        msg = QueuedMessage(
            message_id=str(uuid.uuid4()),
            body=body,
            sent_at_s=self._clock(),
            attributes=dict(attributes or {}),
            visible_at_s=self._clock(),
        )
        self._messages[msg.message_id] = msg
        self._changed.set()
        return msg.message_id

    async def receive(self, max_messages: int, wait_s: int, visibility_s: int) -> list[Message]:
        """Up to min(10, max_messages) visible messages, long-polling up to `wait_s`."""
        self._count("receive")
        loop = asyncio.get_running_loop()
        poll_ends = loop.time() + wait_s * self.poll_time_scale  # real seconds
        manual = isinstance(self._clock, ManualClock)
        while True:
            got = self._take(max(1, min(BATCH, max_messages)), visibility_s)
            left_s = poll_ends - loop.time()
            if got or left_s <= 0:
                return got
            self._changed.clear()
            if not manual:  # on real time, a hidden message becomes visible by itself
                upcoming = self.next_visible_at()
                if upcoming is not None:
                    left_s = min(left_s, max(0.0, upcoming - self._clock()))
            with contextlib.suppress(TimeoutError):  # the poll's end, or a message's time
                await asyncio.wait_for(self._changed.wait(), timeout=left_s)

    def next_visible_at(self) -> float | None:
        """When the next hidden message becomes visible (None: nothing is hidden)."""
        now = self._clock()
        hidden = [m.visible_at_s for m in self._messages.values() if m.visible_at_s > now]
        return min(hidden, default=None)

    def _take(self, count: int, visibility_s: int) -> list[Message]:
        now = self._clock()
        out: list[Message] = []
        for msg in list(self._messages.values()):
            if len(out) >= count:
                break
            if msg.visible_at_s > now:
                continue
            if self.max_receive_count is not None and msg.receive_count >= self.max_receive_count:
                self._redrive(msg)
                continue
            msg.receive_count += 1
            handle = f"{msg.message_id}#{msg.receive_count}#{uuid.uuid4().hex[:8]}"
            msg.handles.add(handle)
            msg.visible_at_s = now + clamp_visibility(visibility_s)
            out.append(
                Message(
                    message_id=msg.message_id,
                    receipt_handle=handle,
                    body=msg.body,
                    receive_count=msg.receive_count,
                    sent_at_s=msg.sent_at_s,
                    received_at_s=now,
                ),
            )
        return out

    def _redrive(self, msg: QueuedMessage) -> None:
        del self._messages[msg.message_id]
        if self.dlq is not None:  # SQS keeps the message id and the attributes
            moved = QueuedMessage(
                message_id=msg.message_id,
                body=msg.body,
                sent_at_s=msg.sent_at_s,
                attributes=dict(msg.attributes),
                visible_at_s=self._clock(),
                receive_count=msg.receive_count,
            )
            self.dlq._messages[moved.message_id] = moved  # noqa: SLF001 - the same class
            self.dlq._changed.set()  # noqa: SLF001

    def _current(self, msg: Message) -> QueuedMessage | None:
        held = self._messages.get(msg.message_id)
        return held if held is not None and msg.receipt_handle in held.handles else None

    async def delete(self, msg: Message) -> None:
        """Delete by receipt handle; a deleted message's handle deletes nothing, silently."""
        self._count("delete")
        if self._current(msg) is not None:
            del self._messages[msg.message_id]

    async def set_visibility(self, msg: Message, seconds: float) -> bool:
        """Hide the message for `seconds` from now; False once the message is deleted."""
        self._count("set_visibility")
        held = self._current(msg)
        if held is None:
            return False
        held.visible_at_s = self._clock() + clamp_visibility(seconds)
        self._changed.set()
        return True

    async def extend_batch(
        self,
        messages: Sequence[Message],
        seconds: float,
        *,
        deadline_s: float | None = None,  # noqa: ARG002 - in memory, nothing to bound
    ) -> list[str]:
        """The heartbeat's visibility extension; the ids refused."""
        self._count("extend_batch")
        failed: list[str] = []
        for msg in messages:
            held = self._current(msg)
            if held is None:
                failed.append(msg.message_id)
            else:
                held.visible_at_s = self._clock() + clamp_visibility(seconds)
        return failed

    async def depth(self) -> dict[str, int]:
        """`queue_visible`, `queue_in_flight`, and the DLQ's, as GetQueueAttributes says."""
        out: dict[str, int] = {}
        for name, queue in (("queue", self), ("dlq", self.dlq)):
            if queue is not None:
                counts = queue.counts()
                out[f"{name}_visible"] = counts["visible"]
                out[f"{name}_in_flight"] = counts["in_flight"]
        return out

    async def dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        """Copy to the DLQ with the reason attributes, then delete here."""
        self._count("dead_letter")
        if self.dlq is None:
            raise AwsPermanentError("sqs.SendMessage", "NoDLQ", "the queue has no DLQ")
        await self.dlq.send(
            msg.body or "(empty)",
            {
                "mailflow_reason": sqs_text(reason, REASON_MAX_BYTES),
                "mailflow_detail": sqs_text(detail, DETAIL_MAX_BYTES),
                "mailflow_source_message_id": sqs_text(msg.message_id, REASON_MAX_BYTES),
            },
        )
        await self.delete(msg)


def new_queue_pair(
    name: str = "mailflow",
    *,
    clock: Callable[[], float] = time.time,
    max_receive_count: int | None = 5,
    poll_time_scale: float = 1.0,
) -> FakeQueue:
    """A queue with its DLQ and a redrive policy, as `mailflow.dev.provision` creates them."""
    dlq = FakeQueue(f"{name}-dlq", clock=clock, poll_time_scale=poll_time_scale)
    return FakeQueue(
        name,
        clock=clock,
        dlq=dlq,
        max_receive_count=max_receive_count,
        poll_time_scale=poll_time_scale,
    )
