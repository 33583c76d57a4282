"""Analysis: steady-state figures of one phase, from the consumers' lines, /proc and the
processor's own stamps."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 3)


def cpu_s(pid: int) -> float:
    """utime + stime of the process itself (children excluded), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu_s(pid: int) -> float:
    """CPU of the processors: what `pid` and its living children (the spawner helper) have
    reaped (cutime + cstime)."""
    total = 0.0
    for p in [pid, *_children_of(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[13]) + int(fields[14])) / CLK_TCK
    return total


def runqueue_wait_s(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU (schedstat), seconds."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
    return kids


def vm_kib(pid: int, name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    php = shutil.which("php")
    php_version = (
        subprocess.run(
            [php, "-r", "echo PHP_VERSION;"], capture_output=True, text=True, check=False
        ).stdout
        if php
        else None
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "php": php_version,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def stamps_of(doc: dict[str, Any]) -> dict[str, float] | None:
    """Wall-clock stamps of one delivery, from a naive line or mailflow's `timing_ms`."""
    if "stamps" in doc:
        return dict(doc["stamps"])
    timing, spawn = doc.get("timing_ms"), doc.get("processor_started_at")
    if not timing or spawn is None or not {"queued", "pre", "run", "post"} <= set(timing):
        return None
    admitted = spawn - timing["pre"] / 1000
    exited = spawn + timing["run"] / 1000
    return {
        "received": admitted - timing["queued"] / 1000,
        "admitted": admitted,
        "spawn": spawn,
        "exit": exited,
        "recorded": exited + timing["post"] / 1000,
    }


def read_sizes(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line.split()[3]) for line in path.read_text().splitlines() if line.strip()]


def read_times(path: Path) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                out[parts[0]] = (float(parts[1]), float(parts[2]))
    return out


def lag_stats(path: Path | None, start: float, end: float, prefix: str) -> dict[str, Any]:
    if path is None or not path.exists():
        return {}
    samples = json.loads(path.read_text())
    lags = [lag for t, lag in samples if start <= t <= end]
    return {
        f"{prefix}_samples": len(lags),
        f"{prefix}_p50_ms": pct(lags, 50),
        f"{prefix}_p99_ms": pct(lags, 99),
        f"{prefix}_max_ms": max(lags) if lags else None,
    }


def analyse(
    consumer: Any,  # load.Consumer (load imports this module)
    times: Path,
    lag_file: Path | None = None,
    canary_file: Path | None = None,
) -> dict[str, Any]:
    """Steady-state figures of one throughput phase."""
    a, b = consumer.window
    own = read_times(times)
    rows = []
    for doc in consumer.deliveries:
        st = stamps_of(doc)
        did = f"{doc.get('mail_id')}:{doc.get('recipient')}"
        if st is None or did not in own:
            continue
        t0, t1 = own[did]
        rows.append(st | {"t0": t0, "t1": t1})
    rows.sort(key=lambda r: r["recorded"])
    if len(rows) <= b:
        raise RuntimeError(f"{consumer.name}: only {len(rows)} timed deliveries, window {a}..{b}")
    start, end = rows[a]["recorded"], rows[b]["recorded"]
    window = [r for r in rows if start <= r["recorded"] <= end]
    ta, cpu_a, backend_a, kids_a, wait_a = consumer.cpu_marks[a]
    tb, cpu_b, backend_b, kids_b, wait_b = consumer.cpu_marks[b]
    ms = 1000.0
    result: dict[str, Any] = {
        "deliveries": len(consumer.deliveries),
        "window": [a, b],
        "throughput_per_s": round((b - a) / (end - start), 2),
        "cpu_ms_per_delivery": round((cpu_b - cpu_a) * ms / (b - a), 3),
        "cpu_window_s": round(cpu_b - cpu_a, 2),
        # Runnable but not running: the consumer waiting for a CPU (a saturated machine).
        "runqueue_wait_ms_per_delivery": round((wait_b - wait_a) * ms / (b - a), 2),
        # The processors' own CPU (reaped children): the legacy script's cost, same for both.
        "processor_cpu_ms_per_delivery": round((kids_b - kids_a) * ms / (b - a), 2),
        # Each backend process's CPU over the same window (it serves the producer too: one
        # SendMessageBatch per ten mails, a small share).
        "backend_cpu_ms_per_delivery_by_process": {
            name: round((backend_b[name] - backend_a[name]) * ms / (b - a), 2) for name in backend_a
        },
        "backend_cpu_ms_per_delivery": round(
            sum(backend_b[n] - backend_a[n] for n in backend_a) * ms / (b - a), 2
        ),
        # What one core of the busiest backend process can serve at that cost: the ceiling
        # for any consumer driving it (moto and LocalStack are single Python processes).
        "backend_ceiling_per_s": round(
            (b - a) / max(1e-9, *(backend_b[n] - backend_a[n] for n in backend_a)), 1
        )
        if backend_a
        else None,
        # received → processor's own first instruction, minus time spent waiting for a run slot
        "pre_ms_p50": pct([(r["t0"] - r["admitted"]) * ms for r in window], 50),
        "pre_ms_p99": pct([(r["t0"] - r["admitted"]) * ms for r in window], 99),
        # processor's own last instruction → outcome recorded
        "post_ms_p50": pct([(r["recorded"] - r["t1"]) * ms for r in window], 50),
        "post_ms_p99": pct([(r["recorded"] - r["t1"]) * ms for r in window], 99),
        "queued_ms_p50": pct([(r["admitted"] - r["received"]) * ms for r in window], 50),
        "claim_fetch_ms_p50": pct([(r["spawn"] - r["admitted"]) * ms for r in window], 50),
        "spawn_to_script_ms_p50": pct([(r["t0"] - r["spawn"]) * ms for r in window], 50),
        "script_to_reaped_ms_p50": pct([(r["exit"] - r["t1"]) * ms for r in window], 50),
        "run_minus_own_ms_p50": pct(
            [((r["exit"] - r["spawn"]) - (r["t1"] - r["t0"])) * ms for r in window],
            50,
        ),
        "run_minus_own_ms_p99": pct(
            [((r["exit"] - r["spawn"]) - (r["t1"] - r["t0"])) * ms for r in window],
            99,
        ),
        "own_ms_p50": pct([(r["t1"] - r["t0"]) * ms for r in window], 50),
        # How many processors were running on average: the concurrency actually achieved.
        "processor_occupancy": round(sum(r["t1"] - r["t0"] for r in window) / (end - start), 2),
    }
    result |= lag_stats(lag_file, ta, tb, "loop_lag")
    result |= lag_stats(canary_file, ta, tb, "canary_lag")
    return result
