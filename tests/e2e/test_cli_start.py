"""`mailflow worker` with a bad setting: one line on stderr and exit 2, as a real process
(moved from tests/unit: each case starts the console script)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (
            {"MAILFLOW_ROUTES": '[{"name":"x","match":"(","command":"php a.php"}]'},
            "MAILFLOW_ROUTES",
        ),
        (
            {"MAILFLOW_ROUTES": '[{"name":"x","match":"a","command":"php a.php {nope}"}]'},
            "unknown placeholder {nope}",
        ),
        ({"MAILFLOW_CONCURRENCY": "-1"}, "MAILFLOW_CONCURRENCY"),
        ({"MAILFLOW_LEASE_S": "abc"}, "MAILFLOW_LEASE_S"),
        ({"MAILFLOW_ROUTES": "not json"}, "MAILFLOW_ROUTES"),
        (
            {"MAILFLOW_PROCESSOR_TRANSPORT": "fastcgi", "MAILFLOW_FASTCGI_ADDRESS": "php-fpm"},
            "MAILFLOW_FASTCGI_ADDRESS",
        ),
        (
            {"MAILFLOW_PROCESSOR_TRANSPORT": "fastcgi", "MAILFLOW_FASTCGI_ADDRESS": "h:99999"},
            "MAILFLOW_FASTCGI_ADDRESS",
        ),
        (
            {"MAILFLOW_PROCESSOR_TRANSPORT": "fastcgi", "MAILFLOW_RUNNER_SCRIPT": "runner.php"},
            "MAILFLOW_RUNNER_SCRIPT",
        ),
        (
            {"MAILFLOW_ROUTES": '[{"name":"x","match":"a","command":"php \'a.php"}]'},
            "MAILFLOW_ROUTES",
        ),
        ({"MAILFLOW_PASS_ENV": "AWS_SECRET_ACCESS_KEY"}, "MAILFLOW_PASS_ENV"),
        ({"MAILFLOW_PASS_ENV": "LANG,aws_session_token"}, "MAILFLOW_PASS_ENV"),
        (
            {"MAILFLOW_PASS_ENV": "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"},
            "MAILFLOW_PASS_ENV",
        ),
        (
            {"MAILFLOW_INCOMING_PREFIX": "", "MAILFLOW_ARCHIVE_BUCKET": "archive"},
            "MAILFLOW_INCOMING_PREFIX",
        ),
    ],
)
def test_bad_setting_stops_start_with_one_line_and_exit_2(env: dict[str, str], needle: str) -> None:
    # Should a bad setting pass, the worker must not reach any real endpoint: a closed port.
    unreachable = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mailflow", "worker"],
        env={**os.environ, **unreachable, **env},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]


#: Run `mailflow ARGS` in a fresh interpreter, then print which AWS SDK modules it loaded.
_LOADED_SDK = """
import sys
from mailflow.cli.app import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
sdk = sorted(m for m in ("aioboto3", "aiobotocore", "botocore", "boto3") if m in sys.modules)
print("sdk:", ",".join(sdk) or "none")
"""


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["aliases", "--help"], ["check"]])
def test_commands_that_never_call_aws_do_not_load_its_sdk(args: list[str]) -> None:
    """Importing aioboto3 is most of a command's start-up (~0.35 of ~0.75 CPU-s): only the
    commands that talk to AWS pay it. `check` is the container's HEALTHCHECK, run every 30 s
    beside the worker."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADED_SDK, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.splitlines()[-1] == "sdk: none", done.stdout[-500:]
    if args == ["--version"]:
        assert done.stdout.splitlines()[0] == f"mailflow {importlib.metadata.version('mailflow')}"


def test_the_aws_package_loads_the_sdk_on_first_use_of_a_boundary_name() -> None:
    """The other side of the check above: `mailflow.aws` re-exports the boundary lazily, and
    the first use of one of its names loads it (and the SDK) as a plain import would."""
    probe = (
        "import sys, mailflow.aws.shapes\n"
        "print('aiobotocore' in sys.modules)\n"
        "from mailflow.aws import open_clients\n"
        "print('aiobotocore' in sys.modules, open_clients.__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "True", "mailflow.aws.boundary"]
