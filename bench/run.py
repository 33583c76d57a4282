"""mailflow benchmark: the worker against a naive sequential consumer, same run, same backend.

    .venv/bin/python bench/run.py                 # N=300, concurrency 16, 100 ms processor
    .venv/bin/python bench/run.py --n 20 --quick  # the CI smoke size

Phases (each on fresh resources of one embedded moto server, a subprocess):

1. naive     bench/naive.py, one message at a time (boto3), N deliveries.
2. worker    `python -m mailflow worker` (exec transport), N deliveries.
3. fastcgi   the same worker with the fastcgi transport against sidecar/run-local (php-fpm),
             when mailflow.processors.fastcgi, sidecar/run-local and php-fpm exist.
4. rss       16 concurrent 40 MiB mails through a fresh worker: its VmHWM.
5. fairness  a flood of one store (max_in_flight_per_key=1), then one mail of another store:
             how long the lone mail takes, in units of one flood delivery's time.

A producer thread keeps at most --depth messages in the system (queued + in flight): moto's
SQS scans the whole queue on every receive, so a deep queue would measure moto, not us.

Figures are ratios and per-delivery costs measured in this run: the machine is shared, so
absolute wall-clock numbers are reported for context only. Output: a markdown table on stdout
and in <out>/latest.md, all figures in <out>/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def _shown(path: Path) -> str:
    """A path for the results file: relative to the repository, so no machine path lands."""
    try:
        return str(path.resolve().relative_to(REPO.resolve()))
    except ValueError:
        return path.name


sys.path.insert(0, str(REPO / "src"))

from mailflow.aws import open_clients  # noqa: E402
from mailflow.config import Route, Settings  # noqa: E402
from mailflow.dev.provision import provision  # noqa: E402
from mailflow.dev.ses import received_notification  # noqa: E402

PHP_PROCESSOR = BENCH / "processor.php"
PY_PROCESSOR = BENCH / "processor.py"
MATCH = r"ne-(?P<store>[0-9]{3})@orders\.example\.com"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

TARGETS = {
    "cpu_ms_per_delivery": 2.0,
    "throughput_ratio": 8.0,
    "loop_lag_p99_ms": 5.0,
    "peak_rss_mb": 150.0,
    "fastcgi_overhead_ms": 1.0,
}

ORDER_MAIL = (
    "From: Shop <shop@example.com>\r\n"
    "To: ne-001@orders.example.com\r\n"
    "Subject: =?UTF-8?B?5rOo5paH44Gu44GK55+l44KJ44Gb?=\r\n"
    "Date: Mon, 1 Jun 2026 10:00:00 +0900\r\n"
    "Message-ID: <bench@example.com>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=UTF-8\r\n"
    "\r\n" + "注文番号: 1001\r\n商品: 靴下 × 3\r\n" * 40
).encode()


# --- small helpers ---------------------------------------------------------------------------


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


def vm_kib(pid: int, name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


# --- the backend -----------------------------------------------------------------------------


class Moto:
    """moto server in its own process, so its CPU is not the bench's or the worker's."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "backend.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=os.environ | {"PYTHONPATH": str(REPO / "src")},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("MOTO_URL="):
            self.stop()
            raise RuntimeError(f"moto server did not start: {line!r}")
        self.url = line.removeprefix("MOTO_URL=")
        from importlib.metadata import version  # noqa: PLC0415

        self.name = f"moto {version('moto')} server (own process, loopback HTTP)"

    def calls(self) -> dict[str, int]:
        """Requests per operation since the last call (the counter resets)."""
        with urllib.request.urlopen(self.url + "/_bench/calls", timeout=10) as resp:  # noqa: S310
            return dict(json.loads(resp.read()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def aws_env(url: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@dataclass
class Phase:
    """Fresh resources for one phase, and the settings a worker for it runs with."""

    name: str
    settings: Settings
    queue_url: str = ""
    topic_arn: str = ""

    @classmethod
    def create(cls, name: str, route: Route, tmp: Path, **overrides: Any) -> Phase:
        uid = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        settings = Settings(
            bucket=uid,
            topic=uid,
            queue=uid,
            table=uid,
            routes=(route,),
            heartbeat_file=tmp / f"{uid}.heartbeat",
            spool_dir=tmp / "spool",
            log_format="json",
            **overrides,
        )
        phase = cls(name, settings)
        out = asyncio.run(_provision(settings))
        phase.queue_url, phase.topic_arn = out["queue_url"], out["topic_arn"]
        return phase

    def worker_env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        env = {
            "MAILFLOW_BUCKET": s.bucket,
            "MAILFLOW_TOPIC": s.topic,
            "MAILFLOW_QUEUE": s.queue,
            "MAILFLOW_TABLE": s.table,
            "MAILFLOW_ROUTES": json.dumps([r.model_dump() for r in s.routes]),
            "MAILFLOW_CONCURRENCY": str(s.concurrency),
            "MAILFLOW_VISIBILITY_TIMEOUT_S": str(s.visibility_timeout_s),
            "MAILFLOW_LEASE_S": str(s.lease_s),
            "MAILFLOW_WAIT_TIME_S": str(s.wait_time_s),
            "MAILFLOW_HEARTBEAT_FILE": str(s.heartbeat_file),
            "MAILFLOW_SPOOL_DIR": str(s.spool_dir),
            "MAILFLOW_LOG_FORMAT": "json",
            "MAILFLOW_SHUTDOWN_GRACE_S": "30",
            "MAILFLOW_MAX_MAIL_BYTES": str(s.max_mail_bytes),
        }
        return env | extra

    def put_mail(self, raw: bytes) -> str:
        key = f"{self.settings.incoming_prefix}shared-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").put_object(Bucket=self.settings.bucket, Key=key, Body=raw)
        return key

    def body(self, key: str, recipient: str) -> tuple[str, str]:
        """(mail id, SQS body): the SES notification in its SNS envelope, as SNS delivers it."""
        mail_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        note = received_notification(
            mail_id=mail_id,
            bucket=self.settings.bucket,
            key=key,
            prefix=self.settings.incoming_prefix,
            topic_arn=self.topic_arn,
            sender="shop@example.com",
            recipients=[recipient],
            common_headers={"subject": "order"},
            now=now,
        )
        envelope = {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": self.topic_arn,
            "Subject": "Amazon SES Email Receipt Notification",
            "Message": json.dumps(note, ensure_ascii=False),
            "Timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        return mail_id, json.dumps(envelope)


async def _provision(settings: Settings) -> dict[str, str]:
    async with open_clients() as clients:
        return await provision(clients, settings)


def processor_route(sleep_ms: int, times: Path, max_per_key: int | None = None) -> Route:
    php = shutil.which("php")
    if php:
        command = f"{php} {PHP_PROCESSOR} {{store}} {sleep_ms} {times}"
    else:
        command = f"{sys.executable} {PY_PROCESSOR} {{store}} {sleep_ms} {times}"
    return Route(
        name="bench",
        match=MATCH,
        command=command,
        key="store",
        max_in_flight_per_key=max_per_key,
    )


# --- the producer ----------------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.value = 0
        self.cond = threading.Condition()

    def add(self) -> None:
        with self.cond:
            self.value += 1
            self.cond.notify_all()

    def wait_above(self, value: int, timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.value > value, timeout_s)


def check_sent(resp: dict[str, Any]) -> None:
    if resp.get("Failed"):
        raise RuntimeError(f"send_message_batch failed: {resp['Failed']}")


class Producer(threading.Thread):
    """Sends `count` notifications, keeping (sent − done) ≤ depth: a shallow, never-empty queue."""

    def __init__(
        self,
        phase: Phase,
        key: str,
        recipients: Callable[[int], str],
        count: int,
        depth: int,
        done: Counter,
    ) -> None:
        super().__init__(name=f"producer-{phase.name}", daemon=True)
        self.phase, self.key, self.recipients = phase, key, recipients
        self.count, self.depth, self.done = count, depth, done
        self.sent = 0
        self.sent_at: dict[str, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            sqs = boto3.client("sqs")
            while self.sent < self.count:
                room = min(10, self.depth - (self.sent - self.done.value), self.count - self.sent)
                if room <= 0:
                    self.done.wait_above(self.done.value, 0.05)
                    continue
                entries = []
                for i in range(room):
                    mail_id, body = self.phase.body(self.key, self.recipients(self.sent + i))
                    entries.append({"Id": str(i), "MessageBody": body})
                    self.sent_at[mail_id] = time.time()
                resp = sqs.send_message_batch(QueueUrl=self.phase.queue_url, Entries=entries)
                check_sent(resp)
                self.sent += room
        except BaseException as exc:
            self.error = exc
            raise


# --- consumers (worker or naive), as subprocesses --------------------------------------------


@dataclass
class Consumer:
    """A consumer process whose JSON lines (one per delivery) are read as they come."""

    name: str
    argv: list[str]
    env: dict[str, str]
    window: tuple[int, int]  # steady state: from the a-th to the b-th completion
    log_stream: str = "stderr"
    done: Counter = field(default_factory=Counter)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    cpu_marks: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    backend_pid: int = 0
    started: threading.Event = field(default_factory=threading.Event)

    def start(self, stdout_path: Path) -> None:
        out = stdout_path.open("w")
        pipe_stderr = self.log_stream == "stderr"
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE if not pipe_stderr else out,
            stderr=subprocess.PIPE if pipe_stderr else out,
        )
        stream = self.proc.stderr if pipe_stderr else self.proc.stdout
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                self.other.append(line.rstrip())
                continue
            event = doc.get("event")
            if event in {"worker_started", "naive_started"}:
                self.started.set()
            if event == "delivery":
                doc["_seen_at"] = time.time()
                self.deliveries.append(doc)
                n = len(self.deliveries)
                if n in self.window:
                    backend = cpu_s(self.backend_pid) if self.backend_pid else 0.0
                    self.cpu_marks[n] = (time.time(), cpu_s(self.proc.pid), backend)
                self.done.add()
            elif event is not None:
                self.events.append(doc)

    def wait_started(self, timeout_s: float = 60) -> None:
        if not self.started.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.other[-20:]))

    def wait_done(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.done.value < count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n" + "\n".join(self.other[-20:]))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {self.done.value}/{count} after {timeout_s}s")
            self.done.wait_above(self.done.value, 0.5)

    def hwm_kib(self) -> int | None:
        return vm_kib(self.proc.pid, "VmHWM")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


#: Set by --profile: run workers under cProfile, one .prof file per phase in this directory.
PROFILE_DIR: list[Path] = []


def worker_consumer(name: str, phase: Phase, window: tuple[int, int], **env: str) -> Consumer:
    argv = [sys.executable, "-m", "mailflow", "worker"]
    if PROFILE_DIR:  # CPU-time profile (bench/profiled.py)
        argv = [sys.executable, str(BENCH / "profiled.py"), str(PROFILE_DIR[0] / f"{name}.prof")]
    return Consumer(
        name,
        argv,
        os.environ | {"PYTHONPATH": str(REPO / "src")} | phase.worker_env(**env),
        window,
    )


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
    consumer: Consumer,
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
    (ta, cpu_a, backend_a), (tb, cpu_b, backend_b) = consumer.cpu_marks[a], consumer.cpu_marks[b]
    ms = 1000.0
    result: dict[str, Any] = {
        "deliveries": len(consumer.deliveries),
        "window": [a, b],
        "throughput_per_s": round((b - a) / (end - start), 2),
        "cpu_ms_per_delivery": round((cpu_b - cpu_a) * ms / (b - a), 3),
        "cpu_window_s": round(cpu_b - cpu_a, 2),
        "backend_cpu_ms_per_delivery": round((backend_b - backend_a) * ms / (b - a), 2),
        # What one core of the backend process can serve at that cost: moto is one Python
        # process, so this is the ceiling for any consumer driving it.
        "backend_ceiling_per_s": round(
            (b - a) / max(backend_b - backend_a, 1e-9),
            1,
        ),
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


def stores(count: int) -> Callable[[int], str]:
    return lambda i: f"ne-{i % count + 1:03d}@orders.example.com"


# --- phases ----------------------------------------------------------------------------------


def run_throughput(
    kind: str,
    args: argparse.Namespace,
    tmp: Path,
    moto: Moto,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    times = tmp / f"times-{kind}.txt"
    route = processor_route(args.processor_ms, times)
    phase = Phase.create(kind, route, tmp, concurrency=args.concurrency, wait_time_s=2)
    key = phase.put_mail(ORDER_MAIL)
    n = args.n
    window = (max(1, n // 10), n - max(1, n // 10))
    lag_file = tmp / f"lag-{kind}.json"
    if kind == "naive":
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
    consumer.backend_pid = moto.proc.pid
    consumer.start(tmp / f"{kind}.out")
    consumer.wait_started()
    canary_file = tmp / f"canary-{kind}.json"
    canary = subprocess.Popen(
        [sys.executable, str(BENCH / "canary.py"), str(canary_file)],
        stdout=subprocess.PIPE,
    )
    assert canary.stdout is not None
    canary.stdout.readline()
    moto.calls()  # reset the per-operation counter
    producer = Producer(phase, key, stores(50), n, args.depth, consumer.done)
    started = time.monotonic()
    producer.start()
    consumer.wait_done(n, timeout_s=max(120, n * 2.0))
    wall_s = time.monotonic() - started
    hwm_kib = consumer.hwm_kib() or 0  # while the process is alive
    calls = moto.calls()
    canary.terminate()
    canary.wait(10)
    code = consumer.stop()
    result = analyse(
        consumer,
        times,
        lag_file if kind != "naive" else None,
        canary_file,
    )
    result["vm_hwm_mb"] = round(hwm_kib / 1024, 1)
    consumer_calls = {
        op: count
        for op, count in sorted(calls.items())
        if op not in {"sqs.SendMessageBatch", "s3.PUT"}  # the producer's
    }
    result["aws_calls_per_delivery"] = {
        op: round(count / n, 2) for op, count in consumer_calls.items()
    }
    result["aws_calls_per_delivery_total"] = round(sum(consumer_calls.values()) / n, 2)
    if kind != "naive":
        stopped = next((e for e in consumer.events if e.get("event") == "worker_stopped"), {})
        result["worker_stats"] = {
            k: v for k, v in stopped.items() if k not in {"event", "timestamp", "level"}
        }
    if producer.error:
        raise producer.error
    result["exit_code"] = code
    result["wall_s_total"] = round(wall_s, 2)
    return result


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


def run_fairness(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    times = tmp / "times-fair.txt"
    route = processor_route(args.processor_ms, times, max_per_key=1)
    phase = Phase.create("fair", route, tmp, concurrency=args.concurrency, wait_time_s=1)
    key = phase.put_mail(ORDER_MAIL)
    consumer = worker_consumer("fair", phase, (0, 0))
    consumer.start(tmp / "fair.out")
    consumer.wait_started()
    flood = Producer(
        phase,
        key,
        lambda _: "ne-001@orders.example.com",
        args.flood,
        args.flood + 10,
        consumer.done,
    )
    flood.run()  # all of it queued at once: that is the flood
    lone_id, body = phase.body(key, "ne-002@orders.example.com")
    boto3.client("sqs").send_message(QueueUrl=phase.queue_url, MessageBody=body)
    lone_sent = time.time()
    deadline = time.monotonic() + max(120.0, args.flood * 0.5)
    lone = None
    while lone is None and time.monotonic() < deadline:
        lone = next((d for d in consumer.deliveries if d.get("mail_id") == lone_id), None)
        if consumer.proc.poll() is not None:
            break
        time.sleep(0.05)
    flood_done_before = sum(
        1 for d in consumer.deliveries if d.get("recipient") == "ne-001@orders.example.com"
    )
    # A few more flood deliveries for a stable per-delivery time.
    with contextlib.suppress(RuntimeError):
        consumer.wait_done(len(consumer.deliveries) + 5, timeout_s=30)
    consumer.stop()
    stopped = next((e for e in consumer.events if e.get("event") == "worker_stopped"), {})
    flood_rows = [
        stamps_of(d)
        for d in consumer.deliveries
        if d.get("recipient") == "ne-001@orders.example.com"
    ]
    per_delivery_ms = (
        statistics.median((r["recorded"] - r["admitted"]) * 1000 for r in flood_rows if r)
        if any(flood_rows)
        else None
    )
    out: dict[str, Any] = {
        "flood": args.flood,
        "flood_per_delivery_ms_p50": round(per_delivery_ms, 1) if per_delivery_ms else None,
        "flood_done_before_lone": flood_done_before,
        "worker_stats": {
            k: v for k, v in stopped.items() if k not in {"event", "timestamp", "level"}
        },
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


def start_fpm(args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    run_local = REPO / "sidecar" / "run-local"
    try:
        import mailflow.processors.fastcgi  # noqa: F401, PLC0415
    except ImportError:
        return None
    search = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin"
    fpm = next(
        (
            shutil.which(n, path=search)
            for n in ("php-fpm8.2", "php-fpm")
            if shutil.which(n, path=search)
        ),
        None,
    )
    if not run_local.exists() or fpm is None or shutil.which("php") is None:
        return None
    address = f"127.0.0.1:{free_port()}"
    php = shutil.which("php")
    env = os.environ | {
        "PHP_FPM": fpm,
        "MAILFLOW_FASTCGI_ADDRESS": address,
        "MAILFLOW_RUNNER_ALLOW": json.dumps([[php, str(PHP_PROCESSOR)]]),
        "MAILFLOW_FPM_RUNDIR": str(tmp / "fpm"),
        "MAILFLOW_FPM_MAX_CHILDREN": str(args.concurrency + 4),
    }
    log = (tmp / "fpm.log").open("wb")
    proc = subprocess.Popen(
        [str(run_local)], env=env, stdout=log, stderr=log, start_new_session=True
    )
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.2):
            return proc, address
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    stop_fpm(proc)
    return None


def stop_fpm(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- report ----------------------------------------------------------------------------------


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    naive, worker = res.get("naive"), res.get("worker")
    rows: list[dict[str, Any]] = []

    def row(
        name: str,
        value: float | None,
        target: float,
        unit: str,
        *,
        higher_better: bool = False,
    ) -> None:
        ok = None if value is None else (value >= target if higher_better else value <= target)
        rows.append(
            {
                "target": name,
                "value": value,
                "limit": target,
                "unit": unit,
                "op": "≥" if higher_better else "≤",
                "met": ok,
            }
        )

    if naive and worker:
        ratio = round(worker["throughput_per_s"] / naive["throughput_per_s"], 2)
        res["throughput_ratio"] = ratio
        row(
            "throughput vs naive consumer",
            ratio,
            TARGETS["throughput_ratio"],
            "×",
            higher_better=True,
        )
    if worker:
        row(
            "worker CPU per delivery",
            worker["cpu_ms_per_delivery"],
            TARGETS["cpu_ms_per_delivery"],
            "ms",
        )
        row(
            "event-loop lag p99 while spawning",
            worker.get("loop_lag_p99_ms"),
            TARGETS["loop_lag_p99_ms"],
            "ms",
        )
    if res.get("rss"):
        row(
            f"peak RSS, {res['rss']['mails']} × {res['rss']['mail_mib']:.0f} MiB mails",
            res["rss"]["vm_hwm_peak_mb"],
            TARGETS["peak_rss_mb"],
            "MB",
        )
    fc = res.get("fastcgi")
    if fc and worker:
        over = round(fc["run_minus_own_ms_p50"] - worker["run_minus_own_ms_p50"], 2)
        res["fastcgi_overhead_ms"] = over
        row(
            "fastcgi overhead per delivery (vs exec, p50)",
            over,
            TARGETS["fastcgi_overhead_ms"],
            "ms",
        )
    fair = res.get("fairness")
    if fair:
        row(
            "lone store's latency under a flood, in flood deliveries (test bound)",
            fair.get("lone_latency_in_deliveries"),
            10.0,
            "deliveries",
        )
    return rows


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        (
            f"mailflow bench, {m['at']}: {m['cpu'] or 'unknown CPU'}, {m['cores']} cores,"
            f" load average at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])};"
            f" Python {m['python']}, PHP {m['php'] or '(none: Python processor)'}."
        ),
        (
            f"Backend: {res['backend']}. N={res['params']['n']}, concurrency"
            f" {res['params']['concurrency']}, processor sleeps {res['params']['processor_ms']}"
            f" ms, ≤ {res['params']['depth']} messages in the system."
        ),
        "",
        "| target | measured | limit | met |",
        "|---|---:|---:|:-:|",
    ]
    for v in res["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[v["met"]]
        lines.append(
            f"| {v['target']} | {fmt(v['value'])} {v['unit']} |"
            f" {v['op']} {fmt(v['limit'])} {v['unit']} | {met} |"
        )
    cols = [c for c in ("naive", "worker", "fastcgi") if res.get(c)]
    fields = [
        ("throughput_per_s", "steady-state throughput (/s)"),
        ("cpu_ms_per_delivery", "consumer CPU per delivery (ms, own process)"),
        ("pre_ms_p50", "received → processor start, p50 (ms)"),
        ("pre_ms_p99", "received → processor start, p99 (ms)"),
        ("post_ms_p50", "processor exit → outcome recorded, p50 (ms)"),
        ("post_ms_p99", "processor exit → outcome recorded, p99 (ms)"),
        ("claim_fetch_ms_p50", "  of which claim + S3 fetch, p50 (ms)"),
        ("spawn_to_script_ms_p50", "  of which spawn → script's first line, p50 (ms)"),
        ("run_minus_own_ms_p50", "transport time beyond the script's own, p50 (ms)"),
        ("queued_ms_p50", "waiting for a run slot (prefetched), p50 (ms)"),
        ("processor_occupancy", "processors running, mean (of the concurrency)"),
        ("loop_lag_p99_ms", "event-loop lag p99 (ms)"),
        ("loop_lag_max_ms", "event-loop lag max (ms)"),
        ("canary_lag_p99_ms", "control canary's lag p99 (ms, machine noise)"),
        ("vm_hwm_mb", "peak RSS (MB)"),
        ("backend_cpu_ms_per_delivery", "moto CPU per delivery (ms)"),
        ("backend_ceiling_per_s", "moto's ceiling at that cost, one core (/s)"),
        ("aws_calls_per_delivery_total", "AWS calls per delivery"),
    ]
    lines += ["", "| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, label in fields:
        lines.append(f"| {label} | " + " | ".join(fmt(res[c].get(key)) for c in cols) + " |")
    if res.get("rss"):
        r = res["rss"]
        lines += [
            "",
            (
                f"RSS: {r['mails']} mails of {r['mail_mib']} MiB ({', '.join(r['statuses'])}),"
                f" {r['max_concurrent_processors']} processors alive at once: VmHWM"
                f" {r['vm_hwm_peak_mb']} MB (idle worker: {r['vm_hwm_idle_mb']} MB)."
            ),
        ]
    if res.get("fairness"):
        f = res["fairness"]
        lines += [
            "",
            (
                f"Fairness: {f['flood']} mails of one store (max_in_flight_per_key=1),"
                f" then one mail of another store: its latency"
                f" {fmt(f['lone_latency_ms'])} ms = {fmt(f['lone_latency_in_deliveries'])}"
                f" flood deliveries ({fmt(f['flood_per_delivery_ms_p50'])} ms each);"
                f" {f['flood_done_before_lone']} flood mails finished before it."
                f" Worker: {json.dumps(f['worker_stats'])}."
            ),
        ]
    if res.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(res["skipped"])]
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--skip", default="", help="comma list: naive,worker,fastcgi,rss,fairness")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--profile", type=Path, help="run workers under cProfile, .prof files here")
    args = parser.parse_args(argv)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE_DIR.append(args.profile.resolve())
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    moto = Moto()
    os.environ.update(aws_env(moto.url))
    os.environ.pop("AWS_PROFILE", None)
    res: dict[str, Any] = {
        "machine": machine(),
        "backend": moto.name,
        "params": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "skipped": [],
    }
    try:
        with tempfile.TemporaryDirectory(prefix="mailflow-bench-") as tmpdir:
            tmp = Path(tmpdir)
            for kind in ("naive", "worker"):
                if kind not in skip:
                    print(f"bench: {kind} …", file=sys.stderr, flush=True)
                    res[kind] = run_throughput(kind, args, tmp, moto)
            if "fastcgi" not in skip:
                fpm = start_fpm(args, tmp)
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
                            moto,
                            {
                                "MAILFLOW_PROCESSOR_TRANSPORT": "fastcgi",
                                "MAILFLOW_FASTCGI_ADDRESS": fpm[1],
                                "MAILFLOW_RUNNER_SCRIPT": str(REPO / "sidecar" / "runner.php"),
                            },
                        )
                    finally:
                        stop_fpm(fpm[0])
            if "rss" not in skip:
                print("bench: rss …", file=sys.stderr, flush=True)
                res["rss"] = run_rss(args, tmp)
            if "fairness" not in skip:
                print("bench: fairness …", file=sys.stderr, flush=True)
                res["fairness"] = run_fairness(args, tmp)
    finally:
        moto.stop()
    res["targets"] = verdicts(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    table = markdown(res)
    (args.out / "latest.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
