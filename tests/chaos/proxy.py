"""A fault-injecting HTTP proxy between the worker and the AWS backend (moto).

Workers get `AWS_ENDPOINT_URL=http://127.0.0.1:<proxy port>`; every AWS call of theirs then
passes through here. On a configurable share of calls the proxy does one of:

- `http500`      answer 500 with the service's own error shape (no forwarding);
- `http503`      answer 503 (S3: `SlowDown`; SQS/DynamoDB: `ServiceUnavailable`);
- `throttle`     the service's throttling error in its wire format:
                 DynamoDB 400 `ProvisionedThroughputExceededException` (JSON 1.0),
                 SQS 400 `ThrottlingException` (JSON 1.0, botocore >= 1.34 speaks JSON to SQS),
                 S3 503 `<Error><Code>SlowDown</Code>` (XML);
- `reset_before` close the connection without answering, before forwarding;
- `reset_after`  forward the request, let the backend apply it, then close the connection
                 without answering: the write happened, the client sees an error;
- `latency`      wait 1-2 s, then forward normally.

The proxy speaks just enough HTTP/1.1 for botocore over aiohttp: keep-alive towards the
client, one fresh `Connection: close` request per call towards the backend, bodies by
Content-Length or chunked. It runs its own event loop in a daemon thread, so synchronous test
code and asyncio code can both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import struct
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

FAULT_KINDS = ("http500", "http503", "throttle", "reset_before", "reset_after", "latency")
_SCOPE = re.compile(rb"Credential=[^/]+/[^/]+/[^/]+/([a-z0-9-]+)/aws4_request")


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    @property
    def service(self) -> str:
        target = self.header(b"x-amz-target") or b""
        if target.startswith(b"DynamoDB"):
            return "dynamodb"
        if target.startswith(b"AmazonSQS"):
            return "sqs"
        found = _SCOPE.search(self.header(b"authorization") or b"")
        return found.group(1).decode() if found else "s3"

    @property
    def operation(self) -> str:
        target = self.header(b"x-amz-target")
        if target:
            return target.decode(errors="replace").rpartition(".")[2]
        return f"{self.method} {self.target.split('?')[0][:40]}"


@dataclass
class FaultPlan:
    """`rate` of calls get a fault, drawn from `kinds` (weights equal). Seeded."""

    rate: float = 0.08
    kinds: tuple[str, ...] = FAULT_KINDS
    latency_s: tuple[float, float] = (1.0, 2.0)
    seed: int = 1
    services: frozenset[str] = frozenset({"s3", "sqs", "dynamodb"})
    #: Operation names (X-Amz-Target suffix) never faulted, e.g. to keep a test's setup clean.
    spare: frozenset[str] = frozenset()


@dataclass
class ProxyStats:
    calls: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    by_op: Counter[str] = field(default_factory=Counter)
    faults_by_service: Counter[str] = field(default_factory=Counter)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    def summary(self) -> str:
        kinds = " ".join(f"{k}={v}" for k, v in sorted(self.faults.items()))
        services = " ".join(f"{k}={v}" for k, v in sorted(self.faults_by_service.items()))
        return f"calls={self.total_calls} faults={self.total_faults} ({kinds}; {services})"


def _error_response(service: str, kind: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of an injected error, in the service's own wire format."""
    if service == "dynamodb":
        code, status = {
            "http500": ("InternalServerError", 500),
            "http503": ("ServiceUnavailable", 503),
            "throttle": ("ProvisionedThroughputExceededException", 400),
        }[kind]
        body = json.dumps(
            {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": f"injected {kind}"},
        ).encode()
        return status, {"Content-Type": "application/x-amz-json-1.0"}, body
    if service == "sqs":
        code, status = {
            "invalid_parameter": ("InvalidParameterValue", 400),
            "http500": ("InternalError", 500),
            "http503": ("ServiceUnavailable", 503),
            "throttle": ("ThrottlingException", 400),
        }[kind]
        body = json.dumps(
            {"__type": f"com.amazonaws.sqs#{code}", "message": f"injected {kind}"},
        ).encode()
        fault = "Sender" if kind == "invalid_parameter" else "Receiver"
        return (
            status,
            {
                "Content-Type": "application/x-amz-json-1.0",
                "x-amzn-query-error": f"{code};{fault}",
            },
            body,
        )
    code, status = {
        "http500": ("InternalError", 500),
        "http503": ("SlowDown", 503),
        "throttle": ("SlowDown", 503),
    }[kind]
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>injected {kind}</Message><RequestId>chaos</RequestId></Error>"
    ).encode()
    return status, {"Content-Type": "application/xml"}, body


def _sqs_allowed(text: str) -> bool:
    return all(
        ord(c) in (0x9, 0xA, 0xD)
        or 0x20 <= ord(c) <= 0xD7FF
        or 0xE000 <= ord(c) <= 0xFFFD
        or 0x10000 <= ord(c) <= 0x10FFFF
        for c in text
    )


def _sqs_refuses(req: Request) -> bool:
    """True for an SQS send whose attribute values real SQS would refuse."""
    if req.service != "sqs" or req.operation not in {"SendMessage", "SendMessageBatch"}:
        return False
    try:
        doc = json.loads(req.body)
    except ValueError:
        return False
    entries = doc.get("Entries", [doc])
    for entry in entries:
        for attr in (entry.get("MessageAttributes") or {}).values():
            value = attr.get("StringValue")
            if isinstance(value, str) and (not value or not _sqs_allowed(value)):
                return True
    return False


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]]) -> bytes:
    names = {k.lower(): v for k, v in headers}
    if b"chunked" in names.get(b"transfer-encoding", b"").lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return bytes(out)
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    length = int(names.get(b"content-length", b"0") or 0)
    return await reader.readexactly(length) if length else b""


def _parse_head(head: bytes) -> tuple[str, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        key, _, value = line.partition(b":")
        headers.append((key.strip(), value.strip()))
    return lines[0].decode("latin-1"), headers


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return bytes(out)
        start = end + 2
        out += data[start : start + size]
        pos = start + size + 2


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST: the client sees 'connection reset', not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(self, backend_url: str, plan: FaultPlan | None = None) -> None:
        parts = urlsplit(backend_url)
        self._backend = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.plan = plan or FaultPlan(rate=0.0)
        self.stats = ProxyStats()
        self._rand = random.Random(self.plan.seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._script: deque[tuple[str | None, str | None]] = deque()
        self.port = 0
        #: While set, every call fails (an outage); see `outage()`.
        self.down = False
        #: Operations (X-Amz-Target suffix) answered 503 while named here: a brownout of one
        #: API, e.g. {"ChangeMessageVisibilityBatch"} while the rest of SQS works.
        self.refused: set[str] = set()
        #: Validate SQS sends as SQS does and moto does not: a message attribute value with a
        #: character outside SQS's set is refused (400 InvalidParameterValue).
        self.strict_sqs = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def listen() -> None:
            self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]

        loop.run_until_complete(listen())
        self._ready.set()
        loop.run_forever()
        loop.close()

    async def _shutdown(self) -> None:
        """In the proxy's loop: stop accepting, cancel every connection, wait for them."""
        if self._server is not None:
            self._server.close()
        handlers = [t for t in self._handlers if not t.done()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError, TimeoutError):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.plan.rate = rate

    # --- one connection -----------------------------------------------------------------------

    def script(self, *kinds: str | None, operation: str | None = None) -> None:
        """Force the next calls' fates in order (None = forward untouched), before any random
        draw; only calls to `operation` (e.g. "UpdateItem") consume the script, if given."""
        with self._lock:
            self._script.extend((operation, kind) for kind in kinds)

    def _choose(self, req: Request) -> str | None:
        with self._lock:
            self.stats.calls[req.service] += 1
            self.stats.by_op[f"{req.service}.{req.operation}"] += 1
            if self._script and self._script[0][0] in {None, req.operation}:
                kind = self._script.popleft()[1]
                if kind is not None:
                    self.stats.faults[kind] += 1
                    self.stats.faults_by_service[req.service] += 1
                return kind
            if req.operation in self.refused:
                self.stats.faults["refused"] += 1
                self.stats.faults_by_service[req.service] += 1
                return "http503"
            if self.down:
                kind = "reset_before" if self._rand.random() < 0.5 else "http503"
                self.stats.faults[f"outage_{kind}"] += 1
                self.stats.faults_by_service[req.service] += 1
                return kind
            if req.service not in self.plan.services or req.operation in self.plan.spare:
                return None
            if self._rand.random() >= self.plan.rate:
                return None
            kind = self._rand.choice(self.plan.kinds)
            self.stats.faults[kind] += 1
            self.stats.faults_by_service[req.service] += 1
            return kind

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, headers = _parse_head(head)
                method, target, version = request_line.split(" ", 2)
                names = {k.lower(): v for k, v in headers}
                if names.get(b"expect", b"").lower() == b"100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await _read_body(reader, headers)
                req = Request(method, target, version, headers, body)
                kind = self._choose(req)
                if kind == "reset_before":
                    _abort(writer)
                    return
                if self.strict_sqs and _sqs_refuses(req):
                    kind = "invalid_parameter"
                    with self._lock:
                        self.stats.faults["sqs_refused_attribute"] += 1
                if kind in {"http500", "http503", "throttle", "invalid_parameter"}:
                    status, extra, payload = _error_response(req.service, kind)
                    self._respond(writer, status, list(extra.items()), payload)
                    await writer.drain()
                    continue
                if kind == "latency":
                    with self._lock:
                        delay = self._rand.uniform(*self.plan.latency_s)
                    await asyncio.sleep(delay)
                try:
                    status_line, resp_headers, resp_body = await self._forward(req)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    _abort(writer)
                    return
                if kind == "reset_after":
                    _abort(writer)
                    return
                self._relay(writer, req, status_line, resp_headers, resp_body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Proxy shutdown. Swallowed on purpose: asyncio's stream callback calls
            # task.exception() on a finished handler task, which raises for a cancelled one.
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _forward(self, req: Request) -> tuple[str, list[tuple[bytes, bytes]], bytes]:
        reader, writer = await asyncio.open_connection(*self._backend)
        try:
            skip = {
                b"connection",
                b"transfer-encoding",
                b"content-length",
                b"expect",
                b"keep-alive",
            }
            lines = [f"{req.method} {req.target} HTTP/1.1".encode()]
            lines += [k + b": " + v for k, v in req.headers if k.lower() not in skip]
            lines += [b"Content-Length: %d" % len(req.body), b"Connection: close"]
            writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + req.body)
            await writer.drain()
            raw = await reader.read()  # until the backend closes
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("backend sent no complete response head")
        status_line, headers = _parse_head(head)
        names = {k.lower(): v for k, v in headers}
        if b"chunked" in names.get(b"transfer-encoding", b"").lower():
            rest = _dechunk(rest)
        elif b"content-length" in names and req.method != "HEAD":
            rest = rest[: int(names[b"content-length"])]
        return status_line, headers, rest

    def _relay(
        self,
        writer: asyncio.StreamWriter,
        req: Request,
        status_line: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        skip = {b"connection", b"transfer-encoding", b"keep-alive"}
        if req.method != "HEAD":
            skip.add(b"content-length")
        kept = [(k, v) for k, v in headers if k.lower() not in skip]
        if req.method != "HEAD":
            kept.append((b"Content-Length", str(len(body)).encode()))
        kept.append((b"Connection", b"keep-alive"))
        head = status_line.encode("latin-1") + b"\r\n"
        head += b"".join(k + b": " + v + b"\r\n" for k, v in kept)
        writer.write(head + b"\r\n" + (b"" if req.method == "HEAD" else body))

    @staticmethod
    def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        reason = {400: "Bad Request", 500: "Internal Server Error", 503: "Service Unavailable"}
        head = f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        head += f"Content-Length: {len(body)}\r\nx-amzn-RequestId: chaos\r\n"
        head += "Connection: keep-alive\r\n\r\n"
        writer.write(head.encode() + body)
