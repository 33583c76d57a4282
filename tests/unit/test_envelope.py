"""The S3 encryption client envelope and the streaming AES-GCM decryption, without AWS."""

from __future__ import annotations

import base64
import itertools
import json

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow.aws.envelope import (
    DECRYPT_BAD_ENVELOPE,
    DECRYPT_CONTEXT_MISMATCH,
    DECRYPT_TAG_MISMATCH,
    DECRYPT_UNSUPPORTED,
    DecryptError,
    GcmStream,
    decrypt_prefix,
    key_region,
    parse_envelope,
)
from mailflow.aws.store import USER_METADATA_BYTES, fit_metadata

# --- the envelope and the stream, without AWS --------------------------------------------------


def envelope_meta(**changes: str) -> dict[str, str]:
    meta = {
        "x-amz-key-v2": base64.b64encode(b"wrapped").decode(),
        "x-amz-iv": base64.b64encode(bytes(12)).decode(),
        "x-amz-cek-alg": "AES/GCM/NoPadding",
        "x-amz-wrap-alg": "kms",
        "x-amz-tag-len": "128",
        "x-amz-matdesc": json.dumps({"kms_cmk_id": "k", "aws:ses:message-id": "m1"}),
        "x-amz-unencrypted-content-length": "5",
    }
    return {k: v for k, v in (meta | changes).items() if v != "-"}


def test_unencrypted_objects_have_no_envelope() -> None:
    assert parse_envelope({}) is None
    assert parse_envelope({"mailflow-mail-id": "x"}) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"x-amz-key-v2": "-", "x-amz-key": "abc"}, DECRYPT_UNSUPPORTED),  # v1: CBC
        ({"x-amz-tag-len": "96"}, DECRYPT_UNSUPPORTED),
        ({"x-amz-iv": base64.b64encode(bytes(16)).decode()}, DECRYPT_BAD_ENVELOPE),
        ({"x-amz-key-v2": "not base64!"}, DECRYPT_BAD_ENVELOPE),
        ({"x-amz-matdesc": "{"}, DECRYPT_BAD_ENVELOPE),
        ({"x-amz-matdesc": "{}"}, DECRYPT_BAD_ENVELOPE),  # `kms` wrap without kms_cmk_id
        ({"x-amz-wrap-alg": "kms+context"}, DECRYPT_CONTEXT_MISMATCH),  # no aws:x-amz-cek-alg
        ({"x-amz-unencrypted-content-length": "-1"}, DECRYPT_BAD_ENVELOPE),
    ],
)
def test_malformed_envelopes_are_named(changes: dict[str, str], reason: str) -> None:
    with pytest.raises(DecryptError) as caught:
        parse_envelope(envelope_meta(**changes), mail_id="m1")
    assert caught.value.reason == reason


def test_envelope_bound_to_its_mail() -> None:
    assert parse_envelope(envelope_meta(), mail_id="m1") is not None
    with pytest.raises(DecryptError) as caught:
        parse_envelope(envelope_meta(), mail_id="m2")
    assert caught.value.reason == DECRYPT_CONTEXT_MISMATCH


@pytest.mark.parametrize("chunk", [1, 7, 15, 16, 17, 1000, 1 << 20])
def test_gcm_stream_matches_one_shot_decryption_at_any_chunking(chunk: int) -> None:
    key, iv = bytes(range(32)), bytes(12)
    plaintext = bytes(range(256)) * 125 + b"tail"
    sealed = AESGCM(key).encrypt(iv, plaintext, None)
    stream = GcmStream(key, iv)
    out = b"".join(stream.update(sealed[i : i + chunk]) for i in range(0, len(sealed), chunk))
    out += stream.finish()
    assert out == plaintext
    assert stream.plaintext_bytes == len(plaintext)

    broken = GcmStream(key, iv)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 0x80])  # the tag's last bit
    for i in range(0, len(tampered), chunk):
        broken.update(tampered[i : i + chunk])
    with pytest.raises(DecryptError) as caught:
        broken.finish()
    assert caught.value.reason == DECRYPT_TAG_MISMATCH


def test_archive_metadata_shortened_to_fit_beside_the_envelope() -> None:
    kept = envelope_meta() | {"x-amz-matdesc": "c" * 900}
    extra = {"mailflow-deliveries": "d" * 512, "mailflow-reasons": "r" * 512, "short": "s"}
    fitted = fit_metadata(kept, extra)
    assert sum(len(k) + len(v) for k, v in fitted.items()) <= USER_METADATA_BYTES
    assert {k: fitted[k] for k in kept} == kept  # the envelope is never cut
    assert fitted["short"] == "s"


KEY, IV = bytes(range(32)), bytes(range(12))


@settings(max_examples=200, deadline=None)
@given(
    plaintext=st.binary(max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=2016), max_size=8),
    flip=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_gcm_stream_any_chunking_any_single_bit_flip(
    plaintext: bytes, cuts: list[int], flip: int | None
) -> None:
    """Any split of the body decrypts to the plaintext; any one flipped bit is refused."""
    sealed = bytearray(AESGCM(KEY).encrypt(IV, plaintext, None))
    if flip is not None:
        bit = flip % (len(sealed) * 8)
        sealed[bit // 8] ^= 1 << (bit % 8)
    bounds = sorted({0, len(sealed), *(c for c in cuts if c <= len(sealed))})
    stream = GcmStream(KEY, IV)
    out = b"".join(stream.update(bytes(sealed[a:b])) for a, b in itertools.pairwise(bounds))
    if flip is None:
        assert out + stream.finish() == plaintext
        assert len(out) <= len(plaintext)
    else:
        with pytest.raises(DecryptError) as caught:
            stream.finish()
        assert caught.value.reason == DECRYPT_TAG_MISMATCH


def test_prefix_decryption_reads_a_header_without_the_tag() -> None:
    plaintext = b"Received: from x by y for ok-001@orders.example.com;\r\n\r\nbody"
    sealed = AESGCM(KEY).encrypt(IV, plaintext, None)
    assert decrypt_prefix(KEY, IV, sealed[:20]) == plaintext[:20]
    assert decrypt_prefix(KEY, IV, sealed[: len(plaintext)]) == plaintext


@pytest.mark.parametrize(
    ("key_id", "region"),
    [
        ("arn:aws:kms:us-west-2:123456789012:key/abc", "us-west-2"),
        ("arn:aws:kms:eu-west-1:123456789012:alias/aws/ses", "eu-west-1"),
        ("alias/mailflow-dev", None),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", None),
        ("arn:aws:s3:::bucket", None),
        (None, None),
    ],
)
def test_key_region_from_its_arn(key_id: str | None, region: str | None) -> None:
    assert key_region(key_id) == region
