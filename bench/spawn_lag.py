"""Event-loop lag while processors start: mailflow's ExecProcessor with its spawner helper
(processors/spawner.py), the same with the previous spawner (Popen in a worker thread,
MAILFLOW_SPAWNER=thread) and the plain `asyncio.create_subprocess_exec` baseline, measured
in the same run, same machine.

    .venv/bin/python bench/spawn_lag.py [--runs 200] [--concurrency 16] [--command CMD]

A canary task sleeps 1 ms at a time and records how late it wakes: that lateness is what every
other delivery's heartbeat and I/O would suffer. Prints p50/p99/max for both, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mailflow.processors.child import SPAWNER_ENV
from mailflow.processors.exec import ExecProcessor, ProcessRequest

CANARY_S = 0.001


async def canary(stop: asyncio.Event, lags_ms: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(CANARY_S)
        lags_ms.append((loop.time() - start - CANARY_S) * 1000)


async def baseline_run(argv: list[str], stdin: Path) -> None:
    with stdin.open("rb") as fh:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=fh,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            process_group=0,
        )
    await proc.communicate()


async def mailflow_run(argv: list[str], stdin: Path) -> None:
    await ExecProcessor().run(
        ProcessRequest(
            argv=tuple(argv), env={"PATH": "/usr/bin:/bin"}, stdin_path=stdin, timeout_s=30
        )
    )


async def measure(kind: str, argv: list[str], stdin: Path, runs: int, conc: int) -> dict:
    lags: list[float] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(canary(stop, lags))
    slots = asyncio.Semaphore(conc)
    one = baseline_run if kind == "asyncio" else mailflow_run
    if kind == "thread":
        os.environ[SPAWNER_ENV] = "thread"
    else:
        os.environ.pop(SPAWNER_ENV, None)

    async def job() -> None:
        async with slots:
            await one(argv, stdin)

    started = time.perf_counter()
    await asyncio.gather(*(job() for _ in range(runs)))
    elapsed = time.perf_counter() - started
    stop.set()
    await probe
    lags.sort()
    return {
        "kind": kind,
        "runs_per_s": runs / elapsed,
        "p50_ms": statistics.median(lags),
        "p99_ms": lags[int(len(lags) * 0.99)],
        "max_ms": lags[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    default = "php -r usleep(100000);" if shutil.which("php") else "sleep 0.1"
    parser.add_argument("--command", default=default)
    args = parser.parse_args()
    argv = shlex.split(args.command)
    with tempfile.TemporaryDirectory() as tmp:
        stdin = Path(tmp) / "mail"
        stdin.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
        results = [  # interleaved, so both see the same machine noise
            asyncio.run(measure(kind, argv, stdin, args.runs, args.concurrency))
            for kind in ("asyncio", "thread", "mailflow") * 2
        ]
    print(f"command: {args.command!r}, {args.runs} runs, {args.concurrency} at a time")
    print("| spawner | runs/s | loop lag p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['kind']} | {r['runs_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f}"
            f" | {r['max_ms']:.2f} |"
        )
    p99 = {
        kind: statistics.mean(r["p99_ms"] for r in results if r["kind"] == kind)
        for kind in ("asyncio", "thread", "mailflow")
    }
    print(
        f"loop lag p99: mailflow {p99['mailflow']:.2f} ms, thread spawner {p99['thread']:.2f}"
        f" ms, asyncio {p99['asyncio']:.2f} ms (ratio to the thread spawner"
        f" {p99['mailflow'] / p99['thread']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
