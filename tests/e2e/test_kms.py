"""Mail SES stored encrypted with a KMS key: moto server (S3 + KMS) over HTTP, real php-cli.

The emulator stores each mail the way an SES receipt rule with `KmsKeyArn` does (the Amazon S3
encryption client's envelope: AES-GCM body + tag, the KMS-wrapped data key and SES's encryption
context in the object's metadata); the worker must decrypt it into the spool, verify the tag
before the processor starts, and refuse anything altered, with a named reason.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailflow.aws import open_clients
from mailflow.aws.envelope import (
    DECRYPT_CONTEXT_MISMATCH,
    DECRYPT_TAG_MISMATCH,
    DECRYPT_UNSUPPORTED,
)
from mailflow.dev import ses
from mailflow.dev.provision import provision
from mailflow.routing import delivery_id
from support.harness import REPO, TESTS, Env, all_terminal, require_binary, run_worker_until, sample

RCPT = "ok-007@orders.example.com"


@pytest.fixture
def kenv(env: Env) -> Env:
    """`env` with an SES receipt-rule key: provision creates it, the emulator encrypts with it."""
    settings = env.with_settings(kms_key=f"alias/{env.settings.bucket}")

    async def setup() -> str:
        async with open_clients() as clients:
            return (await provision(clients, settings))["kms_key_arn"]

    arn = asyncio.run(setup())
    return Env(settings=settings, ledger_dir=env.ledger_dir, extra={"key_arn": arn})


def stdin_seen(env: Env, mail_id: str, recipient: str = RCPT, attempt: int = 1) -> bytes:
    safe = "".join(c if c.isalnum() else "_" for c in delivery_id(mail_id, recipient))
    return (env.ledger_dir / "stdin" / f"{safe}.{attempt}").read_bytes()


def decrypt_independently(env: Env, bucket: str, key: str) -> bytes:
    """The stored object decrypted in one piece with boto3 + AESGCM, not mailflow's stream."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    obj = env.boto("s3").get_object(Bucket=bucket, Key=key)
    meta = obj["Metadata"]
    data_key = env.boto("kms").decrypt(
        CiphertextBlob=base64.b64decode(meta["x-amz-key-v2"]),
        EncryptionContext=json.loads(meta["x-amz-matdesc"]),
    )["Plaintext"]
    return AESGCM(data_key).decrypt(base64.b64decode(meta["x-amz-iv"]), obj["Body"].read(), None)


def spool_files(env: Env) -> list[Path]:
    spool = env.settings.spool_dir
    assert spool is not None
    return [p for p in spool.rglob("*") if p.is_file()] if spool.exists() else []


def deliver(env: Env, raw: bytes, recipient: str = RCPT, alter: Any = None) -> dict[str, Any]:
    """Send one mail through the emulator, optionally alter the stored object, run a worker."""

    async def scenario() -> dict[str, Any]:
        async with open_clients() as clients:
            mail_id = await env.send(clients, raw, [recipient])
            if alter is not None:
                alter(env, f"{env.settings.incoming_prefix}{mail_id}")
            await run_worker_until(env.settings, clients, all_terminal(env, [mail_id]))
            (rec,) = await env.records(clients, mail_id)
            return rec

    return asyncio.run(scenario())


def rewrite(env: Env, key: str, body: Any = None, metadata: Any = None) -> None:
    """Put the object back with its body and/or metadata changed by the given functions."""
    s3 = env.boto("s3")
    obj = s3.get_object(Bucket=env.settings.bucket, Key=key)
    data, meta = obj["Body"].read(), obj["Metadata"]
    s3.put_object(
        Bucket=env.settings.bucket,
        Key=key,
        Body=body(data) if body else data,
        Metadata=metadata(meta) if metadata else meta,
    )


def with_context(**changes: str) -> Any:
    def change(meta: dict[str, str]) -> dict[str, str]:
        context = json.loads(meta["x-amz-matdesc"]) | changes
        return meta | {"x-amz-matdesc": json.dumps(context)}

    return change


# --- end to end -------------------------------------------------------------------------------


def test_encrypted_iso2022jp_mail_reaches_the_processor_byte_identical(kenv: Env) -> None:
    require_binary("php")
    raw = sample("order-001-iso2022jp.eml")
    rec = deliver(kenv, raw)
    assert (rec["status"], rec["reason"]) == ("succeeded", "ok")
    stored = kenv.boto("s3").get_object(Bucket=rec["bucket"], Key=rec["key"])
    assert stored["Metadata"]["x-amz-wrap-alg"] == "kms"
    assert raw not in stored["Body"].read()  # SES stored ciphertext
    plaintext = decrypt_independently(kenv, rec["bucket"], rec["key"])
    seen = stdin_seen(kenv, rec["mail_id"])
    assert seen == plaintext
    assert seen.endswith(raw)
    assert rec["size_bytes"] == len(plaintext)
    assert rec["subject"]  # the header summary is read from the plaintext
    assert spool_files(kenv) == []


@pytest.mark.parametrize(
    ("alter", "reason"),
    [
        pytest.param(  # one ciphertext bit flipped in the middle of the body
            lambda env, key: rewrite(env, key, body=lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:]),
            DECRYPT_TAG_MISMATCH,
            id="tampered-ciphertext",
        ),
        pytest.param(  # the tag cut off
            lambda env, key: rewrite(env, key, body=lambda b: b[:-16]),
            DECRYPT_TAG_MISMATCH,
            id="truncated",
        ),
        pytest.param(  # the context no longer what KMS bound the data key to
            lambda env, key: rewrite(env, key, metadata=with_context(**{"aws:ses:rule-name": "x"})),
            "decrypt_kms_refused",
            id="wrong-context",
        ),
        pytest.param(  # another mail's id: refused before KMS is asked
            lambda env, key: rewrite(
                env, key, metadata=with_context(**{"aws:ses:message-id": "other"})
            ),
            DECRYPT_CONTEXT_MISMATCH,
            id="context-of-another-mail",
        ),
        pytest.param(
            lambda env, key: rewrite(
                env, key, metadata=lambda m: m | {"x-amz-cek-alg": "AES/CBC/PKCS5Padding"}
            ),
            DECRYPT_UNSUPPORTED,
            id="unknown-algorithm",
        ),
        pytest.param(
            lambda env, key: rewrite(env, key, metadata=lambda m: m | {"x-amz-wrap-alg": "RSA"}),
            DECRYPT_UNSUPPORTED,
            id="unknown-wrap",
        ),
    ],
)
def test_altered_encrypted_mail_fails_named_without_running_the_processor(
    kenv: Env, alter: Any, reason: str
) -> None:
    require_binary("php")
    rec = deliver(kenv, sample("order-001-iso2022jp.eml"), alter=alter)
    assert (rec["status"], rec["reason"]) == ("failed", reason), rec.get("detail")
    assert rec["attempts"] == 1  # permanent: no retry
    assert kenv.starts() == []  # the processor never ran
    assert not (kenv.ledger_dir / "stdin").exists()
    assert spool_files(kenv) == []  # no plaintext left behind


def test_data_key_under_another_key_is_refused(kenv: Env) -> None:
    """MAILFLOW_KMS_KEY names the one key accepted: KMS refuses data keys wrapped by others."""
    require_binary("php")
    other = kenv.boto("kms").create_key()["KeyMetadata"]["Arn"]
    sender = Env(kenv.with_settings(kms_key=other), kenv.ledger_dir)
    raw = sample("order-001-iso2022jp.eml")

    async def scenario() -> dict[str, Any]:
        async with open_clients() as clients:
            mail_id = await sender.send(clients, raw, [RCPT])
            await run_worker_until(kenv.settings, clients, all_terminal(kenv, [mail_id]))
            (rec,) = await kenv.records(clients, mail_id)
            return rec

    rec = asyncio.run(scenario())
    assert (rec["status"], rec["reason"]) == ("failed", "decrypt_kms_refused")
    assert kenv.starts() == []


def test_archived_encrypted_mail_stays_decryptable_and_retry_delivers_it(kenv: Env) -> None:
    require_binary("php")
    from test_ops_cli import FIXED_ROUTE, mailflow, mailflow_json  # noqa: PLC0415

    recipient = "exit1-005@orders.example.com"
    rec = deliver(kenv, sample("order-001-iso2022jp.eml"), recipient)
    assert (rec["status"], rec["reason"]) == ("failed", "exit_1")
    mail_id = rec["mail_id"]
    first = stdin_seen(kenv, mail_id, recipient)
    extra = {"MAILFLOW_KMS_KEY": str(kenv.settings.kms_key)}
    mailflow(kenv, "reconcile", "--archive-grace", "0", extra=extra)
    archived = kenv.boto("s3").head_object(Bucket=kenv.settings.bucket, Key=f"failed/{mail_id}")
    assert archived["Metadata"]["x-amz-key-v2"]  # the envelope travelled with the copy
    assert archived["Metadata"]["mailflow-outcome"] == "failed"
    assert decrypt_independently(kenv, kenv.settings.bucket, f"failed/{mail_id}") == first
    shown = mailflow_json(kenv, "show", mail_id, extra=extra)
    assert shown[0]["object"]["archived"]["encrypted"] is True

    (done,) = mailflow_json(kenv, "retry", mail_id, extra=extra)
    assert done["result"] == "retried"

    async def run_fixed() -> dict[str, Any]:
        async with open_clients() as clients:
            fixed = kenv.with_settings(routes=(FIXED_ROUTE,))
            await run_worker_until(fixed, clients, all_terminal(kenv, [mail_id]))
            (rec,) = await kenv.records(clients, mail_id)
            return rec

    rec = asyncio.run(run_fixed())
    assert (rec["status"], rec["reason"]) == ("succeeded", "ok")
    safe = "".join(c if c.isalnum() else "_" for c in delivery_id(mail_id, recipient))
    assert (kenv.ledger_dir / "stdin" / f"{safe}.1").read_bytes() == first


def test_parse_decrypts_a_stored_object_and_refuses_a_tampered_one(kenv: Env) -> None:
    from test_ops_cli import mailflow, mailflow_json  # noqa: PLC0415

    raw = sample("order-001-iso2022jp.eml")

    async def send() -> str:
        async with open_clients() as clients:
            return await kenv.send(clients, raw, [RCPT])

    mail_id = asyncio.run(send())
    key = f"{kenv.settings.incoming_prefix}{mail_id}"
    url = f"s3://{kenv.settings.bucket}/{key}"
    extra = {"MAILFLOW_KMS_KEY": str(kenv.settings.kms_key)}
    doc = mailflow_json(kenv, "parse", url, extra=extra)
    assert doc["encrypted"] is True
    plaintext = decrypt_independently(kenv, kenv.settings.bucket, key)
    assert doc["sha256"] == hashlib.sha256(plaintext).hexdigest()
    assert doc["summary"]["subject"]  # read from the plaintext, not the ciphertext
    assert [d["recipient"] for d in doc["deliveries"]] == [RCPT]
    assert "encrypted (KMS)" in mailflow(kenv, "parse", url, extra=extra).stdout

    rewrite(kenv, key, body=lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    failed = mailflow(kenv, "parse", url, code=1, extra=extra)
    assert DECRYPT_TAG_MISMATCH in failed.stderr


def test_encrypted_orphan_is_recovered_from_its_decrypted_header(kenv: Env) -> None:
    """SES stored it encrypted, its notification was lost: the orphan scan reads the header."""
    require_binary("php")
    from test_reconcile import reconcile  # noqa: PLC0415

    from support.harness import SIMPLE_MAIL  # noqa: PLC0415

    mail_id = ses.new_message_id()
    key = f"{kenv.settings.incoming_prefix}{mail_id}"
    stored = ses.ses_headers(mail_id, "shop@example.com", [RCPT], datetime.now(UTC)) + SIMPLE_MAIL

    async def scenario() -> list[dict[str, Any]]:
        async with open_clients() as clients:
            body, meta = await ses.encrypt_as_ses(
                clients, str(kenv.settings.kms_key), mail_id, stored
            )
            await clients.s3.put_object(
                Bucket=kenv.settings.bucket, Key=key, Body=body, Metadata=meta
            )
            report = await reconcile(kenv, clients)
            (act,) = [a for a in report.actions if a.phase == "orphans"]
            assert (act.what, act.result, act.recipient) == ("recovered", "done", RCPT)
            await run_worker_until(kenv.settings, clients, all_terminal(kenv, [mail_id]))
            return await kenv.records(clients, mail_id)

    (rec,) = asyncio.run(scenario())
    assert (rec["status"], rec["reason"]) == ("succeeded", "ok")
    assert stdin_seen(kenv, mail_id) == stored


def test_smtp_emulator_stores_mail_encrypted_like_ses(kenv: Env) -> None:
    """`mailflow smtp` with MAILFLOW_KMS_KEY: the stored object is SES's encrypted form."""
    import smtplib  # noqa: PLC0415

    from mailflow.dev.smtp import EmulatorThread  # noqa: PLC0415

    sent = sample("order-002-shiftjis.eml")
    with (
        EmulatorThread(kenv.settings, domains=["orders.example.com"]) as emu,
        smtplib.SMTP(emu.host, emu.port, timeout=30) as client,
    ):
        client.ehlo("client.example.net")
        assert client.sendmail("shop@example.com", [RCPT], sent) == {}
    listed = kenv.boto("s3").list_objects_v2(Bucket=kenv.settings.bucket)["Contents"]
    (key,) = [o["Key"] for o in listed]
    stored = kenv.boto("s3").get_object(Bucket=kenv.settings.bucket, Key=key)
    context = json.loads(stored["Metadata"]["x-amz-matdesc"])
    assert context["aws:ses:message-id"] == key.removeprefix(kenv.settings.incoming_prefix)
    assert sent not in stored["Body"].read()
    assert decrypt_independently(kenv, kenv.settings.bucket, key).endswith(sent)


# --- memory: 16 encrypted 40 MiB mails at once -------------------------------------------------

#: `make bench`'s peak-RSS target, 16 concurrent 40 MiB mails (bench/report.py).
BENCH_PEAK_RSS_MB = 150.0
MIB = 1024 * 1024


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_sixteen_encrypted_40mib_mails_stay_within_the_bench_memory_figure(
    kenv: Env, tmp_path: Path
) -> None:
    """A `mailflow worker` process decrypts 16 × 40 MiB at once; its peak RSS stays in bounds."""
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415

    from mailflow.config import Route  # noqa: PLC0415
    from support.harness import start_worker_process  # noqa: PLC0415

    sha = require_binary("sha256sum")
    route = Route(name="hash", match=r"ok-(?P<store>[0-9]{3})@orders\.example\.com", command=sha)
    settings = kenv.with_settings(routes=(route,), concurrency=16, processor_timeout_s=60)
    big = Env(settings, kenv.ledger_dir)
    head = b"From: shop@example.com\r\nTo: ok-001@orders.example.com\r\nSubject: big\r\n\r\n"
    lines = (40 * MIB - 4096 - len(head)) // 78  # SES headers go on top: stay under 40 MiB
    raw = head + (b"x" * 76 + b"\r\n") * lines

    async def send_all() -> list[str]:
        async with open_clients() as clients:
            return [
                await big.send(clients, raw, [f"ok-{i:03d}@orders.example.com"]) for i in range(16)
            ]

    mail_ids = asyncio.run(send_all())
    proc = start_worker_process(settings, tmp_path / "worker.log")
    try:

        async def wait_done() -> list[dict[str, Any]]:
            async with open_clients() as clients:
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    recs = [r for m in mail_ids for r in await big.records(clients, m)]
                    if len(recs) == 16 and all(
                        r["status"] in {"succeeded", "failed"} for r in recs
                    ):
                        return recs
                    await asyncio.sleep(0.5)
            raise AssertionError("16 big mails not done in 240 s")

        records = asyncio.run(wait_done())
        peak_mb = vm_hwm_mb(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    print(f"peak RSS of the worker, 16 encrypted 40 MiB mails: {peak_mb:.1f} MB")
    assert {(r["status"], r["reason"]) for r in records} == {("succeeded", "ok")}
    assert all(40 * MIB - 8192 < r["size_bytes"] <= 40 * MIB for r in records)
    first = records[0]
    expected = hashlib.sha256(decrypt_independently(big, first["bucket"], first["key"])).hexdigest()
    assert first["stdout_tail"].split()[0] == expected  # the processor read the plaintext
    assert peak_mb <= BENCH_PEAK_RSS_MB


# --- compatibility with AWS's own S3 encryption client --------------------------------------

S3EC_PYTHON = REPO / ".venv-s3ec" / "bin" / "python"


def s3ec(*args: str, stdin: bytes = b"") -> bytes:
    """Run AWS's client (tests/compat/s3ec.py) in its own venv, against the moto server."""
    if not S3EC_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail("CI needs .venv-s3ec: make .venv-s3ec/.installed")
        pytest.skip("no .venv-s3ec (make .venv-s3ec/.installed)")
    done = subprocess.run(
        [str(S3EC_PYTHON), str(TESTS / "compat" / "s3ec.py"), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout


def test_mail_encrypted_by_aws_s3_encryption_client_is_delivered(kenv: Env) -> None:
    """AWS's client encrypts (kms+context wrap) under SES's context; the worker decrypts."""
    require_binary("php")
    s = kenv.settings
    raw = sample("order-001-iso2022jp.eml")
    mail_id = ses.new_message_id()
    key = f"{s.incoming_prefix}{mail_id}"
    now = datetime.now(UTC)
    stored = ses.ses_headers(mail_id, "shop@example.com", [RCPT], now) + raw
    context = {
        "aws:ses:message-id": mail_id,
        "aws:ses:rule-name": "inbound",
        "aws:ses:source-account": "123456789012",
    }
    s3ec("encrypt", s.bucket, key, str(s.kms_key), json.dumps(context), stdin=stored)
    meta = kenv.boto("s3").head_object(Bucket=s.bucket, Key=key)["Metadata"]
    assert meta["x-amz-wrap-alg"] == "kms+context"
    assert meta["x-amz-cek-alg"] == "AES/GCM/NoPadding"

    async def scenario() -> dict[str, Any]:
        async with open_clients() as clients:
            arn = await ses.topic_arn(clients, s)
            notification = ses.received_notification(
                mail_id=mail_id, bucket=s.bucket, key=key, prefix=s.incoming_prefix,
                topic_arn=arn, sender="shop@example.com", recipients=[RCPT],
                common_headers={}, now=now,
            )  # fmt: skip
            await clients.sns.publish(TopicArn=arn, Message=json.dumps(notification))
            await run_worker_until(s, clients, all_terminal(kenv, [mail_id]))
            (rec,) = await kenv.records(clients, mail_id)
            return rec

    rec = asyncio.run(scenario())
    assert (rec["status"], rec["reason"]) == ("succeeded", "ok"), rec.get("detail")
    assert stdin_seen(kenv, mail_id) == stored


def test_mail_encrypted_like_ses_is_read_by_aws_s3_encryption_client(kenv: Env) -> None:
    """What the emulator stores (SES's `kms` wrap) decrypts with AWS's client to the same bytes."""
    raw = sample("order-002-shiftjis.eml")

    async def send() -> str:
        async with open_clients() as clients:
            return await kenv.send(clients, raw, [RCPT])

    mail_id = asyncio.run(send())
    key = f"{kenv.settings.incoming_prefix}{mail_id}"
    theirs = s3ec("decrypt", kenv.settings.bucket, key, str(kenv.settings.kms_key))
    assert theirs.endswith(raw)
    assert theirs == decrypt_independently(kenv, kenv.settings.bucket, key)
