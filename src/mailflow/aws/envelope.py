"""Client-side encrypted mail: the Amazon S3 encryption client's envelope, as SES writes it.

An SES receipt rule whose S3 action names a `KmsKeyArn` does not store the mail in clear: it
asks KMS for a fresh AES-256 data key, encrypts the mail with AES-GCM, and stores the KMS-wrapped
data key and the parameters in the object's user metadata (the Amazon S3 encryption client's
"v2" format):

    x-amz-key-v2                      the KMS-wrapped data key, base64
    x-amz-iv                          the 12-byte GCM nonce, base64
    x-amz-cek-alg                     AES/GCM/NoPadding
    x-amz-tag-len                     128: the GCM tag is the object's last 16 bytes
    x-amz-wrap-alg                    kms (SES; the context carries `kms_cmk_id`) or
                                      kms+context (newer clients; it carries aws:x-amz-cek-alg)
    x-amz-matdesc                     JSON: the KMS encryption context. SES's has
                                      aws:ses:message-id, aws:ses:rule-name, aws:ses:source-account
    x-amz-unencrypted-content-length  the plaintext's size

This module reads that envelope and decrypts the body as a stream; it does no I/O except the
one KMS call that unwraps the data key (`unwrap_data_key`, through the boundary's `call`).
Anything it cannot decrypt is a `DecryptError`, permanent, with a `decrypt_*` reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailflow import aws
from mailflow.aws.boundary import AwsPermanentError
from mailflow.errors import PermanentError

# --- the metadata names (S3 user metadata, so `x-amz-meta-` on the wire) ---------------------
KEY_V1 = "x-amz-key"
KEY_V2 = "x-amz-key-v2"
IV = "x-amz-iv"
CEK_ALG = "x-amz-cek-alg"
WRAP_ALG = "x-amz-wrap-alg"
TAG_LEN = "x-amz-tag-len"
MATDESC = "x-amz-matdesc"
PLAINTEXT_LENGTH = "x-amz-unencrypted-content-length"
INSTRUCTION_FILE = "x-amz-crypto-instr-file"
KEY_V3 = "x-amz-3"  # the key-committing format of newer clients; SES does not write it

GCM = "AES/GCM/NoPadding"
WRAP_KMS = "kms"
WRAP_KMS_CONTEXT = "kms+context"
CONTEXT_KEY_ID = "kms_cmk_id"  # what the `kms` wrap puts into the context
CONTEXT_CEK_ALG = "aws:x-amz-cek-alg"  # what the `kms+context` wrap puts into the context
SES_MESSAGE_ID = "aws:ses:message-id"
IV_BYTES = 12
TAG_BYTES = 16
DATA_KEY_BYTES = 32

# --- why a decryption failed: the delivery's `reason` -----------------------------------------
DECRYPT_UNSUPPORTED = "decrypt_unsupported"  # an algorithm, wrap or format we do not accept
DECRYPT_BAD_ENVELOPE = "decrypt_bad_envelope"  # metadata missing or malformed
DECRYPT_CONTEXT_MISMATCH = "decrypt_context_mismatch"  # the context names another mail/alg
DECRYPT_KMS_REFUSED = "decrypt_kms_refused"  # KMS said no: wrong key, context, access
DECRYPT_TAG_MISMATCH = "decrypt_tag_mismatch"  # ciphertext or tag altered
DECRYPT_LENGTH_MISMATCH = "decrypt_length_mismatch"  # plaintext size differs from the envelope


class DecryptError(PermanentError):
    """The stored object cannot be decrypted; `reason` is one of the `decrypt_*` names."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Envelope:
    """What decrypting one object needs, read from its metadata."""

    wrapped_key: bytes
    iv: bytes
    wrap_alg: str
    context: dict[str, str]
    plaintext_bytes: int | None

    @property
    def key_id(self) -> str | None:
        """The KMS key the context names (`kms` wrap only)."""
        return self.context.get(CONTEXT_KEY_ID)


def is_encrypted(metadata: Mapping[str, str]) -> bool:
    """Does this object carry an encryption client's envelope (any version)?"""
    return any(name in metadata for name in (KEY_V1, KEY_V2, KEY_V3, INSTRUCTION_FILE))


def envelope_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The envelope part of an object's user metadata: what a copy must keep to stay readable."""
    return {k: v for k, v in metadata.items() if k.lower().startswith("x-amz-")}


def _b64(metadata: Mapping[str, str], name: str) -> bytes:
    try:
        return base64.b64decode(metadata[name], validate=True)
    except KeyError:
        raise DecryptError(DECRYPT_BAD_ENVELOPE, f"{name} missing") from None
    except (binascii.Error, ValueError):
        raise DecryptError(DECRYPT_BAD_ENVELOPE, f"{name} is not base64") from None


def _context(raw: str | None) -> dict[str, str]:
    if raw is None:
        raise DecryptError(DECRYPT_BAD_ENVELOPE, f"{MATDESC} missing")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise DecryptError(DECRYPT_BAD_ENVELOPE, f"{MATDESC} is not JSON") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise DecryptError(DECRYPT_BAD_ENVELOPE, f"{MATDESC} is not a string map")
    return value


def _algorithms(metadata: Mapping[str, str]) -> tuple[str, str]:
    """(cek_alg, wrap_alg), if they are the ones SES uses; else `decrypt_unsupported`."""
    if KEY_V2 not in metadata:
        # v1 (AES/CBC, unauthenticated), v3 and instruction files: not what SES writes.
        raise DecryptError(DECRYPT_UNSUPPORTED, "only the v2 envelope (x-amz-key-v2) is accepted")
    if INSTRUCTION_FILE in metadata:
        raise DecryptError(DECRYPT_UNSUPPORTED, "instruction files are not read")
    cek_alg = metadata.get(CEK_ALG)
    if cek_alg != GCM:
        raise DecryptError(DECRYPT_UNSUPPORTED, f"{CEK_ALG}={cek_alg!r}, only {GCM}")
    tag_len = metadata.get(TAG_LEN)
    if tag_len != str(TAG_BYTES * 8):
        raise DecryptError(DECRYPT_UNSUPPORTED, f"{TAG_LEN}={tag_len!r}, only {TAG_BYTES * 8}")
    wrap_alg = metadata.get(WRAP_ALG)
    if wrap_alg not in (WRAP_KMS, WRAP_KMS_CONTEXT):
        raise DecryptError(DECRYPT_UNSUPPORTED, f"{WRAP_ALG}={wrap_alg!r}, only kms, kms+context")
    return cek_alg, wrap_alg


def _check_binding(
    context: dict[str, str], cek_alg: str, wrap_alg: str, mail_id: str | None
) -> None:
    """The context belongs to this algorithm and this mail (KMS then checks the rest)."""
    if wrap_alg == WRAP_KMS_CONTEXT and context.get(CONTEXT_CEK_ALG) != cek_alg:
        # The context is authenticated by KMS; the algorithm header is not, except through it.
        raise DecryptError(DECRYPT_CONTEXT_MISMATCH, f"{CONTEXT_CEK_ALG} differs from {CEK_ALG}")
    if wrap_alg == WRAP_KMS and CONTEXT_KEY_ID not in context:
        raise DecryptError(DECRYPT_BAD_ENVELOPE, f"{MATDESC} has no {CONTEXT_KEY_ID}")
    bound_to = context.get(SES_MESSAGE_ID)
    if mail_id is not None and bound_to is not None and bound_to != mail_id:
        raise DecryptError(
            DECRYPT_CONTEXT_MISMATCH, f"encrypted for SES message {bound_to!r}, not {mail_id!r}"
        )


def parse_envelope(metadata: Mapping[str, str], *, mail_id: str | None = None) -> Envelope | None:
    """The object's envelope; None for an unencrypted object. Raises `DecryptError`.

    `mail_id`, when given, must be the SES message id the context was bound to: an encrypted
    object moved under another mail's key is refused before KMS is asked.
    """
    if not is_encrypted(metadata):
        return None
    cek_alg, wrap_alg = _algorithms(metadata)
    wrapped_key = _b64(metadata, KEY_V2)
    iv = _b64(metadata, IV)
    if len(iv) != IV_BYTES or not wrapped_key:
        raise DecryptError(DECRYPT_BAD_ENVELOPE, f"{IV} must be {IV_BYTES} bytes, key non-empty")
    context = _context(metadata.get(MATDESC))
    _check_binding(context, cek_alg, wrap_alg, mail_id)
    plaintext_bytes: int | None = None
    if (raw_len := metadata.get(PLAINTEXT_LENGTH)) is not None:
        if not raw_len.isdigit():
            raise DecryptError(DECRYPT_BAD_ENVELOPE, f"{PLAINTEXT_LENGTH}={raw_len!r}")
        plaintext_bytes = int(raw_len)
    return Envelope(wrapped_key, iv, wrap_alg, context, plaintext_bytes)


def key_region(key_id: str | None) -> str | None:
    """The region in a KMS key or alias ARN (`arn:aws:kms:REGION:ACCOUNT:key/...`); else None."""
    if key_id is None or not key_id.startswith("arn:"):
        return None
    parts = key_id.split(":")
    if len(parts) < 6 or parts[2] != "kms" or not parts[3]:
        return None
    return parts[3]


class GcmStream:
    """AES-GCM decryption of a body whose last 16 bytes are the tag, fed in chunks.

    Holds back the last 16 bytes seen (they may be the tag), so memory is one chunk, whatever
    the size of the mail. Plaintext handed out before `finish()` is *unauthenticated*: the
    caller may only write it somewhere private and must discard it unless `finish()` returns.
    """

    def __init__(self, data_key: bytes, iv: bytes) -> None:
        if len(data_key) != DATA_KEY_BYTES:
            raise DecryptError(DECRYPT_BAD_ENVELOPE, f"data key is {len(data_key)} bytes")
        self._decryptor = Cipher(algorithms.AES(data_key), modes.GCM(iv)).decryptor()
        self._tail = b""
        self.plaintext_bytes = 0

    def update(self, chunk: bytes) -> bytes:
        """Decrypt what is certainly ciphertext so far; keep the possible tag back."""
        held = self._tail + chunk
        if len(held) <= TAG_BYTES:
            self._tail = held
            return b""
        self._tail = held[-TAG_BYTES:]
        out = self._decryptor.update(held[:-TAG_BYTES])
        self.plaintext_bytes += len(out)
        return out

    def finish(self) -> bytes:
        """Verify the tag (the bytes held back); raise `DecryptError` if it does not match."""
        if len(self._tail) < TAG_BYTES:
            raise DecryptError(DECRYPT_TAG_MISMATCH, "object shorter than its GCM tag")
        try:
            out = self._decryptor.finalize_with_tag(self._tail)
        except InvalidTag:
            raise DecryptError(DECRYPT_TAG_MISMATCH, "GCM tag does not match") from None
        self.plaintext_bytes += len(out)
        return out


def decrypt_prefix(data_key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """The plaintext of the body's first bytes, *unauthenticated* (the tag is at the end).

    For reading a header block only (the reconciler's orphan scan: who is the mail for?). A
    forged prefix can at worst name a recipient whose delivery then fails its tag check.
    """
    if len(data_key) != DATA_KEY_BYTES:
        raise DecryptError(DECRYPT_BAD_ENVELOPE, f"data key is {len(data_key)} bytes")
    return Cipher(algorithms.AES(data_key), modes.GCM(iv)).decryptor().update(ciphertext)


def check_length(envelope: Envelope, plaintext_bytes: int) -> None:
    """The plaintext has the size the envelope announced (when it announced one)."""
    if envelope.plaintext_bytes is not None and envelope.plaintext_bytes != plaintext_bytes:
        raise DecryptError(
            DECRYPT_LENGTH_MISMATCH,
            f"{plaintext_bytes} bytes, envelope says {envelope.plaintext_bytes}",
        )


async def unwrap_data_key(kms: Any, envelope: Envelope, *, key_id: str | None) -> bytes:
    """Ask KMS for the plaintext data key, under the stored encryption context.

    `key_id`, when set, is the one key mailflow accepts: KMS refuses a data key wrapped by any
    other. Refusals (wrong key, wrong context, access denied, disabled key) are permanent
    `decrypt_kms_refused`; throttling and outages stay transient (the boundary retries them).
    """
    kwargs: dict[str, Any] = {
        "CiphertextBlob": envelope.wrapped_key,
        "EncryptionContext": envelope.context,
    }
    if key_id:
        kwargs["KeyId"] = key_id
    try:
        resp = await aws.call("kms.Decrypt", kms.decrypt, **kwargs)
    except AwsPermanentError as exc:
        raise DecryptError(DECRYPT_KMS_REFUSED, str(exc)) from exc
    data_key = resp.get("Plaintext")
    if not isinstance(data_key, bytes) or len(data_key) != DATA_KEY_BYTES:
        raise DecryptError(DECRYPT_BAD_ENVELOPE, "KMS returned no 256-bit data key")
    return data_key


# --- the writing side, as SES does it (the development emulator and the tests) ---------------


async def describe_key_arn(kms: Any, key_id: str) -> str:
    """The ARN of a key given by id, ARN or alias."""
    resp = await aws.call("kms.DescribeKey", kms.describe_key, KeyId=key_id)
    return str(resp["KeyMetadata"]["Arn"])


def ses_context(*, mail_id: str, rule_name: str, account: str, key_id: str) -> dict[str, str]:
    """The encryption context SES's S3 action uses (with the `kms` wrap's `kms_cmk_id`)."""
    return {
        SES_MESSAGE_ID: mail_id,
        "aws:ses:rule-name": rule_name,
        "aws:ses:source-account": account,
        CONTEXT_KEY_ID: key_id,
    }


async def seal(
    kms: Any,
    plaintext: bytes,
    *,
    key_id: str,
    context: dict[str, str],
) -> tuple[bytes, dict[str, str]]:
    """Encrypt a whole mail as SES does: (AES-GCM ciphertext + tag, the envelope metadata).

    In memory: this is the emulator's side (development and tests), not the worker's.
    """
    resp = await aws.call(
        "kms.GenerateDataKey",
        kms.generate_data_key,
        KeyId=key_id,
        KeySpec="AES_256",
        EncryptionContext=context,
    )
    iv = os.urandom(IV_BYTES)
    body = AESGCM(resp["Plaintext"]).encrypt(iv, plaintext, None)
    metadata = {
        KEY_V2: base64.b64encode(resp["CiphertextBlob"]).decode("ascii"),
        IV: base64.b64encode(iv).decode("ascii"),
        CEK_ALG: GCM,
        WRAP_ALG: WRAP_KMS,
        TAG_LEN: str(TAG_BYTES * 8),
        MATDESC: json.dumps(context, separators=(",", ":")),
        PLAINTEXT_LENGTH: str(len(plaintext)),
    }
    return body, metadata
