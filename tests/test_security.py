"""Security properties: what the processor can see, no shell anywhere, bounded regexes,
private spool files, and which notifications are trusted."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from chaos.procs import reap, start_worker, wait_for
from conftest import REPO, SIMPLE_MAIL, TESTS, Env, all_terminal, require_binary, run_worker_until
from mailflow.aws import AwsClients, open_clients
from mailflow.aws.store import make_spool_dir, spooled
from mailflow.config import Route
from mailflow.errors import BadNotificationError, ObjectMissingError, TooLargeError
from mailflow.mail.notification import MailRef, check_trusted
from mailflow.routing import MAX_RECIPIENT_CHARS, DeliveryPlan, Unroutable, plan_delivery

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


def test_processor_sees_only_the_contract_env_no_credentials_no_fds_private_spool(
    env: Env,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_binary("php")
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


def test_processor_cannot_read_the_workers_environment_through_proc(
    env: Env, tmp_path: Path
) -> None:
    """Same uid, no capabilities: /proc/<worker>/environ would hand the processor the worker's
    credentials (or ECS's credentials URI) unless the worker makes itself undumpable."""
    require_binary("php")
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


# --- no shell, anywhere ---------------------------------------------------------------------

SHELL_CALLS = {
    ("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"), ("asyncio", "create_subprocess_shell"),
    ("pty", "spawn"),
}  # fmt: skip
SHELL_ATTRS = {
    "create_subprocess_shell",
    "subprocess_shell",
    "system",
    "popen",
    "getoutput",
    "getstatusoutput",
}


def shell_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found.extend(
                f"line {node.lineno}: shell={ast.unparse(kw.value)}"
                for kw in node.keywords
                if kw.arg == "shell"
                and not (isinstance(kw.value, ast.Constant) and kw.value.value in {False, None})
            )
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in SHELL_ATTRS:
                found.append(f"line {node.lineno}: {ast.unparse(func)}()")
        if isinstance(node, ast.ImportFrom) and node.module:
            found.extend(
                f"line {node.lineno}: from {node.module} import {alias.name}"
                for alias in node.names
                if (node.module, alias.name) in SHELL_CALLS
            )
    return found


def test_no_shell_anywhere_in_src() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found = {}
    for path in files:
        uses = shell_uses(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        if uses:
            found[str(path.relative_to(REPO))] = uses
    assert found == {}


@pytest.mark.parametrize(
    "code",
    [
        "import subprocess\nsubprocess.run('ls', shell=True)",
        "import subprocess\nsubprocess.Popen(cmd, shell=flag)",
        "import os\nos.system('ls')",
        "import os\nos.popen('ls')",
        "import asyncio\nasyncio.create_subprocess_shell('ls')",
        "loop.subprocess_shell(proto, 'ls')",
        "from subprocess import getoutput",
        "from os import system",
    ],
)
def test_the_shell_detector_detects(code: str) -> None:
    assert shell_uses(ast.parse(code))


def test_the_shell_detector_allows_exec_form() -> None:
    code = (
        "import asyncio, subprocess\n"
        "asyncio.create_subprocess_exec('php', 'x.php', '001')\n"
        "subprocess.run(['ls'], shell=False)\n"
    )
    assert shell_uses(ast.parse(code)) == []


# --- hostile recipients against the route regexes -------------------------------------------

STORE = Route(
    name="store",
    match=r"ne-(?P<store>[0-9]{3})@orders\.example\.com",
    command="php /app/receive_mail.php {store}",
)
#: A route an operator might write by accident: catastrophic backtracking on a near miss.
EVIL = Route(
    name="evil",
    match=r"(?P<local>(a|aa)+)@orders\.example\.com",
    command="php /app/receive_mail.php {local}",
)


def test_a_megabyte_recipient_is_refused_fast() -> None:
    recipient = "ne-" + "0" * (1024 * 1024) + "@orders.example.com"
    started = time.perf_counter()
    decision = plan_delivery((EVIL, STORE), recipient, sender="a@b", mail_id="m")
    took = time.perf_counter() - started
    print(f"\n1 MB recipient refused in {took * 1000:.1f} ms")
    assert isinstance(decision, Unroutable)
    assert str(MAX_RECIPIENT_CHARS) in decision.detail


def test_a_backtracking_route_times_out_instead_of_hanging() -> None:
    recipient = "a" * 60 + "!@orders.example.com"  # under the length cap, a near miss
    assert len(recipient) <= MAX_RECIPIENT_CHARS
    started = time.perf_counter()
    decision = plan_delivery((EVIL, STORE), recipient, sender="a@b", mail_id="m")
    took = time.perf_counter() - started
    print(f"\ncatastrophic regex stopped after {took * 1000:.1f} ms")
    assert isinstance(decision, Unroutable)
    assert "timed out" in decision.detail
    # and the same route still routes what it is meant for
    ok = plan_delivery((EVIL, STORE), "aaaa@orders.example.com", sender="a@b", mail_id="m")
    assert isinstance(ok, DeliveryPlan)
    assert ok.argv[-1] == "aaaa"


@pytest.mark.parametrize(
    "recipient",
    [
        "ne-001\x00@orders.example.com",
        "ne-001\n@orders.example.com",
        "ne-\x7f001@orders.example.com",
    ],
)
def test_recipients_with_control_characters_are_unroutable(recipient: str) -> None:
    loose = Route(name="loose", match=r".*@orders\.example\.com", command="prog {mail_id}")
    decision = plan_delivery((loose,), recipient, sender="a@b", mail_id="m")
    assert isinstance(decision, Unroutable)
    assert "control" in decision.detail


# --- spool files ----------------------------------------------------------------------------


def test_spool_dir_is_private(tmp_path: Path) -> None:
    path = make_spool_dir(tmp_path / "base")
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    other = make_spool_dir(tmp_path / "base")
    assert other != path  # one per process


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


# --- which notifications are trusted --------------------------------------------------------


def ref(bucket: str = "mf-mail", key: str = "incoming/abc", mail_id: str = "abc") -> MailRef:
    return MailRef(
        mail_id=mail_id, bucket=bucket, key=key, recipients=("a@b",), sender="", received_at_s=None
    )


@pytest.mark.parametrize(
    ("bucket", "key", "mail_id", "reason"),
    [
        ("other-bucket", "incoming/abc", "abc", "bucket_not_allowed"),
        ("MF-MAIL", "incoming/abc", "abc", "bucket_not_allowed"),
        ("mf-mail", "processed/abc", "abc", "key_not_allowed"),
        ("mf-mail", "incoming/../processed/abc", "abc", "key_not_allowed"),
        ("mf-mail", "incoming/a/../../etc", "abc", "key_not_allowed"),
        ("mf-mail", "/incoming/abc", "abc", "key_not_allowed"),
        ("mf-mail", "Incoming/abc", "abc", "key_not_allowed"),
        ("mf-mail", "incomingabc", "abc", "key_not_allowed"),
        ("mf-mail", "incoming/abc\x00", "abc", "key_not_allowed"),
        ("mf-mail", "incoming/abc", "a/b", "bad_mail_id"),
        ("mf-mail", "incoming/abc", "a" * 129, "bad_mail_id"),
        ("mf-mail", "incoming/abc", "a b", "bad_mail_id"),
        ("mf-mail", "incoming/abc", "a\x00b", "bad_mail_id"),
        # SES stores a mail at <prefix><messageId>: any other object is a replay
        ("mf-mail", "incoming/old-mail", "abc", "key_not_mail_id"),
        ("mf-mail", "incoming/sub/dir/abc", "abc", "key_not_mail_id"),
        ("mf-mail", "incoming/abcd", "abc", "key_not_mail_id"),
        ("mf-mail", "incoming/ABC", "abc", "key_not_mail_id"),
    ],
)
def test_untrusted_notifications_are_refused(
    bucket: str, key: str, mail_id: str, reason: str
) -> None:
    with pytest.raises(BadNotificationError) as caught:
        check_trusted(ref(bucket, key, mail_id), ("mf-mail", "mf-mail-2"), "incoming/")
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("bucket", "key", "mail_id"),
    [
        ("mf-mail", "incoming/abc", "abc"),
        ("mf-mail-2", "incoming/abc", "abc"),
        ("mf-mail", "incoming/a..b", "a..b"),
    ],
)
def test_trusted_notifications_pass(bucket: str, key: str, mail_id: str) -> None:
    check_trusted(ref(bucket, key, mail_id), ("mf-mail", "mf-mail-2"), "incoming/")


def test_sidecar_runner_uses_no_shell() -> None:
    """runner.php starts the legacy script with proc_open in array form, nothing else."""
    runner = REPO / "sidecar" / "runner.php"
    if not runner.exists():
        pytest.skip("no sidecar/runner.php")
    code = "\n".join(
        line
        for line in runner.read_text(encoding="utf-8").splitlines()
        if not line.lstrip().startswith(("//", "*", "/*", "#"))
    )
    for bad in ("shell_exec(", "passthru(", "system(", "popen(", "`", "pcntl_exec("):
        assert bad not in code, bad
    assert " exec(" not in code
    assert "proc_open(" in code
