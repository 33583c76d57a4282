"""mailflow benchmark: the worker against a naive sequential consumer, same run, same backend.

    .venv/bin/python bench/run.py                 # N=300, concurrency 16, 100 ms processor
    .venv/bin/python bench/run.py --n 20 --big-mails 2 --big-mib 1 --flood 20  # smoke size

Modules, one per part of a run: backend.py (the AWS endpoints, own processes), load.py (fresh
resources, producer, consumer processes), analysis.py (steady-state figures), report.py
(targets and the tables); this file runs the phases.

Phases (each on fresh resources of one backend, see backend.py):

1. naive     bench/naive.py, one message at a time (boto3), N deliveries.
2. worker    `python -m mailflow worker` (exec transport), N deliveries.
3. lean      the same worker with MAILFLOW_AWS_CLIENT=lean (mailflow.aws.lean: the hot calls
             without botocore's per-request pipeline), N deliveries.
4. fastcgi   the lean worker with the fastcgi transport against sidecar/run-local (php-fpm),
             when mailflow.processors.fastcgi, sidecar/run-local and php-fpm exist; php-fpm's
             CPU counts as the processors'.
5. native    naive and lean again with bench/processor.c (built with cc) as the processor:
             the same 100 ms sleep with almost no CPU of its own, so php-cli's start-up
             (~15-20 ms of CPU a run) does not fill the cores: what the worker overlaps.
6. spawn     bench/spawn_lag.py: event-loop lag while 16 processors at a time start, the
             spawner helper beside the thread spawner and plain asyncio, interleaved.
7. rss       16 concurrent 40 MiB mails through a fresh worker: its VmHWM.
8. fairness  a flood of one store (max_in_flight_per_key=1) through --fair-workers worker
             processes (3), then one mail of another store: how long the lone mail takes, in
             units of one flood delivery's time, and whether the store's runs ever overlapped.

A producer thread keeps at most --depth messages in the system (queued + in flight): moto's
SQS scans the whole queue on every receive, so a deep queue would measure moto, not us.

Figures are ratios and per-delivery costs measured in this run: the machine is shared, so
absolute wall-clock numbers are reported for context only. Output: a markdown table on stdout
and in <out>/latest.md, all figures in <out>/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3

import backend
import cost
import load
import spawn_lag
from analysis import analyse, machine, read_sizes, read_times, stamps_of
from load import (
    BENCH,
    MATCH,
    MIB,
    ORDER_MAIL,
    PROFILE_DIR,
    RUNNER_SCRIPT,
    Consumer,
    Phase,
    Producer,
    processor_route,
    start_fpm,
    stop_fpm,
    stores,
    worker_consumer,
)
from report import markdown, shown, verdicts

# --- phases ----------------------------------------------------------------------------------


def run_throughput(
    kind: str,
    args: argparse.Namespace,
    tmp: Path,
    aws: backend.Backend,
    extra_env: dict[str, str] | None = None,
    processor_pid: int | None = None,
    native: Path | None = None,
) -> dict[str, Any]:
    times = tmp / f"times-{kind}.txt"
    route = processor_route(args.processor_ms, times, native=native)
    phase = Phase.create(kind, route, tmp, concurrency=args.concurrency, wait_time_s=2)
    key = phase.put_mail(ORDER_MAIL)
    n = args.n
    window = (max(1, n // 10), n - max(1, n // 10))
    lag_file = tmp / f"lag-{kind}.json"
    if kind.startswith("naive"):
        consumer = Consumer(
            "naive",
            [sys.executable, str(BENCH / "naive.py")],
            os.environ
            | {
                "NAIVE_QUEUE_URL": phase.queue_url,
                "NAIVE_TABLE": phase.settings.table,
                "NAIVE_ARGV": json.dumps(route.command.split()),
                "NAIVE_MATCH": MATCH,
            },
            window,
            log_stream="stdout",
        )
    else:
        consumer = worker_consumer(
            kind,
            phase,
            window,
            MAILFLOW_LOOP_LAG_PROBE=str(lag_file),
            **(extra_env or {}),
        )
    consumer.backend = aws
    consumer.processor_pid = processor_pid
    consumer.start(tmp / f"{kind}.out")
    consumer.wait_started()
    spy = py_spy(args, kind, consumer.proc.pid)
    canary_file = tmp / f"canary-{kind}.json"
    canary = subprocess.Popen(
        [sys.executable, str(BENCH / "canary.py"), str(canary_file)],
        stdout=subprocess.PIPE,
    )
    assert canary.stdout is not None
    canary.stdout.readline()
    producer = Producer(phase, key, stores(50), n, args.depth, consumer.done)
    started = time.monotonic()
    producer.start()
    consumer.wait_done(n, timeout_s=max(120, n * 2.0))
    wall_s = time.monotonic() - started
    hwm_kib = consumer.hwm_kib() or 0  # while the process is alive
    canary.terminate()
    canary.wait(10)
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        spy.wait(60)
    code = consumer.stop()
    result = analyse(
        consumer,
        times,
        lag_file if not kind.startswith("naive") else None,
        canary_file,
    )
    result["vm_hwm_mb"] = round(hwm_kib / 1024, 1)
    items = sorted(cost.table_items(phase.settings.table), key=cost.item_bytes)
    if items:
        sizes = [cost.item_bytes(i) for i in items]
        result["item_bytes"] = {"p50": sizes[len(sizes) // 2], "max": sizes[-1]}
        result["item_bytes_by_attribute"] = cost.attribute_bytes(items[-1])
    stopped = next(
        (e for e in consumer.events if e.get("event") in {"worker_stopped", "naive_stopped"}), {}
    )
    consumer_calls = dict(sorted(stopped.get("aws_requests", {}).items()))
    result["aws_calls_per_delivery"] = {
        op: round(count / n, 2) for op, count in consumer_calls.items()
    }
    result["aws_calls_per_delivery_total"] = round(sum(consumer_calls.values()) / n, 2)
    if not kind.startswith("naive"):
        result["worker_stats"] = {
            k: v for k, v in stopped.items() if k not in {"event", "timestamp", "level"}
        }
    if producer.error:
        raise producer.error
    result["exit_code"] = code
    result["wall_s_total"] = round(wall_s, 2)
    return result


def py_spy(args: argparse.Namespace, kind: str, pid: int) -> subprocess.Popen[bytes] | None:
    """With --py-spy DIR: sample `pid`'s on-CPU stacks (idle waits excluded) into DIR."""
    if args.py_spy is None:
        return None
    exe = shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("--py-spy needs py-spy on PATH (pip install py-spy)")
    args.py_spy.mkdir(parents=True, exist_ok=True)
    out = args.py_spy / f"{kind}.txt"
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_rss(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    times = tmp / "times-rss.txt"
    route = processor_route(args.rss_processor_ms, times)  # long enough for all to overlap
    phase = Phase.create(
        "rss",
        route,
        tmp,
        concurrency=args.big_mails,
        wait_time_s=1,
        max_mail_bytes=max(40 * MIB, args.big_mib * MIB),
    )
    # Just under the limit (SES's own is 40 MiB), as 78-byte lines.
    lines = (args.big_mib * MIB - len(ORDER_MAIL) - 2) // 78
    raw = ORDER_MAIL + b"\r\n" + (b"x" * 76 + b"\r\n") * lines
    key = phase.put_mail(raw)
    consumer = worker_consumer("rss", phase, (0, 0), MAILFLOW_CONCURRENCY=str(args.big_mails))
    consumer.start(tmp / "rss.out")
    consumer.wait_started()
    time.sleep(1.0)
    idle_kib = consumer.hwm_kib() or 0
    producer = Producer(
        phase, key, stores(args.big_mails), args.big_mails, args.big_mails, consumer.done
    )
    producer.start()
    consumer.wait_done(args.big_mails, timeout_s=300)
    peak_kib = consumer.hwm_kib() or 0
    consumer.stop()
    statuses = sorted({str(d.get("status")) for d in consumer.deliveries})
    own = read_times(times)
    sizes = {len(raw)}
    spans = sorted(own.values())
    overlap = 0
    for t0, _ in spans:  # the most processors alive at one moment
        overlap = max(overlap, sum(1 for s0, s1 in spans if s0 <= t0 <= s1))
    return {
        "mails": args.big_mails,
        "mail_mib": round(max(sizes) / MIB, 2),
        "statuses": statuses,
        "stdin_bytes_seen": sorted(set(read_sizes(times))),
        "max_concurrent_processors": overlap,
        "vm_hwm_idle_mb": round(idle_kib / 1024, 1),
        "vm_hwm_peak_mb": round(peak_kib / 1024, 1),
    }


def merged_stats(stopped: list[dict[str, Any]]) -> dict[str, int | float]:
    """The workers' `worker_stopped` counters, added up (`max_*` ones: the largest)."""
    out: dict[str, int | float] = {}
    for stats in stopped:
        for k, v in stats.items():
            if isinstance(v, (int, float)) and k != "exit_code":
                out[k] = max(out.get(k, v), v) if k.startswith("max_") else out.get(k, 0) + v
    return out


def run_fairness(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    times = tmp / "times-fair.txt"
    route = processor_route(args.processor_ms, times, max_per_key=1)
    phase = Phase.create("fair", route, tmp, concurrency=args.concurrency, wait_time_s=1)
    key = phase.put_mail(ORDER_MAIL)
    # Several worker processes: max_in_flight_per_key is the service's limit, not a process's.
    consumers = [worker_consumer(f"fair{i}", phase, (0, 0)) for i in range(args.fair_workers)]
    for i, c in enumerate(consumers):
        c.start(tmp / f"fair{i}.out")
    for c in consumers:
        c.wait_started()

    def deliveries() -> list[dict[str, Any]]:
        return [d for c in consumers for d in list(c.deliveries)]

    flood = Producer(
        phase,
        key,
        lambda _: "ne-001@orders.example.com",
        args.flood,
        args.flood + 10,
        consumers[0].done,
    )
    flood.run()  # all of it queued at once: that is the flood
    lone_id, body = phase.body(key, "ne-002@orders.example.com")
    boto3.client("sqs").send_message(QueueUrl=phase.queue_url, MessageBody=body)
    lone_sent = time.time()
    deadline = time.monotonic() + max(120.0, args.flood * 0.5)
    lone = None
    while lone is None and time.monotonic() < deadline:
        lone = next((d for d in deliveries() if d.get("mail_id") == lone_id), None)
        if any(c.proc.poll() is not None for c in consumers):
            break
        time.sleep(0.05)
    flood_done_before = sum(
        1 for d in deliveries() if d.get("recipient") == "ne-001@orders.example.com"
    )
    # A few more flood deliveries for a stable per-delivery time.
    settle = time.monotonic() + 30
    while len(deliveries()) < flood_done_before + 6 and time.monotonic() < settle:
        time.sleep(0.1)
    for c in consumers:  # all at once: one stopping worker's parked mail goes back to SQS,
        if c.proc.poll() is None:  # and would otherwise be received again by the others
            c.proc.send_signal(signal.SIGTERM)
    for c in consumers:
        c.stop()
    stopped = [
        next((e for e in c.events if e.get("event") == "worker_stopped"), {}) for c in consumers
    ]
    flood_rows = [
        stamps_of(d) for d in deliveries() if d.get("recipient") == "ne-001@orders.example.com"
    ]
    per_delivery_ms = (
        statistics.median((r["recorded"] - r["admitted"]) * 1000 for r in flood_rows if r)
        if any(flood_rows)
        else None
    )
    spans = sorted((r["spawn"], r["exit"]) for r in flood_rows if r)
    out: dict[str, Any] = {
        "flood": args.flood,
        "workers": len(consumers),
        "flood_per_delivery_ms_p50": round(per_delivery_ms, 1) if per_delivery_ms else None,
        "flood_done_before_lone": flood_done_before,
        # Two runs of the one store at once (must be 0: max_in_flight_per_key=1).
        "flood_overlaps": sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1]),
        "worker_stats": merged_stats(stopped),
    }
    if lone is None:
        out["lone_latency_ms"] = None
        out["lone_latency_in_deliveries"] = None
        return out
    st = stamps_of(lone)
    recorded = st["recorded"] if st else lone["_seen_at"]
    out["lone_latency_ms"] = round((recorded - lone_sent) * 1000, 1)
    if per_delivery_ms:
        out["lone_latency_in_deliveries"] = round(out["lone_latency_ms"] / per_delivery_ms, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="deliveries per throughput phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--processor-ms", type=int, default=100)
    parser.add_argument("--depth", type=int, default=50, help="max messages in the system")
    parser.add_argument("--big-mails", type=int, default=16)
    parser.add_argument("--big-mib", type=int, default=40)
    parser.add_argument("--rss-processor-ms", type=int, default=3000)
    parser.add_argument("--flood", type=int, default=300, help="fairness: flood size")
    parser.add_argument(
        "--fair-workers", type=int, default=3, help="fairness: worker processes (default 3)"
    )
    parser.add_argument(
        "--backend",
        choices=backend.KINDS,
        default="emulators",
        help="emulators: DynamoDB on dynalite, S3/SQS/SNS on LocalStack (make backends); moto",
    )
    parser.add_argument(
        "--skip", default="", help="comma list: naive,worker,lean,fastcgi,native,spawn,rss,fairness"
    )
    parser.add_argument(
        "--spawn-runs", type=int, default=200, help="spawn lag: processor starts per spawner"
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--profile", type=Path, help="run workers under cProfile, .prof files here")
    parser.add_argument(
        "--py-spy", type=Path, help="sample each throughput consumer with py-spy, stacks here"
    )
    args = parser.parse_args(argv)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE_DIR.append(args.profile.resolve())
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    with contextlib.suppress(OSError):
        (args.out / "logs").mkdir(parents=True, exist_ok=True)
    print(f"bench: starting the {args.backend} backend …", file=sys.stderr, flush=True)
    aws = backend.start(args.backend, args.out / "logs")
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[name]  # the backend's endpoints and credentials, nothing of the caller's
    os.environ.update(aws.env)
    res: dict[str, Any] = {
        "machine": machine(),
        "backend": aws.name,
        "backend_kind": aws.kind,
        "params": {k: (shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "skipped": [],
    }
    try:
        with tempfile.TemporaryDirectory(prefix="mailflow-bench-") as tmpdir:
            tmp = Path(tmpdir)

            def throughput(kind: str, native: Path | None = None) -> None:
                print(f"bench: {kind} …", file=sys.stderr, flush=True)
                lean = {"MAILFLOW_AWS_CLIENT": "lean"} if kind.startswith("lean") else None
                res[kind] = run_throughput(kind, args, tmp, aws, lean, native=native)

            for kind in ("naive", "worker", "lean"):
                if kind not in skip:
                    throughput(kind)
            if "fastcgi" not in skip:
                fpm = start_fpm(tmp, args.concurrency + 4)
                if fpm is None:
                    res["skipped"].append(
                        "fastcgi (no mailflow.processors.fastcgi, run-local or php-fpm)"
                    )
                else:
                    print("bench: fastcgi …", file=sys.stderr, flush=True)
                    try:
                        res["fastcgi"] = run_throughput(
                            "fastcgi",
                            args,
                            tmp,
                            aws,
                            {
                                "MAILFLOW_PROCESSOR_TRANSPORT": "fastcgi",
                                "MAILFLOW_FASTCGI_ADDRESS": fpm[1],
                                "MAILFLOW_RUNNER_SCRIPT": str(RUNNER_SCRIPT),
                                "MAILFLOW_AWS_CLIENT": "lean",
                            },
                            processor_pid=fpm[0].pid,
                        )
                    finally:
                        stop_fpm(fpm[0])
            if "native" not in skip:
                native = load.build_native_processor(tmp)
                if native is None:
                    res["skipped"].append("native (no C compiler for bench/processor.c)")
                else:
                    for kind in ("naive_native", "lean_native"):
                        throughput(kind, native)
            if "spawn" not in skip:
                print("bench: spawn lag …", file=sys.stderr, flush=True)
                res["spawn_lag"] = spawn_lag.measure_all(
                    args.spawn_runs, args.concurrency, spawn_lag.default_command()
                )
            if "rss" not in skip:
                print("bench: rss …", file=sys.stderr, flush=True)
                res["rss"] = run_rss(args, tmp)
            if "fairness" not in skip:
                print("bench: fairness …", file=sys.stderr, flush=True)
                res["fairness"] = run_fairness(args, tmp)
    finally:
        aws.stop()
    if res.get("worker"):
        res["cost"] = cost.per_million(res["worker"])
    res["targets"] = verdicts(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    table = markdown(res)
    (args.out / "latest.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
