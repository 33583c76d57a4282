"""Security properties: what the processor can see, no shell anywhere, bounded regexes,
private spool files, and which notifications are trusted."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from chaos.procs import reap, start_worker, wait_for
from mailflow.aws import AwsClients, open_clients
from mailflow.aws.store import make_spool_dir, spooled
from mailflow.config import Route
from mailflow.errors import ObjectMissingError, TooLargeError
from mailflow.processors.exec import ProcessRequest
from mailflow.processors.fastcgi import FastCGIProcessor
from support.harness import (
    REPO,
    SIMPLE_MAIL,
    TESTS,
    Env,
    all_terminal,
    require_binary,
    run_worker_until,
)
from support.php_fpm import running_php_fpm

SRC = REPO / "src" / "mailflow"
PROBE = TESTS / "chaos" / "inspect.php"
CONTRACT_ENV = frozenset({
    "PATH", "LANG", "HOME",
    "SENDER", "RECIPIENT", "ORIGINAL_RECIPIENT", "LOCAL", "DOMAIN", "EXTENSION",
    "MAILFLOW_MAIL_ID", "MAILFLOW_DELIVERY_ID", "MAILFLOW_ATTEMPT", "MAILFLOW_ROUTE",
})  # fmt: skip
PLANTED_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "planted-secret-access-key",
    "AWS_SESSION_TOKEN": "planted-session-token",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/planted-guid",
    "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/planted-token",
    "AWS_PROFILE": "planted-profile",
    "DATABASE_PASSWORD": "planted-db-password",
    "MAILFLOW_FASTCGI_ADDRESS": "127.0.0.1:9000",
}


def probe_route() -> Route:
    return Route(
        name="probe",
        match=r"probe-(?P<code>[0-9]{1,3})@orders\.example\.com",
        command=f"php {PROBE} {{code}}",
    )


def probe_reports(probe_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(probe_dir.glob("*.json"))]


# --- the processor's view -------------------------------------------------------------------


@pytest.mark.php
def test_processor_sees_only_the_contract_env_no_credentials_no_fds_private_spool(
    env: Env,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    monkeypatch.setenv("PROBE_DIR", str(probe_dir))
    for name, value in PLANTED_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE")  # botocore would look the planted profile up; keep it out
    secret_values = {v for k, v in PLANTED_SECRETS.items() if k != "AWS_PROFILE"} | {
        os.environ["AWS_ACCESS_KEY_ID"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
    }
    settings = env.with_settings(routes=(probe_route(),), pass_env=("PROBE_DIR",), max_attempts=2)
    spool_seen_empty: list[bool] = []

    async def scenario() -> None:
        async with open_clients() as clients:
            mail_ids = [
                await env.send(clients, SIMPLE_MAIL, [f"probe-{code}@orders.example.com"])
                for code in (0, 1, 75)
            ]

            async def done(c: AwsClients) -> bool:
                if not await all_terminal(env, mail_ids)(c):
                    return False
                # the worker still runs: its spool dir exists and must hold nothing
                dirs = list(settings.spool_dir.iterdir())
                spool_seen_empty.append(all(not any(d.iterdir()) for d in dirs))
                return True

            await run_worker_until(settings, clients, done, timeout_s=60)
            records = [r for m in mail_ids for r in await env.records(clients, m)]
            outcomes = sorted((r["reason"], r["attempts"]) for r in records)
            assert outcomes == [("attempts_exhausted", 2), ("exit_1", 1), ("ok", 1)]

    asyncio.run(scenario())
    assert spool_seen_empty == [True]  # after success, permanent failure and retries
    reports = probe_reports(probe_dir)
    assert len(reports) == 4  # 0, 1, 75 twice
    for report in reports:
        names = set(report["env"])
        assert names <= CONTRACT_ENV | {"PROBE_DIR"}, names - CONTRACT_ENV
        assert not [n for n in names if n.startswith("AWS_")]
        leaked = [v for v in report["env"].values() if any(s in v for s in secret_values)]
        assert not leaked
        # nothing of the worker's open files (its sockets to AWS, its logs): stdin, stdout,
        # stderr, plus what PHP itself holds (its script, the fd listing /proc/self/fd)
        extra = [(fd, target) for fd, target in report["fds"] if fd not in {"0", "1", "2"}]
        assert all(
            not target or target == str(PROBE) or str(target).startswith("/proc/")
            for _, target in extra
        ), extra
        # stdin is the private spool file itself
        assert report["stdin_path"].startswith(str(settings.spool_dir))
        assert report["stdin_mode"] == "600"
        assert report["stdin_dir_mode"] == "700"
        assert report["stdin_bytes"] > len(SIMPLE_MAIL)


#: Root without capabilities: to ptrace-style checks, a worker and its processor run like the
#: container's uid 10001 (same uid, no CAP_SYS_PTRACE), the case that matters in production.
NO_CAPS = ("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--")


@pytest.mark.php
def test_processor_cannot_read_the_workers_environment_through_proc(
    env: Env, tmp_path: Path
) -> None:
    """Same uid, no capabilities: /proc/<worker>/environ would hand the processor the worker's
    credentials (or ECS's credentials URI) unless the worker makes itself undumpable."""
    require_binary("setpriv")
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    settings = env.with_settings(routes=(probe_route(),), pass_env=("PROBE_DIR",))
    log = tmp_path / "worker.log"
    proc = start_worker(
        settings, log, tmp_path, prefix=NO_CAPS, PROBE_DIR=str(probe_dir),
        AWS_CONTAINER_CREDENTIALS_RELATIVE_URI="/v2/credentials/planted-guid",
    )  # fmt: skip
    try:

        async def send() -> str:
            async with open_clients() as clients:
                return await env.send(clients, SIMPLE_MAIL, ["probe-0@orders.example.com"])

        asyncio.run(send())
        (report,) = wait_for(lambda: probe_reports(probe_dir), 60, "the probe's report")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            reap(proc)
    assert "planted-guid" not in json.dumps(report["env"])
    assert not report["parent_environ_planted"]
    assert not report["parent_environ_readable"], "the worker's environment is readable"


# --- spool files ----------------------------------------------------------------------------


def test_spool_files_are_private_and_removed_on_every_path(env: Env, tmp_path: Path) -> None:
    spool = make_spool_dir(tmp_path)
    bucket = env.settings.bucket
    body = b"x" * 300_000

    async def scenario() -> None:
        async with open_clients() as clients:
            await clients.s3.put_object(Bucket=bucket, Key="incoming/a", Body=body)
            async with spooled(
                clients.s3, bucket, "incoming/a", spool_dir=spool, max_bytes=10**6
            ) as mail:
                mode = stat.S_IMODE(mail.path.stat().st_mode)
                assert mode == 0o600
                assert mail.path.parent == spool
                assert mail.path.read_bytes() == body
            assert not mail.path.exists()
            # the block fails
            with pytest.raises(RuntimeError):
                async with spooled(
                    clients.s3, bucket, "incoming/a", spool_dir=spool, max_bytes=10**6
                ):
                    raise RuntimeError("processor transport broke")
            # the download fails
            with pytest.raises(ObjectMissingError):
                async with spooled(
                    clients.s3, bucket, "incoming/none", spool_dir=spool, max_bytes=10**6
                ):
                    pass
            with pytest.raises(TooLargeError):
                async with spooled(
                    clients.s3, bucket, "incoming/a", spool_dir=spool, max_bytes=1000
                ):
                    pass

    asyncio.run(scenario())
    assert list(spool.iterdir()) == []


# --- credentials through /proc/*/environ ---------------------------------------------------


def _sidecar_users() -> tuple[str, str]:
    """(php-fpm's master user, the pool's user) as sidecar/Dockerfile runs them."""
    text = (REPO / "sidecar" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    pool = re.search(r"MAILFLOW_FPM_USER=(\S+)", text)
    assert pool is not None
    return (users[-1].split(":")[0] if users else "root"), pool.group(1)


def _as_user(user: str) -> tuple[str, ...]:
    """A command prefix that runs as `user` (nothing for root), no capabilities beyond it."""
    if user in {"root", "0"}:
        return ()
    if user.isdigit():  # a numeric image user need not exist in this machine's passwd
        uid = gid = int(user)
    else:
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    return (
        "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--",
    )  # fmt: skip


@pytest.mark.php
@pytest.mark.phpfpm
def test_a_sidecar_processor_finds_no_aws_variable_in_any_proc_environ() -> None:
    """The sidecar as its image runs it: PID 1 (tini) and php-fpm's master hold the task's
    credentials URI; the processor, run by the pool's non-root user, must not read it."""
    require_binary("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root to run the sidecar's users")
    master, pool = _sidecar_users()
    assert pool not in {"root", "0"}, "the pool (and so the processor) must not run as root"
    work = Path(tempfile.mkdtemp(prefix="mailflow-sidecar-"))  # under /tmp: the pool reaches it
    mark = f"mark-{uuid.uuid4().hex}"
    planted = {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/planted-guid"}
    stand_in: subprocess.Popen[bytes] | None = None
    try:
        work.chmod(0o755)
        out = work / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        probe = work / "inspect.php"
        shutil.copy(PROBE, probe)
        probe.chmod(0o644)
        run_dir = work / "fpm"
        run_dir.mkdir()
        if master not in {"root", "0"}:
            shutil.chown(run_dir, user=int(master) if master.isdigit() else master)
        # PID 1 of the container (tini, from ECS's initProcessEnabled) as the image's user.
        stand_in = subprocess.Popen(
            [*_as_user(master), "sleep", "120"],
            env={"PATH": "/usr/bin:/bin", "PROBE_MARK": mark, **planted},
        )
        mail = work / "mail.eml"
        mail.write_bytes(SIMPLE_MAIL)
        with running_php_fpm(
            run_dir,
            allow=[["php", str(probe)]],
            prefix=_as_user(master),
            extra_env={
                "MAILFLOW_FPM_USER": pool,
                "MAILFLOW_FPM_GROUP": pool,
                "PROBE_MARK": mark,
                **planted,
            },
        ) as fpm:
            request = ProcessRequest(
                argv=("php", str(probe), "0"),
                env={"PATH": "/usr/bin:/bin", "PROBE_DIR": str(out), "PROBE_MARK": mark},
                stdin_path=mail,
                timeout_s=30,
            )
            result = asyncio.run(FastCGIProcessor(fpm.address, fpm.runner_script).run(request))
            assert result.exit_code == 0, (result, fpm.log())
            # The control: the same probe as root sees the planted variables (PID 1's, the
            # master's), so an empty list below is the processor's view, not a blind probe.
            subprocess.run(
                [require_binary("php"), str(probe), "0"],
                env={"PROBE_DIR": str(work), "PROBE_MARK": mark, "PATH": "/usr/bin:/bin"},
                input=b"",
                check=True,
            )
        (report,) = probe_reports(out)
        (control,) = probe_reports(work)
    finally:
        if stand_in is not None:
            stand_in.kill()
            stand_in.wait()
        shutil.rmtree(work, ignore_errors=True)
    assert f"{stand_in.pid}:AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" in control["environ"]["aws"]
    assert report["uid"] == pwd.getpwnam(pool).pw_uid
    assert report["environ"]["aws"] == [], report["environ"]


def _single_container_layout() -> tuple[str, tuple[str, ...]]:
    """(the container's user: PID 1's and the health checks', the ENTRYPOINT's wrapper before
    `mailflow`) of the single-container variant, from its Dockerfile in docs/deploy.md §9."""
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split("## 9.")[1].split("## 10.")[0]
    block = re.search(r"```dockerfile\n(.*?)```", section, re.DOTALL)
    assert block is not None
    users = re.findall(r"^USER\s+(\S+)", block.group(1), re.MULTILINE)
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", block.group(1), re.MULTILINE)
    wrapper = json.loads(entry.group(1)) if entry else ["mailflow"]
    return users[-1].split(":")[0], tuple(wrapper[: wrapper.index("mailflow")])


@pytest.mark.php
def test_an_exec_processor_finds_no_aws_variable_in_any_proc_environ(env: Env) -> None:
    """The single-container variant as documented: PID 1 (the init) and a health check hold
    the task's credentials URI; the worker and its processor run as they are told to. The
    processor, which reads every /proc/*/environ it can open, must find no AWS_ variable."""
    require_binary("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root to run the image's users")
    container_user, wrapper = _single_container_layout()
    work = Path(tempfile.mkdtemp(prefix="mailflow-single-"))  # under /tmp: any uid reaches it
    mark = f"mark-{uuid.uuid4().hex}"
    planted = {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/planted-guid"}
    stand_ins: list[subprocess.Popen[bytes]] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        work.chmod(0o777)  # the worker's uid comes from the layout: let it write its files here
        probe_dir = work / "probe"
        probe_dir.mkdir(mode=0o777)
        probe_dir.chmod(0o777)
        settings = env.with_settings(
            routes=(probe_route(),),
            pass_env=("PROBE_DIR", "PROBE_MARK"),
            spool_dir=work / "spool",
            health_file=work / "health",
        )
        stand_ins.extend(  # PID 1, and a health check in flight
            subprocess.Popen(
                [*_as_user(container_user), "/bin/sleep", "120"],
                env={"PATH": "/usr/bin:/bin", "PROBE_MARK": mark, **planted},
            )
            for _ in range(2)
        )
        proc = start_worker(
            settings, work / "worker.log", work, prefix=(*_as_user(container_user), *wrapper),
            PROBE_DIR=str(probe_dir), PROBE_MARK=mark, **planted,
        )  # fmt: skip

        async def send() -> str:
            async with open_clients() as clients:
                return await env.send(clients, SIMPLE_MAIL, ["probe-0@orders.example.com"])

        asyncio.run(send())
        (report,) = wait_for(lambda: probe_reports(probe_dir), 60, "the probe's report")
        # The control: root sees PID 1's planted variable, so the probe is not blind.
        control = subprocess.run(
            [require_binary("php"), "-r", f"require '{PROBE}'; echo json_encode(scan_environ());"],
            env={"PATH": "/usr/bin:/bin", "PROBE_MARK": mark},
            capture_output=True,
            check=True,
        )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            finally:
                reap(proc)
        for stand_in in stand_ins:
            stand_in.kill()
            stand_in.wait()
        shutil.rmtree(work, ignore_errors=True)
    seen = json.loads(control.stdout)["aws"]
    assert f"{stand_ins[0].pid}:AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" in seen, seen
    assert report["uid"] != 0, "the processor runs as non-root"
    assert report["environ"]["aws"] == [], report["environ"]
