"""Epoch seconds as text: one ISO-8601 form for JSON output, notifications and tables."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso(ts: Any) -> str | None:
    """`ts` (epoch seconds) as `2026-12-02T04:28:37.123Z`; None for anything not a number."""
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
