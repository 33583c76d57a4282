"""The bench's backend: the AWS endpoints the consumers talk to, in their own processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the backend -----------------------------------------------------------------------------


class Moto:
    """moto server in its own process, so its CPU is not the bench's or the worker's."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "moto_counting.py"), "--port", "0"],
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
