"""Settings: every knob is an environment variable `MAILFLOW_*` (or a line in `.env`).

AWS endpoint and region are deliberately *not* here: botocore reads `AWS_ENDPOINT_URL`,
`AWS_ENDPOINT_URL_<SERVICE>` and `AWS_DEFAULT_REGION` itself, so mailflow behaves like every
other AWS tool on the box.
"""

from __future__ import annotations

import json
import shlex
import string
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, Self

import regex
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mailflow.aws import shapes

MIB = 1024 * 1024

#: Placeholders every route template may use, besides the route's own named groups.
BUILTIN_PLACEHOLDERS = frozenset(
    {"recipient", "local", "domain", "extension", "sender", "mail_id"},
)


class Route(BaseModel):
    """One line of the old /etc/aliases, as data.

    `match` is full-matched against the lower-cased envelope recipient; its named groups
    become placeholders in `command`. `key` names the group (or builtin) that identifies a
    tenant for `max_in_flight_per_key`: at most that many runs of one key at once across every
    worker of the service (slots in the DynamoDB table, renewed with the delivery lease), so
    one store's orders never run concurrently when the legacy stock update cannot take it.
    A crashed holder's slot is free again when its lease expires (`lease_s`); a holder that
    cannot renew for a whole lease may overlap the next one until its heartbeat learns it
    (docs/guarantees.md §8).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    match: str
    command: str
    key: str | None = None
    max_in_flight_per_key: Annotated[int, Field(ge=1)] | None = None

    @field_validator("match")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        try:
            regex.compile(value)
        except regex.error as exc:
            raise ValueError(f"regex does not compile: {exc}") from None
        return value

    @model_validator(mode="after")
    def _placeholders_known(self) -> Self:
        groups = set(regex.compile(self.match).groupindex)
        known = groups | BUILTIN_PLACEHOLDERS
        for field in template_fields(self.command):
            if field not in known:
                raise ValueError(
                    f"route {self.name!r}: command names unknown placeholder {{{field}}}"
                    f" (known: {', '.join(sorted(known))})",
                )
        if self.key is not None and self.key not in known:
            raise ValueError(f"route {self.name!r}: key {self.key!r} is not a placeholder")
        if self.max_in_flight_per_key is not None and self.key is None:
            raise ValueError(f"route {self.name!r}: max_in_flight_per_key needs a key")
        if not self.command.strip():
            raise ValueError(f"route {self.name!r}: empty command")
        try:  # as routing splits it, once, at start: not at the first matching delivery
            shlex.split(self.command)
        except ValueError as exc:
            raise ValueError(f"route {self.name!r}: command does not split: {exc}") from None
        return self


def template_fields(template: str) -> list[str]:
    """Names of the `{placeholders}` in a command template (format-spec syntax)."""
    fields: list[str] = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{field}}} must be a plain name")
        fields.append(field)
    return fields


#: What the processor must never get through MAILFLOW_PASS_ENV: the worker's AWS access.
#: Every AWS_* variable (keys, session token, profile, the container and web-identity
#: credential sources) and the non-prefixed ones AWS SDKs also read.
CREDENTIAL_PREFIXES = ("AWS_",)
CREDENTIAL_NAMES = frozenset({"AMAZON_ACCESS_KEY_ID", "AMAZON_SECRET_ACCESS_KEY"})


DEFAULT_ROUTES = (
    Route(
        name="store",
        match=r"ne-(?P<store>[0-9]{3})@.+",
        command="php examples/legacy/receive_mail.php {store}",
        key="store",
    ),
)


def _split_list(value: object, convert: Callable[[str], object]) -> object:
    """An environment list: JSON (`["a", "b"]`) or comma-separated (`a, b`), each converted."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return tuple(json.loads(value))
        return tuple(convert(v.strip()) for v in value.split(",") if v.strip())
    return value


#: DynamoDB TTLs count retention in days.
SECONDS_PER_DAY = 86_400


class Settings(BaseSettings):
    """The whole configuration of one mailflow process."""

    model_config = SettingsConfigDict(
        env_prefix="MAILFLOW_",
        populate_by_name=True,  # Settings(health_file=…) as well as its environment names
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # --- resources --------------------------------------------------------------------------
    bucket: str = "mailflow-mail"
    incoming_prefix: str = shapes.INCOMING_PREFIX
    allowed_buckets: Annotated[tuple[str, ...], NoDecode] = ()
    topic: str = "mailflow-inbound"
    queue: str = "mailflow-inbound"
    table: str = "mailflow-deliveries"
    processed_prefix: str = shapes.PROCESSED_PREFIX
    failed_prefix: str = shapes.FAILED_PREFIX
    quarantine_prefix: str = shapes.QUARANTINE_PREFIX
    archive_bucket: str | None = None
    #: Where SES receives: the bucket, its topic and the KMS key live there; S3, SNS and KMS
    #: clients are made for it. None: the process's own region (AWS_DEFAULT_REGION).
    mail_region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")] | None = None
    #: The KMS key of the SES receipt rule's S3 action (key ARN, alias ARN or alias/NAME).
    #: Encrypted mail is decrypted only under this key. In development, `provision` creates it
    #: (an alias) and `send`/`smtp` encrypt with it, as SES does. None: any key the envelope
    #: names (IAM then decides), and the emulator stores mail unencrypted.
    kms_key: str | None = None
    #: Which client sends the worker's hot AWS calls (S3 GetObject, SQS receive/delete/
    #: visibility, DynamoDB item writes): "botocore", or "lean" (mailflow.aws.lean: the same
    #: requests, answers and errors at about a third of the CPU; see docs/performance.md).
    aws_client: Literal["botocore", "lean"] = "botocore"

    # --- routing ----------------------------------------------------------------------------
    routes: Annotated[tuple[Route, ...], NoDecode] = DEFAULT_ROUTES
    routes_file: Path | None = None

    # --- worker -----------------------------------------------------------------------------
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 8
    prefetch: Annotated[int, Field(ge=0, le=1024)] | None = None
    visibility_timeout_s: Annotated[int, Field(ge=1, le=43200)] = shapes.VISIBILITY_TIMEOUT_S
    lease_s: Annotated[float, Field(gt=0, le=43200)] = 60.0
    heartbeat_s: Annotated[float, Field(gt=0)] | None = None
    wait_time_s: Annotated[int, Field(ge=0, le=20)] = shapes.WAIT_TIME_S
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    retry_base_s: Annotated[float, Field(ge=0)] = 30.0
    retry_max_s: Annotated[float, Field(ge=0, le=43200)] = 3600.0
    missing_object_attempts: Annotated[int, Field(ge=1)] = 3
    processor_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    kill_grace_s: Annotated[float, Field(ge=0)] = 5.0
    max_mail_bytes: Annotated[int, Field(ge=1)] = 40 * MIB
    #: Envelope recipients one notification may carry; beyond, it goes to the DLQ whole. RFC
    #: 5321 has a server accept at least 100 (SES sends to at most 50 per message).
    max_recipients: Annotated[int, Field(ge=1, le=10000)] = 100
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 90.0
    spool_dir: Path | None = None
    quarantine_verdicts: Annotated[tuple[str, ...], NoDecode] = ("virus",)
    retention_days: Annotated[int, Field(ge=1)] = 90

    # --- processor --------------------------------------------------------------------------
    processor_transport: Literal["exec", "fastcgi"] = "exec"
    #: exec: how many steps below the worker's CPU priority processors run (0: the same).
    #: Keeps the worker's heartbeat on time when processors saturate the CPU.
    processor_nice: Annotated[int, Field(ge=0, le=19)] = 10
    fastcgi_address: str = "127.0.0.1:9000"
    fastcgi_connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    runner_script: str = "/app/sidecar/runner.php"
    tempfail_codes: Annotated[tuple[int, ...], NoDecode] = (75, 71)
    pass_env: Annotated[tuple[str, ...], NoDecode] = ()
    output_tail_bytes: Annotated[int, Field(ge=256, le=65536)] = 4096
    workdir: Path | None = None

    # --- observability ----------------------------------------------------------------------
    log_format: Literal["json", "console", "auto"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The health file (`mailflow check`), not the lease heartbeat. The old names still work.
    health_file: Path = Field(
        Path("/tmp/mailflow-worker.health"),  # noqa: S108 - a health beacon, not a secret
        validation_alias=AliasChoices(
            "MAILFLOW_HEALTH_FILE", "MAILFLOW_HEARTBEAT_FILE", "health_file"
        ),
    )
    health_max_age_s: Annotated[float, Field(gt=0)] = Field(
        60.0,
        validation_alias=AliasChoices(
            "MAILFLOW_HEALTH_MAX_AGE_S", "MAILFLOW_HEARTBEAT_MAX_AGE_S", "health_max_age_s"
        ),
    )
    metrics_namespace: str = "mailflow"

    # --- reconciler -------------------------------------------------------------------------
    orphan_age_s: Annotated[float, Field(ge=0)] = 900.0

    @field_validator(
        "allowed_buckets",
        "quarantine_verdicts",
        "pass_env",
        mode="before",
    )
    @classmethod
    def _split_words(cls, value: object) -> object:
        return _split_list(value, str)

    @field_validator("tempfail_codes", mode="before")
    @classmethod
    def _split_codes(cls, value: object) -> object:
        return _split_list(value, int)

    @field_validator("routes", mode="before")
    @classmethod
    def _routes_from_json(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from None
        return value

    @field_validator("pass_env")
    @classmethod
    def _no_credentials(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            upper = name.upper()
            if upper.startswith(CREDENTIAL_PREFIXES) or upper in CREDENTIAL_NAMES:
                raise ValueError(
                    f"{name} is AWS configuration or a credential: the processor never gets"
                    " the worker's AWS access"
                )
        return value

    @field_validator("fastcgi_address")
    @classmethod
    def _fastcgi_address(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("processor_transport") == "fastcgi":
            # The one parser the transport uses; imported here to keep config light.
            from mailflow.processors.fastcgi import FastCGIAddress  # noqa: PLC0415

            FastCGIAddress.parse(value)  # ValueError says what is wrong
        return value

    @field_validator("runner_script")
    @classmethod
    def _runner_absolute(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("processor_transport") == "fastcgi" and not value.startswith("/"):
            raise ValueError(f"{value!r} must be an absolute path (php-fpm resolves no other)")
        return value

    @field_validator("incoming_prefix")
    @classmethod
    def _incoming_not_empty(cls, value: str) -> str:
        if not value:
            # The key check and the orphan scan would then cover the whole bucket.
            raise ValueError("must not be empty: SES writes mail under a prefix of its own")
        return value

    @field_validator("incoming_prefix", "processed_prefix", "failed_prefix", "quarantine_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if value.startswith("/") or ".." in value:
            raise ValueError("a prefix must be relative and contain no '..'")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.routes_file is not None:
            try:
                raw = json.loads(self.routes_file.read_text(encoding="utf-8"))
                routes = tuple(Route.model_validate(r) for r in raw)
            except (OSError, json.JSONDecodeError, ValidationError) as exc:
                raise ValueError(f"routes_file {self.routes_file}: {exc}") from None
            object.__setattr__(self, "routes", routes)
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ValueError("routes: names must be unique")
        if not self.allowed_buckets:
            object.__setattr__(self, "allowed_buckets", (self.bucket,))
        archive_prefixes = (self.processed_prefix, self.failed_prefix, self.quarantine_prefix)
        if self.archive_bucket in (None, self.bucket) and any(
            p.startswith(self.incoming_prefix) or self.incoming_prefix.startswith(p)
            for p in archive_prefixes
        ):
            raise ValueError(
                "processed/failed/quarantine prefixes must not overlap the incoming prefix"
                " in the same bucket (the orphan scan would find archived mail)",
            )
        if self.retry_max_s < self.retry_base_s:
            raise ValueError("retry_max_s must be >= retry_base_s")
        if self.heartbeat_interval_s * 3 > self.lease_s:
            raise ValueError("heartbeat_s must be at most lease_s / 3")
        return self

    @property
    def heartbeat_interval_s(self) -> float:
        """Lease and visibility are renewed this often; the lease outlives three misses."""
        if self.heartbeat_s is not None:
            return self.heartbeat_s
        return min(self.lease_s, float(self.visibility_timeout_s)) / 4

    @property
    def prefetch_limit(self) -> int:
        """Messages held but not yet started; small, because each one holds a visibility."""
        return self.prefetch if self.prefetch is not None else self.concurrency

    def expires_at(self, now_s: float) -> int:
        """The DynamoDB TTL (epoch seconds) of a delivery finished at `now_s`."""
        return int(now_s + self.retention_days * SECONDS_PER_DAY)

    @property
    def dlq(self) -> str:
        """The DLQ's name (or URL): the queue's, plus `-dlq`."""
        # A queue URL + "-dlq" is the DLQ's URL too: SQS URLs end in the queue name.
        return shapes.dlq_name(self.queue)

    @property
    def max_receive_count(self) -> int:
        """SQS redrive threshold. Every receive counts, deferrals included: keep a wide margin."""
        return shapes.max_receive_count(self.max_attempts)


def describe_validation_error(exc: ValidationError) -> str:
    """One line an operator can act on: the setting's variable name and what is wrong."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        name = "MAILFLOW_" + loc[0].upper() if loc else "settings"
        msg = str(err["msg"]).removeprefix("Value error, ")
        detail = (" (" + ".".join(loc[1:]) + ")") if len(loc) > 1 else ""
        parts.append(f"{name}{detail}: {msg}")
    return "; ".join(parts)
