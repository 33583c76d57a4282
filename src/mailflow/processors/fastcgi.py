"""The `fastcgi` transport: ask the php-fpm sidecar's runner.php to run the processor.

One FastCGI connection per request (php-fpm handles one request per child at a time anyway;
connection pooling would save one loopback connect per mail and is left for later). The wire
format, params and answer are described in docs/fastcgi.md; in short:

- PARAMS: the CGI basics (SCRIPT_FILENAME = the runner, REQUEST_METHOD = POST, CONTENT_LENGTH,
  CONTENT_TYPE) plus MAILFLOW_ARGV (JSON list), MAILFLOW_ENV (JSON object), MAILFLOW_TIMEOUT_S,
  MAILFLOW_KILL_GRACE_S, MAILFLOW_TAIL_BYTES and, when set, MAILFLOW_CWD.
- STDIN: the spool file, streamed in record-sized chunks with back-pressure.
- STDOUT: CGI headers, then the runner's JSON (after optional keep-alive newlines).

Everything that goes wrong on the way (connect, reset, timeout, garbage, php-fpm errors) is a
`ProcessResult(transport_error=...)`: retryable. A refusal by the runner's allow-list is
`ProcessResult(refused=True)`: permanent. Only cancellation raises.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

from mailflow.outcome import ProcessResult
from mailflow.processors.exec import ProcessRequest
from mailflow.processors.fastcgi_codec import (
    ALIGNMENT,
    MAX_CONTENT_LEN,
    EndRequest,
    FastCGIProtocolError,
    ProtocolStatus,
    RecordType,
    ResponseParser,
    Stderr,
    Stdout,
    encode_abort_request,
    encode_begin_request,
    encode_params,
    encode_record,
    end_of_stream,
    parse_cgi_response,
)

#: One connection carries one request; any id from 1 up will do.
REQUEST_ID = 1
#: Spool reads: the largest record content that needs no padding (8 bytes short of 64 KiB).
STDIN_CHUNK_BYTES = MAX_CONTENT_LEN - MAX_CONTENT_LEN % ALIGNMENT
READ_BYTES = 64 * 1024
#: The runner's answer is a small JSON document (tails are bounded); anything larger is junk.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: php-fpm's own stderr for the request (PHP warnings of the runner), kept for error messages.
MAX_FPM_STDERR_BYTES = 4096
#: On top of timeout + kill grace: the runner's pipe drain, upload of the mail, php-fpm.
DEFAULT_RESPONSE_MARGIN_S = 15.0
#: When sending the mail failed, how long an answer already on its way may take to arrive.
SEND_FAILURE_GRACE_S = 1.0
RESULT_VERSION = 1
CLOSE_TIMEOUT_S = 1.0
#: After a cancelled request, until the runner has surely killed the process group: it
#: notices the closed connection at its next keep-alive write (every 0.5 s, runner.php
#: KEEPALIVE_S), SIGTERMs, waits the kill grace, SIGKILLs; plus slack for a loaded php-fpm.
ABORT_NOTICE_S = 2.0


@dataclass(frozen=True, slots=True)
class FastCGIAddress:
    """Where php-fpm listens: `host` and `port` for TCP, or `path` for a unix socket."""

    host: str | None
    port: int | None
    path: str | None

    @classmethod
    def parse(cls, address: str) -> FastCGIAddress:
        """`host:port`, `[v6]:port`, or an absolute unix socket path."""
        if address.startswith("/"):
            return cls(None, None, address)
        host, sep, port = address.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"FastCGI address {address!r} is neither host:port nor an absolute socket path",
            )
        return cls(host, int(port), None)

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


class _TransportError(Exception):
    """Internal: becomes ProcessResult(transport_error=str(exc))."""


class FastCGIProcessor:
    """The `Processor` that runs commands through the php-fpm sidecar's runner.php."""

    def __init__(
        self,
        address: str,
        runner_script: str,
        connect_timeout_s: float = 5.0,
        *,
        response_margin_s: float = DEFAULT_RESPONSE_MARGIN_S,
    ) -> None:
        self.address = FastCGIAddress.parse(address)
        if not runner_script.startswith("/"):
            raise ValueError(f"runner script {runner_script!r} must be an absolute path")
        self.runner_script = runner_script
        self.connect_timeout_s = connect_timeout_s
        self.response_margin_s = response_margin_s

    def __repr__(self) -> str:
        return f"FastCGIProcessor({str(self.address)!r}, {self.runner_script!r})"

    async def close(self) -> None:
        """Nothing to release: every request uses its own connection."""

    def settle_s(self, kill_grace_s: float) -> float:
        """A cancelled request is not waited for (php-fpm cannot tell the runner while the
        connection stays open): the runner may run the processor this much longer."""
        return kill_grace_s + ABORT_NOTICE_S

    def params(self, request: ProcessRequest, content_length: int) -> dict[str, str]:
        """The PARAMS of one request. ASCII-only JSON: nothing is lost between PHP and us."""
        params = {
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_SOFTWARE": "mailflow",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": "POST",
            "SCRIPT_FILENAME": self.runner_script,
            "SCRIPT_NAME": "/" + PurePosixPath(self.runner_script).name,
            "REQUEST_URI": "/" + PurePosixPath(self.runner_script).name,
            "CONTENT_TYPE": "message/rfc822",
            "CONTENT_LENGTH": str(content_length),
            "MAILFLOW_ARGV": json.dumps(list(request.argv)),
            "MAILFLOW_ENV": json.dumps(request.env),
            "MAILFLOW_TIMEOUT_S": repr(float(request.timeout_s)),
            "MAILFLOW_KILL_GRACE_S": repr(float(request.kill_grace_s)),
            "MAILFLOW_TAIL_BYTES": str(int(request.tail_bytes)),
        }
        if request.cwd is not None:
            params["MAILFLOW_CWD"] = str(request.cwd)
        return params

    async def run(self, request: ProcessRequest) -> ProcessResult:
        """Run `request` through the runner: one connection, BEGIN_REQUEST, PARAMS, the spool file
        as STDIN, then the runner's JSON answer.

        Never raises for the peer or the processor: connect failures, resets, protocol errors and
        no answer within timeout + kill grace + `response_margin_s` are `transport_error` results
        (retryable); an allow-list refusal or a request php-fpm cannot be sent is `refused`
        (permanent). Cancellation sends ABORT_REQUEST, closes the connection and re-raises; the
        runner then kills the processor's process group."""
        started = time.monotonic()

        def failed(reason: str) -> ProcessResult:
            return ProcessResult(transport_error=reason, duration_s=time.monotonic() - started)

        try:
            stdin = request.stdin_path.open("rb")
        except OSError as exc:
            return failed(f"spool file {request.stdin_path}: {exc.strerror or exc}")
        with stdin:
            try:
                size = os.fstat(stdin.fileno()).st_size
                head = encode_begin_request(REQUEST_ID) + encode_params(
                    REQUEST_ID,
                    self.params(request, size),
                )
            except OSError as exc:
                return failed(f"spool file {request.stdin_path}: {exc.strerror or exc}")
            except ValueError as exc:
                # Cannot be encoded for php-fpm (a single param over 64 KiB): no retry helps.
                return ProcessResult(
                    refused=True,
                    stderr_tail=f"request not encodable for FastCGI: {exc}".encode(),
                    duration_s=time.monotonic() - started,
                )
            try:
                return await self._run(request, stdin, size, head, started)
            except asyncio.CancelledError:
                raise
            except _TransportError as exc:
                return failed(str(exc))
            except Exception as exc:  # the contract: never raise for the peer or the processor
                return failed(f"{self.address}: unexpected {type(exc).__name__}: {exc}")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.address.path is not None:
                    return await asyncio.open_unix_connection(self.address.path)
                return await asyncio.open_connection(self.address.host, self.address.port)
        except TimeoutError:
            raise _TransportError(
                f"connect to {self.address}: no answer within {self.connect_timeout_s}s",
            ) from None
        except OSError as exc:
            raise _TransportError(f"connect to {self.address}: {_describe(exc)}") from None

    async def _run(
        self,
        request: ProcessRequest,
        stdin: IO[bytes],
        size: int,
        head: bytes,
        started: float,
    ) -> ProcessResult:
        reader, writer = await self._connect()
        budget_s = request.timeout_s + request.kill_grace_s + self.response_margin_s
        try:
            async with asyncio.timeout(budget_s):
                stdout, fpm_stderr, end = await self._exchange(reader, writer, stdin, size, head)
        except asyncio.CancelledError:
            # Lost lease or shutdown. php-fpm reads nothing from the connection once the body
            # is in, so the ABORT_REQUEST is a courtesy; what the runner notices is the closed
            # connection (its next keep-alive write fails) and it then kills the process group.
            # Waiting here would not help: the runner cannot notice while we keep the
            # connection open. The caller keeps a retry back for settle_s() instead.
            with contextlib.suppress(Exception):
                writer.write(encode_abort_request(REQUEST_ID))
            writer.close()
            raise
        except TimeoutError:
            await _close(writer)
            raise _TransportError(
                f"{self.address}: no answer from the runner within {budget_s:.1f}s",
            ) from None
        except FastCGIProtocolError as exc:
            await _close(writer)
            raise _TransportError(f"{self.address}: FastCGI protocol error: {exc}") from None
        except (OSError, EOFError) as exc:
            await _close(writer)
            detail = _describe(exc) if isinstance(exc, OSError) else str(exc)
            raise _TransportError(f"{self.address}: connection broken: {detail}") from None
        except BaseException:
            await _close(writer)
            raise
        await _close(writer)
        return self._result(stdout, fpm_stderr, end, started)

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stdin: IO[bytes],
        size: int,
        head: bytes,
    ) -> tuple[bytes, bytes, EndRequest]:
        writer.write(head)
        sender = asyncio.create_task(self._send_body(writer, stdin, size))
        receiver = asyncio.create_task(self._receive(reader))
        try:
            done, _ = await asyncio.wait(
                {sender, receiver},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if sender in done and sender.exception() is not None and receiver not in done:
                # The answer may already be on its way (php-fpm ended the request early); if
                # not, the send failure is the story.
                done, _ = await asyncio.wait({receiver}, timeout=SEND_FAILURE_GRACE_S)
                if receiver not in done:
                    error = sender.exception()
                    assert error is not None  # noqa: S101 - checked above
                    raise error
            return await receiver
        finally:
            for task in (sender, receiver):
                task.cancel()
            # Collect both, so no exception is left unretrieved; a cancellation of *this*
            # task still propagates from the await above or here.
            await asyncio.gather(sender, receiver, return_exceptions=True)

    @staticmethod
    async def _send_body(writer: asyncio.StreamWriter, stdin: IO[bytes], size: int) -> None:
        # `size` went out as CONTENT_LENGTH: exactly that many bytes follow, then end of stream.
        remaining = size
        while remaining > 0:
            chunk = stdin.read(min(STDIN_CHUNK_BYTES, remaining))
            if not chunk:
                raise _TransportError(
                    f"spool file shrank while sending: {size - remaining} of {size} bytes",
                )
            writer.write(encode_record(RecordType.STDIN, REQUEST_ID, chunk))
            await writer.drain()
            remaining -= len(chunk)
        writer.write(end_of_stream(RecordType.STDIN, REQUEST_ID))
        await writer.drain()

    @staticmethod
    async def _receive(reader: asyncio.StreamReader) -> tuple[bytes, bytes, EndRequest]:
        parser = ResponseParser(REQUEST_ID)
        stdout = bytearray()
        stderr = bytearray()
        while parser.end is None:
            chunk = await reader.read(READ_BYTES)
            if not chunk:
                parser.close()
                raise EOFError("php-fpm closed the connection before END_REQUEST")
            for event in parser.feed(chunk):
                if isinstance(event, Stdout):
                    stdout += event.data
                    if len(stdout) > MAX_RESPONSE_BYTES:
                        raise FastCGIProtocolError(
                            f"response larger than {MAX_RESPONSE_BYTES} bytes",
                        )
                elif isinstance(event, Stderr):
                    stderr += event.data
                    del stderr[: max(0, len(stderr) - MAX_FPM_STDERR_BYTES)]
        return bytes(stdout), bytes(stderr), parser.end

    def _result(
        self,
        stdout: bytes,
        fpm_stderr: bytes,
        end: EndRequest,
        started: float,
    ) -> ProcessResult:
        data = self._answer(stdout, fpm_stderr, end)
        duration_s = time.monotonic() - started
        if data.get("refused") is True:
            reason = data.get("reason")
            return ProcessResult(
                refused=True,
                stderr_tail=str(reason or "refused by runner").encode(),
                duration_s=duration_s,
            )
        if data.get("error") is not None:
            raise _TransportError(f"{self.address}: runner: {data['error']}")
        if data.get("aborted") is True:
            raise _TransportError(f"{self.address}: runner saw the request aborted")
        try:
            return ProcessResult(
                exit_code=_optional_int(data, "exit_code"),
                signal=_optional_int(data, "signal"),
                timed_out=_bool(data, "timed_out"),
                stdout_head=_b64(data, "stdout_head"),
                stdout_tail=_b64(data, "stdout_tail"),
                stderr_head=_b64(data, "stderr_head"),
                stderr_tail=_b64(data, "stderr_tail"),
                duration_s=duration_s,
            )
        except (TypeError, ValueError) as exc:
            raise self._malformed(str(exc), fpm_stderr) from None

    def _malformed(self, why: str, fpm_stderr: bytes) -> _TransportError:
        note = _fpm_note(fpm_stderr)
        return _TransportError(f"{self.address}: malformed runner answer: {why}{note}")

    def _answer(self, stdout: bytes, fpm_stderr: bytes, end: EndRequest) -> dict[str, Any]:
        """The runner's JSON object, or why there is none (php-fpm or HTTP level failures)."""
        if end.protocol_status != ProtocolStatus.REQUEST_COMPLETE:
            try:
                status_name = ProtocolStatus(end.protocol_status).name
            except ValueError:
                status_name = str(end.protocol_status)
            raise _TransportError(f"{self.address}: php-fpm refused the request: {status_name}")
        try:
            response = parse_cgi_response(stdout)
        except FastCGIProtocolError as exc:
            raise self._malformed(str(exc), fpm_stderr) from None
        data = _json_object(response.body)
        if response.status != 200:
            detail = data.get("error") if data else None
            if not isinstance(detail, str):
                detail = response.body[:200].decode("utf-8", "replace").strip()
            raise _TransportError(
                f"{self.address}: runner answered HTTP {response.status} {response.reason}:"
                f" {detail}{_fpm_note(fpm_stderr)}",
            )
        if data is None:
            raise self._malformed("body is not a JSON object", fpm_stderr)
        if data.get("version") != RESULT_VERSION:
            raise self._malformed(f"unknown result version {data.get('version')!r}", fpm_stderr)
        return data


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close and wait briefly; a peer that does not take our last bytes gets a reset."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()


def _describe(exc: OSError) -> str:
    """`Connection refused`, not asyncio's `Connect call failed ('127.0.0.1', 9000)`."""
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


def _fpm_note(fpm_stderr: bytes) -> str:
    text = fpm_stderr.decode("utf-8", "replace").strip()
    return f" (php-fpm stderr: {text[-300:]})" if text else ""


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)  # leading keep-alive newlines are JSON whitespace
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _optional_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} is not an integer")
    return value


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise TypeError(f"{key} is not a boolean")
    return value


def _b64(data: dict[str, Any], key: str) -> bytes:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise TypeError(f"{key} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{key} is not base64: {exc}") from None
