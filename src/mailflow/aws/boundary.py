"""The AWS edge: clients, retries, and the mapping of foreign exceptions to mailflow's own.

Every AWS call goes through `call()`. botocore's own retries are switched off so there is
exactly one retry layer (tenacity: jittered exponential backoff, bounded in tries and time).
What is still failing after that becomes a `TransientError`; a definite "no" from AWS becomes
a `PermanentError` (or `ConditionFailedError`, which carries the item that made it fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import functools
import platform
import random
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aioboto3
import aiobotocore
import aiohttp
import botocore
import botocore.exceptions
import botocore.httpsession
import botocore.loaders
import botocore.utils
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.session import AioSession
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

import mailflow
from mailflow.errors import PermanentError, TransientError

log = structlog.get_logger("mailflow.aws")

T = TypeVar("T")

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "SlowDown",
        "TransactionInProgressException",
        "LimitExceededException",
    },
)
SERVER_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "KMS.InternalException",
    },
)
#: Errors below the HTTP layer: the request may or may not have been applied.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectionClosedError, ...
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ReadTimeoutError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,
)

CALL_ATTEMPTS = 6
CALL_DEADLINE_S = 30.0

#: Requests sent since the process started, by "<service>.<client method>" (every try counts:
#: AWS bills tries). Cheap enough to keep always on; the worker logs it when it stops.
_requests: Counter[str] = Counter()


def requests_sent() -> dict[str, int]:
    """AWS requests this process has sent so far, by "<service>.<client method>"."""
    return dict(_requests)


class RetryableAwsError(TransientError):
    """One try failed in a way worth another try."""


class AwsPermanentError(PermanentError):
    """An AWS call failed in a way another try will not fix (access denied, no such
    resource, validation): `operation` is `<service>.<Operation>`, `code` the AWS error code
    (or the HTTP status when AWS gave none)."""

    def __init__(self, operation: str, code: str, message: str) -> None:
        super().__init__(f"{operation}: {code}: {message}")
        self.operation = operation
        self.code = code


class ConditionFailedError(AwsPermanentError):
    """A DynamoDB condition did not hold. `item` is the item as it was (ALL_OLD), if asked."""

    def __init__(self, operation: str, message: str, item: dict[str, Any] | None) -> None:
        super().__init__(operation, "ConditionalCheckFailedException", message)
        self.item = item


def error_code(exc: botocore.exceptions.ClientError) -> str:
    """The AWS error code of a ClientError (`NoSuchKey`, `ThrottlingException`...); "" if none."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def map_error(operation: str, exc: BaseException) -> Exception:
    """A foreign exception → a mailflow one. Called at the boundary and nowhere else."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(exc.response.get("Error", {}).get("Message", ""))
        if code == "ConditionalCheckFailedException":
            item = exc.response.get("Item")  # ALL_OLD, when the call asked for it
            return ConditionFailedError(
                operation, message, item if isinstance(item, dict) else None
            )
        if code in THROTTLING_CODES or code in SERVER_CODES or status >= 500 or status == 429:
            return RetryableAwsError(f"{operation}: {code or status}: {message}")
        return AwsPermanentError(operation, code or str(status), message)
    if isinstance(exc, CONNECTION_ERRORS):
        return RetryableAwsError(f"{operation}: {type(exc).__name__}: {exc}")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return AwsPermanentError(operation, type(exc).__name__, str(exc))
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


#: The longest jittered wait after the first try; after try n it is FIRST_WAIT_S * 2**(n-1).
FIRST_WAIT_S = 0.05


def _log_retry(operation: str, attempt: int, error: BaseException | None) -> None:
    log.warning("aws_retry", operation=operation, attempt=attempt, error=str(error or ""))


async def _try(
    operation: str,
    counted: str,
    fn: Callable[..., Awaitable[T]],
    kwargs: dict[str, Any],
) -> T:
    _requests[counted] += 1
    try:
        return await fn(**kwargs)
    except Exception as exc:  # mapped right here, the boundary
        raise map_error(operation, exc) from exc


async def call(
    operation: str,
    fn: Callable[..., Awaitable[T]],
    /,
    *,
    deadline_s: float | None = None,
    **kwargs: Any,
) -> T:
    """Run one AWS call with bounded, jittered retries; raise only mailflow errors.

    Retried calls must be safe to repeat. Conditional writes are: a retry after a lost
    response fails its condition, and the callers recognise their own earlier write by its
    lease token (see ledger.py).

    `deadline_s` bounds the whole call, tries, backoff and a hanging request included (a
    `TransientError` when it passes): for callers that must be done before their next round,
    such as the heartbeat. Without it, retries stop after CALL_DEADLINE_S.
    """
    if deadline_s is None:
        return await _call(operation, fn, CALL_DEADLINE_S, kwargs)
    try:
        async with asyncio.timeout(deadline_s):
            return await _call(operation, fn, deadline_s, kwargs)
    except TimeoutError:
        raise TransientError(f"{operation}: no answer within {deadline_s:.1f}s") from None


async def _call(
    operation: str,
    fn: Callable[..., Awaitable[T]],
    retry_deadline_s: float,
    kwargs: dict[str, Any],
) -> T:
    counted = f"{operation.partition('.')[0]}.{getattr(fn, '__name__', '?')}"
    started = time.monotonic()
    # The first try runs outside tenacity: almost every call succeeds at once, and building
    # and driving a retry loop per call cost ~4 % of the worker's CPU.
    try:
        return await _try(operation, counted, fn, kwargs)
    except RetryableAwsError as exc:
        first = exc
    _log_retry(operation, 1, first)
    await asyncio.sleep(random.uniform(0, FIRST_WAIT_S))  # noqa: S311 - jitter, not crypto
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(RetryableAwsError),
        stop=stop_after_attempt(CALL_ATTEMPTS - 1)
        | stop_after_delay(max(0.0, retry_deadline_s - (time.monotonic() - started))),
        # This loop's try k is the call's try k+1: it waits up to FIRST_WAIT_S * 2**k.
        wait=wait_random_exponential(multiplier=2 * FIRST_WAIT_S, max=5.0),
        reraise=True,
        before_sleep=lambda rs: _log_retry(
            operation,
            rs.attempt_number + 1,
            rs.outcome.exception() if rs.outcome else None,
        ),
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await _try(operation, counted, fn, kwargs)
    except RetryableAwsError as exc:
        raise TransientError(str(exc)) from exc
    raise AssertionError("unreachable: tenacity re-raises")  # pragma: no cover


def _user_agent() -> str:
    # The packages' own __version__, not importlib.metadata (a scan of sys.path per name).
    versions = (
        f"mailflow/{mailflow.__version__} aiobotocore/{aiobotocore.__version__}"
        f" botocore/{botocore.__version__}"
    )
    return f"{versions} Python/{platform.python_version()}"


USER_AGENT = _user_agent()


@dataclass(slots=True)
class AwsClients:
    """One client per service. S3, SNS and KMS talk to the mail's region (where SES receives:
    bucket, topic, key), SQS and DynamoDB to the process's own region."""

    s3: Any
    sqs: Any
    sns: Any
    dynamodb: Any
    kms: Any = None
    _stack: contextlib.AsyncExitStack | None = None
    _session: Any = None
    _config: AioConfig | None = None
    _kms_by_region: dict[str, Any] = field(default_factory=dict)

    async def kms_in(self, region: str | None) -> Any:
        """The KMS client for a key's region (the mail region's client when None or equal)."""
        if region is None or self.kms is None or region == self.kms.meta.region_name:
            return self.kms
        if region not in self._kms_by_region:
            if self._stack is None or self._session is None:
                raise RuntimeError("kms_in: clients were not opened by open_clients")
            self._kms_by_region[region] = await self._stack.enter_async_context(
                self._session.client("kms", region_name=region, config=self._config),
            )
        return self._kms_by_region[region]


CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0  # > the 20 s SQS long poll


@functools.cache
def tls_context(ca_bundle: str) -> ssl.SSLContext:
    """The process's one TLS context for `ca_bundle`: chain *and* host name checked.

    Loading a CA bundle costs ~37 ms of CPU, and aiobotocore loads it into a new context for
    every client (five per `open_clients`, so ~0.19 s of every CLI command). Its context also
    leaves `check_hostname` off (urllib3's default, where urllib3 matches host names itself;
    aiohttp does not), so a certificate for any name would be accepted. One context per bundle
    fixes both; `ssl.SSLContext` is meant to be shared between connections."""
    context = ssl.create_default_context(cafile=ca_bundle)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class SharedTLSSession(AIOHTTPSession):
    """aiobotocore's HTTP session on `tls_context`: same pool, timeouts and proxies. A client
    certificate or a proxy keeps aiobotocore's own per-client context."""

    # Set by aiobotocore's __init__ (its type stubs leave private attributes out).
    _verify: bool | str
    _cert_file: str | None
    _max_pool_connections: int
    _connector_args: dict[str, Any]

    def _create_connector(self, proxy_url: str | None) -> aiohttp.TCPConnector:
        if proxy_url or self._cert_file or not self._verify:
            connector: aiohttp.TCPConnector = super()._create_connector(proxy_url)  # type: ignore[misc]
            return connector
        # verify is True (botocore's default bundle) or a bundle's path (AWS_CA_BUNDLE).
        verify = self._verify
        ca_bundle = verify if isinstance(verify, str) else botocore.httpsession.get_cert_path(True)  # noqa: FBT003
        return aiohttp.TCPConnector(
            limit=self._max_pool_connections,
            ssl=tls_context(ca_bundle),
            **self._connector_args,
        )


def client_config(max_pool_connections: int = 32) -> AioConfig:
    """The botocore configuration for every client: botocore's own retries off (the boundary's
    `call` is the one retry layer), timeouts above the SQS long poll, and at most
    `max_pool_connections` HTTP connections per client."""
    return AioConfig(
        # tenacity is the one retry layer. `total_max_attempts`, not `max_attempts`: botocore
        # reads max_attempts as *retries* (max_attempts=1 → two tries under each of ours).
        retries={"total_max_attempts": 1, "mode": "standard"},
        # Request shapes are built by this code, not by users, and the tests exercise every
        # one against a real endpoint; client-side validation costs ~11% of worker CPU.
        parameter_validation=False,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=max_pool_connections,
        tcp_keepalive=True,
        # A fixed User-Agent: botocore otherwise rebuilds and sanitises its structured one
        # (platform, features, config) twice per request, ~5 % of the worker's CPU.
        user_agent=USER_AGENT,
        # No CRC32 over every GetObject body and PutObject: the store hashes each mail itself
        # (SHA-256), and TLS protects it in transit. Checksums still apply where S3 requires.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        http_session_cls=SharedTLSSession,
    )


def _timestamp(value: str) -> dt.datetime:
    """Response timestamps: the two formats AWS sends, parsed without dateutil (which cost
    ~3 % of the worker's CPU on GetObject's Last-Modified alone); anything else goes to
    botocore's own parser."""
    try:
        if value[:4].isdigit():  # ISO 8601: 2026-12-02T04:50:22.000Z
            parsed = dt.datetime.fromisoformat(value)
        else:  # RFC 7231 HTTP date: Wed, 02 Dec 2026 04:50:22 GMT
            parsed = email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError, IndexError):
        return botocore.utils.parse_timestamp(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


#: One loader per data path for every session of the process: botocore parses a service's
#: model (S3's alone is ~1 MB of JSON) once per loader, so sharing it makes a second
#: `open_clients` ~6x cheaper in CPU (0.15-0.35 s down to ~0.03 s for the five clients).
#: Processes that open clients more than once (the tests, the bench, `mailflow dev`) pay it
#: once. The loader only reads packaged model files and caches what it parsed.
_LOADERS: dict[str | None, botocore.loaders.Loader] = {}


def _botocore_session() -> AioSession:
    session = AioSession()
    data_path = session.get_config_variable("data_path")  # AWS_DATA_PATH, as botocore reads it
    loader = _LOADERS.get(data_path)
    if loader is None:
        loader = _LOADERS[data_path] = botocore.loaders.create_loader(data_path)
    session.register_component("data_loader", loader)
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=_timestamp
    )
    return session


#: `open_clients(client=...)`: which client sends a delivery's hot calls (see aws.lean).
CLIENT_KINDS = ("botocore", "lean")


@contextlib.asynccontextmanager
async def open_clients(
    max_pool_connections: int = 32,
    *,
    mail_region: str | None = None,
    client: str = "botocore",
) -> AsyncIterator[AwsClients]:
    """One client per service for the life of the process; endpoints come from AWS_* vars.

    `mail_region` (MAILFLOW_MAIL_REGION) is where the mail is received: S3, SNS and KMS
    clients are made for it, so reads go there directly instead of through a redirect. None:
    the process's own region (AWS_DEFAULT_REGION), for everything.

    `client` (MAILFLOW_AWS_CLIENT): "botocore", or "lean" to send the hot operations of S3,
    SQS and DynamoDB on `aws.lean`'s path (same answers and errors, a fraction of the CPU).
    """
    if client not in CLIENT_KINDS:
        raise ValueError(f"client must be one of {', '.join(CLIENT_KINDS)}, not {client!r}")
    botocore_session = _botocore_session()
    session = aioboto3.Session(botocore_session=botocore_session)
    config = client_config(max_pool_connections)
    async with contextlib.AsyncExitStack() as stack:

        async def enter(opened: Any) -> Any:
            return await stack.enter_async_context(opened)

        s3 = await enter(session.client("s3", region_name=mail_region, config=config))
        sqs = await enter(session.client("sqs", config=config))
        dynamodb = await enter(session.client("dynamodb", config=config))
        credentials = None
        if client == "lean":
            from mailflow.aws import lean  # noqa: PLC0415 - only the worker's choice loads it

            refused = lean.unsupported_environment()
            if refused is None:
                credentials = await botocore_session.get_credentials()
            else:
                log.warning("lean_client_not_used", reason=refused)
        if credentials is not None:  # no credentials: botocore says so on the first call
            http = await enter(
                lean.http_session(max_pool_connections, CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
            )
            source = lean.CredentialSource(credentials)
            s3, sqs, dynamodb = (
                lean.LeanClient(inner, http, source, USER_AGENT) for inner in (s3, sqs, dynamodb)
            )
        yield AwsClients(
            s3=s3,
            sqs=sqs,
            sns=await enter(session.client("sns", region_name=mail_region, config=config)),
            dynamodb=dynamodb,
            kms=await enter(session.client("kms", region_name=mail_region, config=config)),
            _stack=stack,
            _session=session,
            _config=config,
        )
