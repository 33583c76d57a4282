"""Security properties: what the processor can see, no shell anywhere, bounded regexes,
private spool files, and which notifications are trusted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest

from chaos.procs import reap, start_worker, wait_for
from mailflow.aws import AwsClients, open_clients
from mailflow.aws.store import make_spool_dir, spooled
from mailflow.config import Route
from mailflow.errors import ObjectMissingError, TooLargeError
from support.harness import (
    REPO,
    SIMPLE_MAIL,
    TESTS,
    Env,
    all_terminal,
    require_binary,
    run_worker_until,
)

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
