"""The lean path on the wire: what it sends and how it reads what comes back, against a stub
HTTP server in this process that answers with crafted bytes (the failures a real server
rarely produces on demand: a bad CRC32, a body cut short, SQS's query-compatible error codes).

The behaviour on real servers is the contract suite's (tests/contract, the `+lean` rows).
"""

from __future__ import annotations

import asyncio
import base64
import json
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import botocore.exceptions
import pytest
from aiohttp import web

from mailflow.aws import boundary, lean
from mailflow.aws.boundary import open_clients

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def with_clients(
    monkeypatch: pytest.MonkeyPatch,
    handler: Handler,
    scenario: Callable[[boundary.AwsClients], Awaitable[Any]],
) -> Any:
    runner, url = await serve(handler)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    try:
        async with open_clients(client="lean") as clients:
            return await scenario(clients)
    finally:
        await runner.cleanup()


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def test_a_json_call_is_signed_and_its_answer_read(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    answer = json.dumps({"Attributes": {"pk": {"S": "a"}, "blob": {"B": "aGk="}}}).encode()

    async def handler(request: web.Request) -> web.Response:
        seen["target"] = request.headers["X-Amz-Target"]
        seen["auth"] = request.headers["Authorization"]
        seen["body"] = json.loads(await request.read())
        return web.Response(
            body=answer,
            content_type="application/x-amz-json-1.0",
            headers={"x-amz-crc32": str(zlib.crc32(answer)), "x-amzn-RequestId": "r1"},
        )

    async def scenario(clients: boundary.AwsClients) -> Any:
        assert isinstance(clients.dynamodb, lean.LeanClient)
        return await clients.dynamodb.update_item(TableName="t", Key={"pk": {"B": b"\x00\xff"}})

    resp = run(with_clients(monkeypatch, handler, scenario))
    assert seen["target"] == "DynamoDB_20120810.UpdateItem"
    assert seen["auth"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/dynamodb/aws4_request" in seen["auth"]
    assert seen["body"]["Key"] == {"pk": {"B": base64.b64encode(b"\x00\xff").decode()}}
    assert resp["Attributes"] == {"pk": {"S": "a"}, "blob": {"B": b"hi"}}
    assert resp["ResponseMetadata"] == {"HTTPStatusCode": 200, "RequestId": "r1"}


def test_a_crc32_mismatch_is_a_retryable_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=b"{}", headers={"x-amz-crc32": "1"})

    async def scenario(clients: boundary.AwsClients) -> Any:
        return await clients.dynamodb.get_item(TableName="t", Key={"pk": {"S": "a"}})

    with pytest.raises(aiohttp.ClientPayloadError) as caught:
        run(with_clients(monkeypatch, handler, scenario))
    assert isinstance(boundary.map_error("ddb.GetItem", caught.value), boundary.RetryableAwsError)


@pytest.mark.parametrize(
    ("status", "body", "headers", "code", "mapped"),
    [
        (
            400,
            {
                "__type": "com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException",
                "message": "no",
                "Item": {"pk": {"S": "a"}},
            },
            {},
            "ConditionalCheckFailedException",
            boundary.ConditionFailedError,
        ),
        (
            400,
            {"__type": "com.amazon.coral.availability#ThrottlingException", "Message": "slow"},
            {},
            "ThrottlingException",
            boundary.RetryableAwsError,
        ),
        (
            400,
            {"__type": "com.amazonaws.sqs#QueueDoesNotExist", "message": "gone"},
            {"x-amzn-query-error": "AWS.SimpleQueueService.NonExistentQueue;Sender"},
            "AWS.SimpleQueueService.NonExistentQueue",
            boundary.AwsPermanentError,
        ),
        (503, {}, {}, "503", boundary.RetryableAwsError),
    ],
)
def test_json_errors_read_as_botocore_reads_them(
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    body: dict[str, Any],
    headers: dict[str, str],
    code: str,
    mapped: type[Exception],
) -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=status, body=json.dumps(body).encode(), headers=headers)

    async def scenario(clients: boundary.AwsClients) -> Any:
        return await clients.sqs.delete_message_batch(QueueUrl="q", Entries=[])

    with pytest.raises(botocore.exceptions.ClientError) as caught:
        run(with_clients(monkeypatch, handler, scenario))
    assert boundary.error_code(caught.value) == code
    error = boundary.map_error("sqs.DeleteMessageBatch", caught.value)
    assert type(error) is mapped
    if isinstance(error, boundary.ConditionFailedError):
        assert error.item == {"pk": {"S": "a"}}


def test_s3_get_streams_the_body_with_metadata_and_range(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, str] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["path"] = request.raw_path
        seen["range"] = request.headers.get("Range", "")
        seen["sha"] = request.headers["x-amz-content-sha256"]
        return web.Response(
            status=206,
            body=b"0123456789",
            headers={"x-amz-meta-x-amz-iv": "aXY=", "Content-Range": "bytes 0-9/100"},
        )

    async def scenario(clients: boundary.AwsClients) -> Any:
        resp = await clients.s3.get_object(Bucket="mail", Key="incoming/a b+c", Range="bytes=0-9")
        async with resp["Body"] as body:
            first, rest = await body.read(4), await body.read()
        return resp, first + rest

    resp, data = run(with_clients(monkeypatch, handler, scenario))
    assert seen["path"] == "/mail/incoming/a%20b%2Bc"  # path style on a custom endpoint
    assert seen["range"] == "bytes=0-9"
    assert data == b"0123456789"
    assert resp["ContentLength"] == 10
    assert resp["ContentRange"] == "bytes 0-9/100"
    assert resp["Metadata"] == {"x-amz-iv": "aXY="}


def test_s3_errors_carry_the_xml_code(monkeypatch: pytest.MonkeyPatch) -> None:
    async def handler(_: web.Request) -> web.Response:
        xml = b"<Error><Code>NoSuchKey</Code><Message>nope</Message></Error>"
        return web.Response(status=404, body=xml, content_type="application/xml")

    async def scenario(clients: boundary.AwsClients) -> Any:
        return await clients.s3.get_object(Bucket="mail", Key="gone")

    with pytest.raises(botocore.exceptions.ClientError) as caught:
        run(with_clients(monkeypatch, handler, scenario))
    error = boundary.map_error("s3.GetObject", caught.value)
    assert isinstance(error, boundary.AwsPermanentError)
    assert error.code == "NoSuchKey"


def test_a_body_cut_short_raises_instead_of_returning_part_of_the_mail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"x" * 40)
        request.transport.close()  # type: ignore[union-attr]
        return response

    async def scenario(clients: boundary.AwsClients) -> Any:
        resp = await clients.s3.get_object(Bucket="mail", Key="m")
        got = b""
        async with resp["Body"] as body:
            while chunk := await body.read(16):
                got += chunk
        return got

    with pytest.raises(aiohttp.ClientPayloadError):
        run(with_clients(monkeypatch, handler, scenario))


def test_parameters_the_path_does_not_send_go_to_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.query_string)
        return web.Response(body=b"data")

    async def scenario(clients: boundary.AwsClients) -> Any:
        resp = await clients.s3.get_object(Bucket="mail", Key="m", VersionId="v1")
        async with resp["Body"] as body:
            return await body.read()

    assert run(with_clients(monkeypatch, handler, scenario)) == b"data"
    assert seen == ["versionId=v1"]  # botocore's serialisation, not ours


def test_a_proxy_keeps_botocore_for_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert lean.unsupported_environment() is not None

    async def main() -> bool:
        async with open_clients(client="lean") as clients:
            return isinstance(clients.dynamodb, lean.LeanClient)

    assert run(main()) is False


def test_a_bucket_in_another_region_is_left_to_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 answers 301 PermanentRedirect; botocore knows how to follow it, the lean path
    hands the call over instead of failing the mail."""
    calls: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.headers.get("User-Agent", ""))
        if len(calls) == 1:  # S3's 307 names a Location that a signed request must not follow
            xml = b"<Error><Code>TemporaryRedirect</Code><Message>elsewhere</Message></Error>"
            return web.Response(
                status=307,
                body=xml,
                content_type="application/xml",
                headers={"Location": "http://127.0.0.1:9/never"},
            )
        return web.Response(body=b"mail")

    async def scenario(clients: boundary.AwsClients) -> Any:
        resp = await clients.s3.get_object(Bucket="mail", Key="m")
        async with resp["Body"] as body:
            return await body.read()

    assert run(with_clients(monkeypatch, handler, scenario)) == b"mail"
    assert len(calls) == 2  # ours, then botocore's


@pytest.mark.parametrize(
    ("status", "body", "retryable"),
    [(502, b"<html>Bad Gateway</html>", True), (200, b"<html>", True), (403, b"denied", False)],
)
def test_an_answer_that_is_not_json_is_an_aws_error_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, status: int, body: bytes, retryable: bool
) -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="text/html")

    async def scenario(clients: boundary.AwsClients) -> Any:
        return await clients.dynamodb.get_item(TableName="t", Key={"pk": {"S": "a"}})

    with pytest.raises(Exception) as caught:
        run(with_clients(monkeypatch, handler, scenario))
    error = boundary.map_error("ddb.GetItem", caught.value)
    expected = boundary.RetryableAwsError if retryable else boundary.AwsPermanentError
    assert isinstance(error, expected)
