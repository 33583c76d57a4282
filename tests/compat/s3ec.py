"""AWS's own S3 encryption client, driven from the command line (runs in .venv-s3ec only).

Its pins (boto3 >= 1.43, cryptography < 49) conflict with mailflow's, so the compatibility
test runs this script with a separate interpreter:

    s3ec.py encrypt BUCKET KEY KMS_KEY CONTEXT_JSON < plaintext   (kms+context, AES-GCM v2)
    s3ec.py decrypt BUCKET KEY KMS_KEY > plaintext                 (reads SES's `kms` wrap too)

Endpoint, region and credentials come from the AWS_* variables, as for any boto3 program.
"""

from __future__ import annotations

import json
import sys

import boto3
from s3_encryption import S3EncryptionClient, S3EncryptionClientConfig
from s3_encryption.materials import AlgorithmSuite, CommitmentPolicy, KmsKeyring


def client(key_id: str) -> S3EncryptionClient:
    keyring = KmsKeyring(
        kms_client=boto3.client("kms"),
        kms_key_id=key_id,
        enable_legacy_wrapping_algorithms=True,  # SES writes the `kms` wrap
    )
    config = S3EncryptionClientConfig(
        keyring=keyring,
        encryption_algorithm=AlgorithmSuite.ALG_AES_256_GCM_IV12_TAG16_NO_KDF,  # SES's format
        commitment_policy=CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT,
    )
    return S3EncryptionClient(wrapped_s3_client=boto3.client("s3"), config=config)


def main(argv: list[str]) -> int:
    command, bucket, key, key_id = argv[:4]
    s3 = client(key_id)
    if command == "encrypt":
        context = json.loads(argv[4])
        body = sys.stdin.buffer.read()
        s3.put_object(Bucket=bucket, Key=key, Body=body, EncryptionContext=context)
        return 0
    if command == "decrypt":
        sys.stdout.buffer.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        return 0
    sys.stderr.write(f"unknown command {command}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
