"""The mail bucket in memory (MailStorePort): objects with bytes, metadata and ETags.

Modelled as S3 behaves where mailflow depends on it: a missing object is ObjectMissingError
when spooled and None on HEAD; an object over the size limit is refused before a byte is
spooled; the spool file is private and removed after the block, on failure too; a copy is
conditional on the source's ETag (PreconditionFailed otherwise) and carries S3's SHA-256 of
the copy; listings come in key order, 1,000 per page. Encrypted mails (KMS envelopes) are
not modelled: spooling one fails as it does for a store without KMS access.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailflow.aws import AwsPermanentError
from mailflow.aws.envelope import DECRYPT_UNSUPPORTED, DecryptError, envelope_metadata, is_encrypted
from mailflow.aws.store import (
    CopyMismatchError,
    Listed,
    Location,
    ObjectInfo,
    SpooledMail,
    fit_metadata,
)
from mailflow.errors import ObjectMissingError, TooLargeError
from mailflow.mail.summary import HEAD_BUDGET_BYTES

PAGE_KEYS = 1000
#: What S3 answers for an object stored without a Content-Type.
DEFAULT_CONTENT_TYPE = "binary/octet-stream"


@dataclass(slots=True)
class StoredObject:
    """One object: its bytes and what S3 keeps beside them."""

    data: bytes
    modified_at: float
    metadata: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    sha256_b64: str | None = None  # only when written with a checksum (a copy is)

    @property
    def etag(self) -> str:
        """S3's ETag of a single-part upload: the MD5 of the bytes, quoted."""
        return '"' + hashlib.md5(self.data, usedforsecurity=False).hexdigest() + '"'


class FakeStore:
    """In-memory `MailStorePort`; `objects` is every bucket's content by (bucket, key)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.objects: dict[tuple[str, str], StoredObject] = {}

    # --- what a test does ---------------------------------------------------------------------

    def put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        """Store an object (as SES does, or a test)."""
        self.objects[(bucket, key)] = StoredObject(
            data, self._clock(), dict(metadata or {}), content_type or DEFAULT_CONTENT_TYPE
        )

    def get_bytes(self, bucket: str, key: str) -> bytes | None:
        """An object's bytes, None if it does not exist."""
        obj = self.objects.get((bucket, key))
        return obj.data if obj else None

    def _get(self, where: Location) -> StoredObject:
        obj = self.objects.get((where.bucket, where.key))
        if obj is None:
            raise AwsPermanentError("s3.GetObject", "NoSuchKey", f"{where.url} does not exist")
        return obj

    # --- MailStorePort ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def spooled(
        self,
        bucket: str,
        key: str,
        *,
        spool_dir: Path,
        max_bytes: int,
        mail_id: str | None = None,  # noqa: ARG002 - binds an encryption context; not modelled
    ) -> AsyncIterator[SpooledMail]:
        """The object in a private spool file (0600, removed when the block ends)."""
        obj = self.objects.get((bucket, key))
        if obj is None:
            raise ObjectMissingError(f"s3://{bucket}/{key} does not exist")
        if is_encrypted(obj.metadata):
            raise DecryptError(DECRYPT_UNSUPPORTED, "encrypted, and no KMS access configured")
        if len(obj.data) > max_bytes:
            raise TooLargeError(f"{len(obj.data)} bytes > MAILFLOW_MAX_MAIL_BYTES={max_bytes}")
        fd, name = tempfile.mkstemp(prefix="mail-", dir=spool_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(obj.data)
            yield SpooledMail(path, len(obj.data), obj.data[:HEAD_BUDGET_BYTES])
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # noqa: ASYNC240 - a local temp file

    async def head(self, where: Location) -> ObjectInfo | None:
        """The object's size, ETag, checksum and metadata; None if it does not exist."""
        obj = self.objects.get((where.bucket, where.key))
        if obj is None:
            return None
        return ObjectInfo(
            where=where,
            size_bytes=len(obj.data),
            etag=obj.etag,
            sha256_b64=obj.sha256_b64,
            content_type=obj.content_type,
            metadata=dict(obj.metadata),
        )

    async def list_objects(
        self,
        bucket: str,
        prefix: str,
        *,
        max_pages: int,
        start_after: str | None = None,
        page_keys: int = PAGE_KEYS,
    ) -> AsyncGenerator[Listed, None]:
        """Objects under `prefix` after `start_after`, in key order, at most `max_pages`
        pages of `page_keys`."""
        keys = sorted(
            k
            for (b, k) in self.objects
            if b == bucket and k.startswith(prefix) and (start_after is None or k > start_after)
        )
        for key in keys[: max_pages * page_keys]:
            obj = self.objects.get((bucket, key))
            if obj is not None:  # deleted while listing
                yield Listed(key, len(obj.data), obj.modified_at)

    async def read_prefix(self, where: Location, size_bytes: int) -> bytes:
        """The first `size_bytes` of the object."""
        obj = self._get(where)
        if is_encrypted(obj.metadata):
            raise DecryptError(DECRYPT_UNSUPPORTED, "encrypted, and no KMS access configured")
        return obj.data[:size_bytes]

    async def copy_verified(
        self, src: ObjectInfo, dest: Location, metadata: dict[str, str]
    ) -> tuple[ObjectInfo, str]:
        """Copy if the source still has the ETag we saw (PreconditionFailed otherwise)."""
        obj = self._get(src.where)
        if src.etag and obj.etag != src.etag:
            raise AwsPermanentError("s3.CopyObject", "PreconditionFailed", "ETag changed")
        digest = base64.b64encode(hashlib.sha256(obj.data).digest()).decode("ascii")
        self.objects[(dest.bucket, dest.key)] = StoredObject(
            data=obj.data,
            modified_at=self._clock(),
            metadata=fit_metadata(envelope_metadata(src.metadata), metadata),
            content_type=src.content_type or "message/rfc822",
            sha256_b64=digest,
        )
        dst = await self.head(dest)
        if dst is None:  # pragma: no cover - just written
            raise CopyMismatchError(f"{dest.url}: missing right after the copy")
        return dst, await self.verify_copy(src, dst)

    async def verify_copy(self, src: ObjectInfo, dst: ObjectInfo) -> str:
        """The real check (size, ETag, S3's SHA-256, else our own hash of the bytes)."""
        if src.size_bytes != dst.size_bytes:
            raise CopyMismatchError(
                f"{dst.where.url}: {dst.size_bytes} bytes, source {src.size_bytes}"
            )
        if src.etag and src.etag == dst.etag:
            return "etag"
        if src.sha256_b64 and dst.sha256_b64:
            if src.sha256_b64 != dst.sha256_b64:
                raise CopyMismatchError(f"{dst.where.url}: SHA-256 differs from {src.where.url}")
            return "sha256"
        mine = hashlib.sha256(self._get(src.where).data).digest()
        theirs = hashlib.sha256(self._get(dst.where).data).digest()
        if mine != theirs:
            raise CopyMismatchError(f"{dst.where.url}: SHA-256 differs from {src.where.url}")
        return "sha256_computed"

    async def delete(self, where: Location) -> None:
        """Delete an object; a missing one is no error."""
        self.objects.pop((where.bucket, where.key), None)
