"""A local AWS emulator run as a child process on a free loopback port: start, wait, stop.

Shared by dynalite.py and localstack.py. The child gets its own process group, so stopping
it also stops whatever it started; its output goes to a log file (a pipe nobody reads would
fill and block it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Self

#: How long a stop waits after SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
#: Between two readiness probes.
PROBE_EVERY_S = 0.1


class BackendNotInstalledError(RuntimeError):
    """The emulator is not installed where expected (see `make backends`)."""


class BackendStartError(RuntimeError):
    """The emulator exited, or did not answer, before it became ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_ready(url: str, *, accept: Callable[[int, bytes], bool]) -> bool:
    """True when a GET of `url` answers and `accept(status, body)` holds."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - a loopback URL we built
            return accept(int(resp.status), resp.read())
    except urllib.error.HTTPError as exc:
        return accept(int(exc.code), exc.read())
    except (OSError, ValueError):
        return False


class BackendProcess:
    """One emulator child process. `url` once started; a context manager too."""

    name = "backend"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: Path | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self._host = host
        self._port = port
        self._log_path = log_path
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        #: Seconds from spawn to the first ready answer (for the record).
        self.start_s: float | None = None

    # --- what a subclass provides -----------------------------------------------------------

    def command(self) -> Sequence[str]:
        """argv of the emulator listening on `self.host`:`self.port`."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The child's whole environment."""
        return dict(os.environ)

    def ready(self, url: str) -> bool:
        """True once the emulator at `url` serves requests."""
        return http_ready(url, accept=lambda status, _body: status < 500)

    def cleanup(self) -> None:
        """Remove what the child left behind (called after it stopped)."""

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The loopback address it listens on."""
        return self._host

    @property
    def port(self) -> int:
        """Its port (a free one is picked at start when 0 was asked for)."""
        return self._port

    @property
    def url(self) -> str:
        """http://host:port of the running emulator."""
        if self._proc is None:
            raise RuntimeError(f"{type(self).__name__}.start() first")
        return f"http://{self._host}:{self._port}"

    def start(self) -> Self:
        """Spawn the emulator and wait until it answers; raise BackendStartError otherwise."""
        if self._port == 0:
            self._port = free_port(self._host)
        argv = list(self.command())
        if self._log_path is not None:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self._log_path.open("ab")
        started = time.monotonic()
        self._proc = subprocess.Popen(
            argv,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log if self._log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = started + self._start_timeout_s
        while not self.ready(self.url):
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                why = f"exited with {code}" if code is not None else "did not answer"
                where = f"; see {self._log_path}" if self._log_path else ""
                msg = f"{self.name} {why} within {self._start_timeout_s:.0f}s{where}"
                raise BackendStartError(msg)
            time.sleep(PROBE_EVERY_S)
        self.start_s = time.monotonic() - started
        return self

    def stop(self) -> None:
        """SIGTERM the emulator's process group, SIGKILL after STOP_GRACE_S; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None:
            _signal_group(proc.pid, signal.SIGKILL)  # stragglers of the group
        if self._log is not None:
            self._log.close()
            self._log = None
        if proc is not None:
            self.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
