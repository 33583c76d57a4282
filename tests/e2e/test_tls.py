"""TLS to the AWS endpoints: the certificate's chain *and* its host name are checked, on both
clients, with one shared context per CA bundle (`boundary.tls_context`).

A real TLS server in this process (aiohttp, loopback) with a certificate for `localhost` only,
signed by a CA made here and trusted through AWS_CA_BUNDLE, as an operator with a private CA
would. Reaching it as `localhost` must work; reaching the same socket as `127.0.0.1` must fail
on the name (aiobotocore's own context leaves host names unchecked).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailflow.aws import boundary
from mailflow.aws.boundary import open_clients
from mailflow.errors import PermanentError, TransientError


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for DNS:localhost only: (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("mailflow test CA"))
        .issuer_name(_name("mailflow test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


async def _handler(request: web.Request) -> web.Response:
    """Every call answered as SQS answers an unknown queue: proof the request got through."""
    await request.read()
    body = {"__type": "com.amazonaws.sqs#QueueDoesNotExist", "message": "no such queue"}
    return web.Response(
        status=400,
        body=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "x-amzn-query-error": "AWS.SimpleQueueService.NonExistentQueue;Sender",
        },
    )


async def _receive(host: str, port: int, client: str) -> str:
    """One ReceiveMessage through `open_clients` at https://HOST:PORT: the error it ends in."""
    url = f"https://{host}:{port}/123456789012/q"
    async with open_clients(client=client) as clients:
        try:
            await boundary.call(
                "sqs.ReceiveMessage",
                clients.sqs.receive_message,
                QueueUrl=url,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=0,
            )
        except PermanentError as exc:
            return f"permanent: {exc}"
        except TransientError as exc:
            return f"transient: {exc}"
    return "answered"


@pytest.mark.parametrize("client", boundary.CLIENT_KINDS)
def test_the_server_name_is_checked_on_both_clients(
    client: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = _certificates(tmp_path)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def scenario() -> dict[str, Any]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", _handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"https://localhost:{port}")
            by_name = await _receive("localhost", port, client)
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"https://127.0.0.1:{port}")
            by_address = await _receive("127.0.0.1", port, client)
        finally:
            await runner.cleanup()
        return {"by_name": by_name, "by_address": by_address}

    boundary.tls_context.cache_clear()
    seen = asyncio.run(scenario())
    # The certificate names localhost: the call gets through and SQS's "no" comes back.
    assert seen["by_name"].startswith("permanent:"), seen
    assert "QueueDoesNotExist" in seen["by_name"] or "NonExistentQueue" in seen["by_name"]
    # The same server reached by address: refused on the name, before any request is sent.
    assert seen["by_address"].startswith("transient:"), seen
    assert "127.0.0.1" in seen["by_address"] or "certificate" in seen["by_address"].lower()
    # Every client of both `open_clients` shared one context: the bundle was loaded once.
    assert boundary.tls_context.cache_info().currsize == 1
