"""FastCGI 1.0 record codec, sans I/O: bytes in, records and events out. Pure.

Only what a *client* (the worker talking to php-fpm) needs, plus enough of the other side to
test it: encoders for BEGIN_REQUEST, ABORT_REQUEST, PARAMS, STDIN and GET_VALUES, a generic
incremental `RecordReader`, and a `ResponseParser` that turns an application's records into
`Stdout`, `Stderr`, `EndRequest`, `GetValuesResult` and `UnknownType` events.

Both parsers take bytes in chunks of any size (a record may straddle any number of `feed`
calls) and hold at most one incomplete record (8 + 65535 + 255 bytes): memory does not grow
with the size of a response. Malformed input raises `FastCGIProtocolError`, a
`TransientError`: a broken peer is worth retrying.

Spec: https://fastcgi-archives.github.io/FastCGI_Specification.html
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from mailflow.errors import TransientError

VERSION_1 = 1
HEADER_LEN = 8
#: contentLength is 16 bits: a record carries at most this much.
MAX_CONTENT_LEN = 0xFFFF
#: Records are padded so the next header starts on this boundary (the spec's recommendation).
ALIGNMENT = 8
#: Name-value lengths below this take one byte, the rest four (with the top bit set).
SHORT_LENGTH_LIMIT = 0x80
MAX_NAME_VALUE_LENGTH = 0x7FFFFFFF
#: Management records (GET_VALUES, UNKNOWN_TYPE) use request id 0.
NULL_REQUEST_ID = 0
#: BEGIN_REQUEST flags: keep the connection open after END_REQUEST.
FLAG_KEEP_CONN = 1

_HEADER = struct.Struct("!BBHHBx")
_BEGIN_REQUEST_BODY = struct.Struct("!HB5x")
_END_REQUEST_BODY = struct.Struct("!IB3x")
_UNKNOWN_TYPE_BODY = struct.Struct("!B7x")
_LONG_LENGTH = struct.Struct("!I")


class FastCGIProtocolError(TransientError):
    """The peer sent something that is not FastCGI, or not what this point of a request allows."""


class RecordType(enum.IntEnum):
    """FastCGI record types (the spec's FCGI_* type numbers)."""

    BEGIN_REQUEST = 1
    ABORT_REQUEST = 2
    END_REQUEST = 3
    PARAMS = 4
    STDIN = 5
    STDOUT = 6
    STDERR = 7
    DATA = 8
    GET_VALUES = 9
    GET_VALUES_RESULT = 10
    UNKNOWN_TYPE = 11


class Role(enum.IntEnum):
    """The role a BEGIN_REQUEST asks the application to play; mailflow always sends RESPONDER."""

    RESPONDER = 1
    AUTHORIZER = 2
    FILTER = 3


class ProtocolStatus(enum.IntEnum):
    """END_REQUEST's protocolStatus: anything but REQUEST_COMPLETE means the application
    refused the request (busy, no multiplexing, role unknown) and never ran it."""

    REQUEST_COMPLETE = 0
    CANT_MPX_CONN = 1
    OVERLOADED = 2
    UNKNOWN_ROLE = 3


#: Variable names a client may ask for with GET_VALUES.
MAX_CONNS = "FCGI_MAX_CONNS"
MAX_REQS = "FCGI_MAX_REQS"
MPXS_CONNS = "FCGI_MPXS_CONNS"


@dataclass(frozen=True, slots=True)
class Header:
    """A record's 8-byte header, decoded; lengths are in bytes."""

    version: int
    type: int
    request_id: int
    content_length: int
    padding_length: int


@dataclass(frozen=True, slots=True)
class Record:
    """One complete record: its type, its request (0: management) and its content, unpadded."""

    type: int
    request_id: int
    content: bytes


# --- encoding -----------------------------------------------------------------------------------


def pack_header(
    record_type: int,
    request_id: int,
    content_length: int,
    padding_length: int = 0,
) -> bytes:
    """The 8-byte header of a version-1 record.

    Raises ValueError when a field does not fit its width (type and padding 8 bits, request id
    and content length 16 bits)."""
    if not 0 <= record_type <= 0xFF:
        raise ValueError(f"record type {record_type} out of range")
    if not 0 <= request_id <= 0xFFFF:
        raise ValueError(f"request id {request_id} out of range")
    if not 0 <= content_length <= MAX_CONTENT_LEN:
        raise ValueError(f"content length {content_length} out of range")
    if not 0 <= padding_length <= 0xFF:
        raise ValueError(f"padding length {padding_length} out of range")
    return _HEADER.pack(VERSION_1, record_type, request_id, content_length, padding_length)


def unpack_header(data: bytes | bytearray | memoryview) -> Header:
    """Decode the header at the start of `data` (the version is not checked here).

    Raises `FastCGIProtocolError` when fewer than 8 bytes are given."""
    if len(data) < HEADER_LEN:
        raise FastCGIProtocolError(f"short record header: {len(data)} bytes")
    version, record_type, request_id, content_length, padding_length = _HEADER.unpack_from(data)
    return Header(version, record_type, request_id, content_length, padding_length)


def padding_for(content_length: int) -> int:
    """Padding bytes after `content_length` bytes of content: the next header is 8-aligned."""
    return -content_length % ALIGNMENT


def encode_record(record_type: int, request_id: int, content: bytes = b"") -> bytes:
    """One record, padded to 8 bytes. `content` must fit (at most 65535 bytes)."""
    padding = padding_for(len(content))
    header = pack_header(record_type, request_id, len(content), padding)
    return b"".join((header, content, b"\0" * padding))


def iter_stream_records(
    record_type: int,
    request_id: int,
    data: bytes | bytearray | memoryview,
) -> Iterator[bytes]:
    """`data` as records of at most 65535 content bytes. Empty data yields nothing: the empty
    record that *ends* a stream is `end_of_stream`, so a stream can be sent in many pieces."""
    view = memoryview(data)
    for start in range(0, len(view), MAX_CONTENT_LEN):
        yield encode_record(record_type, request_id, bytes(view[start : start + MAX_CONTENT_LEN]))


def encode_stream(
    record_type: int,
    request_id: int,
    data: bytes | bytearray | memoryview,
    *,
    end: bool = False,
) -> bytes:
    """`data` as records, followed by the end-of-stream record when `end`."""
    parts = list(iter_stream_records(record_type, request_id, data))
    if end:
        parts.append(end_of_stream(record_type, request_id))
    return b"".join(parts)


def end_of_stream(record_type: int, request_id: int) -> bytes:
    """The empty record that closes a request's `record_type` stream (PARAMS, STDIN...)."""
    return encode_record(record_type, request_id, b"")


def encode_begin_request(
    request_id: int,
    role: Role = Role.RESPONDER,
    *,
    keep_conn: bool = False,
) -> bytes:
    """The BEGIN_REQUEST record that opens request `request_id`.

    With `keep_conn` the application keeps the connection open after END_REQUEST; without it,
    it closes the connection when the request ends."""
    flags = FLAG_KEEP_CONN if keep_conn else 0
    return encode_record(
        RecordType.BEGIN_REQUEST,
        request_id,
        _BEGIN_REQUEST_BODY.pack(role, flags),
    )


def encode_abort_request(request_id: int) -> bytes:
    """The ABORT_REQUEST record for `request_id`: asks the application to stop the request;
    the spec has it answer with END_REQUEST all the same."""
    return encode_record(RecordType.ABORT_REQUEST, request_id, b"")


def encode_end_request(
    request_id: int,
    app_status: int,
    protocol_status: ProtocolStatus = ProtocolStatus.REQUEST_COMPLETE,
) -> bytes:
    """The application's side; used by tests and fakes."""
    return encode_record(
        RecordType.END_REQUEST,
        request_id,
        _END_REQUEST_BODY.pack(app_status & 0xFFFFFFFF, protocol_status),
    )


def _encode_length(length: int) -> bytes:
    if length < SHORT_LENGTH_LIMIT:
        return bytes((length,))
    if length > MAX_NAME_VALUE_LENGTH:
        raise ValueError(f"name-value length {length} exceeds 2**31 - 1")
    return _LONG_LENGTH.pack(length | 0x80000000)


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def encode_name_value_pair(name: str | bytes, value: str | bytes) -> bytes:
    """One name-value pair in FastCGI's length-prefixed form; `str` is sent as UTF-8.

    Raises ValueError for a name or value longer than 2**31 - 1 bytes."""
    raw_name, raw_value = _as_bytes(name), _as_bytes(value)
    return b"".join(
        (_encode_length(len(raw_name)), _encode_length(len(raw_value)), raw_name, raw_value),
    )


def _pairs(
    params: Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[str | bytes, str | bytes]],
) -> Iterator[tuple[str | bytes, str | bytes]]:
    if isinstance(params, Mapping):
        yield from params.items()
    else:
        yield from params


def encode_name_value_pairs(
    params: Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[str | bytes, str | bytes]],
) -> bytes:
    """Pairs from a mapping or an iterable of (name, value), in order, as one byte string
    (not yet split into records: see `encode_params`)."""
    return b"".join(encode_name_value_pair(name, value) for name, value in _pairs(params))


def decode_name_value_pairs(data: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
    """The body of a PARAMS stream or a GET_VALUES(_RESULT) record, in order."""
    view = memoryview(data)
    pairs: list[tuple[bytes, bytes]] = []
    pos = 0

    def length() -> int:
        nonlocal pos
        if pos >= len(view):
            raise FastCGIProtocolError("name-value pair truncated in a length")
        if view[pos] < SHORT_LENGTH_LIMIT:
            pos += 1
            return int(view[pos - 1])
        if pos + 4 > len(view):
            raise FastCGIProtocolError("name-value pair truncated in a 4-byte length")
        (value,) = _LONG_LENGTH.unpack_from(view, pos)
        pos += 4
        return int(value) & MAX_NAME_VALUE_LENGTH

    while pos < len(view):
        name_len = length()
        value_len = length()
        end = pos + name_len + value_len
        if end > len(view):
            raise FastCGIProtocolError("name-value pair truncated in its data")
        pairs.append((bytes(view[pos : pos + name_len]), bytes(view[pos + name_len : end])))
        pos = end
    return pairs


def encode_params(
    request_id: int,
    params: Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[str | bytes, str | bytes]],
) -> bytes:
    """The whole PARAMS stream, end record included.

    Pairs are packed whole into records: the spec lets a pair straddle records, but php-fpm
    decodes each PARAMS record on its own and would lose such a pair. A single pair larger
    than one record therefore cannot be sent to php-fpm: ValueError.
    """
    records: list[bytes] = []
    current = bytearray()
    for name, value in _pairs(params):
        pair = encode_name_value_pair(name, value)
        if len(pair) > MAX_CONTENT_LEN:
            shown = _as_bytes(name)[:40].decode("utf-8", "replace")
            raise ValueError(
                f"FastCGI param {shown!r} is {len(pair)} bytes encoded;"
                f" at most {MAX_CONTENT_LEN} fit one record",
            )
        if len(current) + len(pair) > MAX_CONTENT_LEN:
            records.append(encode_record(RecordType.PARAMS, request_id, bytes(current)))
            current.clear()
        current += pair
    if current:
        records.append(encode_record(RecordType.PARAMS, request_id, bytes(current)))
    records.append(end_of_stream(RecordType.PARAMS, request_id))
    return b"".join(records)


def encode_get_values(names: Iterable[str]) -> bytes:
    """A GET_VALUES management record asking the application for the named variables
    (`MAX_CONNS`, `MAX_REQS`, `MPXS_CONNS`); the answer is a `GetValuesResult` event."""
    return encode_record(
        RecordType.GET_VALUES,
        NULL_REQUEST_ID,
        encode_name_value_pairs((name, b"") for name in names),
    )


# --- decoding -----------------------------------------------------------------------------------


class RecordReader:
    """Bytes in any chunking → complete records, in order. Checks framing, not meaning."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        """Add bytes; return the records they complete, in order (possibly none).

        Raises `FastCGIProtocolError` on a record whose version is not 1. At most one incomplete
        record stays buffered."""
        self._buffer += data
        records: list[Record] = []
        pos = 0
        buffer = self._buffer
        while len(buffer) - pos >= HEADER_LEN:
            header = unpack_header(memoryview(buffer)[pos : pos + HEADER_LEN])
            if header.version != VERSION_1:
                raise FastCGIProtocolError(
                    f"unsupported FastCGI version {header.version} (not a FastCGI peer?)",
                )
            total = HEADER_LEN + header.content_length + header.padding_length
            if len(buffer) - pos < total:
                break
            start = pos + HEADER_LEN
            content = bytes(buffer[start : start + header.content_length])
            records.append(Record(header.type, header.request_id, content))
            pos += total
        del buffer[:pos]
        return records

    @property
    def buffered_bytes(self) -> int:
        """Bytes held back as the start of an incomplete record."""
        return len(self._buffer)

    def close(self) -> None:
        """The peer closed the stream: a partial record left over is an error."""
        if self._buffer:
            raise FastCGIProtocolError(
                f"connection closed inside a record ({len(self._buffer)} bytes left over)",
            )


@dataclass(frozen=True, slots=True)
class Stdout:
    """A piece of the application's STDOUT (never empty: an empty record ends the stream)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Stderr:
    """A piece of the application's STDERR (never empty: an empty record ends the stream)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndRequest:
    """The application finished the request: `app_status` is the script's exit status,
    `protocol_status` a `ProtocolStatus` value."""

    app_status: int
    protocol_status: int


@dataclass(frozen=True, slots=True)
class GetValuesResult:
    """The application's answer to GET_VALUES: (name, value) pairs as bytes, in its order."""

    values: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class UnknownType:
    """The application did not understand a management record we sent."""

    type: int


Event = Stdout | Stderr | EndRequest | GetValuesResult | UnknownType


class ResponseParser:
    """An application's records for one request → events.

    Empty STDOUT/STDERR records end their stream and produce no event (see `stdout_closed`).
    Anything after END_REQUEST for this request, a record for another request, or a record
    type an application never sends is a protocol error.
    """

    def __init__(self, request_id: int) -> None:
        if not 1 <= request_id <= 0xFFFF:
            raise ValueError("request id must be 1..65535")
        self.request_id = request_id
        self._reader = RecordReader()
        self.end: EndRequest | None = None
        self.stdout_closed = False
        self.stderr_closed = False

    @property
    def finished(self) -> bool:
        """True once END_REQUEST arrived for this request; nothing may follow it."""
        return self.end is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Add bytes from the connection; return the events they complete, in order.

        Raises `FastCGIProtocolError` on anything the class docstring calls a protocol error."""
        events: list[Event] = []
        for record in self._reader.feed(data):
            event = self._event(record)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> None:
        """The connection ended: raises `FastCGIProtocolError` if it ended inside a record.
        Does not check that END_REQUEST arrived: see `finished`."""
        self._reader.close()

    def _event(self, record: Record) -> Event | None:
        if record.request_id == NULL_REQUEST_ID:
            return self._management(record)
        if record.request_id != self.request_id:
            raise FastCGIProtocolError(
                f"record for request {record.request_id}, expected {self.request_id}",
            )
        if self.end is not None:
            raise FastCGIProtocolError(
                f"record type {record.type} after END_REQUEST",
            )
        if record.type == RecordType.STDOUT:
            return self._stream(record, stderr=False)
        if record.type == RecordType.STDERR:
            return self._stream(record, stderr=True)
        if record.type == RecordType.END_REQUEST:
            if len(record.content) != _END_REQUEST_BODY.size:
                raise FastCGIProtocolError(
                    f"END_REQUEST body is {len(record.content)} bytes, expected 8",
                )
            app_status, protocol_status = _END_REQUEST_BODY.unpack(record.content)
            self.end = EndRequest(app_status, protocol_status)
            return self.end
        raise FastCGIProtocolError(f"unexpected record type {record.type} from the application")

    def _stream(self, record: Record, *, stderr: bool) -> Event | None:
        name = "STDERR" if stderr else "STDOUT"
        closed = self.stderr_closed if stderr else self.stdout_closed
        if closed and record.content:
            raise FastCGIProtocolError(f"{name} data after the end of {name}")
        if not record.content:
            if stderr:
                self.stderr_closed = True
            else:
                self.stdout_closed = True
            return None
        return Stderr(record.content) if stderr else Stdout(record.content)

    @staticmethod
    def _management(record: Record) -> Event:
        if record.type == RecordType.GET_VALUES_RESULT:
            return GetValuesResult(tuple(decode_name_value_pairs(record.content)))
        if record.type == RecordType.UNKNOWN_TYPE:
            if len(record.content) != _UNKNOWN_TYPE_BODY.size:
                raise FastCGIProtocolError("UNKNOWN_TYPE body is not 8 bytes")
            (unknown,) = _UNKNOWN_TYPE_BODY.unpack(record.content)
            return UnknownType(int(unknown))
        raise FastCGIProtocolError(f"unexpected management record type {record.type}")


# --- CGI response -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CGIResponse:
    """A responder's STDOUT read as CGI: the status (200 when no `Status` header), its reason
    text, the header lines in order (names and values latin-1, stripped) and the body bytes."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of the first header named `name` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


def parse_cgi_response(stdout: bytes) -> CGIResponse:
    """A responder's STDOUT: CGI header lines, a blank line, the body (RFC 3875 §6).

    `Status: 404 Not Found` sets the status; without one it is 200.
    """
    crlf = stdout.find(b"\r\n\r\n")
    lf = stdout.find(b"\n\n")
    candidates = [(i, 4) for i in (crlf,) if i >= 0] + [(i, 2) for i in (lf,) if i >= 0]
    if not candidates:
        raise FastCGIProtocolError("response has no end of CGI headers")
    end, sep_len = min(candidates)
    head, body = stdout[:end], stdout[end + sep_len :]
    headers: list[tuple[str, str]] = []
    for raw_line in head.split(b"\n"):
        line = raw_line.rstrip(b"\r")
        if not line:
            continue
        raw_name, colon, raw_value = line.partition(b":")
        if not colon or not raw_name.strip():
            raise FastCGIProtocolError(f"malformed CGI header line {line[:80]!r}")
        headers.append(
            (raw_name.strip().decode("latin-1"), raw_value.strip().decode("latin-1")),
        )
    status, reason = 200, "OK"
    for name, value in headers:
        if name.lower() == "status":
            code, _, reason = value.partition(" ")
            if not (code.isdigit() and len(code) == 3):
                raise FastCGIProtocolError(f"malformed Status header {value[:80]!r}")
            status = int(code)
    return CGIResponse(status, reason, tuple(headers), body)
