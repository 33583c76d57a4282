"""The mail store, the same on every backend: spooling (sizes, missing objects, private files
removed on every path), HEAD, listings in key order with their pages, ranged reads, and the
verified archive copy conditional on the source's ETag."""

from __future__ import annotations

import stat

import pytest

from mailflow.aws import AwsPermanentError
from mailflow.aws.store import Location, make_spool_dir
from mailflow.errors import ObjectMissingError, PermanentError, TooLargeError
from mailflow.mail.summary import HEAD_BUDGET_BYTES

MAIL = b"From: shop@example.com\r\nSubject: order\r\n\r\n" + b"x" * 70_000


def test_a_mail_is_spooled_to_a_private_file_removed_after_the_block(backend, tmp_path) -> None:
    spool = make_spool_dir(tmp_path)

    async def scenario(b) -> None:
        await b.put("incoming/m1", MAIL)
        async with b.store.spooled(
            b.bucket, "incoming/m1", spool_dir=spool, max_bytes=len(MAIL)
        ) as mail:
            assert mail.path.read_bytes() == MAIL
            assert stat.S_IMODE(mail.path.stat().st_mode) == 0o600
            assert mail.size_bytes == len(MAIL)
            assert mail.head == MAIL[:HEAD_BUDGET_BYTES]
            assert not mail.encrypted
        assert not mail.path.exists()
        with pytest.raises(RuntimeError):
            async with b.store.spooled(b.bucket, "incoming/m1", spool_dir=spool, max_bytes=10**6):
                raise RuntimeError("the processor broke")
        with pytest.raises(TooLargeError):
            async with b.store.spooled(
                b.bucket, "incoming/m1", spool_dir=spool, max_bytes=len(MAIL) - 1
            ):
                pass
        with pytest.raises(ObjectMissingError):
            async with b.store.spooled(b.bucket, "incoming/none", spool_dir=spool, max_bytes=99):
                pass

    backend.run(scenario)
    assert list(spool.iterdir()) == []


def test_head_and_ranged_read(backend) -> None:
    async def scenario(b) -> None:
        await b.put("incoming/m1", MAIL)
        info = await b.store.head(Location(b.bucket, "incoming/m1"))
        assert info is not None
        assert info.size_bytes == len(MAIL)
        assert info.etag.startswith('"')
        assert not info.encrypted
        assert await b.store.head(Location(b.bucket, "incoming/none")) is None
        assert await b.store.read_prefix(Location(b.bucket, "incoming/m1"), 10) == MAIL[:10]
        short = await b.store.read_prefix(Location(b.bucket, "incoming/m1"), 10**6)
        assert short == MAIL  # a range past the end is the whole object
        with pytest.raises(AwsPermanentError):
            await b.store.read_prefix(Location(b.bucket, "incoming/none"), 10)

    backend.run(scenario)


def test_listing_is_in_key_order_and_paged(backend) -> None:
    async def scenario(b) -> None:
        keys = [f"incoming/{i:04d}" for i in range(25)]
        for key in reversed(keys):
            await b.put(key, b"m")
        await b.put("processed/0001", b"m")

        async def listed(**kwargs) -> list:
            pages = b.store.list_objects(b.bucket, "incoming/", page_keys=10, **kwargs)
            return [o async for o in pages]

        everything = await listed(max_pages=5)
        assert [o.key for o in everything] == keys  # three pages, in key order, one prefix
        assert {o.size_bytes for o in everything} == {1}
        assert [o.key for o in await listed(max_pages=1)] == keys[:10]
        assert [o.key for o in await listed(max_pages=1, start_after=keys[20])] == keys[21:]

    backend.run(scenario)


def test_an_archive_copy_is_verified_and_conditional_on_the_etag(backend) -> None:
    async def scenario(b) -> None:
        await b.put("incoming/m1", MAIL)
        src = await b.store.head(Location(b.bucket, "incoming/m1"))
        assert src is not None
        dest = Location(b.bucket, "processed/m1")
        dst, how = await b.store.copy_verified(src, dest, {"mailflow-mail-id": "m1"})
        assert dst.size_bytes == len(MAIL)
        assert dst.metadata == {"mailflow-mail-id": "m1"}
        assert dst.content_type == src.content_type == "binary/octet-stream"  # S3's default
        assert dst.sha256_b64  # S3 computes the copy's checksum
        assert how in {"etag", "sha256", "sha256_computed"}
        assert await b.store.verify_copy(src, dst) == how
        await b.store.delete(src.where)
        assert await b.store.head(src.where) is None
        await b.store.delete(src.where)  # deleting what is gone is no error
        # The source changed since it was looked at: S3 refuses the copy (CopySourceIfMatch);
        # moto copies anyway and the verification refuses it. Either way: a permanent error,
        # and the caller keeps the source.
        await b.put("incoming/m2", MAIL)
        seen = await b.store.head(Location(b.bucket, "incoming/m2"))
        assert seen is not None
        await b.put("incoming/m2", MAIL + b"changed")
        with pytest.raises(PermanentError):
            await b.store.copy_verified(seen, Location(b.bucket, "processed/m2"), {})

    backend.run(scenario)
