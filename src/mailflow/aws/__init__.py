"""The AWS edge: every call to AWS goes through this package and nowhere else.

`boundary` holds the one call boundary (`call`, the retry layer, error mapping, clients); the
modules beside it wrap one service each: `ledger` (DynamoDB), `queue` (SQS), `store` (S3).
The boundary's names are re-exported here, so callers write `aws.call(...)`.
"""

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
