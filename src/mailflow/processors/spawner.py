"""A helper process that starts processors, so that the worker's interpreter never forks.

Why: CPython keeps the GIL while the thread that calls vfork (`subprocess.Popen`,
`os.posix_spawn`) is suspended until the child has exec'd. On a loaded machine that is tens of
milliseconds, sometimes a hundred, and the event loop cannot run meanwhile: starting the
processor from a worker thread (child.py before) still stalled every other delivery's I/O.
Measured here with a busy loop in the main thread and a thread starting `php` 25 times a
second: stalls up to 73-83 ms with Popen and 104-109 ms with posix_spawn, against 20 ms with
no spawning at all.

The helper is started once, from a minimal environment (none of the worker's credentials),
and does nothing but start processes: the worker sends argv, env and cwd as JSON and the
child's stdin, stdout and stderr as file descriptors (SCM_RIGHTS) over a Unix socket; the
helper answers with the pid, waits for the child and reports its exit status. When the worker
goes, the socket closes and the helper exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from mailflow.processors.child import lower_priority

#: Largest request (argv + env as JSON) and answer.
MAX_MESSAGE_BYTES = 1 << 20
#: stdin, stdout, stderr of the child.
FDS_PER_REQUEST = 3


def serve(sock: socket.socket) -> None:
    """Answer spawn requests on `sock` until the other end closes it."""
    lock = threading.Lock()

    def send(doc: dict[str, Any]) -> None:
        with lock, contextlib.suppress(OSError):  # the worker is gone: nobody to tell
            sock.send(json.dumps(doc).encode())

    running: dict[int, subprocess.Popen[bytes]] = {}

    def start(request: dict[str, Any], fds: list[int]) -> None:
        try:
            if len(fds) != FDS_PER_REQUEST:
                send({"id": request["id"], "error": 0, "message": "expected 3 descriptors"})
                return
            popen = subprocess.Popen(
                request["argv"],
                stdin=fds[0],
                stdout=fds[1],
                stderr=fds[2],
                env=request["env"],
                cwd=request["cwd"],
                # Own process group: a timeout or a lost lease kills grandchildren too.
                process_group=0,
                close_fds=True,
            )
        except OSError as exc:
            send(
                {"id": request["id"], "error": exc.errno or 0, "message": exc.strerror or str(exc)}
            )
        else:
            lower_priority(popen.pid, int(request.get("nice", 0)))
            running[popen.pid] = popen
            send({"id": request["id"], "pid": popen.pid})
            send({"id": request["id"], "exit": popen.wait()})
            running.pop(popen.pid, None)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE_BYTES, FDS_PER_REQUEST)
        except OSError:
            return
        if not data:
            _kill_groups(list(running))
            return
        # One thread per child: it starts the child, then waits for it.
        threading.Thread(target=start, args=(json.loads(data), fds), daemon=True).start()


def _kill_groups(pids: list[int]) -> None:
    """The worker is gone (it closes its end only once nothing runs): whatever still runs was
    started for it, and nobody may keep running on a dead worker's behalf."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _ignore(_signum: int, _frame: object) -> None:
    """The worker decides when processors stop; the helper follows its socket."""


def main() -> None:
    """Entry point of the helper: the socket's descriptor is argv[1]."""
    # fork, not vfork: a vfork parent waits, holding the GIL, until the child has exec'd, so
    # concurrent starts would queue behind the slowest exec. This process is small (a few
    # MB), so copying its page tables costs less than that wait.
    subprocess._USE_VFORK = False  # type: ignore[misc]  # noqa: SLF001
    # The helper shares the worker's process group, so a signal to the group (Ctrl-C, a
    # container stop) reaches it too: it outlives the worker only until the socket closes,
    # then kills what is left. Handlers, not SIG_IGN: processors must not inherit an ignore.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _ignore)
    from mailflow.processors.exec import forbid_environ_reads  # noqa: PLC0415 - exec imports us

    forbid_environ_reads()  # as the worker: processors' environments pass through our memory
    with socket.socket(fileno=int(sys.argv[1])) as sock:
        serve(sock)


if __name__ == "__main__":
    main()
