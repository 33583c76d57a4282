"""Chaos, CI size: real worker processes, kills, duplicates, poison, AWS faults.

The full run (N >= 300) is `make chaos` (tests/chaos/run.py); this is the same harness,
smaller, so every CI run proves the accounting: nothing lost, repeated side effects only
where a worker was killed after a processor's side effect, nothing left in flight.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.run import ChaosConfig, run_chaos


@pytest.mark.php
def test_chaos_small(tmp_path: Path) -> None:
    cfg = ChaosConfig(
        deliveries=60,
        workers=2,
        kills=3,
        seed=20241203,
        wave=20,
        timeout_s=240,
        workdir=tmp_path / "chaos",
    )
    report = run_chaos(cfg)
    assert report.problems == []
    assert report.lost == []
    assert report.wrong == []
    assert report.unexplained_dups == []
    assert len(report.kills) >= 3
    assert report.faults > 0
    assert report.copies > 0
    assert not any(report.queue_left.values())
