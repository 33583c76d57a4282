"""The load: fresh resources per phase, a producer that keeps the queue shallow, and the
consumer processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3

from analysis import children_cpu_s, cpu_s, runqueue_wait_s, vm_kib
from backend import free_port, tree_cpu_s
from mailflow.aws import open_clients
from mailflow.config import Route, Settings
from mailflow.dev.provision import provision
from mailflow.dev.ses import received_notification

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

PHP_PROCESSOR = BENCH / "processor.php"
PY_PROCESSOR = BENCH / "processor.py"
MATCH = r"ne-(?P<store>[0-9]{3})@orders\.example\.com"
MIB = 1024 * 1024

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


_clients = threading.local()


@dataclass
class Phase:
    """Fresh resources for one phase, and the settings a worker for it runs with."""

    name: str
    settings: Settings
    queue_url: str = ""
    topic_arn: str = ""

    @classmethod
    def create(cls, name: str, route: Route, tmp: Path, **overrides: Any) -> Phase:
        uid = f"bench-{name.replace('_', '-')}-{uuid.uuid4().hex[:8]}"  # S3 names: no "_"
        settings = Settings(
            bucket=uid,
            topic=uid,
            queue=uid,
            table=uid,
            routes=(route,),
            health_file=tmp / f"{uid}.health",
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
            "MAILFLOW_HEALTH_FILE": str(s.health_file),
            "MAILFLOW_SPOOL_DIR": str(s.spool_dir),
            "MAILFLOW_LOG_FORMAT": "json",
            "MAILFLOW_SHUTDOWN_GRACE_S": "30",
            "MAILFLOW_MAX_MAIL_BYTES": str(s.max_mail_bytes),
        }
        return env | extra

    def put_mail(self, raw: bytes) -> str:
        """Store a template mail; body() copies it to each mail's own key."""
        key = f"template/{uuid.uuid4().hex[:8]}"
        boto3.client("s3").put_object(Bucket=self.settings.bucket, Key=key, Body=raw)
        return key

    def _s3(self) -> Any:
        if not hasattr(_clients, "s3"):  # boto3 clients are not shared between threads
            _clients.s3 = boto3.client("s3")
        return _clients.s3

    def body(self, template: str, recipient: str) -> tuple[str, str]:
        """(mail id, SQS body): the mail stored where SES stores it (`<prefix><messageId>`, a
        server-side copy of `template`), and its notification in the SNS envelope."""
        mail_id = uuid.uuid4().hex
        key = f"{self.settings.incoming_prefix}{mail_id}"
        bucket = self.settings.bucket
        self._s3().copy_object(
            Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": template}
        )
        now = datetime.now(UTC)
        note = received_notification(
            mail_id=mail_id,
            bucket=bucket,
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


NATIVE_SOURCE = BENCH / "processor.c"


def build_native_processor(out_dir: Path) -> Path | None:
    """bench/processor.c built with the system's C compiler (None without one, or if the
    build fails): the processor whose own CPU is next to nothing."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    binary = out_dir / "processor-native"
    built = subprocess.run(
        [cc, "-O2", "-o", str(binary), str(NATIVE_SOURCE)],
        capture_output=True,
        check=False,
    )
    return binary if built.returncode == 0 else None


def processor_route(
    sleep_ms: int,
    times: Path,
    max_per_key: int | None = None,
    native: Path | None = None,
) -> Route:
    """The bench route: php-cli running processor.php (processor.py without php), or the
    compiled `native` processor when given."""
    php = shutil.which("php")
    if native is not None:
        command = f"{native} {{store}} {sleep_ms} {times}"
    elif php:
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
    cpu_marks: dict[int, tuple[float, float, Any, float, float]] = field(default_factory=dict)
    backend: Any = None  # backend.Backend, whose CPU is sampled beside the consumer's
    #: Processors that are not the consumer's children (a php-fpm pool): their tree's CPU
    #: counts as processor CPU beside the reaped children's.
    processor_pid: int | None = None
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
                    backend = self.backend.cpu_s() if self.backend else {}
                    pid = self.proc.pid
                    self.cpu_marks[n] = (
                        time.time(),
                        cpu_s(pid),
                        backend,
                        children_cpu_s(pid) + self.pool_cpu_s(),
                        runqueue_wait_s(pid),
                    )
                self.done.add()
            elif event is not None:
                self.events.append(doc)

    def pool_cpu_s(self) -> float:
        """CPU of the processors outside the consumer's own children (php-fpm and what its
        workers spawned and reaped); 0 without such a pool."""
        return tree_cpu_s(self.processor_pid, reaped=True) if self.processor_pid else 0.0

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


def stores(count: int) -> Callable[[int], str]:
    return lambda i: f"ne-{i % count + 1:03d}@orders.example.com"


#: The FastCGI runner php-fpm runs (sidecar/run-local serves it).
RUNNER_SCRIPT = REPO / "sidecar" / "runner.php"


def start_fpm(
    tmp: Path, max_children: int, allow: list[list[str]] | None = None
) -> tuple[subprocess.Popen[bytes], str] | None:
    """php-fpm with mailflow's runner on a free loopback port, as `sidecar/run-local` starts
    it: (process, "host:port"), or None where php, php-fpm or the fastcgi transport is
    missing. `allow`: the runner's argv prefixes (default: php on bench/processor.php)."""
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
        "MAILFLOW_RUNNER_ALLOW": json.dumps(allow or [[php, str(PHP_PROCESSOR)]]),
        "MAILFLOW_FPM_RUNDIR": str(tmp / "fpm"),
        "MAILFLOW_FPM_MAX_CHILDREN": str(max_children),
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
