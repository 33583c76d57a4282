"""The lean path's SigV4 signer gives botocore's signature for the same request, byte for byte.

botocore's `SigV4Auth` / `S3SigV4Auth` are the reference: each case builds one request, signs
it with both at the same instant and compares the Authorization header (which covers the
canonical request, the signed header list, the scope and the key derivation).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from urllib.parse import quote

import botocore.auth
import botocore.credentials
import pytest
from botocore.awsrequest import AWSRequest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.aws.sigv4 import EMPTY_SHA256, Credentials, Signer

NOW = dt.datetime(2026, 12, 2, 13, 1, 2, tzinfo=dt.UTC)
KEYS = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SESSION = Credentials("ASIAEXAMPLE", "c2VjcmV0", "FwoGZXIvYXdzEJr//////////wEaDK+token==")


def botocore_signature(  # noqa: PLR0917 - one request's every part, as botocore takes them
    monkeypatch: pytest.MonkeyPatch,
    auth_class: type[botocore.auth.SigV4Auth],
    credentials: Credentials,
    service: str,
    region: str,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
) -> str:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    creds = botocore.credentials.Credentials(
        credentials.access_key, credentials.secret_key, credentials.token
    )
    auth_class(creds, service, region).add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize("credentials", [KEYS, SESSION], ids=["keys", "session-token"])
@pytest.mark.parametrize(
    ("service", "target"),
    [("dynamodb", "DynamoDB_20120810.UpdateItem"), ("sqs", "AmazonSQS.DeleteMessageBatch")],
)
def test_json_protocol_post_signs_as_botocore(
    monkeypatch: pytest.MonkeyPatch, credentials: Credentials, service: str, target: str
) -> None:
    body = json.dumps({"TableName": "t", "Key": {"pk": {"S": "ü 1"}}}).encode()
    headers = {
        "host": f"{service}.eu-west-1.amazonaws.com",
        "content-type": "application/x-amz-json-1.0",
        "x-amz-target": target,
        "user-agent": "mailflow/test",
    }
    expected = botocore_signature(
        monkeypatch,
        botocore.auth.SigV4Auth,
        credentials,
        service,
        "eu-west-1",
        "POST",
        f"https://{service}.eu-west-1.amazonaws.com/",
        headers,
        body,
    )
    ours = dict(headers)
    Signer(service, "eu-west-1").sign(
        "POST", "/", ours, hashlib.sha256(body).hexdigest(), credentials, NOW
    )
    assert ours["authorization"] == expected
    assert ours["x-amz-date"] == "20261202T130102Z"
    assert ("x-amz-security-token" in ours) == bool(credentials.token)


KEY_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(key=KEY_TEXT, ranged=st.booleans(), path_style=st.booleans())
def test_s3_get_signs_as_botocore(key: str, ranged: bool, path_style: bool) -> None:
    """Any object key (spaces, '+', '~', '%', non-ASCII, '//' runs): S3 signs the path as sent."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        host = "127.0.0.1:4566" if path_style else "mail-bucket.s3.eu-west-1.amazonaws.com"
        path = ("/mail-bucket/" if path_style else "/") + quote(key, safe="/~")
        scheme = "http" if path_style else "https"
        headers = {
            "host": host,
            "x-amz-content-sha256": EMPTY_SHA256,
            "user-agent": "mailflow/test",
        }
        if ranged:
            headers["range"] = "bytes=0-65535"
        expected = botocore_signature(
            monkeypatch,
            botocore.auth.S3SigV4Auth,
            SESSION,
            "s3",
            "eu-west-1",
            "GET",
            f"{scheme}://{host}{path}",
            headers,
            b"",
        )
        ours = dict(headers)
        Signer("s3", "eu-west-1").sign("GET", path, ours, EMPTY_SHA256, SESSION, NOW, s3=True)
        assert ours["authorization"] == expected


def test_signing_key_is_derived_once_per_day_and_secret() -> None:
    signer = Signer("dynamodb", "us-east-1")
    for _ in range(3):
        signer.sign("POST", "/", {"host": "h"}, EMPTY_SHA256, KEYS, NOW)
    first = dict(signer._keys)
    signer.sign("POST", "/", {"host": "h"}, EMPTY_SHA256, KEYS, NOW + dt.timedelta(days=1))
    assert len(first) == 1
    assert signer._keys.keys() != first.keys()
    assert len(signer._keys) == 1
