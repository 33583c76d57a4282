"""Fairness across stores: one store's flood must not starve another store's mail.

Routes name a key (the store) with `max_in_flight_per_key`; a message whose store is busy is
*parked* without using prefetch room (worker.py), so the worker keeps receiving and the other
stores' mail runs at once. Parked messages are capped; beyond the cap they are deferred, paced
so that each costs about one extra receive, never a march into the DLQ.

Moto server over HTTP, an in-process worker, real php-cli processors. Every bound is relative
to the per-delivery time measured in the same run: the machine is shared.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailflow.aws import AwsClients, open_clients
from mailflow.aws.ledger import TERMINAL
from mailflow.config import Route
from mailflow.dev.ses import received_notification, topic_arn
from support.harness import Env, run_worker_until

#: The lone store's mail may take at most this many flood deliveries' time.
K_DELIVERIES = 10

PROCESSOR = """<?php
// fairness test processor: STORE SLEEP_MS LOG. One line per run: store mail_id start end.
$t0 = microtime(true);
stream_get_contents(STDIN);
usleep((int) $argv[2] * 1000);
file_put_contents($argv[3], sprintf("%s %s %.6f %.6f\\n", $argv[1],
    getenv('MAILFLOW_MAIL_ID'), $t0, microtime(true)), FILE_APPEND | LOCK_EX);
"""

MAIL = (
    b"From: Shop <shop@example.com>\r\nTo: ne-001@orders.example.com\r\n"
    b"Subject: order\r\n\r\nOrder 1001\r\n"
)


pytestmark = pytest.mark.php


def store_route(tmp_path: Path, sleep_ms: int) -> tuple[Route, Path]:
    script = tmp_path / "store.php"
    script.write_text(PROCESSOR)
    log = tmp_path / "runs.log"
    route = Route(
        name="store",
        match=r"ne-(?P<store>[0-9]{3})@orders\.example\.com",
        command=f"php {script} {{store}} {sleep_ms} {log}",
        key="store",
        max_in_flight_per_key=1,
    )
    return route, log


def runs(log: Path) -> list[tuple[str, str, float, float]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        store, mail_id, start, end = line.split()
        out.append((store, mail_id, float(start), float(end)))
    return out


async def flood(env: Env, clients: AwsClients, store: str, count: int) -> list[str]:
    """`count` mails for one store, queued at once: one stored object, SNS-shaped notices."""
    key = f"{env.settings.incoming_prefix}flood-{uuid.uuid4().hex[:8]}"
    env.boto("s3").put_object(Bucket=env.settings.bucket, Key=key, Body=MAIL)
    arn = await topic_arn(clients, env.settings)
    sqs, url = env.boto("sqs"), env.queue_url()
    mail_ids = []
    for start in range(0, count, 10):
        entries = []
        for i in range(start, min(count, start + 10)):
            mail_id = f"flood{i:04d}{uuid.uuid4().hex[:12]}"
            note = received_notification(
                mail_id=mail_id,
                bucket=env.settings.bucket,
                key=key,
                prefix=env.settings.incoming_prefix,
                topic_arn=arn,
                sender="shop@example.com",
                recipients=[f"ne-{store}@orders.example.com"],
                common_headers={},
                now=datetime.now(UTC),
            )
            body = {"Type": "Notification", "TopicArn": arn, "Message": json.dumps(note)}
            entries.append({"Id": str(i - start), "MessageBody": json.dumps(body)})
            mail_ids.append(mail_id)
        assert not sqs.send_message_batch(QueueUrl=url, Entries=entries).get("Failed")
    return mail_ids


def test_a_flood_of_one_store_does_not_starve_another(env: Env, tmp_path: Path) -> None:
    route, log = store_route(tmp_path, sleep_ms=500)
    settings = env.with_settings(routes=(route,), concurrency=4)
    flood_size = 200
    result: dict[str, float] = {}

    async def scenario() -> None:
        async with open_clients() as clients:
            await flood(env, clients, "001", flood_size)
            sent = time.time()
            lone_id = await env.send(clients, MAIL, ["ne-002@orders.example.com"])

            async def lone_done_or_starved(c: AwsClients) -> bool:
                flood_runs = [r for r in runs(log) if r[0] == "001"]
                if len(flood_runs) >= 4 * K_DELIVERIES:
                    return True  # starved: stop and let the assertions say so
                records = await env.records(c, lone_id)
                lone_done = bool(records) and records[0].get("status") in TERMINAL
                return lone_done and len(flood_runs) >= 3

            worker = await run_worker_until(
                settings,
                clients,
                lone_done_or_starved,
                timeout_s=240,
                poll_s=0.1,
            )
            (lone,) = await env.records(clients, lone_id) or [{}]
            result["lone_latency_s"] = float(lone.get("finished_at", float("inf"))) - sent
            result["lone_status"] = lone.get("status")  # type: ignore[assignment]
            result.update({f"stat_{k}": v for k, v in worker.stats.items()})

    asyncio.run(scenario())
    flood_runs = [r for r in runs(log) if r[0] == "001"]
    lone_runs = [r for r in runs(log) if r[0] == "002"]
    # One flood delivery, as the store's gate sees it: from one flood run's end to the next
    # one's end (claim, fetch, run, record: everything the key is busy with).
    ends = sorted(r[3] for r in flood_runs)
    per_delivery_s = statistics.median(b - a for a, b in itertools.pairwise(ends))
    lone_end = lone_runs[0][3] if lone_runs else float("inf")
    before = sum(1 for r in flood_runs if r[3] < lone_end)
    print(
        f"\nlone store's mail: {result['lone_latency_s']:.2f}s after it was sent;"
        f" one flood delivery {per_delivery_s:.2f}s (median);"
        f" {before} flood deliveries finished before it;"
        f" ratio {result['lone_latency_s'] / per_delivery_s:.1f} (bound {K_DELIVERIES});"
        f" worker: parked={result.get('stat_parked', -1):.0f}"
        f" deferred={result.get('stat_deferred_busy_key', -1):.0f}"
        f" max_receive_count={result.get('stat_max_receive_count', -1):.0f}",
    )
    assert result["lone_status"] == "succeeded", f"lone mail starved behind {before} flood mails"
    assert result["lone_latency_s"] < K_DELIVERIES * per_delivery_s
    assert before < K_DELIVERIES
    assert result.get("stat_deferred_busy_key", 0) > 0  # the flood went past the parking cap
    assert env.drain_queue(dlq=True) == []


def test_deferred_flood_completes_once_each_without_burning_receive_counts(
    env: Env,
    tmp_path: Path,
) -> None:
    route, log = store_route(tmp_path, sleep_ms=50)
    # 2 run slots + 2 prefetch: parking cap 16, so most of the flood is deferred.
    settings = env.with_settings(routes=(route,), concurrency=2)
    flood_size = 60

    async def scenario() -> dict[str, int]:
        async with open_clients() as clients:
            mail_ids = await flood(env, clients, "003", flood_size)

            async def all_done(_c: AwsClients) -> bool:
                return len(runs(log)) >= flood_size and env.queue_counts() == {
                    "visible": 0,
                    "in_flight": 0,
                }

            worker = await run_worker_until(settings, clients, all_done, timeout_s=240)
            records = [r for m in mail_ids for r in await env.records(clients, m)]
            assert len(records) == flood_size
            assert {r["status"] for r in records} == {"succeeded"}
            assert {r["attempts"] for r in records} == {1}
            return worker.stats

    stats = asyncio.run(scenario())
    done = runs(log)
    assert len(done) == flood_size  # each ran exactly once
    # max_in_flight_per_key=1: no two runs of the store overlapped
    spans = sorted((start, end) for _, _, start, end in done)
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans))
    print(f"\nflood of {flood_size}: {stats}")
    assert stats["deferred_busy_key"] > 0
    # Paced deferrals: a deferred message comes back about when the store has room, so it
    # is received about twice, nowhere near the redrive threshold.
    assert stats["max_receive_count"] <= 3 < settings.max_receive_count
    assert env.drain_queue(dlq=True) == []
