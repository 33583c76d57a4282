"""The second backend in one step: LocalStack (S3, SQS, SNS) and dynalite (DynamoDB).

    with second_backend() as endpoints:      # {"AWS_ENDPOINT_URL_SQS": "http://…", …}
        os.environ.update(endpoints)         # botocore reads these before AWS_ENDPOINT_URL

Both must be installed (`make backends`); BackendNotInstalledError says what is missing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mailflow.dev.dynalite import Dynalite
from mailflow.dev.localstack import SERVICES, LocalStack


@contextlib.contextmanager
def second_backend(log_dir: Path | None = None) -> Iterator[dict[str, str]]:
    """Start dynalite and LocalStack on free loopback ports; yield the per-service endpoint
    variables (AWS_ENDPOINT_URL_S3/_SQS/_SNS/_DYNAMODB); stop both on exit."""
    dynalite_log = log_dir / "dynalite.log" if log_dir else None
    localstack_log = log_dir / "localstack.log" if log_dir else None
    with Dynalite(log_path=dynalite_log) as dynalite, LocalStack(log_path=localstack_log) as ls:
        endpoints = {f"AWS_ENDPOINT_URL_{s.upper()}": ls.url for s in SERVICES}
        endpoints["AWS_ENDPOINT_URL_DYNAMODB"] = dynalite.url
        yield endpoints
