"""The bench's backend: the AWS endpoints the consumers talk to, each in its own process.

Two kinds, chosen with `bench/run.py --backend`:

- `emulators` (the default): DynamoDB on dynalite (node), S3/SQS/SNS on LocalStack in host
  mode, both installed by `make backends` and started through mailflow.dev. Neither is the
  bottleneck at the bench's rates, so the figures are the consumers'.
- `moto`: everything on mailflow's embedded moto server, for comparison. moto evaluates
  DynamoDB expressions in pure Python (≈ 50 ms of CPU per worker delivery), so there the
  bench measures moto.

Every backend process's CPU (the process and its descendants, from /proc) is sampled beside
the consumer's, so the report shows who is the bottleneck.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
KINDS = ("emulators", "moto")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def tree_cpu_s(pid: int, *, reaped: bool = False) -> float:
    """utime + stime of `pid` and all its living descendants, in seconds; with `reaped`, also
    what their children that have exited and been waited for used (cutime + cstime): a
    php-fpm worker's proc_open children, say."""
    tree, total, todo = _children(), 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
            if reaped:
                ticks += int(fields[13]) + int(fields[14])
            total += ticks / CLK_TCK
        todo.extend(tree.get(p, []))
    return total


@dataclass
class Backend:
    """Running endpoints: the AWS_* environment that reaches them, and their processes."""

    kind: str
    name: str
    env: dict[str, str]
    pids: dict[str, int]  # service group → process id, for CPU sampling
    _stops: list[Any] = field(default_factory=list)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by each backend process tree."""
        return {name: tree_cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        """Stop every process this backend started."""
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()
        self._stops.clear()


CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start(kind: str, logs: Path) -> Backend:
    """Start the backend `kind` (one of KINDS); logs of emulators go under `logs`."""
    if kind == "moto":
        return _moto()
    if kind == "emulators":
        return _emulators(logs)
    raise ValueError(f"unknown backend {kind!r}: one of {', '.join(KINDS)}")


def _moto() -> Backend:
    from mailflow.dev.motoserver import spawn as spawn_moto  # noqa: PLC0415

    server = spawn_moto()
    return Backend(
        kind="moto",
        name=f"moto {version('moto')} server (own process, loopback HTTP)",
        env={"AWS_ENDPOINT_URL": server.url} | CREDENTIALS,
        pids={"moto": server.pid},
        _stops=[server.stop],
    )


def _emulators(logs: Path) -> Backend:
    try:
        from mailflow.dev.dynalite import DYNALITE_PACKAGE, Dynalite  # noqa: PLC0415
        from mailflow.dev.localstack import (  # noqa: PLC0415
            LOCALSTACK_REQUIREMENTS,
            LocalStack,
        )
    except ImportError as exc:  # pragma: no cover - a checkout without the second backend
        raise RuntimeError(f"the emulators backend needs mailflow.dev.dynalite: {exc}") from exc
    backend = Backend(kind="emulators", name="", env=dict(CREDENTIALS), pids={})
    try:
        dynalite = Dynalite(log_path=logs / "dynalite.log").start()
        backend._stops.append(dynalite.stop)  # noqa: SLF001
        localstack = LocalStack(log_path=logs / "localstack.log").start()
        backend._stops.append(localstack.stop)  # noqa: SLF001
    except Exception:
        backend.stop()
        raise
    backend.env |= {
        "AWS_ENDPOINT_URL_DYNAMODB": dynalite.url,
        "AWS_ENDPOINT_URL_S3": localstack.url,
        "AWS_ENDPOINT_URL_SQS": localstack.url,
        "AWS_ENDPOINT_URL_SNS": localstack.url,
    }
    backend.pids = {
        "dynalite": listener_pid(dynalite.url),
        "localstack": listener_pid(localstack.url),
    }
    backend.name = (
        f"DynamoDB on {DYNALITE_PACKAGE.replace('@', ' ')} (node), S3/SQS/SNS on LocalStack"
        f" {LOCALSTACK_REQUIREMENTS[0].split('==')[-1]} (host mode); each in its own process,"
        " loopback HTTP"
    )
    return backend


def listener_pid(url: str) -> int:
    """The process listening on `url`'s loopback port (from /proc/net/tcp and the fds)."""
    port = int(url.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(cols[9])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                link = str(fd.readlink())
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(entry.name)
    raise RuntimeError(f"no process listens on {url}")
