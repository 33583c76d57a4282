"""The spawner helper: processors start in it (real processes), never in the worker."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from mailflow.processors import child
from mailflow.processors.child import Child


async def _run(argv: list[str], stdin: Path, env: dict[str, str]) -> tuple[int | None, bytes]:
    proc = await Child.start(argv, stdin_path=stdin, env=env, cwd=None, read_limit=65536)
    out = await proc.stdout.read()
    await proc.exited
    proc.close()
    return proc.returncode(), out


@pytest.fixture
def stdin(tmp_path: Path) -> Path:
    path = tmp_path / "mail"
    path.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    return path


def test_a_processor_starts_in_the_helper_with_its_stdin_and_exit_status(stdin: Path) -> None:
    script = (
        "import os, sys; data = sys.stdin.buffer.read();"
        " print(os.getppid(), len(data), os.environ['ONLY']); sys.exit(3)"
    )
    code, out = asyncio.run(_run([sys.executable, "-c", script], stdin, {"ONLY": "this"}))
    parent, size, only = out.split()
    assert code == 3
    assert int(size) == stdin.stat().st_size
    assert only == b"this"
    assert int(parent) != os.getpid()  # started by the helper, not by us


def test_a_start_that_fails_raises_oserror(stdin: Path) -> None:
    with pytest.raises(OSError, match="No such file"):
        asyncio.run(_run(["/nonexistent/processor"], stdin, {}))


def test_the_helper_has_none_of_the_workers_credentials(
    stdin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-the-helper")
    monkeypatch.setattr(child, "_spawner", None)  # a fresh helper, started with this env

    async def helper_environ() -> bytes:
        spawner = await child._spawner_for_now()
        assert spawner is not None
        try:
            return Path(f"/proc/{spawner._helper.pid}/environ").read_bytes()
        finally:
            spawner.close()

    try:
        environ = asyncio.run(helper_environ())
    except PermissionError:
        pytest.skip("cannot read another process's environ here")
    assert b"PATH=" in environ
    assert b"never-in-the-helper" not in environ
    assert b"AWS_" not in environ
    code, _ = asyncio.run(_run([sys.executable, "-c", "pass"], stdin, {}))
    assert code == 0  # the closed helper was replaced on the next start


def test_an_exit_reported_after_its_loop_closed_does_not_stop_the_helper(stdin: Path) -> None:
    async def start_and_leave() -> None:
        proc = await Child.start(
            [sys.executable, "-c", "import time; time.sleep(0.3)"],
            stdin_path=stdin,
            env={},
            cwd=None,
            read_limit=65536,
        )
        proc.close()  # the loop ends before the exit is reported

    asyncio.run(start_and_leave())
    time.sleep(0.6)  # the exit arrives for a closed loop

    async def next_run() -> tuple[int | None, bytes]:
        async with asyncio.timeout(30):
            return await _run([sys.executable, "-c", "print('ok')"], stdin, {})

    code, out = asyncio.run(next_run())
    assert (code, out.strip()) == (0, b"ok")


def test_a_helper_that_dies_is_replaced_and_its_running_child_still_reports_its_exit(
    stdin: Path,
) -> None:
    async def scenario() -> tuple[int | None, int | None, int]:
        async with asyncio.timeout(30):
            proc = await Child.start(
                [sys.executable, "-c", "import time; time.sleep(0.5)"],
                stdin_path=stdin,
                env={},
                cwd=None,
                read_limit=65536,
            )
            spawner = await child._spawner_for_now()
            assert spawner is not None
            os.kill(spawner._helper.pid, signal.SIGKILL)
            status = await proc.exited  # the child outlives the helper: watched by pidfd
            proc.close()
            code, _ = await _run([sys.executable, "-c", "pass"], stdin, {})
            replacement = await child._spawner_for_now()
            assert replacement is not None
            return status, code, replacement._helper.pid

    status, code, helper_pid = asyncio.run(scenario())
    assert status is None  # its status went with the helper
    assert code == 0  # a new helper started the next processor
    assert helper_pid > 0


@pytest.mark.parametrize("spawner", ["helper", "thread"])
@pytest.mark.parametrize("nice", [0, 7])
def test_processors_run_niced_below_the_worker(
    stdin: Path, monkeypatch: pytest.MonkeyPatch, spawner: str, nice: int
) -> None:
    """Both spawners lower the processor's CPU priority by `nice` (the worker keeps its own),
    and what the processor starts inherits it."""
    if spawner == "thread":
        monkeypatch.setenv(child.SPAWNER_ENV, "thread")
    else:
        monkeypatch.delenv(child.SPAWNER_ENV, raising=False)
    script = "import os, subprocess; print(os.nice(0)); subprocess.run(['nice'])"

    async def run() -> tuple[int | None, bytes]:
        proc = await Child.start(
            [sys.executable, "-c", script],
            stdin_path=stdin,
            env={"PATH": os.environ["PATH"]},
            cwd=None,
            read_limit=65536,
            nice=nice,
        )
        out = await proc.stdout.read()
        await proc.exited
        proc.close()
        return proc.returncode(), out

    code, out = asyncio.run(run())
    assert code == 0
    own, grandchild = (int(x) for x in out.split())
    worker = os.nice(0)
    assert own == grandchild == worker + nice
