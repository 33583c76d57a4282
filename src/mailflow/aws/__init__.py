"""The AWS edge: every call to AWS goes through this package and nowhere else.

`boundary` holds the one call boundary (`call`, the retry layer, error mapping, clients); the
modules beside it wrap one service each: `ledger` (DynamoDB), `queue` (SQS), `store` (S3).
The boundary's names are re-exported here, so callers write `aws.call(...)`. They load on
first use: `mailflow.aws.shapes` (plain data the settings validate against) must not pull in
aioboto3, which is most of the ~0.5 s a command that never calls AWS would spend importing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailflow.aws.boundary import (
        CALL_ATTEMPTS,
        CALL_DEADLINE_S,
        AwsClients,
        AwsPermanentError,
        ConditionFailedError,
        RetryableAwsError,
        call,
        client_config,
        error_code,
        map_error,
        open_clients,
        requests_sent,
    )

__all__ = [
    "CALL_ATTEMPTS",
    "CALL_DEADLINE_S",
    "AwsClients",
    "AwsPermanentError",
    "ConditionFailedError",
    "RetryableAwsError",
    "call",
    "client_config",
    "error_code",
    "map_error",
    "open_clients",
    "requests_sent",
]


def __getattr__(name: str) -> Any:
    """The re-exported boundary names, imported on first access (PEP 562)."""
    if name in __all__:
        return getattr(importlib.import_module("mailflow.aws.boundary"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
