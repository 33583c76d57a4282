"""Security rules that need no server: no shell anywhere, bounded route regexes, a private
spool directory, and which notifications are trusted."""

from __future__ import annotations

import ast
import stat
import time
from pathlib import Path

import pytest

from mailflow.aws.store import make_spool_dir
from mailflow.config import Route
from mailflow.errors import BadNotificationError
from mailflow.mail.notification import MailRef, check_trusted
from mailflow.routing import MAX_RECIPIENT_CHARS, DeliveryPlan, Unroutable, plan_delivery
from support.harness import REPO

SRC = REPO / "src" / "mailflow"


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
