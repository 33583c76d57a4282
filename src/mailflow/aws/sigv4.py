"""AWS Signature Version 4 for the lean hot path (`aws.lean`): header signing only.

botocore's signer rebuilds the signing key, copies and re-parses the request, and walks its
headers through `email.message` on every call; this one derives the key once per day and
credentials, and signs exactly the headers the hot path sends. What it computes is checked
against botocore's own `SigV4Auth` / `S3SigV4Auth` for the same requests
(tests/unit/test_sigv4.py), so the two cannot drift.

Scope: requests whose query string is empty (every hot-path request), header
authentication (no presigning), unchunked payloads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
#: The SHA-256 of an empty payload: the content hash of every GET.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: Sent, never signed (botocore's list: proxies and SDKs rewrite these).
UNSIGNED_HEADERS = frozenset({"user-agent", "expect", "transfer-encoding", "x-amzn-trace-id"})


@dataclass(frozen=True, slots=True)
class Credentials:
    """One frozen set of credentials (a refreshable source hands out a new one per refresh)."""

    access_key: str
    secret_key: str
    token: str | None = None


def amz_date(now: dt.datetime) -> str:
    """The X-Amz-Date form of a UTC time: 20261202T130102Z."""
    return now.strftime("%Y%m%dT%H%M%SZ")


def canonical_uri(path: str, *, s3: bool) -> str:
    """The canonical URI of an already percent-encoded `path`: S3 signs it as sent; every
    other service encodes it once more (AWS's rule, as botocore applies it)."""
    return path if s3 else quote(path, safe="/~")


@dataclass(slots=True)
class Signer:
    """Signs requests for one service in one region."""

    service: str
    region: str
    #: (date, secret) → signing key: one derivation per day and credentials.
    _keys: dict[tuple[str, str], bytes] = field(default_factory=dict)

    def _signing_key(self, date: str, secret: str) -> bytes:
        key = self._keys.get((date, secret))
        if key is None:
            key = _hmac(f"AWS4{secret}".encode(), date)
            for part in (self.region, self.service, "aws4_request"):
                key = _hmac(key, part)
            self._keys.clear()  # a new day or rotated credentials: the old key is done
            self._keys[(date, secret)] = key
        return key

    def sign(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        payload_sha256: str,
        credentials: Credentials,
        now: dt.datetime,
        *,
        s3: bool = False,
    ) -> None:
        """Add X-Amz-Date, X-Amz-Security-Token (when the credentials carry one) and
        Authorization to `headers` (lower-case names, Host among them), in place."""
        stamp = amz_date(now)
        headers["x-amz-date"] = stamp
        if credentials.token:
            headers["x-amz-security-token"] = credentials.token
        signed = signed_header_names(headers)
        canonical = "\n".join(
            (
                method,
                canonical_uri(path, s3=s3),
                "",  # the query string: the hot path sends none
                *(f"{name}:{_fold(headers[name])}" for name in signed),
                "",
                ";".join(signed),
                payload_sha256,
            ),
        )
        scope = f"{stamp[:8]}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(
            (ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()),
        )
        signature = hmac.new(
            self._signing_key(stamp[:8], credentials.secret_key),
            to_sign.encode(),
            hashlib.sha256,
        ).hexdigest()
        headers["authorization"] = (
            f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={';'.join(signed)}, Signature={signature}"
        )


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _fold(value: str) -> str:
    """A header value as SigV4 canonicalises it: trimmed, inner runs of spaces as one."""
    return " ".join(value.split())


def signed_header_names(headers: Mapping[str, str]) -> list[str]:
    """The names `Signer.sign` signs, sorted: every header but UNSIGNED_HEADERS."""
    return sorted(name for name in headers if name not in UNSIGNED_HEADERS)
