"""Fixtures for every test folder, and the markers the folders imply.

The folders say what a test is:
- tests/unit: pure logic, and the worker/delivery/reconcile logic on the in-memory fakes
  (mailflow.testing). No server, no php, no sleeps.
- tests/contract: one suite run against every backend (support/backends.py: the fakes, a
  moto server over HTTP), so the fakes cannot drift from the real behaviour.
- tests/e2e: the real things together: moto server over HTTP, php-cli / php-fpm processes,
  worker processes and signals. A test parametrizing the `backend` fixture with BACKENDS
  runs on a second, independent backend too: LocalStack (S3, SQS, SNS) and dynalite
  (DynamoDB), one of each per session, reached through the per-service endpoint variables;
  skipped without `make backends`, failed without it when CI is set.
- tests/deploy: the deployment files (ecspresso jsonnet, IAM, Dockerfiles, compose) rendered
  and validated against the AWS request schemas. No server, but jsonnet renders are slow.

Tests are plain sync functions that drive asyncio scenarios with `asyncio.run`, so nothing
depends on an async pytest plugin. Shared helpers are imported from tests/support.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `support` and `chaos`, from any folder

from mailflow.config import Settings
from mailflow.dev.backend_process import BackendNotInstalledError
from mailflow.dev.motoserver import MotoServer
from mailflow.dev.second_backend import second_backend
from support.harness import (
    SERVICE_ENDPOINT_VARS,
    Env,
    behave_route,
    provision_settings,
    require_binary,
)
from support.php_fpm import PHP_FPM_NAMES

TESTS = Path(__file__).parent
#: Folder → marker, so `-m e2e` / `-m contract` select what the folders hold.
FOLDER_MARKERS = {"e2e": "e2e", "contract": "contract", "unit": "unit", "deploy": "deploy"}
#: Marker → the binary a test so marked needs (skipped without it, failed without it in CI).
BINARY_MARKERS = {"php": ("php",), "phpfpm": PHP_FPM_NAMES}


#: Run order, longest first: with several pytest-xdist workers the suite ends when its last
#: long test does, so long tests start early and the many short ones fill the gaps at the end.
FOLDER_ORDER = ("e2e", "contract", "deploy", "unit")


def _run_rank(item: pytest.Item) -> tuple[int, int]:
    folder = Path(item.path).relative_to(TESTS).parts[0]
    not_slow = item.get_closest_marker("slow") is None
    return (not_slow, FOLDER_ORDER.index(folder) if folder in FOLDER_ORDER else len(FOLDER_ORDER))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(item.path).relative_to(TESTS).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])
    items.sort(key=_run_rank)  # stable: a module's tests stay in their written order


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, binary in BINARY_MARKERS.items():
        if item.get_closest_marker(marker) is not None:
            require_binary(*binary)


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """One moto server over HTTP for the session; the AWS SDK variables point at it."""
    with MotoServer() as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", server.url)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        yield server.url


@pytest.fixture(scope="session")
def aws_like_endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """LocalStack + dynalite, started once per session: {endpoint variable: URL}."""
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            endpoints = stack.enter_context(second_backend(tmp_path_factory.mktemp("backends")))
        except BackendNotInstalledError as exc:
            if os.environ.get("CI"):
                pytest.fail(f"the second backend is required in CI: {exc}")
            pytest.skip(str(exc))
        sys.stderr.write(f"\nsecond backend up in {time.monotonic() - started:.1f}s\n")
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.delenv("AWS_PROFILE", raising=False)
        yield endpoints


@pytest.fixture
def backend() -> str:
    """moto unless a test parametrizes this fixture with BACKENDS."""
    return "moto"


@pytest.fixture
def aws_endpoints(
    backend: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """Point every AWS client of this test (and its subprocesses) at the chosen backend."""
    if backend == "moto":
        url = request.getfixturevalue("moto_url")
        for name in SERVICE_ENDPOINT_VARS:
            monkeypatch.delenv(name, raising=False)
        return dict.fromkeys(SERVICE_ENDPOINT_VARS, url)
    if backend != "localstack+dynalite":
        raise ValueError(f"unknown backend {backend!r}")
    endpoints: dict[str, str] = request.getfixturevalue("aws_like_endpoints")
    # Nothing may fall through to moto: no global endpoint while the test runs.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for name, url in endpoints.items():
        monkeypatch.setenv(name, url)
    return endpoints


@pytest.fixture
def env(aws_endpoints: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """Fresh bucket, topic, queue + DLQ and table on the test's backend; behave.php routed."""
    uid = uuid.uuid4().hex[:10]
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    monkeypatch.setenv("LEDGER_DIR", str(ledger_dir))
    settings = Settings(
        bucket=f"mf-{uid}",
        topic=f"mf-{uid}",
        queue=f"mf-{uid}",
        table=f"mf-{uid}",
        routes=(behave_route(),),
        pass_env=("LEDGER_DIR", "SLOW_S"),
        concurrency=4,
        visibility_timeout_s=20,
        lease_s=20,
        wait_time_s=1,
        retry_base_s=0.2,
        retry_max_s=0.5,
        processor_timeout_s=10,
        kill_grace_s=1,
        shutdown_grace_s=10,
        health_file=tmp_path / "heartbeat",
        spool_dir=tmp_path / "spool",
        log_format="json",
    )
    asyncio.run(provision_settings(settings))
    return Env(settings=settings, ledger_dir=ledger_dir)
