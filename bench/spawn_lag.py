"""Event-loop lag while processors start: mailflow's ExecProcessor as configured (spawner
helper, processors at nice 10), the helper with processors at the worker's priority, the
previous spawner (Popen in a worker thread, MAILFLOW_SPAWNER=thread, niced as configured) and
the plain `asyncio.create_subprocess_exec` baseline, measured in the same run, same machine.

    .venv/bin/python bench/spawn_lag.py [--runs 200] [--concurrency 16] [--command CMD]

A canary task sleeps 1 ms at a time and records how late it wakes: that lateness is what every
other delivery's heartbeat and I/O would suffer. Prints p50/p99/max for each, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mailflow.processors.child import SPAWNER_ENV
from mailflow.processors.exec import DEFAULT_NICE, ExecProcessor, ProcessRequest

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


async def mailflow_run(argv: list[str], stdin: Path, nice: int = DEFAULT_NICE) -> None:
    await ExecProcessor(nice=nice).run(
        ProcessRequest(
            argv=tuple(argv), env={"PATH": "/usr/bin:/bin"}, stdin_path=stdin, timeout_s=30
        )
    )


async def measure(kind: str, argv: list[str], stdin: Path, runs: int, conc: int) -> dict:
    lags: list[float] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(canary(stop, lags))
    slots = asyncio.Semaphore(conc)
    if kind == "asyncio":
        one = baseline_run
    elif kind == "mailflow_nice0":
        one = functools.partial(mailflow_run, nice=0)
    else:
        one = mailflow_run
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


KINDS = ("asyncio", "thread", "mailflow_nice0", "mailflow")
#: Report names: "helper" is mailflow as configured (spawner helper, processors niced).
NAMES = {"mailflow": "helper", "mailflow_nice0": "helper_nice0"}


def default_command() -> str:
    """A 100 ms processor: php when installed (what production starts), else sleep."""
    return "php -r usleep(100000);" if shutil.which("php") else "sleep 0.1"


def measure_all(runs: int, concurrency: int, command: str) -> dict:
    """Each spawner twice, interleaved so all see the same machine noise; per spawner the mean
    of its two runs ("mailflow" is the spawner helper, reported as "helper")."""
    argv = shlex.split(command)
    with tempfile.TemporaryDirectory() as tmp:
        stdin = Path(tmp) / "mail"
        stdin.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
        results = [asyncio.run(measure(kind, argv, stdin, runs, concurrency)) for kind in KINDS * 2]
    out: dict = {"command": command, "runs": runs, "concurrency": concurrency, "raw": results}
    for kind in KINDS:
        mine = [r for r in results if r["kind"] == kind]
        out[NAMES.get(kind, kind)] = {
            key: round(statistics.mean(r[key] for r in mine), 2)
            for key in ("runs_per_s", "p50_ms", "p99_ms", "max_ms")
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--command", default=default_command())
    args = parser.parse_args()
    res = measure_all(args.runs, args.concurrency, args.command)
    print(f"command: {args.command!r}, {args.runs} runs, {args.concurrency} at a time")
    print("| spawner | runs/s | loop lag p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---:|---:|---:|---:|")
    for r in res["raw"]:
        print(
            f"| {r['kind']} | {r['runs_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f}"
            f" | {r['max_ms']:.2f} |"
        )
    p99 = {kind: res[kind]["p99_ms"] for kind in ("asyncio", "thread", "helper_nice0", "helper")}
    print(
        f"loop lag p99: mailflow {p99['helper']:.2f} ms (processors at nice {DEFAULT_NICE};"
        f" at nice 0: {p99['helper_nice0']:.2f} ms), thread spawner {p99['thread']:.2f}"
        f" ms, asyncio {p99['asyncio']:.2f} ms (ratio to the thread spawner"
        f" {p99['helper'] / p99['thread']:.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
