"""A child process started outside the worker's interpreter, its exit reported to the loop.

Why not `asyncio.create_subprocess_exec`, nor `subprocess.Popen` in a worker thread:
- Starting a process suspends the starting thread until the child has exec'd (vfork), and
  CPython keeps the GIL meanwhile: on a busy machine the event loop stalls for tens of
  milliseconds per start, whichever thread starts it. Here a helper process (spawner.py)
  starts processors; the worker only sends it a message with three file descriptors.
- asyncio's `Process.wait()` returns only once the child's pipes are closed as well, so a
  grandchild holding stdout turns a clean exit into a "timeout". Here the exit itself is the
  event (the helper reports it when it has reaped the child), whatever the pipes do.

Where the helper cannot start, processes start with `subprocess.Popen` in a worker thread
and their exit is watched through a pidfd, as before.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

#: Without pidfd, one thread per running child blocks in waitpid. Such threads live in a pool
#: of their own: in the default executor, 8 processors on 6 threads left a DNS lookup waiting
#: 3.5 s for a thread. Threads start only as needed; the cap is the largest concurrency.
WAIT_THREADS = 1024
_wait_pool: ThreadPoolExecutor | None = None
_wait_pool_lock = threading.Lock()


def _wait_executor() -> ThreadPoolExecutor:
    global _wait_pool  # noqa: PLW0603 - one pool per process, made on first use
    with _wait_pool_lock:
        if _wait_pool is None:
            _wait_pool = ThreadPoolExecutor(WAIT_THREADS, thread_name_prefix="mailflow-wait")
        return _wait_pool


def lower_priority(pid: int, nice: int) -> None:
    """Run `pid` (and what it starts later) `nice` steps below normal CPU priority.

    Why: on a saturated machine the processors (php-cli costs ~12 ms of CPU just to start)
    would otherwise take the CPU from the worker's event loop, whose heartbeat keeps every
    running delivery's lease: a starved loop renews late, and a late renewal lets another
    worker take a delivery that is still running. Niced processors still get every idle cycle.
    Applied right after exec (Popen returns then); best effort: a refusal leaves it at normal.
    """
    if nice > 0:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, nice)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Child:
    """One started process in its own process group, with async stdout/stderr readers.

    `exited` resolves to the process's return code (negative: killed by that signal; None:
    unknown) once it has exited."""

    def __init__(
        self,
        pid: int,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        exited: asyncio.Future[int | None],
        transports: list[asyncio.BaseTransport],
    ) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.exited = exited
        self._transports = transports

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        stdin_path: Path,
        env: dict[str, str],
        cwd: Path | None,
        read_limit: int,
        nice: int = 0,
    ) -> Child:
        """Start `argv` with the file at `stdin_path` as its stdin, `nice` steps below the
        worker's CPU priority (see `lower_priority`). Raises OSError."""
        loop = asyncio.get_running_loop()
        spawner = await _spawner_for_now()
        if spawner is None:
            return await cls._start_in_thread(argv, stdin_path, env, cwd, read_limit, nice)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            # The child reads the spool file itself: no copy of the mail passes through us.
            stdin = os.open(stdin_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                pid, exited = await spawner.spawn(argv, env, cwd, (stdin, out_w, err_w), nice)
            finally:
                os.close(stdin)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)  # the child has its own copies now
            os.close(err_w)
        readers, transports = await _readers(loop, (out_r, err_r), read_limit)
        return cls(pid, readers[0], readers[1], exited, transports)

    @classmethod
    async def _start_in_thread(
        cls,
        argv: Sequence[str],
        stdin_path: Path,
        env: dict[str, str],
        cwd: Path | None,
        read_limit: int,
        nice: int,
    ) -> Child:
        def spawn() -> subprocess.Popen[bytes]:
            with stdin_path.open("rb") as stdin:
                popen = subprocess.Popen(
                    list(argv),
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    cwd=cwd,
                    # Own process group: a timeout or a lost lease kills grandchildren too.
                    process_group=0,
                    close_fds=True,
                )
            lower_priority(popen.pid, nice)
            return popen

        popen = await asyncio.to_thread(spawn)
        loop = asyncio.get_running_loop()
        assert popen.stdout is not None  # noqa: S101 - PIPE was asked for
        assert popen.stderr is not None  # noqa: S101
        pipes = (os.dup(popen.stdout.fileno()), os.dup(popen.stderr.fileno()))
        popen.stdout.close()
        popen.stderr.close()
        readers, transports = await _readers(loop, pipes, read_limit)
        exited = await _watch_exit(popen, loop)
        return cls(popen.pid, readers[0], readers[1], exited, transports)

    def signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to the child's process group (the child and whatever it started)."""
        _signal_group(self.pid, sig)

    async def terminate_group(self, grace_s: float) -> None:
        """SIGTERM to the whole group, then SIGKILL after the grace: grandchildren included."""
        self.signal_group(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.shield(self.exited)
        except TimeoutError:
            pass
        self.signal_group(signal.SIGKILL)
        await asyncio.shield(self.exited)

    def returncode(self) -> int | None:
        """The exit status once the process has exited (None before, or if unknown)."""
        if self.exited.done() and not self.exited.cancelled():
            return self.exited.result()
        return None

    def close(self) -> None:
        """Close our pipe ends (the process has been reaped already, or is being reaped)."""
        for transport in self._transports:
            transport.close()


async def _readers(
    loop: asyncio.AbstractEventLoop,
    fds: tuple[int, int],
    read_limit: int,
) -> tuple[list[asyncio.StreamReader], list[asyncio.BaseTransport]]:
    readers: list[asyncio.StreamReader] = []
    transports: list[asyncio.BaseTransport] = []
    for fd in fds:
        reader = asyncio.StreamReader(limit=read_limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(functools.partial(_same, protocol), pipe)
        transports.append(transport)
        readers.append(reader)
    return readers, transports


def _same(protocol: asyncio.StreamReaderProtocol) -> asyncio.StreamReaderProtocol:
    return protocol


async def _watch_exit(
    popen: subprocess.Popen[bytes],
    loop: asyncio.AbstractEventLoop,
) -> asyncio.Future[int | None]:
    exited: asyncio.Future[int | None] = loop.create_future()
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        # No pidfd (kernel < 5.3, or a sandbox that forbids it): a thread waits instead.
        def waited(_: asyncio.Future[int]) -> None:
            if not exited.done():
                exited.set_result(popen.poll())

        loop.run_in_executor(_wait_executor(), popen.wait).add_done_callback(waited)
        return exited

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not exited.done():
            exited.set_result(popen.poll())  # it has exited: this reaps without blocking

    loop.add_reader(pidfd, readable)
    return exited


class Spawner:
    """The worker's end of the spawner helper (spawner.py): one per process, started on first
    use and kept until the process exits. A thread reads the helper's answers and hands each
    to the event loop that asked."""

    def __init__(self, sock: socket.socket, helper: subprocess.Popen[bytes]) -> None:
        self._sock = sock
        self._helper = helper
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the three tables below
        self._ids = itertools.count()
        self._started: dict[int, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int | None]] = {}
        self._pids: dict[int, int] = {}
        self.alive = True
        threading.Thread(target=self._read, name="mailflow-spawner", daemon=True).start()

    @classmethod
    def start(cls) -> Spawner:
        """Start the helper (the one fork this process makes). Raises OSError."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Only what Python needs to start: none of the worker's credentials.
        env = {k: v for k, v in os.environ.items() if k in HELPER_ENV}
        try:
            helper = subprocess.Popen(
                [sys.executable, "-m", "mailflow.processors.spawner", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(ours, helper)

    def close(self) -> None:
        """Close our end: the helper exits (its running children are not touched)."""
        self.alive = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._helper.wait(5)

    async def spawn(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: Path | None,
        fds: tuple[int, int, int],
        nice: int = 0,
    ) -> tuple[int, asyncio.Future[int | None]]:
        """Start `argv` with `fds` as its stdin, stdout, stderr, `nice` steps below normal
        priority: (pid, future of its exit). Raises OSError when the start fails."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[int] = loop.create_future()
        exited: asyncio.Future[int | None] = loop.create_future()
        with self._lock:
            request_id = next(self._ids)
            self._started[request_id], self._exits[request_id] = started, exited
        message = json.dumps(
            {
                "id": request_id,
                "argv": list(argv),
                "env": env,
                "cwd": str(cwd) if cwd else None,
                "nice": nice,
            }
        ).encode()
        try:
            with self._send_lock:  # one datagram of a few KB: the socket buffer takes it
                socket.send_fds(self._sock, [message], list(fds))
        except OSError:
            with self._lock:
                self._started.pop(request_id, None)
                self._exits.pop(request_id, None)
            self._lost()
            raise
        return await started, exited

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_ANSWER_BYTES)
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            self._answer(json.loads(data))

    def _answer(self, doc: dict[str, Any]) -> None:
        request_id = int(doc["id"])
        with self._lock:
            if "exit" in doc:
                self._pids.pop(request_id, None)
                _resolve(self._exits.pop(request_id, None), int(doc["exit"]))
            elif "pid" in doc:
                self._pids[request_id] = int(doc["pid"])
                _resolve(self._started.pop(request_id, None), int(doc["pid"]))
            else:
                self._exits.pop(request_id, None)
                error = OSError(int(doc.get("error") or 0), str(doc.get("message")))
                _fail(self._started.pop(request_id, None), error)

    def _lost(self) -> None:
        """The helper is gone: fail the starts in flight; children still running are watched
        by pidfd (their exit status went with the helper: None)."""
        self.alive = False
        with self._lock:
            for started in self._started.values():
                _fail(started, OSError("the spawner helper exited"))
            for request_id, exited in self._exits.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    exited.get_loop().call_soon_threadsafe(
                        _watch_unknown, self._pids.get(request_id), exited
                    )
            self._started.clear()
            self._exits.clear()
            self._pids.clear()


def _resolve(future: asyncio.Future[Any] | None, value: object) -> None:
    if future is not None:
        _in_loop(future, _set_result, value)


def _fail(future: asyncio.Future[Any] | None, error: BaseException) -> None:
    if future is not None:
        _in_loop(future, _set_exception, error)


def _in_loop(future: asyncio.Future[Any], fn: Any, *args: object) -> None:
    # The loop that asked may be closed by now (asyncio.run ended): nobody waits any more.
    with contextlib.suppress(RuntimeError):
        future.get_loop().call_soon_threadsafe(fn, future, *args)


def _set_result(future: asyncio.Future[Any], value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _watch_unknown(pid: int | None, exited: asyncio.Future[int | None]) -> None:
    if exited.done():
        return
    try:
        pidfd = os.pidfd_open(pid) if pid is not None else -1
    except OSError:
        pidfd = -1
    if pidfd < 0:  # gone already, never started, or no pidfd: status unknown
        exited.set_result(None)
        return
    loop = exited.get_loop()

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        _set_result(exited, None)

    loop.add_reader(pidfd, readable)


#: What the helper's environment keeps of the worker's: enough for Python to start.
HELPER_ENV = frozenset({"PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV"})
MAX_ANSWER_BYTES = 4096
#: MAILFLOW_SPAWNER=thread starts processes from a worker thread instead (no helper).
SPAWNER_ENV = "MAILFLOW_SPAWNER"
_spawner: Spawner | None = None
_spawner_lock = threading.Lock()


async def _spawner_for_now() -> Spawner | None:
    """The process's spawner helper, started on first use; None: start in a thread instead."""
    if os.environ.get(SPAWNER_ENV) == "thread":
        return None
    current = _spawner
    if current is not None and current.alive:
        return current

    def start() -> Spawner | None:
        global _spawner  # noqa: PLW0603 - one helper per process
        with _spawner_lock:
            if _spawner is None or not _spawner.alive:
                try:
                    _spawner = Spawner.start()
                except OSError:
                    return None
                atexit.register(_spawner.close)
            return _spawner

    return await asyncio.to_thread(start)
