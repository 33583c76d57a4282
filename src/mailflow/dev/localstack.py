"""LocalStack in host mode (no Docker) for SQS, SNS and S3: a second, independent backend.

moto accepts requests that real SQS refuses (a control character in a message attribute,
for one); LocalStack validates them like AWS and implements SQS's StartMessageMoveTask
(`mailflow redrive`), which moto lacks. It runs as a child process on a free loopback port,
from its own venv (`var/localstack-venv/`, made by `make backends`: its pins conflict with
ours), with a private data and temp folder that is removed on stop, and with every
download, telemetry and update check switched off.

Run standalone: `python -m mailflow.dev.localstack` prints `LOCALSTACK_URL=http://…` when
ready.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from mailflow.dev.backend_process import BackendNotInstalledError, BackendProcess, http_ready
from mailflow.dev.dynalite import backends_dir

#: What `make backends` installs into the LocalStack venv (4.13.1 needs these extra pins on
#: Python 3.11: cbor2 6 dropped an API it uses; pyOpenSSL 25.3 matches its cryptography).
LOCALSTACK_REQUIREMENTS = (
    "localstack-core[runtime]==4.13.1",
    "cbor2<6",
    "pyopenssl==25.3.0",
    "service_identity",
)
SERVICES = ("s3", "sqs", "sns")
#: LocalStack's first start in a fresh process takes several seconds (plugin discovery).
START_TIMEOUT_S = 120.0


def localstack_python() -> Path:
    """The LocalStack venv's python; BackendNotInstalledError if absent."""
    path = backends_dir() / "localstack-venv" / "bin" / "python"
    if not path.exists():
        msg = f"LocalStack is not installed at {path}: run `make backends`"
        raise BackendNotInstalledError(msg)
    return path


class LocalStack(BackendProcess):
    """LocalStack (S3, SQS, SNS) on 127.0.0.1; `url` is its endpoint once started."""

    name = "localstack"

    def __init__(self, *, port: int = 0, log_path: Path | None = None) -> None:
        super().__init__(port=port, log_path=log_path, start_timeout_s=START_TIMEOUT_S)
        self._home: Path | None = None

    def command(self) -> Sequence[str]:
        """The LocalStack runtime in this process (host mode)."""
        return [str(localstack_python()), "-m", "localstack.runtime.main"]

    def environment(self) -> dict[str, str]:
        """A closed environment: only what LocalStack needs, nothing of ours leaks in. Makes
        the private folder (data, temp, cache, HOME) that `cleanup` removes."""
        self._home = Path(tempfile.mkdtemp(prefix="mailflow-localstack-"))
        for sub in ("data", "tmp", "cache", "home"):
            (self._home / sub).mkdir()
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self._home / "home"),
            "TMPDIR": str(self._home / "tmp"),
            "SERVICES": ",".join(SERVICES),
            "GATEWAY_LISTEN": f"{self.host}:{self.port}",
            # Queue URLs, topic ARNs' endpoints etc. name the address we listen on.
            "LOCALSTACK_HOST": f"{self.host}:{self.port}",
            "SQS_ENDPOINT_STRATEGY": "path",
            "DNS_ADDRESS": "0",  # no DNS server (it would want port 53)
            "EAGER_SERVICE_LOADING": "1",  # all three load before the health check says ready
            "PERSISTENCE": "0",
            "FILESYSTEM_ROOT": str(self._home),
            "LOCALSTACK_VOLUME_DIR": str(self._home / "data"),
            # Nothing phones home or downloads: no analytics, no update checks, no packages.
            "DISABLE_EVENTS": "1",
            # (SKIP_INFRA_DOWNLOADS is deprecated since 1.3: downloads happen only on demand,
            # and S3/SQS/SNS need none.)
            "SKIP_SSL_CERT_DOWNLOAD": "1",
            "DISABLE_CORS_CHECKS": "1",
            "OUTBOUND_HTTP_PROXY": "",
            "OUTBOUND_HTTPS_PROXY": "",
            "LS_LOG": "warn",
            "DEBUG": "0",
        }

    def ready(self, url: str) -> bool:
        """Every service we asked for reports `running` (or `available`) in the health API."""

        def accept(status: int, body: bytes) -> bool:
            if status != 200:
                return False
            try:
                services = json.loads(body).get("services", {})
            except ValueError:
                return False
            return all(services.get(s) in {"running", "available"} for s in SERVICES)

        return http_ready(f"{url}/_localstack/health", accept=accept)

    def cleanup(self) -> None:
        """Remove the private data and temp folder."""
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None


def main(argv: list[str] | None = None) -> int:
    """Run LocalStack until interrupted."""
    parser = argparse.ArgumentParser(description="Run LocalStack (S3, SQS, SNS) on loopback.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    with LocalStack(port=args.port) as server:
        sys.stdout.write(f"LOCALSTACK_URL={server.url}\n")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
