"""SQS: receive, delete, defer, keep-alive, dead-letter.

Delivery semantics: SQS (and SNS before it) deliver at least once, so every message may
arrive twice; the ledger's claim turns that into at-most-one *recorded outcome*. A message is
deleted only once every delivery of its mail is terminal. Retries and deferrals are
ChangeMessageVisibility, never a re-send, so ApproximateReceiveCount and the redrive policy
keep counting: every receive counts, deferrals included (size maxReceiveCount with a margin).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog

from mailflow import aws
from mailflow.aws import AwsPermanentError

log = structlog.get_logger("mailflow.aws.queue")

#: SQS's own ceiling for a message's visibility timeout.
MAX_VISIBILITY_S = 43200
BATCH = 10
#: Batch calls of one kind in flight at once; further requests queue up and share the next one.
BATCH_FLIGHTS = 4
#: Caps (UTF-8 bytes) of the dead-letter attributes: a reason is a short machine word, a
#: detail one line for an operator; the body beside them keeps the whole evidence.
REASON_MAX_BYTES = 128
DETAIL_MAX_BYTES = 1000


def _sqs_allowed(ch: str) -> bool:
    """SQS's character set for bodies and string attributes (the XML 1.0 Char production):
    #x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD | #x10000-#x10FFFF. Anything else gets
    the whole SendMessage refused with InvalidParameterValue."""
    code = ord(ch)
    return (
        code in (0x9, 0xA, 0xD)
        or 0x20 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    )


def sqs_text(value: str, max_bytes: int) -> str:
    """`value` as an SQS string attribute: characters outside SQS's set escaped (`\\xNN`,
    `\\uNNNN`; a backslash doubled, so the escape reads back unambiguously), cut at a
    character boundary to at most `max_bytes` UTF-8 bytes (an ellipsis marks the cut), never
    empty (SQS refuses an empty value)."""
    pieces = []
    for ch in value:
        if ch == "\\":
            pieces.append("\\\\")
        elif _sqs_allowed(ch):
            pieces.append(ch)
        elif ord(ch) <= 0xFF:
            pieces.append(f"\\x{ord(ch):02x}")
        else:
            pieces.append(f"\\u{ord(ch):04x}")
    text = "".join(pieces)
    if len(text.encode("utf-8")) <= max_bytes:
        return text or "-"
    kept: list[str] = []
    budget = max_bytes - len("…".encode())
    for piece in pieces:  # whole pieces only: never half a character or half an escape
        budget -= len(piece.encode("utf-8"))
        if budget < 0:
            break
        kept.append(piece)
    return "".join(kept) + "…"


Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(slots=True)
class Message:
    """One received SQS message: its id, the receipt handle that deletes or defers this receipt
    of it, the body, how often SQS has handed it out (`ApproximateReceiveCount`), when it was
    sent and when we received it (epoch seconds)."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_at_s: float | None
    received_at_s: float = field(default_factory=time.time)


def clamp_visibility(seconds: float) -> int:
    """`seconds` as a visibility timeout SQS accepts: rounded up, within 0..12 hours."""
    return max(0, min(MAX_VISIBILITY_S, int(seconds + 0.999)))


class Batcher(Generic[Item, Result]):
    """Natural batching: requests that come together share one SQS batch call (up to 10
    entries), so there is one call per request when idle and about one per ten under load;
    no request ever waits for a batch to fill. `send` answers one result per item, in order;
    if it raises, every request of that batch gets the exception."""

    def __init__(self, send: Callable[[list[Item]], Awaitable[list[Result]]]) -> None:
        self._send = send
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flights: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        """Queue `item` for the next batch call; await its result (or the call's exception)."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if len(self._flights) < BATCH_FLIGHTS:
            flight = asyncio.create_task(self._flush())
            self._flights.add(flight)
            flight.add_done_callback(self._flights.discard)
        return await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
            try:
                results = await self._send([item for item, _ in batch])
            except Exception as exc:  # handed to every waiter: each decides for its message
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for (_, done), result in zip(batch, results, strict=True):
                    if not done.done():
                        done.set_result(result)


class Queue:
    """The work queue (SQS) and its dead-letter queue.

    Contract: messages arrive at least once, duplicates included; the worker deletes one only
    once every delivery of its mail is terminal, and retries or defers by changing its
    visibility (never by re-sending), so the redrive policy keeps counting receives. Deletes and
    visibility changes of concurrent deliveries share batch calls. A stale receipt handle is
    not an error (False or a log line); a backend that stays unreachable raises
    `TransientError`."""

    def __init__(self, sqs: Any, url: str, dlq_url: str | None) -> None:
        self._sqs = sqs
        self.url = url
        self.dlq_url = dlq_url
        self._deletes = Batcher(self._delete_batch)
        self._visibility = Batcher(self._visibility_batch)

    @classmethod
    async def resolve(cls, sqs: Any, queue: str, dlq: str) -> Queue:
        """The queue named `queue` (a name or a URL) and its DLQ `dlq`; a DLQ that cannot be
        found leaves `dlq_url` None (dead-lettering then raises). Raises if the queue is missing."""
        url = await _url(sqs, queue)
        try:
            dlq_url: str | None = await _url(sqs, dlq)
        except AwsPermanentError:
            dlq_url = None
        return cls(sqs, url, dlq_url)

    async def receive(self, max_messages: int, wait_s: int, visibility_s: int) -> list[Message]:
        """Long-poll for up to `max_messages` (at most 10) for `wait_s` seconds; each message
        received stays invisible to other receivers for `visibility_s` seconds."""
        resp = await aws.call(
            "sqs.ReceiveMessage",
            self._sqs.receive_message,
            QueueUrl=self.url,
            MaxNumberOfMessages=max(1, min(BATCH, max_messages)),
            WaitTimeSeconds=wait_s,
            VisibilityTimeout=visibility_s,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        out = []
        for m in resp.get("Messages", []):
            attrs = m.get("Attributes", {})
            sent = attrs.get("SentTimestamp")
            out.append(
                Message(
                    message_id=m["MessageId"],
                    receipt_handle=m["ReceiptHandle"],
                    body=m.get("Body", ""),
                    receive_count=int(attrs.get("ApproximateReceiveCount", 1)),
                    sent_at_s=int(sent) / 1000 if sent else None,
                ),
            )
        return out

    async def delete(self, msg: Message) -> None:
        """Delete a handled message (DeleteMessageBatch, shared with concurrent deletes).
        Raises TransientError if SQS stays unreachable."""
        await self._deletes.submit(msg)

    async def _delete_batch(self, messages: list[Message]) -> list[None]:
        entries = [
            {"Id": str(i), "ReceiptHandle": m.receipt_handle} for i, m in enumerate(messages)
        ]
        try:
            resp = await aws.call(
                "sqs.DeleteMessageBatch",
                self._sqs.delete_message_batch,
                QueueUrl=self.url,
                Entries=entries,
            )
        except AwsPermanentError as exc:
            for m in messages:
                log.info("delete_refused", message_id=m.message_id, error=exc.code)
            return [None] * len(messages)
        for failure in resp.get("Failed", []):
            msg = messages[int(failure["Id"])]
            if failure.get("SenderFault", True):
                # A stale handle: the message was received again elsewhere. The work is
                # recorded; the other receiver sees a terminal delivery and deletes it.
                log.info("delete_stale_handle", message_id=msg.message_id, error=failure["Code"])
            else:  # SQS failed this entry on its side: once more alone, with retries
                await self._delete_one(msg)
        return [None] * len(messages)

    async def _delete_one(self, msg: Message) -> None:
        try:
            await aws.call(
                "sqs.DeleteMessage",
                self._sqs.delete_message,
                QueueUrl=self.url,
                ReceiptHandle=msg.receipt_handle,
            )
        except AwsPermanentError as exc:
            log.info("delete_stale_handle", message_id=msg.message_id, error=exc.code)

    async def set_visibility(self, msg: Message, seconds: float) -> bool:
        """Defer (or give back, at 0) one message; False if SQS refused (a stale handle).
        Shares ChangeMessageVisibilityBatch calls with concurrent requests."""
        return await self._visibility.submit((msg, seconds))

    async def _visibility_batch(self, items: list[tuple[Message, float]]) -> list[bool]:
        entries = _visibility_entries(items)
        try:
            resp = await aws.call(
                "sqs.ChangeMessageVisibilityBatch",
                self._sqs.change_message_visibility_batch,
                QueueUrl=self.url,
                Entries=entries,
            )
        except AwsPermanentError as exc:
            for m, _ in items:
                log.info("visibility_not_changed", message_id=m.message_id, error=exc.code)
            return [False] * len(items)
        results = [True] * len(items)
        for failure in resp.get("Failed", []):
            i = int(failure["Id"])
            msg, seconds = items[i]
            if failure.get("SenderFault", True):
                log.info("visibility_not_changed", message_id=msg.message_id, error=failure["Code"])
                results[i] = False
            else:  # SQS failed this entry on its side: once more alone, with retries
                results[i] = await self._set_visibility_one(msg, seconds)
        return results

    async def _set_visibility_one(self, msg: Message, seconds: float) -> bool:
        try:
            await aws.call(
                "sqs.ChangeMessageVisibility",
                self._sqs.change_message_visibility,
                QueueUrl=self.url,
                ReceiptHandle=msg.receipt_handle,
                VisibilityTimeout=clamp_visibility(seconds),
            )
        except AwsPermanentError as exc:
            log.info("visibility_not_changed", message_id=msg.message_id, error=exc.code)
            return False
        return True

    async def extend_batch(
        self,
        messages: Sequence[Message],
        seconds: float,
        *,
        deadline_s: float | None = None,
    ) -> list[str]:
        """Heartbeat: push visibility out for many messages, 10 per call, the calls at once.
        Returns the ids SQS refused; raises TransientError if a call got no answer within
        `deadline_s` (then nothing is known about its messages)."""
        chunks = [messages[i : i + BATCH] for i in range(0, len(messages), BATCH)]
        results = await asyncio.gather(
            *(self._extend_chunk(chunk, seconds, deadline_s) for chunk in chunks),
            return_exceptions=True,
        )
        failed: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            failed.extend(result)
        return failed

    async def _extend_chunk(
        self,
        chunk: Sequence[Message],
        seconds: float,
        deadline_s: float | None,
    ) -> list[str]:
        entries = [
            {
                "Id": str(i),
                "ReceiptHandle": m.receipt_handle,
                "VisibilityTimeout": clamp_visibility(seconds),
            }
            for i, m in enumerate(chunk)
        ]
        resp = await aws.call(
            "sqs.ChangeMessageVisibilityBatch",
            self._sqs.change_message_visibility_batch,
            deadline_s=deadline_s,
            QueueUrl=self.url,
            Entries=entries,
        )
        return [chunk[int(f["Id"])].message_id for f in resp.get("Failed", [])]

    async def dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        """Move a poison message to the DLQ with its reason, then delete it here.

        Send first, delete second: a crash between the two leaves a copy in both queues,
        never in neither.
        """
        if self.dlq_url is None:
            raise AwsPermanentError("sqs.SendMessage", "NoDLQ", "the queue has no DLQ")
        # Every value escaped to SQS's character set and capped: the reason and detail quote
        # the hostile input itself, and a refused send would leave the message looping until
        # the redrive policy dead-letters it with no reason at all.
        attributes = {
            "mailflow_reason": _attr(sqs_text(reason, REASON_MAX_BYTES)),
            "mailflow_detail": _attr(sqs_text(detail, DETAIL_MAX_BYTES)),
            "mailflow_source_message_id": _attr(sqs_text(msg.message_id, REASON_MAX_BYTES)),
        }
        try:
            await self._send_dead(msg, attributes)
        except AwsPermanentError as exc:
            # Refused anyway, for a rule we do not know of: once more with the reason alone,
            # in ASCII. If the body itself is refused, this raises and the redrive policy
            # remains the last resort.
            log.warning("dead_letter_attributes_refused", message_id=msg.message_id, error=str(exc))
            ascii_reason = reason.encode("ascii", "backslashreplace").decode("ascii")
            await self._send_dead(
                msg,
                {
                    "mailflow_reason": _attr(sqs_text(ascii_reason, REASON_MAX_BYTES)),
                    "mailflow_detail": _attr(f"attributes refused ({exc.code})"),
                },
            )
        await self.delete(msg)

    async def _send_dead(self, msg: Message, attributes: dict[str, dict[str, str]]) -> None:
        await aws.call(
            "sqs.SendMessage",
            self._sqs.send_message,
            QueueUrl=self.dlq_url,
            MessageBody=msg.body or "(empty)",
            MessageAttributes=attributes,
        )

    async def send(self, body: str) -> str:
        """Send `body` to the main queue (reconciler and retry re-enqueues); returns its id."""
        resp = await aws.call(
            "sqs.SendMessage",
            self._sqs.send_message,
            QueueUrl=self.url,
            MessageBody=body,
        )
        return str(resp["MessageId"])

    async def depth(self) -> dict[str, int]:
        """Approximate message counts: `queue_visible`, `queue_in_flight`, and the same for the DLQ
        (`dlq_*`) when there is one."""
        out: dict[str, int] = {}
        for name, url in (("queue", self.url), ("dlq", self.dlq_url)):
            if url is None:
                continue
            resp = await aws.call(
                "sqs.GetQueueAttributes",
                self._sqs.get_queue_attributes,
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                ],
            )
            attrs = resp.get("Attributes", {})
            out[f"{name}_visible"] = int(attrs.get("ApproximateNumberOfMessages", 0))
            out[f"{name}_in_flight"] = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
        return out

    async def arn(self, url: str) -> str:
        """The ARN of one of this queue's URLs (the main queue or its DLQ)."""
        resp = await aws.call(
            "sqs.GetQueueAttributes",
            self._sqs.get_queue_attributes,
            QueueUrl=url,
            AttributeNames=["QueueArn"],
        )
        return str(resp["Attributes"]["QueueArn"])

    async def start_redrive(self) -> tuple[str, str] | None:
        """Start SQS's own DLQ → queue move task: (DLQ ARN, task handle), or None where the
        backend does not offer it (a capability probe: one try, no retry layer)."""
        if self.dlq_url is None:
            return None
        source_arn = await self.arn(self.dlq_url)
        dest_arn = await self.arn(self.url)
        try:
            started = await self._sqs.start_message_move_task(
                SourceArn=source_arn, DestinationArn=dest_arn
            )
        except Exception as exc:  # any failure means "fall back to receive/send/delete"
            log.info(
                "move_task_unavailable",
                error=str(aws.map_error("sqs.StartMessageMoveTask", exc))[:200],
            )
            return None
        return source_arn, str(started.get("TaskHandle", ""))

    async def redrive_progress(self, source_arn: str) -> dict[str, Any]:
        """The newest move task of `source_arn`: its status and how many messages it moved."""
        resp = await aws.call(
            "sqs.ListMessageMoveTasks",
            self._sqs.list_message_move_tasks,
            SourceArn=source_arn,
            MaxResults=1,
        )
        task: dict[str, Any] = (resp.get("Results") or [{}])[0]
        return task

    async def receive_dead(self, max_messages: int, visibility_s: int) -> list[dict[str, Any]]:
        """Raw messages from the DLQ, with their attributes (a short poll of every server)."""
        if self.dlq_url is None:
            return []
        got = await aws.call(
            "sqs.ReceiveMessage",
            self._sqs.receive_message,
            QueueUrl=self.dlq_url,
            MaxNumberOfMessages=min(BATCH, max_messages),
            WaitTimeSeconds=1,
            VisibilityTimeout=visibility_s,
            MessageAttributeNames=["All"],
        )
        messages: list[dict[str, Any]] = got.get("Messages", [])
        return messages

    async def requeue_dead(self, messages: Sequence[dict[str, Any]]) -> int:
        """Send DLQ messages back to the queue, then delete them from the DLQ: never lost (a
        crash between the two leaves a duplicate, which the claim absorbs). Drops mailflow's
        own `mailflow_*` attributes, keeps the sender's. Returns how many were moved."""
        entries = []
        for i, m in enumerate(messages):
            kept = {
                k: {f: v[f] for f in ("DataType", "StringValue", "BinaryValue") if f in v}
                for k, v in (m.get("MessageAttributes") or {}).items()
                if not k.startswith("mailflow_")
            }
            entry: dict[str, Any] = {"Id": str(i), "MessageBody": m["Body"]}
            if kept:
                entry["MessageAttributes"] = kept
            entries.append(entry)
        sent = await aws.call(
            "sqs.SendMessageBatch", self._sqs.send_message_batch, QueueUrl=self.url, Entries=entries
        )
        ok = [messages[int(s["Id"])] for s in sent.get("Successful", [])]
        if ok:
            await aws.call(
                "sqs.DeleteMessageBatch",
                self._sqs.delete_message_batch,
                QueueUrl=self.dlq_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(ok)
                ],
            )
        return len(ok)


def _visibility_entries(items: Sequence[tuple[Message, float]]) -> list[dict[str, Any]]:
    """ChangeMessageVisibilityBatch entries, their Ids the items' positions."""
    return [
        {
            "Id": str(i),
            "ReceiptHandle": m.receipt_handle,
            "VisibilityTimeout": clamp_visibility(seconds),
        }
        for i, (m, seconds) in enumerate(items)
    ]


def _attr(text: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": text}


async def _url(sqs: Any, queue: str) -> str:
    if queue.startswith(("https://", "http://")):
        return queue
    resp = await aws.call("sqs.GetQueueUrl", sqs.get_queue_url, QueueName=queue)
    return str(resp["QueueUrl"])
