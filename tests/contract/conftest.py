"""The `backend` fixture: each contract test runs once per backend of support.backends."""

from __future__ import annotations

import pytest

from support.backends import BACKENDS, Runner


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.server] if server else [])
        for name, (_, server) in BACKENDS.items()
    ],
)
def backend(request: pytest.FixtureRequest) -> Runner:
    """Runs a test's scenario on one backend, on fresh resources."""
    opener, server = BACKENDS[request.param]
    if server is not None:
        request.getfixturevalue(server)
    return Runner(opener)
