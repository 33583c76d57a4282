"""The lean hot path: a delivery's AWS calls without botocore's per-request pipeline.

Why: botocore costs 1.1-1.4 ms of CPU per call here even with every switch the boundary
already flips (no validation, fixed User-Agent, no checksums), and a delivery needs at least
3.2 calls; that floor alone is above the worker's CPU budget (docs/performance.md). Most of it
is work that does not change between requests: event-hook dispatch, endpoint rules, copying
the request through `AWSRequest`/`email.message`, re-deriving the signing key.

What: `LeanClient` wraps one aiobotocore client. The operations in its `hot` set (the calls a
delivery makes: DynamoDB item writes and queries, SQS receive/delete/visibility, S3 GetObject)
are sent directly: JSON protocol for DynamoDB and SQS (the request body *is* the parameters),
a signed GET for S3. Every other method, and any hot call with a parameter this path does not
handle, goes to the wrapped botocore client unchanged. The answers have botocore's shapes
(same dicts, a `Body` with `read`/`close`) and failures raise botocore's `ClientError` with
the same `Error.Code`, so `aws.call`, `map_error` and every caller are unchanged.

Checked by: the contract suite, run against the same servers with both clients; the signer
against botocore's (tests/unit/test_sigv4.py); `make bench`, which reports both.
Off by default (MAILFLOW_AWS_CLIENT=botocore) until a canary on real AWS has run it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import ssl
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self
from urllib.parse import quote, urlsplit

import aiohttp
import botocore.exceptions
import botocore.httpsession
from yarl import URL

from mailflow.aws import boundary
from mailflow.aws.sigv4 import EMPTY_SHA256, Credentials, Signer

#: The operations sent on the lean path, by service (botocore method names).
HOT_OPERATIONS: Mapping[str, frozenset[str]] = {
    "dynamodb": frozenset({"update_item", "get_item", "put_item", "delete_item", "query"}),
    "sqs": frozenset(
        {
            "receive_message",
            "delete_message",
            "delete_message_batch",
            "change_message_visibility",
            "change_message_visibility_batch",
        },
    ),
    "s3": frozenset({"get_object"}),
}
#: GetObject parameters this path sends; any other (VersionId, SSE-C, ...) goes to botocore.
S3_GET_PARAMS = frozenset({"Bucket", "Key", "Range"})
#: S3's answers for a bucket in another region than the request's: botocore redirects.
S3_WRONG_REGION = frozenset(
    {"PermanentRedirect", "AuthorizationHeaderMalformed", "301", "307", "TemporaryRedirect"},
)
#: A bucket name that is also a DNS label set without dots (virtual-hosted addressing works).
_DNS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_S3_ERROR_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_S3_ERROR_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
_META_PREFIX = "x-amz-meta-"


class CredentialSource:
    """The process's credentials (botocore's provider chain, refreshed as botocore does)."""

    def __init__(self, credentials: Any) -> None:
        self._credentials = credentials

    async def frozen(self) -> Credentials:
        """The current credentials; a refreshable source refreshes here when due."""
        frozen = await self._credentials.get_frozen_credentials()
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token or None)


class LeanClient:
    """One aiobotocore client with its hot operations on the lean path (see the module)."""

    def __init__(
        self,
        inner: Any,
        http: aiohttp.ClientSession,
        credentials: CredentialSource,
        user_agent: str,
    ) -> None:
        meta = inner.meta
        self._inner = inner
        self._http = http
        self._credentials = credentials
        self._user_agent = user_agent
        model = meta.service_model
        self._service = model.service_name
        self._signer = Signer(model.signing_name, meta.region_name)
        self._endpoint = meta.endpoint_url.rstrip("/")
        self._host = urlsplit(self._endpoint).netloc
        self._aws_endpoint = urlsplit(self._endpoint).hostname.endswith(".amazonaws.com")
        self._query_compatible = bool(model.is_query_compatible)
        self._target = model.metadata.get("targetPrefix", "")
        self._content_type = f"application/x-amz-json-{model.metadata.get('jsonVersion', '1.0')}"
        for name in HOT_OPERATIONS.get(self._service, ()):
            setattr(self, name, self._bind(name, meta.method_to_api_mapping[name]))

    def __getattr__(self, name: str) -> Any:
        """Everything not on the hot path is the wrapped client's (meta, other methods); the
        hot operations are instance attributes, found before this is asked."""
        return getattr(self._inner, name)

    def _bind(self, name: str, operation: str) -> Callable[..., Awaitable[dict[str, Any]]]:
        fallback = getattr(self._inner, name)
        if self._service == "s3":

            async def method(**kwargs: Any) -> dict[str, Any]:
                bucket = kwargs.get("Bucket", "")
                if kwargs.keys() - S3_GET_PARAMS or (
                    self._aws_endpoint and not _DNS_BUCKET.fullmatch(bucket)
                ):
                    return dict(await fallback(**kwargs))
                try:
                    return await self._s3_get(operation, bucket, kwargs["Key"], kwargs.get("Range"))
                except botocore.exceptions.ClientError as exc:
                    if error_code(exc) not in S3_WRONG_REGION:
                        raise
                # The bucket is in another region than the client's: botocore follows S3's
                # redirect (and caches the bucket's region); this path does not.
                return dict(await fallback(**kwargs))

        else:

            async def method(**kwargs: Any) -> dict[str, Any]:
                if "MessageAttributeNames" in kwargs:  # binary attribute values: botocore's
                    return dict(await fallback(**kwargs))
                return await self._json_call(operation, kwargs)

        method.__name__ = name  # aws.call counts requests by method name
        method.__qualname__ = f"LeanClient.{name}"
        return method

    # --- JSON protocol (DynamoDB, SQS) ------------------------------------------------------

    async def _json_call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(params, separators=(",", ":"), default=_blob_to_json).encode()
        headers = {
            "host": self._host,
            "content-type": self._content_type,
            "x-amz-target": f"{self._target}.{operation}",
            "user-agent": self._user_agent,
        }
        if self._query_compatible:
            headers["x-amzn-query-mode"] = "true"
        self._signer.sign(
            "POST",
            "/",
            headers,
            hashlib.sha256(body).hexdigest(),
            await self._credentials.frozen(),
            dt.datetime.now(dt.UTC),
        )
        async with self._http.post(
            URL(self._endpoint + "/", encoded=True),
            data=body,
            headers=headers,
            allow_redirects=False,  # a signed request is valid for its own host only
        ) as resp:
            raw = await resp.read()
            status = resp.status
            crc = resp.headers.get("x-amz-crc32")
            query_error = resp.headers.get("x-amzn-query-error")
            request_id = resp.headers.get("x-amzn-requestid", "")
        if crc is not None and crc.isdigit() and zlib.crc32(raw) & 0xFFFFFFFF != int(crc):
            # botocore retries a CRC mismatch; here it is a transient fault the boundary retries
            raise aiohttp.ClientPayloadError(f"{operation}: response CRC32 mismatch")
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:  # not JSON: a proxy's or load balancer's page, a cut body
            if status < 300:
                raise aiohttp.ClientPayloadError(f"{operation}: answer is not JSON") from None
            parsed = {"message": raw[:200].decode("utf-8", "replace")}  # as botocore does
        if not isinstance(parsed, dict):
            raise aiohttp.ClientPayloadError(f"{operation}: answer is not a JSON object")
        if b'"B' in raw:  # binary attribute values come base64-encoded
            parsed = _json_blobs(parsed)
        if status >= 300:
            raise _json_error(operation, status, parsed, query_error, request_id)
        parsed["ResponseMetadata"] = {"HTTPStatusCode": status, "RequestId": request_id}
        return dict(parsed)

    # --- S3 GetObject -----------------------------------------------------------------------

    async def _s3_get(
        self, operation: str, bucket: str, key: str, byte_range: str | None
    ) -> dict[str, Any]:
        quoted = quote(key, safe="/~")
        if self._aws_endpoint:  # virtual-hosted: the bucket in the host name
            scheme = self._endpoint.split("://", 1)[0]
            host, path = f"{bucket}.{self._host}", f"/{quoted}"
            url = f"{scheme}://{host}{path}"
        else:  # a custom endpoint (an emulator, a proxy): path style
            host, path = self._host, f"/{bucket}/{quoted}"
            url = f"{self._endpoint}{path}"
        headers = {
            "host": host,
            "x-amz-content-sha256": EMPTY_SHA256,
            "user-agent": self._user_agent,
        }
        if byte_range is not None:
            headers["range"] = byte_range
        self._signer.sign(
            "GET",
            path,
            headers,
            EMPTY_SHA256,
            await self._credentials.frozen(),
            dt.datetime.now(dt.UTC),
            s3=True,
        )
        resp = await self._http.get(
            URL(url, encoded=True),
            headers=headers,
            allow_redirects=False,  # S3's region redirects go to botocore (S3_WRONG_REGION)
        )
        if resp.status >= 300:
            try:
                raw = await resp.read()
            finally:
                resp.release()
            raise _s3_error(operation, resp.status, raw, resp.headers)
        got = resp.headers
        out: dict[str, Any] = {
            "Body": StreamingBody(resp),
            "ContentLength": int(got.get("content-length", 0)),
            "ETag": got.get("etag", ""),
            "Metadata": {
                name[len(_META_PREFIX) :].lower(): value
                for name, value in got.items()
                if name.lower().startswith(_META_PREFIX)
            },
            "ResponseMetadata": {
                "HTTPStatusCode": resp.status,
                "RequestId": got.get("x-amz-request-id", ""),
            },
        }
        if "content-range" in got:
            out["ContentRange"] = got["content-range"]
        return out


class StreamingBody:
    """A GetObject body as botocore's: `read(amt)`, `close()`, `async with`. A body that ends
    short of its Content-Length raises (a transient fault), never returns a truncated mail."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self._expected = resp.content_length
        self._read = 0
        self._done = False

    async def read(self, amt: int | None = None) -> bytes:
        """Up to `amt` bytes (everything left when None); b"" at the end."""
        if self._done:
            return b""
        chunk = await (self._resp.content.read() if amt is None else self._resp.content.read(amt))
        self._read += len(chunk)
        if not chunk or amt is None:
            self._done = True
            if self._expected is not None and self._read != self._expected:
                msg = f"GetObject body ended at {self._read} of {self._expected} bytes"
                raise aiohttp.ClientPayloadError(msg)
        return chunk

    def close(self) -> None:
        """Give the connection back (or drop it, when the body was not read to its end)."""
        if self._done:
            self._resp.release()
        else:
            self._resp.close()

    async def __aenter__(self) -> Self:
        """The body itself."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close it."""
        self.close()


def error_code(exc: botocore.exceptions.ClientError) -> str:
    """A ClientError's AWS error code ("" if none)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _blob_to_json(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json_blobs(value: Any) -> Any:
    """DynamoDB attribute values "B" / "BS" decoded from base64, as botocore returns them."""
    if isinstance(value, dict):
        if len(value) == 1:
            ((kind, inner),) = value.items()
            if kind == "B" and isinstance(inner, str):
                return {"B": base64.b64decode(inner)}
            if kind == "BS" and isinstance(inner, list):
                return {"BS": [base64.b64decode(v) for v in inner]}
        return {k: _json_blobs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_blobs(v) for v in value]
    return value


def _json_error(
    operation: str,
    status: int,
    body: dict[str, Any],
    query_error: str | None,
    request_id: str,
) -> botocore.exceptions.ClientError:
    """botocore's reading of a JSON-protocol error: the code after '#', the SQS query code
    from x-amzn-query-error, the message under either spelling, and modeled fields (the
    ALL_OLD `Item` of a failed DynamoDB condition)."""
    code = str(body.get("__type", status)).split(":", 1)[0].rsplit("#", 1)[-1]
    if query_error:
        legacy, _, kind = query_error.partition(";")
        if legacy and kind:
            code = legacy
    error: dict[str, Any] = {
        "Error": {"Code": code, "Message": body.get("message", body.get("Message", ""))},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": request_id},
    }
    if isinstance(body.get("Item"), dict):
        error["Item"] = body["Item"]
    return botocore.exceptions.ClientError(error, operation)  # type: ignore[arg-type]


def _s3_error(
    operation: str, status: int, raw: bytes, headers: Mapping[str, str]
) -> botocore.exceptions.ClientError:
    """botocore's reading of an S3 error: the XML body's Code and Message; a HEAD-like empty
    body gives the status (404 → NoSuchKey is not guessed: the body says it)."""
    code_match, message_match = _S3_ERROR_CODE.search(raw), _S3_ERROR_MESSAGE.search(raw)
    code = code_match.group(1).decode() if code_match else str(status)
    error: dict[str, Any] = {
        "Error": {
            "Code": code,
            "Message": message_match.group(1).decode() if message_match else "",
        },
        "ResponseMetadata": {
            "HTTPStatusCode": status,
            "RequestId": headers.get("x-amz-request-id", ""),
        },
    }
    return botocore.exceptions.ClientError(error, operation)  # type: ignore[arg-type]


def unsupported_environment() -> str | None:
    """Why the lean path must not be used in this process (None: it may). An HTTP proxy:
    botocore honours HTTP(S)_PROXY / NO_PROXY and its proxy configuration; this path does not
    implement them, so such a process keeps botocore for every call."""
    proxies = {k: v for k, v in urllib.request.getproxies().items() if k in {"http", "https"}}
    if proxies:
        return f"an HTTP proxy is configured ({', '.join(sorted(proxies))})"
    return None


def tls_context() -> ssl.SSLContext:
    """Server certificates checked against the CA bundle botocore uses: AWS_CA_BUNDLE when
    set, else botocore's default (certifi's), so both paths trust the same authorities; the
    same shared context as the botocore clients' (`boundary.tls_context`)."""
    bundle = os.environ.get("AWS_CA_BUNDLE") or botocore.httpsession.get_cert_path(True)  # noqa: FBT003 - its API
    return boundary.tls_context(bundle)


def http_session(max_connections: int, connect_timeout_s: float, read_timeout_s: float) -> Any:
    """The lean path's HTTP session: keep-alive, the same limits, timeouts and CA bundle as
    botocore's."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=max_connections, keepalive_timeout=30, ssl=tls_context()
        ),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        ),
        auto_decompress=False,  # S3 bodies are the object's bytes, as botocore gives them
        cookie_jar=aiohttp.DummyCookieJar(),  # AWS APIs set none; filtering them costs per call
        skip_auto_headers=("Accept", "Accept-Encoding"),
    )
