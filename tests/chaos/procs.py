"""Worker processes for the reliability, hostile and chaos tests: start, inspect, kill.

A worker here is what ECS runs: `python -m mailflow worker` with MAILFLOW_* variables,
in its own session so that the test can signal its whole process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailflow.config import Settings

REPO = Path(__file__).resolve().parents[2]

#: Settings fields a test worker gets from the test's Settings object.
_FIELDS = (
    "bucket", "topic", "queue", "table", "incoming_prefix", "concurrency", "prefetch",
    "visibility_timeout_s", "lease_s", "heartbeat_s", "wait_time_s", "max_attempts",
    "retry_base_s", "retry_max_s", "missing_object_attempts", "processor_timeout_s",
    "kill_grace_s", "max_mail_bytes", "shutdown_grace_s", "spool_dir", "health_file",
    "pass_env", "allowed_buckets", "quarantine_verdicts", "tempfail_codes",
)  # fmt: skip


def settings_env(settings: Settings) -> dict[str, str]:
    """MAILFLOW_* variables that make a worker process see `settings`."""
    env: dict[str, str] = {}
    for name in _FIELDS:
        value: Any = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = json.dumps(list(value))
        env[f"MAILFLOW_{name.upper()}"] = str(value)
    env["MAILFLOW_ROUTES"] = json.dumps([r.model_dump() for r in settings.routes])
    env["MAILFLOW_LOG_FORMAT"] = "json"
    env["MAILFLOW_LOG_LEVEL"] = "info"
    return env


def worker_environ(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFLOW_")}
    env["PYTHONPATH"] = str(REPO / "src")
    env.update(settings_env(settings))
    env.update(extra)
    return env


def start_worker(
    settings: Settings,
    log_path: Path,
    cwd: Path,
    *,
    prefix: tuple[str, ...] = (),
    **extra: str,
) -> subprocess.Popen[bytes]:
    """A `mailflow worker` subprocess in a new session; its log (JSON lines) to `log_path`.
    `prefix` runs it through a wrapper (e.g. setpriv)."""
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "mailflow", "worker"],
            env=worker_environ(settings, **extra),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def log_events(log_path: Path) -> list[dict[str, Any]]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                out.append(doc)
    return out


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def descendants_of(pid: int) -> list[int]:
    """Children, grandchildren, ...: processors run under the worker's spawner helper."""
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def kill_tree(pid: int) -> set[int]:
    """SIGKILL a worker as a container runtime would: freeze it, kill its children's process
    groups (the processors run in their own), then its own group. Returns the children."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGSTOP)
    kids = set(children_of(pid))
    for kid in list(kids):  # and theirs: processors started by the worker's spawner helper
        kids.update(children_of(kid))
    for kid in kids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(kid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(kid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return kids


def reap(proc: subprocess.Popen[bytes]) -> None:
    """However a test ended: a worker still running is killed (tree) and waited for."""
    if proc.poll() is None:
        kill_tree(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process, in KiB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)
