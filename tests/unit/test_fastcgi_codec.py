"""The FastCGI record codec: framing, name-value pairs, the incremental parser."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.errors import TransientError
from mailflow.processors.fastcgi_codec import (
    HEADER_LEN,
    MAX_CONTENT_LEN,
    CGIResponse,
    EndRequest,
    FastCGIProtocolError,
    GetValuesResult,
    Header,
    ProtocolStatus,
    Record,
    RecordReader,
    RecordType,
    ResponseParser,
    Role,
    Stderr,
    Stdout,
    UnknownType,
    decode_name_value_pairs,
    encode_abort_request,
    encode_begin_request,
    encode_end_request,
    encode_get_values,
    encode_name_value_pair,
    encode_name_value_pairs,
    encode_params,
    encode_record,
    encode_stream,
    end_of_stream,
    pack_header,
    parse_cgi_response,
    unpack_header,
)

# --- headers and records ------------------------------------------------------------------------


def test_header_layout_matches_the_spec():
    assert pack_header(RecordType.STDIN, 0x0102, 0x0304, 5) == bytes(
        [1, 5, 0x01, 0x02, 0x03, 0x04, 5, 0],
    )
    assert unpack_header(bytes([1, 6, 0, 1, 0xFF, 0xFF, 1, 0])) == Header(1, 6, 1, 65535, 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"record_type": 256}, "record type"),
        ({"request_id": 65536}, "request id"),
        ({"content_length": 65536}, "content length"),
        ({"padding_length": 256}, "padding length"),
        ({"content_length": -1}, "content length"),
    ],
)
def test_header_fields_out_of_range_are_refused(kwargs, field):
    args = {"record_type": 1, "request_id": 1, "content_length": 0, "padding_length": 0} | kwargs
    with pytest.raises(ValueError, match=field):
        pack_header(**args)


def test_short_header_is_a_protocol_error():
    with pytest.raises(FastCGIProtocolError, match="short"):
        unpack_header(b"\x01\x06")


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 100, 65535])
def test_records_are_padded_to_eight_bytes(length):
    record = encode_record(RecordType.STDOUT, 7, b"x" * length)
    assert len(record) % 8 == 0
    header = unpack_header(record)
    assert header.content_length == length
    assert header.padding_length == len(record) - HEADER_LEN - length
    assert header.padding_length < 8


def test_record_content_over_65535_is_refused():
    with pytest.raises(ValueError, match="content length"):
        encode_record(RecordType.STDIN, 1, b"x" * (MAX_CONTENT_LEN + 1))


def test_begin_request_body():
    record = encode_begin_request(1)
    assert record == bytes([1, 1, 0, 1, 0, 8, 0, 0]) + bytes([0, 1, 0, 0, 0, 0, 0, 0])
    keep = encode_begin_request(2, Role.FILTER, keep_conn=True)
    assert keep[HEADER_LEN:] == bytes([0, 3, 1, 0, 0, 0, 0, 0])


def test_abort_request_is_an_empty_record():
    assert encode_abort_request(3) == bytes([1, 2, 0, 3, 0, 0, 0, 0])


def test_stream_is_split_into_records_of_at_most_65535_bytes():
    data = bytes(range(256)) * 600  # 153600 bytes: 65535 + 65535 + 22530
    encoded = encode_stream(RecordType.STDIN, 1, data, end=True)
    records = RecordReader().feed(encoded)
    assert [len(r.content) for r in records] == [65535, 65535, 22530, 0]
    assert all(r.type == RecordType.STDIN and r.request_id == 1 for r in records)
    assert b"".join(r.content for r in records) == data


def test_empty_stream_without_end_is_nothing():
    assert encode_stream(RecordType.STDIN, 1, b"") == b""
    assert encode_stream(RecordType.STDIN, 1, b"", end=True) == end_of_stream(
        RecordType.STDIN,
        1,
    )


# --- name-value pairs ---------------------------------------------------------------------------


def test_short_and_long_lengths():
    assert encode_name_value_pair(b"A", b"bc") == b"\x01\x02Abc"
    long_value = b"v" * 128
    encoded = encode_name_value_pair(b"N", long_value)
    assert encoded[:5] == b"\x01" + struct.pack("!I", 0x80000080)
    assert encoded[5:] == b"N" + long_value
    assert encode_name_value_pair(b"x" * 127, b"")[:2] == b"\x7f\x00"


def test_str_names_and_values_are_utf8():
    assert decode_name_value_pairs(encode_name_value_pair("名前", "値")) == [
        ("名前".encode(), "値".encode()),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"\x05",  # value length missing
        b"\x80\x00",  # 4-byte length cut short
        b"\x05\x05abc",  # data cut short
        b"\x01\x80\x00\x00\x10N",  # long value length, data missing
    ],
)
def test_truncated_pairs_are_protocol_errors(data):
    with pytest.raises(FastCGIProtocolError, match="truncated"):
        decode_name_value_pairs(data)


def _pattern(length: int) -> bytes:
    """Large payloads cheaply: hypothesis draws a length, not every byte."""
    return (bytes(range(251)) * (length // 251 + 1))[:length]


#: Small random bytes, or large patterned ones (past 64 KiB: more than one record).
payloads = st.one_of(
    st.binary(max_size=600),
    st.integers(min_value=0, max_value=200_000).map(_pattern),
)

names_values = st.lists(st.tuples(st.binary(max_size=300), payloads), max_size=6)


@settings(max_examples=60, deadline=None)
@given(names_values)
def test_name_value_round_trip(pairs):
    assert decode_name_value_pairs(encode_name_value_pairs(pairs)) == pairs


@given(st.integers(min_value=0, max_value=2000))
def test_length_encoding_boundary(length):
    encoded = encode_name_value_pair(b"k", b"v" * length)
    value_len_size = 1 if length < 128 else 4
    assert len(encoded) == 1 + value_len_size + 1 + length
    assert decode_name_value_pairs(encoded) == [(b"k", b"v" * length)]


def test_params_end_with_an_empty_record_and_keep_pairs_whole():
    params = {f"P{i}": "x" * 30000 for i in range(5)}
    records = RecordReader().feed(encode_params(9, params))
    assert records[-1] == Record(RecordType.PARAMS, 9, b"")
    bodies = [r.content for r in records[:-1]]
    assert all(0 < len(b) <= MAX_CONTENT_LEN for b in bodies)
    # php-fpm decodes each record on its own: every record must hold whole pairs.
    decoded = [pair for body in bodies for pair in decode_name_value_pairs(body)]
    assert decoded == [(k.encode(), v.encode()) for k, v in params.items()]


def test_empty_params_are_just_the_end_record():
    assert encode_params(1, {}) == end_of_stream(RecordType.PARAMS, 1)


def test_a_param_larger_than_one_record_is_refused():
    with pytest.raises(ValueError, match="BIG"):
        encode_params(1, {"BIG": "x" * MAX_CONTENT_LEN})


def test_get_values_record():
    records = RecordReader().feed(encode_get_values(["FCGI_MAX_CONNS", "FCGI_MPXS_CONNS"]))
    assert records == [
        Record(
            RecordType.GET_VALUES,
            0,
            encode_name_value_pairs([(b"FCGI_MAX_CONNS", b""), (b"FCGI_MPXS_CONNS", b"")]),
        ),
    ]


# --- record reader ------------------------------------------------------------------------------


def test_reader_waits_for_a_whole_record():
    record = encode_record(RecordType.STDOUT, 1, b"hello")
    reader = RecordReader()
    assert reader.feed(record[:3]) == []
    assert reader.feed(record[3:10]) == []
    assert reader.buffered_bytes == 10
    assert reader.feed(record[10:]) == [Record(RecordType.STDOUT, 1, b"hello")]
    assert reader.buffered_bytes == 0
    reader.close()


def test_reader_refuses_another_version():
    bad = bytearray(encode_record(RecordType.STDOUT, 1, b"x"))
    bad[0] = 2
    with pytest.raises(FastCGIProtocolError, match="version 2"):
        RecordReader().feed(bytes(bad))


def test_http_instead_of_fastcgi_is_a_protocol_error():
    with pytest.raises(FastCGIProtocolError, match="version"):
        RecordReader().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_reader_close_inside_a_record_is_an_error():
    reader = RecordReader()
    reader.feed(encode_record(RecordType.STDOUT, 1, b"abc")[:9])
    with pytest.raises(FastCGIProtocolError, match="inside a record"):
        reader.close()


def test_protocol_error_is_transient():
    assert issubclass(FastCGIProtocolError, TransientError)


# --- response parser ----------------------------------------------------------------------------


def _response_stream(request_id=1, stdout=b"", stderr=b"", app_status=0):
    return b"".join(
        [
            encode_stream(RecordType.STDERR, request_id, stderr, end=bool(stderr)),
            encode_stream(RecordType.STDOUT, request_id, stdout, end=True),
            encode_end_request(request_id, app_status),
        ],
    )


def test_parser_events():
    stream = _response_stream(stdout=b"Status: 200\r\n\r\nbody", stderr=b"warn", app_status=3)
    parser = ResponseParser(1)
    events = parser.feed(stream)
    assert events == [
        Stderr(b"warn"),
        Stdout(b"Status: 200\r\n\r\nbody"),
        EndRequest(3, ProtocolStatus.REQUEST_COMPLETE),
    ]
    assert parser.finished
    assert parser.stdout_closed
    assert parser.stderr_closed
    parser.close()


def test_parser_app_status_is_unsigned_32_bit():
    parser = ResponseParser(1)
    (event,) = parser.feed(encode_end_request(1, -1))
    assert event == EndRequest(0xFFFFFFFF, 0)


def test_parser_management_records():
    parser = ResponseParser(5)
    result = encode_record(
        RecordType.GET_VALUES_RESULT,
        0,
        encode_name_value_pairs({b"FCGI_MPXS_CONNS": b"0"}),
    )
    unknown = encode_record(RecordType.UNKNOWN_TYPE, 0, bytes([42, 0, 0, 0, 0, 0, 0, 0]))
    assert parser.feed(result + unknown) == [
        GetValuesResult(((b"FCGI_MPXS_CONNS", b"0"),)),
        UnknownType(42),
    ]


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (encode_record(RecordType.STDOUT, 2, b"x"), "request 2"),
        (encode_record(RecordType.STDIN, 1, b"x"), "unexpected record type 5"),
        (encode_record(RecordType.BEGIN_REQUEST, 1, b"\0" * 8), "unexpected record type 1"),
        (encode_record(RecordType.END_REQUEST, 1, b"\0" * 4), "END_REQUEST body"),
        (encode_record(RecordType.GET_VALUES, 0, b""), "management record type 9"),
        (encode_record(RecordType.UNKNOWN_TYPE, 0, b"\0"), "UNKNOWN_TYPE"),
        (encode_end_request(1, 0) + encode_record(RecordType.STDOUT, 1, b"x"), "after END"),
        (
            end_of_stream(RecordType.STDOUT, 1) + encode_record(RecordType.STDOUT, 1, b"x"),
            "after the end of STDOUT",
        ),
    ],
)
def test_parser_protocol_errors(stream, message):
    with pytest.raises(FastCGIProtocolError, match=message):
        ResponseParser(1).feed(stream)


def test_parser_request_id_range():
    with pytest.raises(ValueError, match="request id"):
        ResponseParser(0)


def _chunked(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


streams = st.builds(
    _response_stream,
    request_id=st.integers(min_value=1, max_value=65535),
    stdout=payloads,
    stderr=st.binary(max_size=3000),
    app_status=st.integers(min_value=0, max_value=0xFFFFFFFF),
)


@settings(max_examples=80, deadline=None)
@given(streams, st.lists(st.integers(min_value=0), max_size=40))
def test_random_chunking_gives_the_same_events(stream, cuts):
    request_id = unpack_header(stream).request_id
    whole = ResponseParser(request_id).feed(stream)
    parser = ResponseParser(request_id)
    pieces = [event for chunk in _chunked(stream, cuts) for event in parser.feed(chunk)]
    assert pieces == whole
    assert isinstance(whole[-1], EndRequest)
    parser.close()


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=5000), st.lists(st.integers(min_value=0), max_size=20))
def test_reader_records_survive_byte_by_byte_and_any_split(data, cuts):
    stream = encode_stream(RecordType.STDOUT, 1, data, end=True)
    reader = RecordReader()
    records = [r for chunk in _chunked(stream, cuts) for r in reader.feed(chunk)]
    assert b"".join(r.content for r in records) == data
    assert records[-1].content == b""


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_errors(data):
    parser = ResponseParser(1)
    try:
        parser.feed(data)
        parser.close()
    except FastCGIProtocolError:
        pass


# --- CGI response -------------------------------------------------------------------------------


def test_cgi_response_default_status():
    response = parse_cgi_response(b"Content-Type: application/json\r\n\r\n{}")
    assert response == CGIResponse(200, "OK", (("Content-Type", "application/json"),), b"{}")
    assert response.header("content-type") == "application/json"
    assert response.header("x-missing") is None


def test_cgi_response_status_header_and_bare_newlines():
    response = parse_cgi_response(
        b"Status: 404 Not Found\nContent-type: text/html\n\nFile not found.\n"
    )
    assert (response.status, response.reason) == (404, "Not Found")
    assert response.body == b"File not found.\n"


def test_cgi_response_body_may_contain_blank_lines():
    response = parse_cgi_response(b"A: b\r\n\r\nx\r\n\r\ny")
    assert response.body == b"x\r\n\r\ny"


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        (b"no headers at all", "no end of CGI headers"),
        (b"Status: abc\r\n\r\n", "Status"),
        (b"not a header\r\n\r\n", "malformed CGI header"),
        (b": empty\r\n\r\n", "malformed CGI header"),
    ],
)
def test_cgi_response_errors(stdout, message):
    with pytest.raises(FastCGIProtocolError, match=message):
        parse_cgi_response(stdout)
