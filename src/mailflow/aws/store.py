"""S3: fetch a mail into a private spool file; move it to its archive prefix.

The spool exists so that memory does not grow with mail size × concurrency: the body is
streamed to disk in chunks, and the processor reads the file itself as its stdin.
Spool files are 0600 in a 0700 directory and removed after use, on failure too.

A mail SES stored encrypted (KMS, the S3 encryption client's envelope: see envelope.py) is
decrypted on the way into the spool; the spool file is handed out only after the GCM tag has
been verified, and is removed with its unauthenticated plaintext when anything fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailflow import aws
from mailflow.aws import AwsPermanentError
from mailflow.aws.envelope import (
    DECRYPT_UNSUPPORTED,
    TAG_BYTES,
    DecryptError,
    Envelope,
    GcmStream,
    check_length,
    decrypt_prefix,
    envelope_metadata,
    is_encrypted,
    key_region,
    parse_envelope,
    unwrap_data_key,
)
from mailflow.errors import ObjectMissingError, PermanentError, TooLargeError
from mailflow.mail.summary import HEAD_BUDGET_BYTES

CHUNK_BYTES = 256 * 1024
#: S3's limit on an object's user metadata, keys and values together.
USER_METADATA_BYTES = 2048
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


@dataclass(frozen=True, slots=True)
class SpooledMail:
    """A mail downloaded into a private spool file for one processor run (see `spooled`): the
    file the processor reads as stdin, its size in bytes, its first bytes for the header summary,
    and whether it was stored KMS-encrypted (the spool then holds the verified plaintext)."""

    path: Path
    size_bytes: int  # of the mail as the processor reads it (the plaintext, if encrypted)
    head: bytes  # the first HEAD_BUDGET_BYTES, for the header summary
    encrypted: bool = False  # stored with a KMS envelope, decrypted into the spool


@dataclass(frozen=True, slots=True)
class KeyRing:
    """How to unwrap an envelope's data key: KMS in the key's region, one key accepted.

    `key_id` (MAILFLOW_KMS_KEY) is the SES receipt rule's key; when set, KMS refuses data keys
    wrapped by any other key, and its ARN's region is where KMS is asked. Unset, the key the
    envelope names decides the region (the mail region's client when it names none).
    """

    kms_in: Callable[[str | None], Awaitable[Any]]
    key_id: str | None = None

    async def data_key(self, envelope: Envelope) -> bytes:
        """The plaintext data key of one envelope."""
        kms = await self.kms_in(key_region(self.key_id) or key_region(envelope.key_id))
        return await unwrap_data_key(kms, envelope, key_id=self.key_id)


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
    keys: KeyRing | None = None,
    mail_id: str | None = None,
) -> AsyncIterator[SpooledMail]:
    """Download `bucket/key` into a private temp file; delete it when the block ends.

    An encrypted object is decrypted with `keys` (its context must be bound to `mail_id`, when
    given); the block is entered only once the whole body is authenticated.
    """
    fd, name = tempfile.mkstemp(prefix="mail-", dir=spool_dir)  # mkstemp: 0600, O_EXCL
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            mail = await _download(s3, bucket, key, out, path, max_bytes, keys, mail_id)
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
    keys: KeyRing | None,
    mail_id: str | None,
) -> SpooledMail:
    try:
        resp = await aws.call("s3.GetObject", s3.get_object, Bucket=bucket, Key=key)
    except AwsPermanentError as exc:
        if exc.code in MISSING_CODES:
            raise ObjectMissingError(f"s3://{bucket}/{key} does not exist") from exc
        raise
    size = int(resp.get("ContentLength", 0))
    body = resp["Body"]
    try:
        envelope = parse_envelope(resp.get("Metadata") or {}, mail_id=mail_id)
        # The plaintext is what counts against the limit: the ciphertext carries the tag too.
        _check_size(size - (TAG_BYTES if envelope else 0), max_bytes)
        stream = await _decryptor(envelope, keys) if envelope else None
    except BaseException:
        body.close()
        raise
    head = bytearray()
    written = 0

    def emit(plain: bytes) -> None:
        nonlocal written, head
        written += len(plain)
        _check_size(written, max_bytes)  # ContentLength lied, or the object grew
        if len(head) < HEAD_BUDGET_BYTES:
            head += plain[: HEAD_BUDGET_BYTES - len(head)]
        out.write(plain)

    try:
        while chunk := await body.read(CHUNK_BYTES):
            emit(stream.update(chunk) if stream is not None else chunk)
    except (TooLargeError, asyncio.CancelledError):
        raise
    except Exception as exc:  # a broken stream mid-body is a transient fault, like a 5xx
        raise aws.map_error("s3.GetObject.read", exc) from exc
    finally:
        body.close()
    if stream is not None and envelope is not None:
        emit(stream.finish())  # raises on a bad tag: the caller removes the spool file
        check_length(envelope, written)
    out.flush()
    return SpooledMail(
        path=path,
        size_bytes=written,
        head=bytes(head),
        encrypted=stream is not None,
    )


async def _decryptor(envelope: Envelope, keys: KeyRing | None) -> GcmStream:
    if keys is None:
        raise DecryptError(DECRYPT_UNSUPPORTED, "encrypted, and no KMS access configured")
    return GcmStream(await keys.data_key(envelope), envelope.iv)


def _check_size(size_bytes: int, max_bytes: int) -> None:
    if size_bytes > max_bytes:
        raise TooLargeError(f"{size_bytes} bytes > MAILFLOW_MAX_MAIL_BYTES={max_bytes}")


# --- archive moves: copy, verify, delete (archive.py decides what goes where) -----------------


class CopyMismatchError(PermanentError):
    """A copy is not byte-identical to its source; the source must be kept."""


@dataclass(frozen=True, slots=True)
class Location:
    """An S3 object's address: bucket and key."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        """The address as `s3://bucket/key`, for logs, records and people."""
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a HEAD said about an object: size in bytes, ETag, S3's SHA-256 (base64) when the
    object carries one, content type and user metadata; what copies are verified against."""

    where: Location
    size_bytes: int
    etag: str
    sha256_b64: str | None  # S3's full-object SHA-256, when the object carries one
    content_type: str | None
    metadata: dict[str, str] = field(default_factory=dict, compare=False)  # x-amz-meta-*

    @property
    def encrypted(self) -> bool:
        """Stored with an S3 encryption client envelope (SES with a KMS key)."""
        return is_encrypted(self.metadata)


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
        metadata=dict(resp.get("Metadata") or {}),
    )


@dataclass(frozen=True, slots=True)
class Listed:
    """One object of a listing: its key, size and last-modified time (epoch seconds)."""

    key: str
    size_bytes: int
    modified_at: float


async def list_objects(
    s3: Any,
    bucket: str,
    prefix: str,
    *,
    max_pages: int,
    start_after: str | None = None,
    page_keys: int = 1000,
) -> AsyncGenerator[Listed, None]:
    """Objects under `prefix` after `start_after`, in key order, at most `max_pages` pages
    of `page_keys` (S3's maximum, 1,000, by default)."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_keys}
    if start_after:
        kwargs["StartAfter"] = start_after
    for _ in range(max_pages):
        resp = await aws.call("s3.ListObjectsV2", s3.list_objects_v2, **kwargs)
        for obj in resp.get("Contents", []):
            yield Listed(str(obj["Key"]), int(obj.get("Size", 0)), obj["LastModified"].timestamp())
        if not resp.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = resp["NextContinuationToken"]


async def read_prefix(
    s3: Any,
    where: Location,
    size_bytes: int,
    keys: KeyRing | None = None,
) -> bytes:
    """The first `size_bytes` of the mail (a ranged GET): enough for its header block.

    An encrypted object's prefix is decrypted with `keys`, unauthenticated (see
    `decrypt_prefix`): good for finding recipients, never fed to a processor.
    """
    resp = await aws.call(
        "s3.GetObject",
        s3.get_object,
        Bucket=where.bucket,
        Key=where.key,
        Range=f"bytes=0-{size_bytes - 1}",
    )
    body = resp["Body"]
    try:
        data = bytes(await body.read())
    except Exception as exc:  # a broken stream mid-body is a transient fault, like a 5xx
        raise aws.map_error("s3.GetObject.read", exc) from exc
    finally:
        body.close()
    envelope = parse_envelope(resp.get("Metadata") or {})
    if envelope is None:
        return data
    if keys is None:
        raise DecryptError(DECRYPT_UNSUPPORTED, "encrypted, and no KMS access configured")
    total = str(resp.get("ContentRange", "")).rpartition("/")[2]
    if total.isdigit():  # a short mail: the range reached its tag, which is not plaintext
        data = data[: max(0, int(total) - TAG_BYTES)]
    return decrypt_prefix(await keys.data_key(envelope), envelope.iv, data)


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
    """Copy `src` to `dest` with new metadata (S3 computes a SHA-256 of the copy); verify it.

    The source's encryption envelope (x-amz-key-v2, x-amz-iv, ...) is carried over: without it
    the copy of an encrypted mail could never be decrypted again.
    """
    await aws.call(
        "s3.CopyObject",
        s3.copy_object,
        Bucket=dest.bucket,
        Key=dest.key,
        CopySource={"Bucket": src.where.bucket, "Key": src.where.key},
        CopySourceIfMatch=src.etag,  # the version we looked at, or nothing
        MetadataDirective="REPLACE",
        Metadata=fit_metadata(envelope_metadata(src.metadata), metadata),
        ContentType=src.content_type or "message/rfc822",
        ChecksumAlgorithm="SHA256",
    )
    dst = await head(s3, dest)
    if dst is None:
        raise CopyMismatchError(f"{dest.url}: missing right after the copy")
    return dst, await verify_copy(s3, src, dst)


def fit_metadata(kept: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """`kept` whole, plus `extra` with its longest values shortened to stay within S3's limit."""
    room = USER_METADATA_BYTES - sum(len(k) + len(v) for k, v in kept.items())
    fitted = dict(extra)
    excess = sum(len(k) + len(v) for k, v in fitted.items()) - room
    while excess > 0 and fitted:
        name = max(fitted, key=lambda k: len(fitted[k]))
        value = fitted[name]
        if not value:
            break
        cut = min(excess, len(value))
        fitted[name] = value[: len(value) - cut]
        excess -= cut
    return {**fitted, **kept}


async def delete(s3: Any, where: Location) -> None:
    """Delete an object (a missing one is no error: S3 says 204 either way)."""
    await aws.call("s3.DeleteObject", s3.delete_object, Bucket=where.bucket, Key=where.key)


class S3Store:
    """The mail store on S3 (`mailflow.ports.MailStorePort`): the functions of this module,
    bound to one client and the KMS key ring that decrypts what SES stored encrypted."""

    def __init__(self, s3: Any, keys: KeyRing | None = None) -> None:
        self.s3 = s3
        self.keys = keys

    def spooled(
        self,
        bucket: str,
        key: str,
        *,
        spool_dir: Path,
        max_bytes: int,
        mail_id: str | None = None,
    ) -> contextlib.AbstractAsyncContextManager[SpooledMail]:
        """`spooled` with this store's client and keys."""
        return spooled(
            self.s3,
            bucket,
            key,
            spool_dir=spool_dir,
            max_bytes=max_bytes,
            keys=self.keys,
            mail_id=mail_id,
        )

    async def head(self, where: Location) -> ObjectInfo | None:
        """`head` with this store's client."""
        return await head(self.s3, where)

    def list_objects(
        self,
        bucket: str,
        prefix: str,
        *,
        max_pages: int,
        start_after: str | None = None,
        page_keys: int = 1000,
    ) -> AsyncGenerator[Listed, None]:
        """`list_objects` with this store's client."""
        return list_objects(
            self.s3,
            bucket,
            prefix,
            max_pages=max_pages,
            start_after=start_after,
            page_keys=page_keys,
        )

    async def read_prefix(self, where: Location, size_bytes: int) -> bytes:
        """`read_prefix` with this store's client and keys."""
        return await read_prefix(self.s3, where, size_bytes, self.keys)

    async def copy_verified(
        self, src: ObjectInfo, dest: Location, metadata: dict[str, str]
    ) -> tuple[ObjectInfo, str]:
        """`copy_verified` with this store's client."""
        return await copy_verified(self.s3, src, dest, metadata)

    async def verify_copy(self, src: ObjectInfo, dst: ObjectInfo) -> str:
        """`verify_copy` with this store's client."""
        return await verify_copy(self.s3, src, dst)

    async def delete(self, where: Location) -> None:
        """`delete` with this store's client."""
        await delete(self.s3, where)
