"""Names and shapes mailflow's code relies on in its AWS resources: the one source.

`mailflow provision` (dev/provision.py) creates resources from these values, Settings takes
its defaults from them, and the Terraform module (infra/terraform/modules/mailflow) reads the
same values from `shapes.tf.json`, which `terraform_locals()` generates
(`make terraform-shapes`) and tests/test_terraform.py keeps identical to this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

# --- S3 key prefixes -------------------------------------------------------------------------
# SES writes new mail under the incoming prefix; the reconciler moves finished mail under one
# of the archive prefixes (lifecycle rules expire each of them on its own retention).
INCOMING_PREFIX: Final = "incoming/"
PROCESSED_PREFIX: Final = "processed/"
FAILED_PREFIX: Final = "failed/"
QUARANTINE_PREFIX: Final = "quarantine/"

# --- SQS -------------------------------------------------------------------------------------
DLQ_SUFFIX: Final = "-dlq"  # the DLQ's name is the queue's name + this
# Every receive counts towards the redrive threshold, deferrals included: keep a wide margin
# over the worker's own attempt limit, so SQS never dead-letters a mail the worker still retries.
MIN_RECEIVE_COUNT: Final = 10
RECEIVES_PER_ATTEMPT: Final = 3
QUEUE_RETENTION_S: Final = 14 * 24 * 3600  # SQS's maximum, for the queue and its DLQ
VISIBILITY_TIMEOUT_S: Final = 60  # the worker extends it per message while it works
WAIT_TIME_S: Final = 20  # long polling, SQS's maximum

# --- DynamoDB (the delivery ledger) ------------------------------------------------------------
HASH_KEY: Final = "mail_id"
RANGE_KEY: Final = "recipient"
ATTENTION_INDEX: Final = "attention"  # what needs a look: status + when, without a Scan
ATTENTION_HASH_KEY: Final = "attn"
ATTENTION_RANGE_KEY: Final = "attn_at"
TTL_ATTRIBUTE: Final = "expires_at"
# DynamoDB attribute types of every key attribute (table and index).
KEY_TYPES: Final = {
    HASH_KEY: "S",
    RANGE_KEY: "S",
    ATTENTION_HASH_KEY: "S",
    ATTENTION_RANGE_KEY: "N",
}


def dlq_name(queue: str) -> str:
    """Name (or URL: SQS URLs end in the name) of the DLQ that belongs to `queue`."""
    return f"{queue}{DLQ_SUFFIX}"


def max_receive_count(max_attempts: int) -> int:
    """SQS redrive threshold for a worker that makes `max_attempts` attempts per delivery."""
    return max(MIN_RECEIVE_COUNT, RECEIVES_PER_ATTEMPT * max_attempts)


def terraform_locals() -> dict[str, Any]:
    """The same values as a Terraform JSON configuration: `local.shapes` in the module."""
    shapes = {
        "incoming_prefix": INCOMING_PREFIX,
        "archive_prefixes": {
            "processed": PROCESSED_PREFIX,
            "failed": FAILED_PREFIX,
            "quarantine": QUARANTINE_PREFIX,
        },
        "dlq_suffix": DLQ_SUFFIX,
        "min_receive_count": MIN_RECEIVE_COUNT,
        "receives_per_attempt": RECEIVES_PER_ATTEMPT,
        "queue_retention_s": QUEUE_RETENTION_S,
        "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
        "wait_time_s": WAIT_TIME_S,
        "hash_key": HASH_KEY,
        "range_key": RANGE_KEY,
        "attention_index": ATTENTION_INDEX,
        "attention_hash_key": ATTENTION_HASH_KEY,
        "attention_range_key": ATTENTION_RANGE_KEY,
        "ttl_attribute": TTL_ATTRIBUTE,
        "key_types": KEY_TYPES,
    }
    return {
        "//": "Generated from src/mailflow/aws/shapes.py by `make terraform-shapes`; do not edit.",
        "locals": {"shapes": shapes},
    }


def write_terraform_locals(path: Path) -> None:
    """Write `terraform_locals()` to `path` (the module's shapes.tf.json)."""
    path.write_text(json.dumps(terraform_locals(), indent=2) + "\n", encoding="utf-8")
