"""Running the legacy processor: one contract, two transports.

`ExecProcessor` spawns the command in the worker's container (dev, tests, single-container
deploys). `FastCGIProcessor` (fastcgi_transport.py) asks the php-fpm sidecar's runner.php
to do the same. Both return an `outcome.ProcessResult`; neither raises for anything the
processor did. Cancellation kills the processor's whole process group and re-raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mailflow.outcome import ProcessResult
from mailflow.processors.child import Child

HEAD_BYTES = 64
STREAM_CHUNK_BYTES = 64 * 1024
#: After the processor exits, how long its stdout/stderr may stay open (a grandchild holding
#: them) before the leftovers of its process group are killed.
PIPE_DRAIN_S = 1.0
PR_SET_DUMPABLE = 4


def forbid_environ_reads() -> bool:
    """Make this process undumpable. A processor runs as our uid; without this it could read
    /proc/<our pid>/environ (the AWS credentials, or ECS's credentials URI, that we never
    pass it) and /proc/<our pid>/mem. Children are not affected: exec makes them dumpable
    again. Also no core dumps of a process holding credentials. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True, slots=True)
class ProcessRequest:
    """One processor run: the argv (no shell) and its complete environment, the spool file that
    becomes its stdin, its timeout and the SIGTERM-to-SIGKILL grace (seconds), its working
    directory, and how many bytes of each output stream to keep (the tail)."""

    argv: tuple[str, ...]
    env: dict[str, str]
    #: The raw mail, exactly as stored: the processor's stdin.
    stdin_path: Path
    timeout_s: float
    kill_grace_s: float = 5.0
    cwd: Path | None = None
    tail_bytes: int = 4096


class Processor(Protocol):
    """A transport that runs the legacy processor for one delivery (exec or FastCGI).

    The delivery relies on: `run` returns a `ProcessResult` for anything the processor or the
    transport did (a crash, a timeout, a broken connection, a refusal are results, never
    exceptions); only cancellation raises, and a cancelled run leaves nothing running.
    """

    async def run(self, request: ProcessRequest) -> ProcessResult:
        """Run `request` to completion (or its timeout) and say how it ended."""

    async def close(self) -> None:
        """Release what the transport holds; no run may be in progress."""

    def settle_s(self, kill_grace_s: float) -> float:
        """After a cancelled `run`, how long the processor may still be running: a retry of
        the same delivery must not start sooner, or two runs overlap."""
        ...


class OutputCapture:
    """Bounded capture of a stream: the first HEAD_BYTES and the last `tail_bytes`."""

    def __init__(self, tail_bytes: int) -> None:
        self._limit = tail_bytes
        self.head = b""
        self._tail = bytearray()
        self.total_bytes = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the stream (memory stays bounded whatever its size)."""
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self.total_bytes += len(chunk)
        self._tail += chunk
        if len(self._tail) > self._limit:
            del self._tail[: len(self._tail) - self._limit]

    @property
    def tail(self) -> bytes:
        """The last `tail_bytes` bytes of the stream."""
        return bytes(self._tail)


async def _pump(stream: asyncio.StreamReader | None, capture: OutputCapture) -> None:
    if stream is None:
        return
    while chunk := await stream.read(STREAM_CHUNK_BYTES):
        capture.feed(chunk)


#: Processors' default niceness: under CPU contention the worker's loop (heartbeats, I/O) gets
#: about ten times a processor's share, and an idle CPU still goes to the processors.
DEFAULT_NICE = 10


class ExecProcessor:
    """The sendmail/postfix pipe, minus the shell. Processors run `nice` steps below the
    worker's CPU priority (MAILFLOW_PROCESSOR_NICE; see child.lower_priority)."""

    def __init__(self, nice: int = DEFAULT_NICE) -> None:
        self.nice = nice

    def settle_s(self, kill_grace_s: float) -> float:  # noqa: ARG002 - the protocol's signature
        """0: a cancelled `run` returns only once the process group is gone."""
        return 0.0

    async def run(self, request: ProcessRequest) -> ProcessResult:
        """Spawn `argv` with the spool file as stdin in its own process group and wait for it.

        On timeout the whole group gets SIGTERM, then SIGKILL after `kill_grace_s`; whatever the
        processor leaves running in its group after it exits is killed too. A spawn failure is a
        `transport_error` result. On cancellation the group is killed before re-raising."""
        started = time.monotonic()
        out, err = OutputCapture(request.tail_bytes), OutputCapture(request.tail_bytes)
        starting = asyncio.ensure_future(
            Child.start(
                request.argv,
                stdin_path=request.stdin_path,
                env=request.env,
                cwd=request.cwd,
                read_limit=STREAM_CHUNK_BYTES,
                nice=self.nice,
            ),
        )
        try:
            child = await asyncio.shield(starting)
        except OSError as exc:
            return ProcessResult(
                transport_error=f"spawn failed: {exc.strerror or exc}",
                duration_s=time.monotonic() - started,
            )
        except asyncio.CancelledError:
            # Cancelled while the process was being started: it must not outlive us.
            with contextlib.suppress(OSError):
                late = await starting
                await late.terminate_group(request.kill_grace_s)
                late.close()
            raise
        pumps = asyncio.gather(_pump(child.stdout, out), _pump(child.stderr, err))
        timed_out = False
        try:
            try:
                async with asyncio.timeout(request.timeout_s):
                    await asyncio.shield(child.exited)
            except TimeoutError:
                timed_out = True
                await child.terminate_group(request.kill_grace_s)
        except asyncio.CancelledError:
            # Lost lease or forced shutdown: nobody may keep running on our behalf.
            await asyncio.shield(child.terminate_group(request.kill_grace_s))
            pumps.cancel()
            child.close()
            raise
        try:
            async with asyncio.timeout(PIPE_DRAIN_S):
                await asyncio.shield(pumps)
        except TimeoutError:
            pass
        finally:
            # Whatever the processor left behind in its group goes with it.
            child.signal_group(signal.SIGKILL)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(PIPE_DRAIN_S):
                    await pumps
            child.close()
        returncode = child.returncode()
        return ProcessResult(
            exit_code=returncode if returncode is not None and returncode >= 0 else None,
            signal=-returncode if returncode is not None and returncode < 0 else None,
            timed_out=timed_out,
            stdout_tail=out.tail,
            stderr_tail=err.tail,
            stdout_head=out.head,
            stderr_head=err.head,
            duration_s=time.monotonic() - started,
        )

    async def close(self) -> None:
        """Nothing to release: each run owns its child process."""
