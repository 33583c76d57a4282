"""S3: fetch a mail into a private spool file; move it to its archive prefix.

The spool exists so that memory does not grow with mail size × concurrency: the body is
streamed to disk in chunks, and the processor reads the file itself as its stdin.
Spool files are 0600 in a 0700 directory and removed after use, on failure too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailflow import aws
from mailflow.aws import AwsPermanentError
from mailflow.errors import ObjectMissingError, TooLargeError
from mailflow.mail import HEAD_BUDGET_BYTES

CHUNK_BYTES = 256 * 1024
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


@dataclass(frozen=True, slots=True)
class SpooledMail:
    path: Path
    size_bytes: int
    head: bytes  # the first HEAD_BUDGET_BYTES, for the header summary
    sha256: str


def make_spool_dir(base: Path | None) -> Path:
    """A private directory for this process's spool files."""
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="mailflow-spool-", dir=base))
    path.chmod(0o700)
    return path


@contextlib.asynccontextmanager
async def spooled(
    s3: Any,
    bucket: str,
    key: str,
    *,
    spool_dir: Path,
    max_bytes: int,
) -> AsyncIterator[SpooledMail]:
    """Download `bucket/key` into a private temp file; delete it when the block ends."""
    fd, name = tempfile.mkstemp(prefix="mail-", dir=spool_dir)  # mkstemp: 0600, O_EXCL
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            mail = await _download(s3, bucket, key, out, path, max_bytes)
        yield mail
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # noqa: ASYNC240 - a local temp file: microseconds, not I/O wait


async def _download(
    s3: Any,
    bucket: str,
    key: str,
    out: Any,
    path: Path,
    max_bytes: int,
) -> SpooledMail:
    try:
        resp = await aws.call("s3.GetObject", s3.get_object, Bucket=bucket, Key=key)
    except AwsPermanentError as exc:
        if exc.code in MISSING_CODES:
            raise ObjectMissingError(f"s3://{bucket}/{key} does not exist") from exc
        raise
    size = int(resp.get("ContentLength", 0))
    body = resp["Body"]
    if size > max_bytes:
        body.close()
        raise TooLargeError(f"{size} bytes > MAILFLOW_MAX_MAIL_BYTES={max_bytes}")
    digest = hashlib.sha256()
    head = bytearray()
    written = 0
    try:
        while chunk := await body.read(CHUNK_BYTES):
            written += len(chunk)
            _check_size(written, max_bytes)  # ContentLength lied, or the object grew
            if len(head) < HEAD_BUDGET_BYTES:
                head += chunk[: HEAD_BUDGET_BYTES - len(head)]
            digest.update(chunk)
            out.write(chunk)
    except (TooLargeError, asyncio.CancelledError):
        raise
    except Exception as exc:  # a broken stream mid-body is a transient fault, like a 5xx
        raise aws.map_error("s3.GetObject.read", exc) from exc
    finally:
        body.close()
    out.flush()
    return SpooledMail(path=path, size_bytes=written, head=bytes(head), sha256=digest.hexdigest())


def _check_size(size_bytes: int, max_bytes: int) -> None:
    if size_bytes > max_bytes:
        raise TooLargeError(f"{size_bytes} bytes > MAILFLOW_MAX_MAIL_BYTES={max_bytes}")
