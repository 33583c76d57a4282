"""Pure logic: settings, routing, notification parsing, outcome semantics, backoff."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from mailflow.backoff import retry_delay_s
from mailflow.config import Route, Settings, describe_validation_error
from mailflow.dev.ses import received_notification
from mailflow.errors import BadNotificationError
from mailflow.mail.notification import check_trusted, parse_body, synthetic_notification
from mailflow.outcome import ProcessResult, Verdict, classify
from mailflow.routing import DeliveryPlan, Unroutable, address_parts, plan_delivery

ROUTE = Route(
    name="store",
    match=r"ne-(?P<store>[0-9]{3})@orders\.example\.com",
    command="php /app/legacy/receive_mail.php {store}",
    key="store",
)


# --- settings ---------------------------------------------------------------------------------


def test_describe_validation_error_names_the_variable() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(max_attempts=0)
    assert describe_validation_error(info.value).startswith("MAILFLOW_MAX_ATTEMPTS")


def test_small_values_work_and_lease_outlives_three_heartbeats() -> None:
    s = Settings(
        visibility_timeout_s=2,
        lease_s=2,
        retry_base_s=1,
        retry_max_s=2,
        processor_timeout_s=1,
        shutdown_grace_s=1,
    )
    assert s.heartbeat_interval_s * 3 < s.lease_s
    assert s.max_receive_count > s.max_attempts
    with pytest.raises(ValidationError):
        Settings(lease_s=3, heartbeat_s=2)


def test_routes_from_env_json() -> None:
    routes = json.dumps([{"name": "a", "match": "x-(?P<id>\\d+)@.+", "command": "php a {id}"}])
    s = Settings(routes=routes)
    assert s.routes[0].name == "a"


# --- routing ----------------------------------------------------------------------------------


def test_first_matching_route_builds_argv_without_a_shell() -> None:
    plan = plan_delivery((ROUTE,), "NE-001@Orders.Example.com", sender="a@b", mail_id="m1")
    assert isinstance(plan, DeliveryPlan)
    assert plan.argv == ("php", "/app/legacy/receive_mail.php", "001")
    assert plan.key == "001"
    assert plan.env["RECIPIENT"] == "ne-001@orders.example.com"
    assert plan.env["MAILFLOW_DELIVERY_ID"] == "m1:ne-001@orders.example.com"


def test_no_route_is_unroutable() -> None:
    decision = plan_delivery((ROUTE,), "info@orders.example.com", sender="", mail_id="m")
    assert isinstance(decision, Unroutable)
    assert decision.reason == "unroutable"


def test_unsafe_placeholder_value_is_refused() -> None:
    route = Route(name="r", match=r"(?P<who>.+)@x", command="php a.php {who}")
    decision = plan_delivery((route,), "a;rm -rf /@x", sender="", mail_id="m")
    assert isinstance(decision, Unroutable)
    assert decision.reason == "unsafe_argument"
    assert isinstance(plan_delivery((route,), "-rf@x", sender="", mail_id="m"), Unroutable)


def test_extension_and_parts() -> None:
    assert address_parts("ne-001+test@x.jp") == ("ne-001+test", "x.jp", "test")
    assert address_parts("plain") == ("plain", "", "")


def test_catastrophic_regex_and_huge_recipient_are_bounded() -> None:
    route = Route(name="evil", match=r"(a|aa)+@x", command="php a.php")
    assert isinstance(
        plan_delivery((route,), "a" * 300 + "!@x", sender="", mail_id="m"),
        Unroutable,
    )
    assert isinstance(
        plan_delivery((ROUTE,), "n" * 1_000_000 + "@x", sender="", mail_id="m"),
        Unroutable,
    )


# --- notifications ----------------------------------------------------------------------------


def _ses(**kw: object) -> dict:
    from datetime import UTC, datetime  # noqa: PLC0415

    doc = received_notification(
        mail_id="abc123",
        bucket="b",
        key="incoming/abc123",
        prefix="incoming/",
        topic_arn="arn:aws:sns:us-east-1:1:t",
        sender="s@x",
        recipients=["NE-001@orders.example.com", "ne-001@orders.example.com", "b@x"],
        common_headers={"subject": "hi"},
        now=datetime.now(UTC),
    )
    doc.update(kw)
    return doc


def test_sns_envelope_and_raw_delivery_parse_alike() -> None:
    doc = _ses()
    envelope = json.dumps({"Type": "Notification", "Message": json.dumps(doc)})
    a, b = parse_body(envelope), parse_body(json.dumps(doc))
    assert a == b
    assert a.recipients == ("ne-001@orders.example.com", "b@x")  # lower-cased, deduplicated
    assert (a.bucket, a.key, a.mail_id) == ("b", "incoming/abc123", "abc123")
    assert a.verdicts["virus"] == "PASS"


def test_synthetic_notification_parses() -> None:
    body = synthetic_notification(
        mail_id="m",
        bucket="b",
        key="incoming/m",
        recipients=["a@x"],
        sender="s",
        received_at="2026-01-01T00:00:00Z",
        reason="requeue",
    )
    ref = parse_body(json.dumps(body))
    assert ref.synthetic == "requeue"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("[]", "not_json_object"),
        ('{"Type":"SubscriptionConfirmation","Message":"{}"}', "sns_type"),
        (
            (
                '{"notificationType":"Received","mail":{"messageId":"m"},"receipt":{"recipients":[],'
                '"action":{"type":"S3","bucketName":"b","objectKey":"k"}}}'
            ),
            "missing_field",
        ),
    ],
)
def test_bad_bodies(body: str, reason: str) -> None:
    with pytest.raises(BadNotificationError) as info:
        parse_body(body)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("bucket", "key", "reason"),
    [
        ("other", "incoming/m", "bucket_not_allowed"),
        ("b", "processed/m", "key_not_allowed"),
        ("b", "incoming/../secrets", "key_not_allowed"),
    ],
)
def test_only_our_bucket_and_prefix_are_trusted(bucket: str, key: str, reason: str) -> None:
    body = synthetic_notification(
        mail_id="m",
        bucket=bucket,
        key=key,
        recipients=["a@x"],
        sender="s",
        received_at="",
        reason="t",
    )
    with pytest.raises(BadNotificationError) as info:
        check_trusted(parse_body(json.dumps(body)), ("b",), "incoming/")
    assert info.value.reason == reason


# --- outcome semantics (postfix pipe) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "verdict", "reason"),
    [
        (ProcessResult(exit_code=0), Verdict.SUCCESS, "ok"),
        (ProcessResult(exit_code=75), Verdict.RETRY, "tempfail_exit_75"),
        (ProcessResult(exit_code=71), Verdict.RETRY, "tempfail_exit_71"),
        (ProcessResult(exit_code=1), Verdict.PERMANENT, "exit_1"),
        (
            ProcessResult(exit_code=1, stdout_head=b"4.2.1 busy"),
            Verdict.RETRY,
            "enhanced_status_4.2.1",
        ),
        (
            ProcessResult(exit_code=75, stderr_head=b"5.1.1 nope"),
            Verdict.PERMANENT,
            "enhanced_status_5.1.1",
        ),
        (
            ProcessResult(exit_code=0, stdout_head=b"5.1.1 ignored on success"),
            Verdict.SUCCESS,
            "ok",
        ),
        (ProcessResult(signal=9), Verdict.RETRY, "killed_by_SIGKILL"),
        (ProcessResult(timed_out=True, signal=15), Verdict.RETRY, "timeout"),
        (ProcessResult(transport_error="refused"), Verdict.RETRY, "transport_error"),
        (ProcessResult(refused=True), Verdict.PERMANENT, "refused"),
    ],
)
def test_classify(result: ProcessResult, verdict: Verdict, reason: str) -> None:
    outcome = classify(result)
    assert (outcome.verdict, outcome.reason) == (verdict, reason)


def test_tempfail_codes_are_configurable() -> None:
    assert classify(ProcessResult(exit_code=1), (1,)).verdict is Verdict.RETRY


# --- backoff ----------------------------------------------------------------------------------


def test_backoff_grows_caps_and_jitters() -> None:
    lo = [retry_delay_s(a, base_s=10, max_s=100, rand=lambda: 0.0) for a in range(1, 8)]
    hi = [retry_delay_s(a, base_s=10, max_s=100, rand=lambda: 1.0) for a in range(1, 8)]
    assert lo == [5, 10, 20, 40, 50, 50, 50]
    assert hi == [10, 20, 40, 80, 100, 100, 100]
    assert retry_delay_s(10_000, base_s=1, max_s=60) <= 60


def test_archive_prefixes_must_not_overlap_incoming() -> None:
    with pytest.raises(ValidationError, match="must not overlap"):
        Settings(processed_prefix="incoming/done/")
    # another bucket for the archive: no overlap possible
    assert Settings(processed_prefix="incoming/", archive_bucket="archive").archive_bucket


def test_health_file_keeps_its_old_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deployed task definitions still say MAILFLOW_HEARTBEAT_FILE; the new name wins."""
    monkeypatch.setenv("MAILFLOW_HEARTBEAT_FILE", "/run/old")
    monkeypatch.setenv("MAILFLOW_HEARTBEAT_MAX_AGE_S", "7")
    old = Settings()
    assert (str(old.health_file), old.health_max_age_s) == ("/run/old", 7.0)
    monkeypatch.setenv("MAILFLOW_HEALTH_FILE", "/run/new")
    assert str(Settings().health_file) == "/run/new"
    assert str(Settings(health_file="/run/kw").health_file) == "/run/kw"
