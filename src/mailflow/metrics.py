"""CloudWatch embedded metric format (EMF) for the canonical outcome line. Pure.

The worker logs one JSON line per delivery outcome. Adding an `_aws` member turns that same
line into metrics when it reaches CloudWatch Logs: no agent, no PutMetricData calls, and the
numbers can never disagree with the log.
"""

from __future__ import annotations

from typing import Any

DIMENSIONS = (("route", "status"), ("status",))


def emf(
    namespace: str,
    *,
    route: str,
    status: str,
    attempt: int,
    processor_ms: float | None,
    queue_lag_ms: float | None,
    now_ms: int,
) -> dict[str, Any]:
    """The members to add to one delivery's outcome log line so CloudWatch reads it as metrics.

    One `deliveries` count and the `attempt` number, plus `processor_ms` and `queue_lag_ms`
    (milliseconds) when known, dimensioned by (route, status) and by status; `now_ms` is the
    metric timestamp in epoch milliseconds."""
    metrics: list[dict[str, str]] = [
        {"Name": "deliveries", "Unit": "Count"},
        {"Name": "attempt", "Unit": "Count"},
    ]
    values: dict[str, Any] = {"deliveries": 1, "attempt": attempt}
    if processor_ms is not None:
        metrics.append({"Name": "processor_ms", "Unit": "Milliseconds"})
        values["processor_ms"] = round(processor_ms, 1)
    if queue_lag_ms is not None:
        metrics.append({"Name": "queue_lag_ms", "Unit": "Milliseconds"})
        values["queue_lag_ms"] = round(queue_lag_ms, 1)
    return {
        "_aws": {
            "Timestamp": now_ms,
            "CloudWatchMetrics": [
                {
                    "Namespace": namespace,
                    "Dimensions": [list(d) for d in DIMENSIONS],
                    "Metrics": metrics,
                },
            ],
        },
        "route": route,
        "status": status,
        **values,
    }
