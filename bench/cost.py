"""Cost per million deliveries, from one run's measured figures, at published list prices.

What is measured in the run: requests per delivery by API (the worker's own count of every
try), the delivery items' sizes (a Scan of the phase's table afterwards), and CPU per delivery
(the worker's, and its processors'). Everything else is a stated assumption, listed with the
prices below, so a reader can redo the arithmetic with other numbers.

DynamoDB on-demand bills one write request unit (WRU) per started KB of the larger of the item
before and after a write, and the same again for every write to a global secondary index. The
`attention` index projects ALL attributes and is keyed by `attn`/`attn_at`, which the claim sets
(one index put) and the outcome changes (an index delete plus an index put).
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import boto3

PRICES_AS_OF = "2026-12-02"
REGION = "us-east-1"
#: USD, list prices in us-east-1 (aws.amazon.com/<service>/pricing, checked on PRICES_AS_OF).
PRICE = {
    "sqs_request": 0.40 / 1e6,  # standard queue, per request (per 64 KB chunk)
    "sns_publish": 0.50 / 1e6,  # per publish; deliveries to SQS are free
    "s3_get": 0.0004 / 1000,  # S3 Standard GET/SELECT
    "s3_put": 0.005 / 1000,  # S3 Standard PUT/COPY/POST/LIST
    "ddb_wru": 0.625 / 1e6,  # on-demand write request unit
    "ddb_rru": 0.125 / 1e6,  # on-demand read request unit
    "fargate_vcpu_s": 0.04048 / 3600,  # Linux/x86, per vCPU-second
    "fargate_gb_s": 0.004445 / 3600,  # per GB-second
    "lambda_request": 0.20 / 1e6,
    "lambda_gb_s": 0.0000166667,  # x86
}
#: The worker's task: the smallest Fargate size (0.25 vCPU needs at least 0.5 GB).
TASK_VCPU, TASK_GB = 0.25, 0.5
#: The original design: one Lambda invocation (128 MB, ~300 ms to parse the notification and
#: call ecs:RunTask) and one Fargate task per mail of the same smallest size. Fargate bills from
#: the start of the image pull to the task's stop, rounded up to the second, at least one
#: minute; a task takes 30-60 s to pull, attach its ENI and start, so every mail bills the
#: minute.
LAMBDA_GB, LAMBDA_S = 0.125, 0.3
RUNTASK_BILLED_S = 60.0
RUNTASK_STARTUP_S = (30.0, 60.0)
KB = 1024


def item_bytes(item: dict[str, Any]) -> int:
    """An item's size as DynamoDB counts it (names + values; numbers ~1 byte per 2 digits)."""
    return sum(len(name.encode()) + _value_bytes(value) for name, value in item.items())


def _value_bytes(value: dict[str, Any]) -> int:  # noqa: PLR0911 - one return per type
    (kind, v), *_ = value.items()
    if kind == "S":
        return len(v.encode())
    if kind == "N":
        digits = Decimal(v).normalize().as_tuple().digits
        return math.ceil(len(digits) / 2) + 1
    if kind == "B":
        return len(v)
    if kind in {"BOOL", "NULL"}:
        return 1
    if kind == "L":
        return 3 + sum(1 + _value_bytes(e) for e in v)
    if kind == "M":
        return 3 + sum(1 + len(k.encode()) + _value_bytes(e) for k, e in v.items())
    if kind in {"SS", "NS", "BS"}:
        return sum(_value_bytes({kind[0]: e}) for e in v)
    return 0


def table_items(table: str) -> list[dict[str, Any]]:
    """Every item in `table` (a Scan: run it once the phase is over)."""
    pages = boto3.client("dynamodb").get_paginator("scan").paginate(TableName=table)
    return [item for page in pages for item in page.get("Items", [])]


def attribute_bytes(item: dict[str, Any]) -> dict[str, int]:
    """Where an item's bytes go: each attribute's size (name + value), largest first."""
    sizes = {name: len(name.encode()) + _value_bytes(value) for name, value in item.items()}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def wru(size_bytes: float) -> int:
    """Write request units of one write of an item this size."""
    return max(1, math.ceil(size_bytes / KB))


def per_million(worker: dict[str, Any]) -> dict[str, Any]:
    """The cost table of one worker phase: rows of (line, quantity per delivery, USD per 1M)."""
    calls: dict[str, float] = worker.get("aws_calls_per_delivery", {})
    sizes = worker.get("item_bytes") or {}
    size = float(sizes.get("max") or 0)
    updates = calls.get("ddb.update_item", 0.0)
    # Table: every UpdateItem at the final item's size (items only grow: an upper bound for
    # the claim). Index: a put on claim, a delete and a put on the outcome.
    table_wru = updates * wru(size)
    index_wru = 3 * wru(size) if updates else 0
    sqs = sum(n for op, n in calls.items() if op.startswith("sqs."))
    s3_get = calls.get("s3.get_object", 0.0)
    cpu_ms = float(worker.get("cpu_ms_per_delivery") or 0)
    php_ms = float(worker.get("processor_cpu_ms_per_delivery") or 0)
    task_s = (cpu_ms + php_ms) / 1000 / TASK_VCPU  # task-seconds per delivery at full use
    rows = [
        ("SQS requests (receive, delete, visibility; batched)", sqs, sqs * PRICE["sqs_request"]),
        ("S3 GET (the mail)", s3_get, s3_get * PRICE["s3_get"]),
        (
            f"DynamoDB WRU, table ({updates:g} UpdateItem × {wru(size)})",
            table_wru,
            table_wru * PRICE["ddb_wru"],
        ),
        (
            "DynamoDB WRU, attention index (put; delete + put)",
            index_wru,
            index_wru * PRICE["ddb_wru"],
        ),
        (
            (
                f"Fargate task-seconds at {TASK_VCPU} vCPU / {TASK_GB} GB"
                f" (worker {cpu_ms:.1f} + processor {php_ms:.1f} ms CPU)"
            ),
            task_s,
            task_s * (TASK_VCPU * PRICE["fargate_vcpu_s"] + TASK_GB * PRICE["fargate_gb_s"]),
        ),
    ]
    ours = sum(r[2] for r in rows)
    lam = PRICE["lambda_request"] + LAMBDA_GB * LAMBDA_S * PRICE["lambda_gb_s"]
    task = RUNTASK_BILLED_S * (
        TASK_VCPU * PRICE["fargate_vcpu_s"] + TASK_GB * PRICE["fargate_gb_s"]
    )
    original = [
        (f"Lambda: 1 request + {LAMBDA_GB * 1024:.0f} MB × {LAMBDA_S} s", 1.0, lam),
        (
            (
                f"ecs:RunTask per mail: {RUNTASK_BILLED_S:.0f} s billed (start-up"
                f" {RUNTASK_STARTUP_S[0]:.0f}-{RUNTASK_STARTUP_S[1]:.0f} s, 1 min minimum)"
            ),
            RUNTASK_BILLED_S,
            task,
        ),
        # The same S3 GET and DynamoDB writes (a task still fetches the mail and records it).
        ("S3 GET and DynamoDB writes (as above)", 1.0, rows[1][2] + rows[2][2] + rows[3][2]),
    ]
    common = [
        ("S3 PUT by SES (the mail)", 1.0, PRICE["s3_put"]),
        ("SNS publish by SES (the notification)", 1.0, PRICE["sns_publish"]),
    ]
    million = 1e6
    return {
        "as_of": PRICES_AS_OF,
        "region": REGION,
        "item_bytes_max": int(size),
        "item_wru_per_write": wru(size),
        "ours": [(name, round(q, 3), round(usd * million, 3)) for name, q, usd in rows],
        "ours_usd_per_million": round(ours * million, 2),
        "original": [(name, round(q, 3), round(usd * million, 2)) for name, q, usd in original],
        "original_usd_per_million": round(sum(r[2] for r in original) * million, 2),
        "common": [(name, q, round(usd * million, 2)) for name, q, usd in common],
        "common_usd_per_million": round(sum(r[2] for r in common) * million, 2),
    }


def markdown(cost: dict[str, Any]) -> list[str]:
    """The cost table as markdown lines."""
    lines = [
        "",
        (
            f"Cost per million deliveries, {cost['region']} list prices of {cost['as_of']}"
            f" (one recipient per mail; a delivery item of ≤ {cost['item_bytes_max']} bytes"
            f" costs {cost['item_wru_per_write']} WRU per write):"
        ),
        "",
        "| | per delivery | USD per 1M |",
        "|---|---:|---:|",
    ]
    lines += [f"| mailflow: {n} | {q:g} | {usd:,.2f} |" for n, q, usd in cost["ours"]]
    lines.append(f"| **mailflow, total** | | **{cost['ours_usd_per_million']:,.2f}** |")
    lines += [f"| original design: {n} | {q:g} | {usd:,.2f} |" for n, q, usd in cost["original"]]
    lines.append(
        f"| **original design (Lambda + RunTask per mail), total** | |"
        f" **{cost['original_usd_per_million']:,.2f}** |"
    )
    lines += [f"| both: {n} | {q:g} | {usd:,.2f} |" for n, q, usd in cost["common"]]
    return lines
