"""Test helper: a real php-fpm sidecar, started with sidecar/run-local.

    with running_php_fpm(tmp_dir, allow=[["php"]]) as fpm:
        FastCGIProcessor(fpm.address, fpm.runner_script)

Binds a free loopback port (or a unix socket in the temp dir), waits until the pool answers
/ping over FastCGI, and stops php-fpm (its whole process group) afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mailflow.processors.fastcgi_codec import (
    RecordType,
    ResponseParser,
    Stdout,
    encode_begin_request,
    encode_params,
    end_of_stream,
    parse_cgi_response,
)
from support.harness import EXTRA_SBIN, require_binary

REPO = Path(__file__).resolve().parents[2]
SIDECAR = REPO / "sidecar"
RUN_LOCAL = SIDECAR / "run-local"
RUNNER_SCRIPT = str(SIDECAR / "runner.php")
PHP_FPM_NAMES = ("php-fpm8.2", "php-fpm")
START_TIMEOUT_S = 15.0


def require_php_fpm() -> str:
    """The php-fpm binary (Debian names it by version)."""
    return require_binary(*PHP_FPM_NAMES)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PhpFpm:
    address: str
    runner_script: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def fastcgi_get(address: str, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """A blocking one-shot GET over FastCGI (the ping page); (status, body)."""
    params = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": path,
        "SCRIPT_FILENAME": path,
        "REQUEST_URI": path,
        "QUERY_STRING": "",
    }
    payload = (
        encode_begin_request(1) + encode_params(1, params) + end_of_stream(RecordType.STDIN, 1)
    )
    family = socket.AF_UNIX if address.startswith("/") else socket.AF_INET
    target: str | tuple[str, int]
    if family == socket.AF_UNIX:
        target = address
    else:
        host, _, port = address.rpartition(":")
        target = (host, int(port))
    parser = ResponseParser(1)
    stdout = b""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(target)
        sock.sendall(payload)
        while not parser.finished:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before END_REQUEST")
            stdout += b"".join(e.data for e in parser.feed(chunk) if isinstance(e, Stdout))
    response = parse_cgi_response(stdout)
    return response.status, response.body


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextlib.contextmanager
def running_php_fpm(
    workdir: Path,
    allow: Sequence[Sequence[str]] | None,
    *,
    unix_socket: bool = False,
    max_children: int = 8,
    extra_env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> Iterator[PhpFpm]:
    """php-fpm via sidecar/run-local; `prefix` runs it under another command (setpriv)."""
    require_php_fpm()
    workdir.mkdir(parents=True, exist_ok=True)
    address = str(workdir / "php-fpm.sock") if unix_socket else f"127.0.0.1:{free_port()}"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin") + os.pathsep + EXTRA_SBIN,
        "HOME": os.environ.get("HOME", "/"),
        "MAILFLOW_FASTCGI_ADDRESS": address,
        "MAILFLOW_FPM_RUNDIR": str(workdir / "run"),
        "MAILFLOW_FPM_MAX_CHILDREN": str(max_children),
        # Proves the pool does not hand the sidecar's own environment to anyone.
        "AWS_SECRET_ACCESS_KEY": "sidecar-secret-must-not-leak",
        **(extra_env or {}),
    }
    if allow is not None:
        env["MAILFLOW_RUNNER_ALLOW"] = json.dumps([list(p) for p in allow])
    log_path = workdir / "php-fpm.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*prefix, str(RUN_LOCAL)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    fpm = PhpFpm(address, RUNNER_SCRIPT, process, log_path)
    try:
        _wait_ready(fpm)
        yield fpm
    finally:
        _stop(process)


def _wait_ready(fpm: PhpFpm) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if fpm.process.poll() is not None:
            raise RuntimeError(
                f"run-local exited with {fpm.process.returncode}:\n{fpm.log()}",
            )
        try:
            status, body = fastcgi_get(fpm.address, "/ping", timeout_s=1.0)
        except OSError as exc:
            last_error = exc
        else:
            if status == 200 and body.strip() == b"pong":
                return
            last_error = RuntimeError(f"/ping answered {status} {body[:80]!r}")
        time.sleep(0.05)
    raise RuntimeError(f"php-fpm not ready after {START_TIMEOUT_S}s ({last_error}):\n{fpm.log()}")
