"""S3: fetch a mail into a private spool file; move it to its archive prefix.

The spool exists so that memory does not grow with mail size × concurrency: the body is
streamed to disk in chunks, and the processor reads the file itself as its stdin.
Spool files are 0600 in a 0700 directory and removed after use, on failure too.
"""

from __future__ import annotations

import asyncio
import base64
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
from mailflow.errors import ObjectMissingError, PermanentError, TooLargeError
from mailflow.mail.summary import HEAD_BUDGET_BYTES

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


# --- archive moves: copy, verify, delete (archive.py decides what goes where) -----------------


class CopyMismatchError(PermanentError):
    """A copy is not byte-identical to its source; the source must be kept."""


@dataclass(frozen=True, slots=True)
class Location:
    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    where: Location
    size_bytes: int
    etag: str
    sha256_b64: str | None  # S3's full-object SHA-256, when the object carries one
    content_type: str | None


async def head(s3: Any, where: Location) -> ObjectInfo | None:
    """HEAD an object; None if it does not exist."""
    try:
        resp = await aws.call(
            "s3.HeadObject",
            s3.head_object,
            Bucket=where.bucket,
            Key=where.key,
            ChecksumMode="ENABLED",
        )
    except AwsPermanentError as exc:
        if exc.code in MISSING_CODES:
            return None
        raise
    return ObjectInfo(
        where=where,
        size_bytes=int(resp.get("ContentLength", 0)),
        etag=str(resp.get("ETag", "")),
        sha256_b64=resp.get("ChecksumSHA256"),
        content_type=resp.get("ContentType"),
    )


async def sha256_b64(s3: Any, where: Location) -> str:
    """SHA-256 of an object's bytes, streamed (never the whole mail in memory)."""
    resp = await aws.call("s3.GetObject", s3.get_object, Bucket=where.bucket, Key=where.key)
    body = resp["Body"]
    digest = hashlib.sha256()
    try:
        while chunk := await body.read(CHUNK_BYTES):
            digest.update(chunk)
    except Exception as exc:  # a broken stream mid-body is a transient fault, like a 5xx
        raise aws.map_error("s3.GetObject.read", exc) from exc
    finally:
        body.close()
    return base64.b64encode(digest.digest()).decode("ascii")


async def verify_copy(s3: Any, src: ObjectInfo, dst: ObjectInfo) -> str:
    """Is `dst` byte-identical to `src`? Returns how that was established; raises if not."""
    if src.size_bytes != dst.size_bytes:
        raise CopyMismatchError(f"{dst.where.url}: {dst.size_bytes} bytes, source {src.size_bytes}")
    if src.etag and src.etag == dst.etag:
        return "etag"
    if src.sha256_b64 and dst.sha256_b64:
        if src.sha256_b64 != dst.sha256_b64:
            raise CopyMismatchError(f"{dst.where.url}: SHA-256 differs from {src.where.url}")
        return "sha256"
    # ETags differ by design under SSE-KMS and for multipart uploads: hash the bytes ourselves.
    mine = await sha256_b64(s3, src.where)
    theirs = dst.sha256_b64 or await sha256_b64(s3, dst.where)
    if mine != theirs:
        raise CopyMismatchError(f"{dst.where.url}: SHA-256 differs from {src.where.url}")
    return "sha256_computed"


async def copy_verified(
    s3: Any,
    src: ObjectInfo,
    dest: Location,
    metadata: dict[str, str],
) -> tuple[ObjectInfo, str]:
    """Copy `src` to `dest` with new metadata (S3 computes a SHA-256 of the copy); verify it."""
    await aws.call(
        "s3.CopyObject",
        s3.copy_object,
        Bucket=dest.bucket,
        Key=dest.key,
        CopySource={"Bucket": src.where.bucket, "Key": src.where.key},
        CopySourceIfMatch=src.etag,  # the version we looked at, or nothing
        MetadataDirective="REPLACE",
        Metadata=metadata,
        ContentType=src.content_type or "message/rfc822",
        ChecksumAlgorithm="SHA256",
    )
    dst = await head(s3, dest)
    if dst is None:
        raise CopyMismatchError(f"{dest.url}: missing right after the copy")
    return dst, await verify_copy(s3, src, dst)


async def delete(s3: Any, where: Location) -> None:
    """Delete an object (a missing one is no error: S3 says 204 either way)."""
    await aws.call("s3.DeleteObject", s3.delete_object, Bucket=where.bucket, Key=where.key)
