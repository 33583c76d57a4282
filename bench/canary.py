"""Control for the event-loop lag figure: an asyncio loop that does nothing but the canary.

    python bench/canary.py OUT.json

Runs alongside the worker during a bench phase and measures its own sleep overshoot the same
way the worker's MAILFLOW_LOOP_LAG_PROBE does. Its lag is what the machine (scheduler, other
processes, CPU contention) adds; the worker's lag beyond it is what the worker adds itself.
SIGTERM: write [[epoch_s, lag_ms], ...] to OUT.json and exit.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

INTERVAL_S = 0.005


async def main(out: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    samples: list[tuple[float, float]] = []
    print("canary_started", flush=True)
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(INTERVAL_S)
        lag_ms = (loop.time() - start - INTERVAL_S) * 1000
        samples.append((round(time.time(), 4), round(lag_ms, 3)))
    out.write_text(json.dumps(samples), encoding="utf-8")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
