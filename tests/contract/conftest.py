"""The `backend` fixture: each contract test runs once per backend of support.backends."""

from __future__ import annotations

import pytest

from support.backends import BACKENDS, Runner
from support.harness import SERVICE_ENDPOINT_VARS


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.server] if server else [])
        for name, (_, server) in BACKENDS.items()
    ],
)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Runner:
    """Runs a test's scenario on one backend, on fresh resources; every AWS client of the
    test points at that backend's server."""
    opener, server = BACKENDS[request.param]
    if server is not None:
        started = request.getfixturevalue(server)
        endpoints = (
            started if isinstance(started, dict) else dict.fromkeys(SERVICE_ENDPOINT_VARS, started)
        )
        for name, url in endpoints.items():
            monkeypatch.setenv(name, url)
    return Runner(opener)
