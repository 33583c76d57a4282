"""An embedded moto server: the zero-Docker AWS backend for `mailflow dev` and the tests.

moto's server handles requests on many threads, and its DynamoDB does not make a
conditional UpdateItem atomic against a concurrent one on the same item (seen: two of three
racing claims on a new item both succeeding). Real DynamoDB never allows that, so this
wrapper serializes DynamoDB requests: the backend behaves like the real one, and mailflow's
claim protocol is never weakened to suit a mock.

Run standalone: `python -m mailflow.dev.motoserver [--port N]` prints `MOTO_URL=http://…`
when ready.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from werkzeug.serving import BaseWSGIServer, make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _serialize_dynamodb(app: WsgiApp) -> WsgiApp:
    lock = threading.Lock()

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if not target.startswith("DynamoDB"):
            return app(environ, start_response)
        with lock:
            # Materialise the body under the lock: the work happens while it is produced.
            return list(app(environ, start_response))

    return wrapped


class MotoServer:
    """A moto server on 127.0.0.1 in a background thread. `url` once started."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        middleware: Callable[[WsgiApp], WsgiApp] | None = None,
    ) -> None:
        """`middleware` wraps the app (outside the DynamoDB serialization), e.g. to count or
        inspect requests in a test."""
        self._host = host
        self._port = port
        self._middleware = middleware
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """`http://host:port` of the listening server; RuntimeError before `start()`."""
        if self._server is None:
            raise RuntimeError("MotoServer.start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        """Bind the socket and serve in a daemon thread; the server accepts requests once this
        returns. Returns self, so `MotoServer().start().url` works."""
        from moto.moto_server.werkzeug_app import (  # noqa: PLC0415 - moto is a dev extra
            DomainDispatcherApplication,
            create_backend_app,
        )
        from moto.server import MotoRequestHandler  # type: ignore[attr-defined]  # noqa: PLC0415

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        app = _serialize_dynamodb(DomainDispatcherApplication(create_backend_app))
        if self._middleware is not None:
            app = self._middleware(app)
        self._server = make_server(
            self._host,
            self._port,
            app,
            threaded=True,
            request_handler=MotoRequestHandler,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            name="moto",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut the server down, close its socket and join its thread (waits 5 s at most)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class MotoProcess:
    """A moto server in a process of its own (its CPU apart from the caller's): `url`, `pid`."""

    proc: subprocess.Popen[bytes]
    url: str

    @property
    def pid(self) -> int:
        """The server process's id (it leads its own session)."""
        return self.proc.pid

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM, then SIGKILL if it lingers; always reaped."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(*, log_path: Path | None = None, port: int = 0) -> MotoProcess:
    """`python -m mailflow.dev.motoserver` in its own session; returns once it listens.
    Its stderr goes to `log_path` (discarded without one). The one way to run moto apart from
    the caller: the chaos run (which kills process groups around it) and the bench use it."""
    with (log_path or Path(os.devnull)).open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailflow.dev.motoserver", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    line = proc.stdout.readline().decode().strip() if proc.stdout is not None else ""
    if proc.stdout is not None:
        proc.stdout.close()
    server = MotoProcess(proc, line.removeprefix("MOTO_URL="))
    if not line.startswith("MOTO_URL="):
        server.stop()
        raise RuntimeError(f"moto server did not start: {line!r}")
    return server


def main(argv: list[str] | None = None) -> int:
    """Run a server until interrupted; print its URL as `MOTO_URL=…` once it listens. Returns 0."""
    parser = argparse.ArgumentParser(description="Run an embedded moto server on loopback.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    server = MotoServer(args.port, args.host).start()
    sys.stdout.write(f"MOTO_URL={server.url}\n")
    sys.stdout.flush()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
