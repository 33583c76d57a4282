"""dynalite: a DynamoDB emulator (node) that validates requests the way DynamoDB does.

A second, independent DynamoDB for the tests and the bench: moto accepts requests real
DynamoDB refuses (a two-character table name, for one); dynalite refuses them. It runs in
memory as a child process on a free loopback port. Install it with `make backends` (npm
package `dynalite`, pinned below, into `var/node/`, never committed).

Run standalone: `python -m mailflow.dev.dynalite` prints `DYNAMODB_URL=http://…` when ready.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from mailflow.dev.backend_process import BackendNotInstalledError, BackendProcess

#: The npm package `make backends` installs.
DYNALITE_PACKAGE = "dynalite@4.0.0"
#: Where local tools are installed: MAILFLOW_BACKENDS_DIR, else the checkout's `var/`.
BACKENDS_DIR_ENV = "MAILFLOW_BACKENDS_DIR"
#: Tables stay CREATING/DELETING this long (dynalite's default is 500 ms; DynamoDB takes
#: seconds): short enough for tests, non-zero so the table waiter is still exercised.
TABLE_STATE_MS = 50


def backends_dir() -> Path:
    """The folder holding `node/` and `localstack-venv/`."""
    configured = os.environ.get(BACKENDS_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[3] / "var"  # src/mailflow/dev/ -> checkout root


def dynalite_bin() -> Path:
    """The installed dynalite executable; BackendNotInstalledError if absent."""
    path = backends_dir() / "node" / "node_modules" / ".bin" / "dynalite"
    if not path.exists():
        msg = f"dynalite is not installed at {path}: run `make backends`"
        raise BackendNotInstalledError(msg)
    return path


class Dynalite(BackendProcess):
    """An in-memory dynalite on 127.0.0.1; `url` is its DynamoDB endpoint once started."""

    name = "dynalite"

    def command(self) -> Sequence[str]:
        """dynalite on host:port, in memory, with short table state transitions."""
        return [
            str(dynalite_bin()),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--createTableMs",
            str(TABLE_STATE_MS),
            "--deleteTableMs",
            str(TABLE_STATE_MS),
            "--updateTableMs",
            str(TABLE_STATE_MS),
        ]


def main(argv: list[str] | None = None) -> int:
    """Run dynalite until interrupted."""
    parser = argparse.ArgumentParser(description="Run dynalite on loopback.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    with Dynalite(port=args.port) as server:
        sys.stdout.write(f"DYNAMODB_URL={server.url}\n")
        sys.stdout.flush()
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
