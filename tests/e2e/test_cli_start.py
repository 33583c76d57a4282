"""`mailflow worker` with a bad setting: one line on stderr and exit 2, as a real process
(moved from tests/unit: each case starts the console script)."""

from __future__ import annotations

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
