"""`make bench` works: a tiny run (N=16) of bench/run.py end to end (moto, naive consumer, worker on
both AWS clients, fastcgi when php-fpm is there, spawn lag, RSS, fairness). Only the shape of
the output is checked here; the figures mean something at the default size
(docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_and_writes_its_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--backend",
            "moto",  # the default (dynalite + LocalStack) needs `make backends`
            # Enough deliveries that the steady-state window (n/10 .. n - n/10) spans several
            # CPU clock ticks of every consumer: at 8 one read 0.0 ms per delivery once.
            "--n",
            "16",
            "--big-mails",
            "2",
            "--big-mib",
            "1",
            "--rss-processor-ms",
            "200",
            "--flood",
            "8",
            "--spawn-runs",
            "8",
            "--skip",
            "native",  # the same phase code on another processor: not worth CI's time
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "latest.json").read_text())
    table = (out / "latest.md").read_text()
    print(table)
    assert result["backend"].startswith("moto")
    for consumer in ("naive", "worker", "lean"):
        figures = result[consumer]
        assert figures["throughput_per_s"] > 0
        assert figures["cpu_ms_per_delivery"] > 0
        assert figures["deliveries"] == 16
    assert result["worker"]["loop_lag_samples"] > 0
    assert result["rss"]["statuses"] == ["succeeded"]
    assert result["fairness"]["lone_latency_ms"] is not None
    names = {t["target"] for t in result["targets"]}
    assert "throughput vs naive consumer (botocore client)" in names
    assert "worker CPU per delivery (lean client)" in names
    assert result["lean"]["aws_calls_per_delivery"]["ddb.update_item"] > 0  # counted on lean too
    assert result["spawn_lag"]["helper"]["p99_ms"] >= 0
    assert result["worker"]["cpu_ceiling_per_s"] > 0
    assert "| target | measured | limit | met |" in table
    assert result["worker"]["aws_calls_per_delivery"]["ddb.update_item"] > 0
    assert result["worker"]["item_bytes"]["max"] > 0
    assert result["cost"]["ours_usd_per_million"] > 0
    assert "Cost per million deliveries" in table
