"""Is the worker alive and responsive? The health file `mailflow check` reads, and an opt-in
event-loop lag canary for benchmarks and diagnosis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("mailflow.worker.health")

#: Opt-in event-loop lag canary (bench, diagnosis): any value logs `loop_lag` (p50/p99/max) at
#: shutdown; a value with a `/` is also a path that gets the samples, [[epoch_s, lag_ms], ...].
LOOP_LAG_PROBE_ENV = "MAILFLOW_LOOP_LAG_PROBE"
LOOP_LAG_INTERVAL_S = 0.005
LOOP_LAG_MAX_SAMPLES = 500_000


class LoopLagProbe:
    """A canary task: sleeps a fixed interval and records how late it woke (blocked loop)."""

    def __init__(self, target: str, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        self.target = target
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []

    @classmethod
    def from_env(cls) -> LoopLagProbe | None:
        """A probe when MAILFLOW_LOOP_LAG_PROBE is set, else None (the default: no probe)."""
        target = os.environ.get(LOOP_LAG_PROBE_ENV, "")
        return cls(target) if target else None

    async def run(self) -> None:
        """Sample the loop's lag every `interval_s` until cancelled (or MAX_SAMPLES are kept)."""
        loop = asyncio.get_running_loop()
        while len(self.samples) < LOOP_LAG_MAX_SAMPLES:
            start = loop.time()
            await asyncio.sleep(self.interval_s)
            lag_s = loop.time() - start - self.interval_s
            self.samples.append((round(time.time(), 4), round(lag_s * 1000, 3)))

    def report(self) -> None:
        """Log p50/p99/max lag (ms); write the samples to `target` when it is a path."""
        lags = sorted(lag for _, lag in self.samples)
        if lags:
            log.info(
                "loop_lag",
                samples=len(lags),
                p50_ms=lags[len(lags) // 2],
                p99_ms=lags[min(len(lags) - 1, len(lags) * 99 // 100)],
                max_ms=lags[-1],
            )
        if "/" in self.target:
            with contextlib.suppress(OSError):
                Path(self.target).write_text(json.dumps(self.samples), encoding="utf-8")


def write_health(path: Path, doc: dict[str, Any]) -> None:
    """Replace the health file with `doc` as JSON, atomically (write aside, rename); its mtime is
    what `mailflow check` measures. Failures are ignored: a full disk must not stop the worker."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        tmp.replace(path)


def health_age_s(path: Path, now: float | None = None) -> float | None:
    """Seconds since the health file was last written; None when it is missing or unreadable."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    return (now if now is not None else time.time()) - mtime
