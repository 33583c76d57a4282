"""A child process started off the event loop, its exit watched through a pidfd.

Why not `asyncio.create_subprocess_exec`:
- Starting a process suspends the starting thread until the child has exec'd (vfork). On a
  busy machine that is milliseconds; on the event loop it stalls every other delivery's
  heartbeat and I/O. Here the start runs in a worker thread.
- asyncio's `Process.wait()` returns only once the child's pipes are closed as well, so a
  grandchild holding stdout turns a clean exit into a "timeout". Here the exit itself is the
  event: the kernel makes the pidfd readable when the child exits, whatever its pipes do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Child:
    """One started process in its own process group, with async stdout/stderr readers."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        exited: asyncio.Future[None],
        transports: list[asyncio.BaseTransport],
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
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
    ) -> Child:
        """Start `argv` with the file at `stdin_path` as its stdin. Raises OSError."""

        def spawn() -> subprocess.Popen[bytes]:
            # The child reads the spool file itself: no copy of the mail passes through us.
            with stdin_path.open("rb") as stdin:
                return subprocess.Popen(
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

        popen = await asyncio.to_thread(spawn)
        loop = asyncio.get_running_loop()
        transports: list[asyncio.BaseTransport] = []
        readers = []
        for pipe in (popen.stdout, popen.stderr):
            reader = asyncio.StreamReader(limit=read_limit, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_read_pipe(functools.partial(_same, protocol), pipe)
            transports.append(transport)
            readers.append(reader)
        exited = await _watch_exit(popen, loop)
        return cls(popen, readers[0], readers[1], exited, transports)

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
        """Reap (the exit has happened, so this does not block) and return the status."""
        return self._popen.poll()

    def close(self) -> None:
        """Close our pipe ends and reap the child if it has exited (it has, on every path
        that calls this: after its exit, or after terminate_group)."""
        for transport in self._transports:
            transport.close()
        self._popen.poll()


def _same(protocol: asyncio.StreamReaderProtocol) -> asyncio.StreamReaderProtocol:
    return protocol


async def _watch_exit(
    popen: subprocess.Popen[bytes],
    loop: asyncio.AbstractEventLoop,
) -> asyncio.Future[None]:
    exited: asyncio.Future[None] = loop.create_future()
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        # No pidfd (kernel < 5.3, or a sandbox that forbids it): a thread waits instead.
        def waited(_: asyncio.Future[int]) -> None:
            if not exited.done():
                exited.set_result(None)

        loop.run_in_executor(_wait_executor(), popen.wait).add_done_callback(waited)
        return exited

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, readable)
    return exited
