"""Chaos run: real worker processes, a fault-injecting proxy, kills, duplicates, poison.

    .venv/bin/python tests/chaos/run.py --deliveries 300 --workers 2 --kills 4

What it does:
- starts a moto server (`python -m mailflow.dev.motoserver`, a subprocess) and a fault-injecting
  HTTP proxy in front of it (tests/chaos/proxy.py); provisions bucket, topic, queue + DLQ, table;
- starts W `mailflow worker` processes (own sessions) whose AWS endpoint is the proxy, so a
  share of their AWS calls fail (500/503, throttling in each service's wire format, resets
  before and after forwarding, 1-2 s latency);
- feeds mails in waves (moto's SQS scans the whole queue on every receive: keep it shallow),
  each recipient naming the chaos processor's behaviour (tests/chaos/processor.php): success,
  slow success, exit 75 then success, 71 then success, 75 forever, exit 1, killed by a signal,
  hanging past the timeout; objects deleted before their delivery runs; unroutable
  recipients; virus verdicts; duplicate SNS-envelope copies and raw-delivery copies sent
  straight to SQS (some delayed), and a few poison messages;
- SIGKILLs a worker (its process group and its processors' groups: what ECS does to a task)
  while processors run, some of them exactly in the window after the side effect and before
  the outcome write, and restarts it;
- waits for the drain, stops the workers with SIGTERM, and settles the accounts from the
  ledger table, the queues, and the processor's append-only effects log.

The last line is the summary:
    deliveries=… lost=0 dup_effects=… kills=… faults=… drain_s=…
Exit status 0 when every check holds. `run_chaos()` is the same, for tests/e2e/test_chaos.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from chaos.procs import alive, descendants_of, kill_tree  # noqa: E402
from chaos.proxy import FaultPlan, FaultProxy  # noqa: E402
from mailflow.aws import open_clients  # noqa: E402
from mailflow.aws.expressions import deserialize  # noqa: E402
from mailflow.aws.keyslots import HOLD_PARTITION, SLOT_PREFIX  # noqa: E402
from mailflow.aws.ledger import RECONCILE_STATE_KEY, TERMINAL  # noqa: E402
from mailflow.config import Route, Settings  # noqa: E402
from mailflow.dev.motoserver import spawn as spawn_moto  # noqa: E402
from mailflow.dev.provision import provision  # noqa: E402
from mailflow.dev.ses import new_message_id, received_notification, ses_headers  # noqa: E402
from mailflow.routing import delivery_id  # noqa: E402

PROCESSOR = HERE / "processor.php"
DOMAIN = "orders.example.com"
#: Modes whose processor ends in success (possibly after a retry).
SUCCEEDS = frozenset({"ok", "slow", "flaky", "e71", "sig", "hang"})
#: Per-delivery behaviour weights.
MODE_WEIGHTS = {
    "ok": 33, "slow": 20, "flaky": 8, "e71": 5, "e75": 4, "e1": 5, "sig": 5, "hang": 5,
    "unroutable": 3,
}  # fmt: skip
#: Poison: (body, the reason the worker must give it in the DLQ).
POISON_REASONS = {
    "not json": "not_json",
    "1" * 5000: "not_json",  # a JSON integer past Python's int-parsing limit
    json.dumps({"Type": "Notification", "Message": "{broken"}): "sns_message_not_json",
    json.dumps({"notificationType": "Bounce", "mail": {}}): "not_ses_received",
}


@dataclass
class ChaosConfig:
    deliveries: int = 300
    workers: int = 2
    kills: int = 4
    fault_rate: float = 0.08
    #: Share of mails that get an SNS-envelope copy, and (independently) a raw copy, in SQS.
    dup_rate: float = 0.15
    gone_rate: float = 0.05
    virus_rate: float = 0.03
    multi_rate: float = 0.2
    stores: int = 150
    wave: int = 30
    concurrency: int = 4
    seed: int = 1
    timeout_s: float = 900.0
    workdir: Path | None = None
    verbose: bool = False
    # worker timing knobs (MAILFLOW_*)
    lease_s: float = 6.0
    visibility_s: int = 6
    processor_timeout_s: float = 3.0
    max_attempts: int = 4


@dataclass
class Planned:
    mail_id: str
    recipient: str
    mode: str
    gone: bool = False
    virus: bool = False

    @property
    def delivery_id(self) -> str:
        return delivery_id(self.mail_id, self.recipient)

    def expected(self) -> tuple[str, str]:
        if self.mode == "unroutable":
            return ("failed", "unroutable")
        if self.virus:
            return ("failed", "quarantined")
        if self.gone:
            return ("failed", "object_missing")
        if self.mode in SUCCEEDS:
            return ("succeeded", "ok")
        if self.mode == "e75":
            return ("failed", "attempts_exhausted")
        return ("failed", "exit_1")


@dataclass
class Kill:
    at_s: float
    slot: int
    pid: int
    targeted: str  # "window" (after a side effect, before the outcome) or "running"
    running: set[str] = field(default_factory=set)  # delivery ids whose processor it killed
    in_window: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)


@dataclass
class Run:
    delivery_id: str
    attempt: int
    pid: int
    mode: str
    sha256: str
    start_s: float
    effect: str | None = None
    exit_code: int | None = None
    end_s: float | None = None


class Effects:
    """The chaos processor's append-only log, parsed incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.runs: dict[int, Run] = {}  # by pid
        self.by_delivery: dict[str, list[Run]] = defaultdict(list)

    def refresh(self) -> None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            parts = raw.decode().split()
            if len(parts) < 5:
                continue
            at, kind, did, attempt, pid = float(parts[0]), parts[1], parts[2], parts[3], parts[4]
            if kind == "start":
                run = Run(did, int(attempt), int(pid), parts[5], parts[6], at)
                self.runs[run.pid] = run
                self.by_delivery[did].append(run)
            elif kind == "effect" and int(pid) in self.runs:
                self.runs[int(pid)].effect = parts[5]
            elif kind == "exit" and int(pid) in self.runs:
                self.runs[int(pid)].exit_code = int(parts[5])
                self.runs[int(pid)].end_s = at

    def unfinished(self) -> list[Run]:
        return [r for r in self.runs.values() if r.exit_code is None]


# --- processes --------------------------------------------------------------------------------


class Workers:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.generation: Counter[int] = Counter()
        self.logs: list[Path] = []
        self.exit_codes: list[int | None] = []

    def start(self, slot: int) -> subprocess.Popen[bytes]:
        self.generation[slot] += 1
        log_path = self.workdir / f"worker-{slot}-{self.generation[slot]}.log"
        self.logs.append(log_path)
        env = dict(self.env)
        env["MAILFLOW_HEARTBEAT_FILE"] = str(self.workdir / f"health-{slot}")
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mailflow", "worker"],
                env=env,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[slot] = proc
        return proc

    def stop_all(self, timeout_s: float = 60) -> list[int | None]:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs.values():
            try:
                codes.append(proc.wait(timeout_s))
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait()
                codes.append(None)
        return codes

    def kill_everything(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()


# --- the run ----------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    deliveries: int = 0
    mails: int = 0
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    dup_effects: dict[str, int] = field(default_factory=dict)
    unexplained_dups: list[str] = field(default_factory=list)
    #: repeats after an attempt that did not end the delivery, whose processor no kill's
    #: snapshot caught (it had exited, timed out, or was handed back at shutdown)
    unattributed_kills: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    faults: int = 0
    calls: int = 0
    fault_detail: str = ""
    drain_s: float = 0.0
    total_s: float = 0.0
    copies: int = 0
    dlq_reasons: dict[str, str] = field(default_factory=dict)
    dlq_problems: list[str] = field(default_factory=list)
    queue_left: dict[str, int] = field(default_factory=dict)
    stdin_mismatch: list[str] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    worker_exit_codes: list[int | None] = field(default_factory=list)
    log_events: Counter[str] = field(default_factory=Counter)
    replays: int = 0
    #: processor exit → outcome recorded, ms (the window of a repeated run), from the logs
    record_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (
            f"deliveries={self.deliveries} lost={len(self.lost)} "
            f"dup_effects={sum(n - 1 for n in self.dup_effects.values())} "
            f"kills={len(self.kills)} faults={self.faults} drain_s={self.drain_s:.1f}"
        )


def _plan(cfg: ChaosConfig, rand: random.Random) -> list[list[Planned]]:
    """Mails, each a list of deliveries; exactly cfg.deliveries deliveries in all."""
    modes, weights = zip(*MODE_WEIGHTS.items(), strict=True)
    mails: list[list[Planned]] = []
    left = cfg.deliveries
    while left > 0:
        mail_id = new_message_id()
        count = 2 if rand.random() < cfg.multi_rate and left >= 2 else 1
        gone = rand.random() < cfg.gone_rate
        virus = not gone and rand.random() < cfg.virus_rate
        seen: set[str] = set()
        mail = []
        while len(mail) < count:
            mode = "ok" if gone else rand.choices(modes, weights)[0]
            store = f"{rand.randrange(1, cfg.stores + 1):03d}"
            recipient = (  # postmaster+NNN matches no route
                f"postmaster+{store}@{DOMAIN}"
                if mode == "unroutable"
                else f"{mode}-{store}@{DOMAIN}"
            )
            if recipient in seen:
                continue
            seen.add(recipient)
            mail.append(Planned(mail_id, recipient, mode, gone=gone, virus=virus))
        mails.append(mail)
        left -= count
    return mails


def _mail_bytes(mail: list[Planned], rand: random.Random) -> bytes:
    to = ", ".join(p.recipient for p in mail)
    order = rand.randrange(10**6)
    body = f"注文番号: {order}\r\n商品コード: SKU-{rand.randrange(999)}\r\n数量: 1\r\n"
    pad = "x" * rand.randrange(0, 4000)
    return (
        f"From: Shop <shop@example.com>\r\nTo: {to}\r\nSubject: 注文 {order}\r\n"
        f"Message-ID: <{order}@example.com>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}{pad}\r\n"
    ).encode()


def _sns_envelope(topic_arn: str, message: str) -> str:
    """What SNS puts in SQS (no raw delivery): a copy as a duplicate SNS delivery looks."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": topic_arn,
            "Subject": "Amazon SES Email Receipt Notification",
            "Message": message,
            "Timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "SignatureVersion": "1",
        }
    )


#: Items of the deliveries table that are not deliveries (their partition key prefixes).
NOT_DELIVERIES = (SLOT_PREFIX, HOLD_PARTITION, RECONCILE_STATE_KEY["mail_id"])


class Chaos:
    def __init__(self, cfg: ChaosConfig, workdir: Path, moto_url: str, proxy: FaultProxy) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.moto_url = moto_url
        self.proxy = proxy
        self.rand = random.Random(cfg.seed)
        uid = uuid.uuid4().hex[:8]
        self.route = Route(
            name="chaos",
            match=rf"(?P<mode>[a-z0-9]+)-(?P<store>[0-9]{{3}})@{DOMAIN.replace('.', '[.]')}",
            command=f"php {PROCESSOR} {{mode}} {{store}}",
            key="store",
            max_in_flight_per_key=1,
        )
        self.settings = Settings(
            bucket=f"chaos-{uid}",
            topic=f"chaos-{uid}",
            queue=f"chaos-{uid}",
            table=f"chaos-{uid}",
            routes=(self.route,),
            max_attempts=cfg.max_attempts,
            visibility_timeout_s=cfg.visibility_s,
            lease_s=cfg.lease_s,
            wait_time_s=2,
        )
        self.effects = Effects(workdir / "effects.log")
        self.report = ChaosReport()
        self.planned: list[Planned] = []
        self.expected_sha: dict[str, str] = {}
        self.poison: dict[str, str] = {}
        self.started = time.monotonic()
        self.feeding_done = asyncio.Event()
        self.kills_done = asyncio.Event()
        self.workers = Workers(self._worker_env(), workdir)

    def _say(self, text: str) -> None:
        if self.cfg.verbose:
            print(f"[{time.monotonic() - self.started:7.1f}s] {text}", flush=True)

    def _worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILFLOW_", "AWS_"))}
        s, c = self.settings, self.cfg
        env.update(
            {
                "AWS_ENDPOINT_URL": self.proxy.url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
                "PYTHONPATH": str(REPO / "src"),
                "CHAOS_DIR": str(self.workdir),
                "MAILFLOW_BUCKET": s.bucket,
                "MAILFLOW_TOPIC": s.topic,
                "MAILFLOW_QUEUE": s.queue,
                "MAILFLOW_TABLE": s.table,
                "MAILFLOW_ROUTES": json.dumps([self.route.model_dump()]),
                "MAILFLOW_PASS_ENV": "CHAOS_DIR,CHAOS_SLOW_S,CHAOS_LINGER_S",
                "MAILFLOW_CONCURRENCY": str(c.concurrency),
                "MAILFLOW_LEASE_S": str(c.lease_s),
                "MAILFLOW_VISIBILITY_TIMEOUT_S": str(c.visibility_s),
                "MAILFLOW_WAIT_TIME_S": "2",
                "MAILFLOW_RETRY_BASE_S": "0.5",
                "MAILFLOW_RETRY_MAX_S": "2",
                "MAILFLOW_PROCESSOR_TIMEOUT_S": str(c.processor_timeout_s),
                "MAILFLOW_KILL_GRACE_S": "1",
                "MAILFLOW_MAX_ATTEMPTS": str(c.max_attempts),
                "MAILFLOW_MISSING_OBJECT_ATTEMPTS": "2",
                "MAILFLOW_SHUTDOWN_GRACE_S": "20",
                "MAILFLOW_SPOOL_DIR": str(self.workdir / "spool"),
                "MAILFLOW_LOG_FORMAT": "json",
                "MAILFLOW_LOG_LEVEL": "info",
            }
        )
        return env

    # --- phases -------------------------------------------------------------------------------

    async def run(self) -> ChaosReport:
        os.environ["AWS_ENDPOINT_URL"] = self.moto_url  # the harness itself: no faults
        async with open_clients() as clients:
            self.clients = clients
            out = await provision(clients, self.settings)
            self.topic_arn, self.queue_url, self.dlq_url = (
                out["topic_arn"],
                out["queue_url"],
                out["dlq_url"],
            )
            mails = _plan(self.cfg, self.rand)
            self.planned = [p for m in mails for p in m]
            self.report.deliveries, self.report.mails = len(self.planned), len(mails)
            for slot in range(self.cfg.workers):
                self.workers.start(slot)
            try:
                feeder = asyncio.create_task(self._feed(mails))
                killer = asyncio.create_task(self._kill_loop())
                await asyncio.gather(feeder, killer)
                drain_started = time.monotonic()
                await self._wait_drained()
                self.report.drain_s = time.monotonic() - drain_started
                self.report.worker_exit_codes = await asyncio.to_thread(self.workers.stop_all)
            finally:
                self.workers.kill_everything()
            await self._account()
        self.report.total_s = time.monotonic() - self.started
        return self.report

    async def _depth(self) -> int:
        resp = await self.clients.sqs.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["All"],
        )
        a = resp["Attributes"]
        return sum(
            int(a[k])
            for k in (
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            )
        )

    async def _feed(self, mails: list[list[Planned]]) -> None:
        poison_at = len(mails) // 2
        last = (len(mails) - 1) // self.cfg.wave * self.cfg.wave
        for index in range(0, len(mails), self.cfg.wave):
            while await self._depth() > self.cfg.wave:
                await asyncio.sleep(0.5)
            if index == last and index:
                # Hold the last wave back until the kills are done (or a minute has passed),
                # so that every kill finds processors running.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.kills_done.wait(), 60)
            for mail in mails[index : index + self.cfg.wave]:
                await self._send(mail)
            if index <= poison_at < index + self.cfg.wave:
                await self._send_poison()
            fed = min(index + self.cfg.wave, len(mails))
            self._say(f"fed wave {index // self.cfg.wave + 1}: {fed}/{len(mails)} mails")
            await asyncio.sleep(1.0)
        self.feeding_done.set()

    async def _send(self, mail: list[Planned]) -> None:
        first = mail[0]
        recipients = [p.recipient for p in mail]
        now = datetime.now(UTC)
        verdict = "FAIL" if first.virus else "PASS"
        key = f"{self.settings.incoming_prefix}{first.mail_id}"
        stored = ses_headers(first.mail_id, "shop@example.com", recipients, now, verdict)
        stored += _mail_bytes(mail, self.rand)
        self.expected_sha[first.mail_id] = hashlib.sha256(stored).hexdigest()
        await self.clients.s3.put_object(Bucket=self.settings.bucket, Key=key, Body=stored)
        if first.gone:  # the object disappears before any delivery of it can run
            await self.clients.s3.delete_object(Bucket=self.settings.bucket, Key=key)
        doc = received_notification(
            mail_id=first.mail_id,
            bucket=self.settings.bucket,
            key=key,
            prefix=self.settings.incoming_prefix,
            topic_arn=self.topic_arn,
            sender="shop@example.com",
            recipients=recipients,
            common_headers={"subject": "order"},
            now=now,
            verdict=verdict,
        )
        message = json.dumps(doc, ensure_ascii=False)
        await self.clients.sns.publish(TopicArn=self.topic_arn, Message=message)
        if self.rand.random() < self.cfg.dup_rate:  # SNS delivered twice
            await self.clients.sqs.send_message(
                QueueUrl=self.queue_url,
                MessageBody=_sns_envelope(self.topic_arn, message),
                DelaySeconds=self.rand.choice([0, 0, 2, 5, 9]),
            )
            self.report.copies += 1
        if self.rand.random() < self.cfg.dup_rate:  # a raw-delivery copy
            await self.clients.sqs.send_message(
                QueueUrl=self.queue_url,
                MessageBody=message,
                DelaySeconds=self.rand.choice([0, 0, 2, 5, 9]),
            )
            self.report.copies += 1

    async def _send_poison(self) -> None:
        bodies = dict(POISON_REASONS)
        doc = received_notification(
            mail_id=new_message_id(),
            bucket="someone-elses-bucket",
            key="incoming/x",
            prefix="incoming/",
            topic_arn=self.topic_arn,
            sender="a@example.com",
            recipients=[f"ok-001@{DOMAIN}"],
            common_headers={},
            now=datetime.now(UTC),
        )
        bodies[json.dumps(doc)] = "bucket_not_allowed"
        doc["receipt"]["action"]["bucketName"] = self.settings.bucket
        doc["receipt"]["action"]["objectKey"] = "incoming/../secrets/x"
        bodies[json.dumps(doc)] = "key_not_allowed"
        for body, reason in bodies.items():
            await self.clients.sqs.send_message(QueueUrl=self.queue_url, MessageBody=body)
            self.poison[body] = reason

    async def _kill_loop(self) -> None:
        """cfg.kills kills, each of a worker with a processor running (odd ones: a processor
        past its side effect, in the window before the outcome write), a few seconds apart."""
        await asyncio.sleep(3.0)
        deadline = time.monotonic() + max(120.0, 30.0 * self.cfg.kills)
        while len(self.report.kills) < self.cfg.kills and time.monotonic() < deadline:
            number = len(self.report.kills)
            targeted = "window" if number % 2 == 0 else "running"
            kill = await self._kill_one(targeted)
            if kill is None:
                continue
            self.report.kills.append(kill)
            self._say(
                f"kill {number + 1} ({kill.targeted}) worker slot {kill.slot} pid {kill.pid}: "
                f"running={sorted(kill.running)} in_window={sorted(kill.in_window)}",
            )
            await asyncio.sleep(self.rand.uniform(0.5, 1.5))
            self.workers.start(kill.slot)
            await asyncio.sleep(self.rand.uniform(2.0, 5.0))
        self.kills_done.set()

    def _runs_of(self, worker_pid: int) -> list[Run]:
        kids = set(descendants_of(worker_pid))
        return [r for r in self.effects.unfinished() if r.pid in kids and alive(r.pid)]

    async def _kill_one(self, targeted: str) -> Kill | None:
        """Wait (up to 10 s) for a worker running a processor that no earlier kill hit (in
        the window, if asked: fall back to any running one); None if nothing ran at all."""
        deadline = time.monotonic() + 10
        fallback: list[int] = []
        while True:
            self.effects.refresh()
            candidates, fallback = [], []
            hit = {d for k in self.report.kills for d in k.running}
            for slot, proc in self.workers.procs.items():
                if proc.poll() is not None:
                    continue
                runs = [r for r in self._runs_of(proc.pid) if r.delivery_id not in hit]
                window = [r for r in runs if r.effect is not None]
                if (targeted == "window" and window) or (targeted == "running" and runs):
                    candidates.append(slot)
                elif runs:
                    fallback.append(slot)
            if candidates or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if not candidates:
            if not fallback:
                return None
            candidates, targeted = fallback, "running"
        slot = self.rand.choice(candidates)
        proc = self.workers.procs[slot]
        self.effects.refresh()
        runs_before = {r.pid: r for r in self.effects.unfinished()}
        kids = kill_tree(proc.pid)
        await asyncio.to_thread(proc.wait)
        kill = Kill(at_s=time.time(), slot=slot, pid=proc.pid, targeted=targeted, pids=kids)
        await asyncio.sleep(0.2)
        self.effects.refresh()
        for pid in kids:
            run = self.effects.runs.get(pid) or runs_before.get(pid)
            if run is not None and run.exit_code is None:
                kill.running.add(run.delivery_id)
                if run.effect is not None:
                    kill.in_window.add(run.delivery_id)
                run.end_s = kill.at_s
        return kill

    async def _wait_drained(self) -> None:
        keys = {(p.mail_id, p.recipient) for p in self.planned}
        deadline = time.monotonic() + self.cfg.timeout_s
        last = ""
        while time.monotonic() < deadline:
            records = await self._records()
            done = sum(1 for k in keys if records.get(k, {}).get("status") in TERMINAL)
            depth = await self._depth()
            state = f"terminal {done}/{len(keys)}, queue depth {depth}"
            if state != last:
                self._say(state)
                last = state
            if done == len(keys) and depth == 0:
                return
            await asyncio.sleep(1.0)
        self.report.problems.append(f"not drained within {self.cfg.timeout_s}s: {last}")

    async def _records(self) -> dict[tuple[str, str], dict[str, Any]]:
        out: dict[tuple[str, str], dict[str, Any]] = {}
        kwargs: dict[str, Any] = {"TableName": self.settings.table, "ConsistentRead": True}
        while True:
            resp = await self.clients.dynamodb.scan(**kwargs)
            for item in resp.get("Items", []):
                rec = deserialize(item)
                if str(rec["mail_id"]).startswith(NOT_DELIVERIES):
                    continue  # key slots, holds, the reconciler's state share the table
                out[(rec["mail_id"], rec["recipient"])] = rec
            if "LastEvaluatedKey" not in resp:
                return out
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

    # --- the accounts -------------------------------------------------------------------------

    async def _account(self) -> None:
        rep = self.report
        records = await self._records()
        self.effects.refresh()
        killed_pids = {pid: k for k in rep.kills for pid in k.pids}
        for p in self.planned:
            rec = records.get((p.mail_id, p.recipient))
            if rec is None or rec.get("status") not in TERMINAL:
                rep.lost.append(f"{p.delivery_id} mode={p.mode} status={rec and rec.get('status')}")
                continue
            attempts = int(rec.get("attempts", 0))
            recorded = {int(h["attempt"]) for h in rec.get("history", [])}
            gaps = sorted(set(range(1, attempts + 1)) - recorded)
            if gaps:
                rep.interrupted.append(f"{p.delivery_id} lost_attempts={gaps}")
            got = (rec["status"], rec.get("reason"))
            want = p.expected()
            if got != want and not (gaps and got == ("failed", "attempts_exhausted")):
                rep.wrong.append(f"{p.delivery_id} mode={p.mode} want={want} got={got}")
            runs = self.effects.by_delivery.get(p.delivery_id, [])
            if p.gone or p.virus or p.mode == "unroutable":
                if runs:
                    rep.wrong.append(f"{p.delivery_id}: processor ran for a {p.expected()[1]}")
                continue
            if rec["status"] == "succeeded" and not any(r.exit_code == 0 for r in runs):
                rep.wrong.append(f"{p.delivery_id}: succeeded without a run that exited 0")
            for run in runs:
                if run.sha256 != self.expected_sha[p.mail_id]:
                    rep.stdin_mismatch.append(f"{p.delivery_id} attempt {run.attempt}")
            effects = [r for r in runs if r.effect is not None]
            rep.replays += sum(1 for r in effects if r.effect == "replay")
            if len(effects) > 1:
                rep.dup_effects[p.delivery_id] = len(effects)
                # The at-least-once window: an attempt that did its effect and did not end
                # the delivery: its worker died before the outcome write (no history entry),
                # or its outcome was a retry (a timeout, a shutdown that handed it back). A
                # repeat after an attempt whose recorded outcome was terminal is a real
                # double run (as are overlapping runs, checked below).
                ended = {
                    int(h["attempt"]) for h in rec.get("history", []) if h.get("status") in TERMINAL
                }
                if any(r.attempt in ended for r in effects[:-1]):
                    rep.unexplained_dups.append(p.delivery_id)
                elif not any(r.pid in killed_pids for r in effects[:-1]):
                    rep.unattributed_kills.append(p.delivery_id)
            ordered = sorted(runs, key=lambda r: r.start_s)
            for a, b in itertools.pairwise(ordered):
                end = (
                    a.end_s
                    if a.end_s is not None
                    else (killed_pids[a.pid].at_s if a.pid in killed_pids else None)
                )
                if end is not None and b.start_s < end - 0.05:
                    rep.overlaps.append(
                        f"{p.delivery_id}: attempt {a.attempt} (pid {a.pid}) still running"
                        f" when attempt {b.attempt} started",
                    )
        # queues
        resp = await self.clients.sqs.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["All"],
        )
        a = resp["Attributes"]
        rep.queue_left = {
            "visible": int(a["ApproximateNumberOfMessages"]),
            "in_flight": int(a["ApproximateNumberOfMessagesNotVisible"]),
            "delayed": int(a["ApproximateNumberOfMessagesDelayed"]),
        }
        dlq: list[dict[str, Any]] = []
        while True:
            got = await self.clients.sqs.receive_message(
                QueueUrl=self.dlq_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=0,
                VisibilityTimeout=600,
                MessageAttributeNames=["All"],
            )
            if not got.get("Messages"):
                break
            dlq.extend(got["Messages"])
        copies: Counter[str] = Counter()
        for msg in dlq:
            body = msg["Body"]
            reason = (
                msg.get("MessageAttributes", {})
                .get("mailflow_reason", {})
                .get(
                    "StringValue",
                    "(none: moved by the redrive policy)",
                )
            )
            copies[body] += 1
            if body not in self.poison:
                rep.dlq_problems.append(f"live message in the DLQ ({reason}): {body[:120]}")
            elif reason != self.poison[body]:
                rep.dlq_problems.append(
                    f"poison {body[:40]!r}: reason {reason}, want {self.poison[body]}"
                )
            rep.dlq_reasons[body] = reason
        missing = [b[:40] for b in self.poison if b not in copies]
        if missing:
            rep.dlq_problems.append(f"poison not in the DLQ: {missing}")
        rep.faults = self.proxy.stats.total_faults
        rep.calls = self.proxy.stats.total_calls
        rep.fault_detail = self.proxy.stats.summary()
        for path in self.workers.logs:
            for line in path.read_text(errors="replace").splitlines():
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    if "Traceback" in line:
                        rep.log_events["traceback"] += 1
                    continue
                event = doc.get("event", "")
                timing = doc.get("timing_ms") or {}
                if event == "delivery" and "post" in timing:
                    rep.record_ms.append(float(timing["post"]))
                if event in {
                    "message_failed",
                    "lease_lost",
                    "lease_lost_at_finish",
                    "heartbeat_failed",
                    "message_transient_failure",
                    "grace_exceeded",
                    "dead_letter",
                    "duplicate",
                    "deferred",
                    "aws_retry",
                    "lease_renew_failed",
                    "visibility_extend_failed",
                }:
                    rep.log_events[event] += 1
        # verdicts
        if rep.lost:
            rep.problems.append(f"lost: {rep.lost}")
        if rep.wrong:
            rep.problems.append(f"wrong outcome: {rep.wrong}")
        if rep.unexplained_dups:
            rep.problems.append(
                f"repeated effects after an attempt that ended the delivery: {rep.unexplained_dups}"
            )
        repeats = sum(n - 1 for n in rep.dup_effects.values())
        if rep.replays != repeats:
            rep.problems.append(
                f"{repeats} repeated effects but {rep.replays} replays of the idempotency key",
            )
        if rep.overlaps:
            rep.problems.append(f"two runs of one delivery at once: {rep.overlaps}")
        if rep.stdin_mismatch:
            rep.problems.append(f"stdin differs from the stored object: {rep.stdin_mismatch}")
        if any(rep.queue_left.values()):
            rep.problems.append(f"messages left in the queue: {rep.queue_left}")
        left = [k for k, r in records.items() if r.get("status") not in TERMINAL]
        if left:
            rep.problems.append(f"deliveries not terminal: {left}")
        if rep.dlq_problems:
            rep.problems.append(f"DLQ: {rep.dlq_problems}")
        if len(rep.kills) < self.cfg.kills:
            rep.problems.append(f"only {len(rep.kills)} kills")
        if any(code != 0 for code in rep.worker_exit_codes):
            rep.problems.append(f"worker exit codes at the end: {rep.worker_exit_codes}")
        if rep.log_events["message_failed"] or rep.log_events["traceback"]:
            rep.problems.append(
                f"unexpected exceptions in worker logs: message_failed="
                f"{rep.log_events['message_failed']} traceback={rep.log_events['traceback']}",
            )


def print_report(rep: ChaosReport, cfg: ChaosConfig, workdir: Path) -> None:
    out = sys.stdout
    out.write(
        f"chaos: {rep.mails} mails, {rep.deliveries} deliveries, {rep.copies} duplicate"
        f" copies, {cfg.workers} workers, seed {cfg.seed}, workdir {workdir}\n"
    )
    out.write(
        f"  proxy: {rep.fault_detail} ({100 * rep.faults / max(rep.calls, 1):.1f}% of calls)\n"
    )
    for i, k in enumerate(rep.kills, 1):
        out.write(
            f"  kill {i}: slot {k.slot} pid {k.pid} ({k.targeted}) killed processors of"
            f" {sorted(k.running) or 'none'};"
            f" after the side effect: {sorted(k.in_window) or 'none'}\n"
        )
    for did, n in sorted(rep.dup_effects.items()):
        out.write(
            f"  repeated effect: {did} ran its side effect {n}x (processor killed by a"
            f" worker kill after its effect; the idempotency key saw a replay)\n"
        )
    if rep.unattributed_kills:
        out.write(
            "  repeated after an attempt outside any kill's process snapshot:"
            f" {rep.unattributed_kills}\n"
        )
    out.write(f"  replays caught by MAILFLOW_DELIVERY_ID: {rep.replays}\n")
    if rep.record_ms:
        ms = sorted(rep.record_ms)
        out.write(
            f"  processor exit -> outcome recorded: p50 {ms[len(ms) // 2]:.0f} ms,"
            f" p99 {ms[len(ms) * 99 // 100]:.0f} ms, max {ms[-1]:.0f} ms ({len(ms)} outcomes)\n"
        )
    out.write(f"  interrupted deliveries (attempts without an outcome): {len(rep.interrupted)}\n")
    if cfg.verbose:
        for line in rep.interrupted:
            out.write(f"    {line}\n")
    out.write(
        f"  DLQ: {len(rep.dlq_reasons)} distinct bodies: {sorted(set(rep.dlq_reasons.values()))}\n"
    )
    out.write(f"  queue left: {rep.queue_left}; worker exit codes: {rep.worker_exit_codes}\n")
    out.write(f"  worker log events: {dict(sorted(rep.log_events.items()))}\n")
    out.write(f"  total {rep.total_s:.1f}s\n")
    for problem in rep.problems:
        out.write(f"  PROBLEM: {problem}\n")
    out.write(rep.summary() + "\n")
    out.flush()


def run_chaos(cfg: ChaosConfig) -> ChaosReport:
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="mailflow-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):  # the effects log is append-only: never mix two runs
        workdir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    moto = spawn_moto(log_path=workdir / "moto.log")
    plan = FaultPlan(rate=cfg.fault_rate, seed=cfg.seed)
    proxy = FaultProxy(moto.url, plan).start()
    try:
        chaos = Chaos(cfg, workdir, moto.url, proxy)
        report = asyncio.run(chaos.run())
    finally:
        proxy.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(moto.pid, signal.SIGKILL)
        moto.proc.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    print_report(report, cfg, workdir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = ChaosConfig()
    parser.add_argument("--deliveries", type=int, default=defaults.deliveries)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--fault-rate", type=float, default=defaults.fault_rate)
    parser.add_argument("--dup-rate", type=float, default=defaults.dup_rate)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--wave", type=int, default=defaults.wave)
    parser.add_argument("--stores", type=int, default=defaults.stores)
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(
        defaults,
        deliveries=args.deliveries,
        workers=args.workers,
        kills=args.kills,
        fault_rate=args.fault_rate,
        dup_rate=args.dup_rate,
        concurrency=args.concurrency,
        wave=args.wave,
        stores=args.stores,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(10**6),
        timeout_s=args.timeout,
        workdir=args.workdir,
        verbose=args.verbose,
    )
    report = run_chaos(cfg)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
