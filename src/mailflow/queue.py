"""SQS: receive, delete, defer, keep-alive, dead-letter.

Delivery semantics: SQS (and SNS before it) deliver at least once, so every message may
arrive twice; the ledger's claim turns that into at-most-one *recorded outcome*. A message is
deleted only once every delivery of its mail is terminal. Retries and deferrals are
ChangeMessageVisibility, never a re-send, so ApproximateReceiveCount and the redrive policy
keep counting: every receive counts, deferrals included (size maxReceiveCount with a margin).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from mailflow import aws
from mailflow.aws import AwsPermanentError

log = structlog.get_logger("mailflow.queue")

#: SQS's own ceiling for a message's visibility timeout.
MAX_VISIBILITY_S = 43200
BATCH = 10


@dataclass(slots=True)
class Message:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_at_s: float | None
    received_at_s: float = field(default_factory=time.time)


def clamp_visibility(seconds: float) -> int:
    return max(0, min(MAX_VISIBILITY_S, int(seconds + 0.999)))


class Queue:
    def __init__(self, sqs: Any, url: str, dlq_url: str | None) -> None:
        self._sqs = sqs
        self.url = url
        self.dlq_url = dlq_url

    @classmethod
    async def resolve(cls, sqs: Any, queue: str, dlq: str) -> Queue:
        url = await _url(sqs, queue)
        try:
            dlq_url: str | None = await _url(sqs, dlq)
        except AwsPermanentError:
            dlq_url = None
        return cls(sqs, url, dlq_url)

    async def receive(self, max_messages: int, wait_s: int, visibility_s: int) -> list[Message]:
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
        try:
            await aws.call(
                "sqs.DeleteMessage",
                self._sqs.delete_message,
                QueueUrl=self.url,
                ReceiptHandle=msg.receipt_handle,
            )
        except AwsPermanentError as exc:
            # A stale handle: the message was received again elsewhere. The work is recorded;
            # the other receiver will see a terminal delivery and delete it as a duplicate.
            log.info("delete_stale_handle", message_id=msg.message_id, error=exc.code)

    async def set_visibility(self, msg: Message, seconds: float) -> bool:
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

    async def extend_batch(self, messages: Sequence[Message], seconds: float) -> list[str]:
        """Heartbeat: push visibility out for many messages, 10 per call. Returns failed ids."""
        failed: list[str] = []
        for start in range(0, len(messages), BATCH):
            chunk = messages[start : start + BATCH]
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
                QueueUrl=self.url,
                Entries=entries,
            )
            failed.extend(chunk[int(f["Id"])].message_id for f in resp.get("Failed", []))
        return failed

    async def dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        """Move a poison message to the DLQ with its reason, then delete it here.

        Send first, delete second: a crash between the two leaves a copy in both queues,
        never in neither.
        """
        if self.dlq_url is None:
            raise AwsPermanentError("sqs.SendMessage", "NoDLQ", "the queue has no DLQ")
        await aws.call(
            "sqs.SendMessage",
            self._sqs.send_message,
            QueueUrl=self.dlq_url,
            MessageBody=msg.body or "(empty)",
            MessageAttributes={
                "mailflow_reason": {"DataType": "String", "StringValue": reason},
                "mailflow_detail": {"DataType": "String", "StringValue": detail[:1000] or "-"},
                "mailflow_source_message_id": {"DataType": "String", "StringValue": msg.message_id},
            },
        )
        await self.delete(msg)

    async def send(self, body: str) -> str:
        resp = await aws.call(
            "sqs.SendMessage",
            self._sqs.send_message,
            QueueUrl=self.url,
            MessageBody=body,
        )
        return str(resp["MessageId"])

    async def depth(self) -> dict[str, int]:
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


async def _url(sqs: Any, queue: str) -> str:
    if queue.startswith(("https://", "http://")):
        return queue
    resp = await aws.call("sqs.GetQueueUrl", sqs.get_queue_url, QueueName=queue)
    return str(resp["QueueUrl"])
