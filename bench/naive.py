"""The naive consumer: what a hand-rolled SQS worker typically looks like.

One message at a time: receive → claim (DynamoDB conditional write) → get (S3, into memory)
→ run (subprocess, mail on stdin) → record (DynamoDB conditional write) → delete (SQS).
Synchronous boto3, no prefetch, no concurrency, no heartbeat. It does the same work per
delivery as mailflow (same calls, same processor), so the ratio between the two measures the
worker's concurrency and overhead, not a difference in the job.

Configuration comes from the environment (set by bench/run.py):
NAIVE_QUEUE_URL, NAIVE_TABLE, NAIVE_ARGV (JSON list; `{store}` is replaced), NAIVE_MATCH
(regex with a `store` group). AWS_* as usual. SIGTERM: finish the current message, then exit.

Every delivery prints one JSON line on stdout with wall-clock stamps (received, spawn, exit,
recorded), like the `timing_ms` of mailflow's canonical `delivery` line.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import boto3
from botocore import xform_name

stopping = False


def _stop(*_: object) -> None:
    global stopping  # noqa: PLW0603 - a signal flag
    stopping = True


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    queue_url = os.environ["NAIVE_QUEUE_URL"]
    table = os.environ["NAIVE_TABLE"]
    argv_template = json.loads(os.environ["NAIVE_ARGV"])
    match = re.compile(os.environ["NAIVE_MATCH"])
    sqs = boto3.client("sqs")
    s3 = boto3.client("s3")
    ddb = boto3.client("dynamodb")
    requests: dict[str, int] = {}  # by "<service>.<client method>", like the worker's count

    def count(prefix: str) -> Callable[..., None]:
        def counted(model: Any, **_: object) -> None:
            name = f"{prefix}.{xform_name(model.name)}"
            requests[name] = requests.get(name, 0) + 1

        return counted

    for client, prefix in ((sqs, "sqs"), (s3, "s3"), (ddb, "ddb")):
        client.meta.events.register("before-call", count(prefix))
    worker = f"naive:{os.getpid()}"
    print(json.dumps({"event": "naive_started", "pid": os.getpid()}), flush=True)
    while not stopping:
        resp = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=1,
            WaitTimeSeconds=1,
            VisibilityTimeout=60,
        )
        for msg in resp.get("Messages", []):
            received = time.time()
            note = json.loads(json.loads(msg["Body"])["Message"])
            mail_id = note["mail"]["messageId"]
            action = note["receipt"]["action"]
            recipient = note["receipt"]["recipients"][0].lower()
            store = match.fullmatch(recipient)
            argv = [a.replace("{store}", store["store"] if store else "000") for a in argv_template]
            key = {"mail_id": {"S": mail_id}, "recipient": {"S": recipient}}
            token = secrets.token_hex(16)
            now = time.time()
            try:
                ddb.update_item(
                    TableName=table,
                    Key=key,
                    UpdateExpression="SET #s = :p, lease_token = :t, lease_owner = :w,"
                    " lease_expires_at = :e, started_at = :n ADD attempts :one",
                    ConditionExpression="attribute_not_exists(mail_id) OR #s = :r",
                    ExpressionAttributeNames={"#s": "status"},
                    ExpressionAttributeValues={
                        ":p": {"S": "processing"},
                        ":t": {"S": token},
                        ":w": {"S": worker},
                        ":e": {"N": str(now + 60)},
                        ":n": {"N": str(now)},
                        ":one": {"N": "1"},
                        ":r": {"S": "received"},
                    },
                )
            except ddb.exceptions.ConditionalCheckFailedException:
                sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=msg["ReceiptHandle"])
                continue
            body = s3.get_object(Bucket=action["bucketName"], Key=action["objectKey"])[
                "Body"
            ].read()
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "MAILFLOW_DELIVERY_ID": f"{mail_id}:{recipient}",
                "RECIPIENT": recipient,
            }
            spawn = time.time()
            proc = subprocess.run(argv, input=body, capture_output=True, env=env, check=False)
            exited = time.time()
            status = "succeeded" if proc.returncode == 0 else "failed"
            ddb.update_item(
                TableName=table,
                Key=key,
                UpdateExpression="SET #s = :s, exit_code = :c, finished_at = :f,"
                " stdout_tail = :o, stderr_tail = :x REMOVE lease_expires_at",
                ConditionExpression="lease_token = :t",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":s": {"S": status},
                    ":c": {"N": str(proc.returncode)},
                    ":f": {"N": str(exited)},
                    ":o": {"S": proc.stdout[-4096:].decode(errors="replace")},
                    ":x": {"S": proc.stderr[-4096:].decode(errors="replace")},
                    ":t": {"S": token},
                },
            )
            recorded = time.time()
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=msg["ReceiptHandle"])
            print(
                json.dumps(
                    {
                        "event": "delivery",
                        "mail_id": mail_id,
                        "recipient": recipient,
                        "status": status,
                        "stamps": {
                            "received": received,
                            "admitted": received,
                            "spawn": spawn,
                            "exit": exited,
                            "recorded": recorded,
                        },
                    },
                ),
                flush=True,
            )
    print(json.dumps({"event": "naive_stopped", "aws_requests": requests}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
