"""Property tests (hypothesis) for the pure core: notification parsing, routing/argv, backoff."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import re
import shlex
import string
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mailflow.aws.queue import sqs_text
from mailflow.backoff import retry_delay_s
from mailflow.config import Route
from mailflow.dev.ses import received_notification
from mailflow.errors import BadNotificationError
from mailflow.mail.notification import MailRef, check_trusted, parse_body
from mailflow.routing import (
    SAFE_VALUE,
    DeliveryPlan,
    Unroutable,
    UnsafeValueError,
    plan_delivery,
    render_argv,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- notification.parse_body ------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


def valid_notification(recipients: list[str] | None = None) -> dict[str, Any]:
    return received_notification(
        mail_id="0123456789abcdefghijklmnopqrstuv",
        bucket="mf-bucket",
        key="incoming/0123456789abcdefghijklmnopqrstuv",
        prefix="incoming/",
        topic_arn="arn:aws:sns:us-east-1:123456789012:t",
        sender="shop@example.com",
        recipients=recipients or ["ok-001@orders.example.com"],
        common_headers={"subject": "order"},
        now=datetime(2024, 12, 3, 1, 2, 3, tzinfo=UTC),
    )


def sns(message: str) -> str:
    return json.dumps({"Type": "Notification", "MessageId": "m", "Message": message})


def parse_or_refuse(body: str) -> MailRef | None:
    """The property: a MailRef, or BadNotificationError; nothing else ever escapes."""
    try:
        return parse_body(body)
    except BadNotificationError as exc:
        reason = exc.reason
    assert isinstance(reason, str)
    assert reason
    return None


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            out += _paths(value, (*prefix, index))
    return out


VALID_PATHS = _paths(valid_notification())


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = copy.deepcopy(doc)
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


@PROPS
@given(st.text(max_size=300))
@example("1" * 5000)  # past Python's int-parsing limit: ValueError, not JSONDecodeError
@example("[" * 100_000)
@example('{"a": ' * 50_000)
@example("-" + "9" * 4301)
@example("1e999999")
@example("\ud800")
def test_parse_body_of_any_text(body: str) -> None:
    parse_or_refuse(body)


@PROPS
@given(json_values)
def test_parse_body_of_any_json(doc: Any) -> None:
    parse_or_refuse(json.dumps(doc))
    parse_or_refuse(sns(json.dumps(doc)))


@PROPS
@given(st.text(max_size=300))
@example("9" * 5000)
@example("[" * 100_000)
def test_parse_body_of_sns_envelope_with_any_message(message: str) -> None:
    parse_or_refuse(sns(message))


@PROPS
@given(st.sampled_from(VALID_PATHS), json_values, st.booleans())
@example(path=("mail", "timestamp"), value="0001-01-01T00:00:00", wrap=True)
@example(path=("receipt", "timestamp"), value="9999-12-31T23:59:59-23:59", wrap=False)
@example(path=("receipt", "recipients"), value=[], wrap=True)
def test_parse_body_of_a_mutated_ses_notification(
    path: tuple[Any, ...],
    value: Any,
    wrap: bool,
) -> None:
    doc = _replace(valid_notification(), path, value)
    body = json.dumps(doc)
    ref = parse_or_refuse(sns(body) if wrap else body)
    if ref is not None:
        assert ref.recipients
        assert all(r == r.strip().lower() for r in ref.recipients)
        assert len(set(ref.recipients)) == len(ref.recipients)
        # check_trusted may refuse, but only with BadNotificationError
        with contextlib.suppress(BadNotificationError):
            check_trusted(ref, ("mf-bucket",), "incoming/")


@PROPS
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5))
def test_valid_notifications_always_parse(recipients: list[str]) -> None:
    assume(all(r.strip() for r in recipients))
    doc = valid_notification(recipients)
    for body in (json.dumps(doc), sns(json.dumps(doc))):
        ref = parse_body(body)
        assert ref.mail_id == doc["mail"]["messageId"]
        assert ref.key == doc["receipt"]["action"]["objectKey"]
        assert list(ref.recipients) == list(dict.fromkeys(r.strip().lower() for r in recipients))


# --- routing: plan_delivery / render_argv -----------------------------------------------------

STORE_ROUTE = Route(
    name="store",
    match=r"(?P<mode>[a-z0-9]+)-(?P<store>[0-9]{3})@orders\.example\.com",
    command="php /app/legacy/receive_mail.php {mode} --store={store} {mail_id}",
    key="store",
)
#: A careless route: its groups take anything, so only the SAFE_VALUE check stands between a
#: hostile recipient and argv.
LOOSE_ROUTE = Route(
    name="loose",
    match=r"(?P<who>.*)@(?P<where>.*)",
    command="prog 'fixed arg' --who={who} {where} x{sender}y {extension}",
)
#: A route whose argv uses no part of the address: the recipient reaches only the environment.
ENV_ONLY_ROUTE = Route(name="env-only", match=r".*@orders\.example\.com", command="prog {mail_id}")

address_chars = st.characters(codec="utf-8")
hostile_text = st.text(
    alphabet=st.sampled_from(
        list(" \t\n\r\x00\x0b\"'`$;&|<>(){}[]*?!#~\\/,=%+@.-_:ü注")
        + list(string.ascii_lowercase + string.digits)
    ),
    max_size=40,
)
recipients = st.one_of(
    st.text(address_chars, max_size=60),
    st.builds(
        lambda a, b, c: f"{a}-{b}@{c}",
        hostile_text,
        hostile_text,
        st.sampled_from(["orders.example.com", "x"]),
    ),
    st.builds(lambda a, b: f"{a}@{b}", hostile_text, hostile_text),
)


def _template_values(command: str, argv: tuple[str, ...]) -> list[tuple[str, str]]:
    """(placeholder, value) for each placeholder token, recovered from argv by its literals."""
    out = []
    for token, arg in zip(shlex.split(command), argv, strict=True):
        parts = list(string.Formatter().parse(token))
        names = [name for _, name, _, _ in parts if name]
        if not names:
            assert arg == token  # literal tokens pass through untouched
            continue
        assert len(names) == 1, "test templates use one placeholder per token"
        prefix = parts[0][0]
        suffix = "".join(lit for lit, name, _, _ in parts[1:] if not name) if len(parts) > 1 else ""
        assert arg.startswith(prefix)
        assert arg.endswith(suffix)
        out.append((names[0], arg[len(prefix) : len(arg) - len(suffix)]))
    return out


@PROPS
@given(recipients, hostile_text, st.sampled_from([STORE_ROUTE, LOOSE_ROUTE, ENV_ONLY_ROUTE]))
@example("ok-001@orders.example.com", "shop@example.com", STORE_ROUTE)
@example("a b@orders.example.com", "x", LOOSE_ROUTE)
@example("a\x00b@orders.example.com", "x", LOOSE_ROUTE)
@example("ok-001@orders.example.com", "a b", LOOSE_ROUTE)
@example("a\x00b@orders.example.com", "x", ENV_ONLY_ROUTE)
def test_plan_never_puts_an_unsafe_value_into_argv(
    recipient: str, sender: str, route: Route
) -> None:
    decision = plan_delivery(
        (route,), recipient, sender=sender, mail_id="m1", base_env={"PATH": "/bin"}
    )
    if isinstance(decision, Unroutable):
        assert decision.reason in {"unroutable", "unsafe_argument"}
        return
    assert isinstance(decision, DeliveryPlan)
    tokens = shlex.split(route.command)
    # one template token, one argv item: a value never splits, never merges
    assert len(decision.argv) == len(tokens)
    for name, value in _template_values(route.command, decision.argv):
        assert SAFE_VALUE.fullmatch(value), (name, value)
    # the environment can carry what it is given: exec refuses NUL outright
    for name, value in decision.env.items():
        assert "\x00" not in value, name
        assert "\x00" not in name


@PROPS
@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.text(max_size=30), min_size=3))
@example({"a": "x y", "b": "1", "c": "2"})
@example({"a": "-rf", "b": "$(id)", "c": "2"})
@example({"a": "ok\n", "b": "1", "c": "2"})
def test_render_argv_validates_every_used_value(values: dict[str, str]) -> None:
    command = "cmd {a} 'lit eral' pre-{b}-post {c}"
    try:
        argv = render_argv(command, values)
    except UnsafeValueError:
        assert not all(SAFE_VALUE.fullmatch(v) for v in values.values())
        return
    assert len(argv) == 5
    assert argv[0] == "cmd"
    assert argv[2] == "lit eral"
    assert argv[1] == values["a"]
    assert argv[3] == f"pre-{values['b']}-post"
    assert argv[4] == values["c"]
    assert all(SAFE_VALUE.fullmatch(v) for v in values.values())


def test_safe_value_refuses_shell_and_argv_syntax() -> None:
    for bad in [
        "",
        " ",
        "a b",
        "-rf",
        "a;b",
        "$(x)",
        "`x`",
        "a\nb",
        "a\x00",
        "a/b",
        "..",
        "'q'",
        '"q"',
        "a|b",
        "a&b",
        "a>b",
        "*",
        "~root",
        "a\\b",
        "ü",
    ]:
        assert not SAFE_VALUE.fullmatch(bad), bad
    for good in ["001", "ok", "ne-001", "a.b", "a+b", "a@b.example", "mail_id123"]:
        assert SAFE_VALUE.fullmatch(good), good


# --- backoff ----------------------------------------------------------------------------------


@PROPS
@given(
    st.integers(min_value=-5, max_value=10_000),
    st.floats(min_value=0, max_value=3600),
    st.floats(min_value=0, max_value=43200),
    st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_is_bounded(attempt: int, base_s: float, max_s: float, r: float) -> None:
    assume(max_s >= base_s)
    delay = retry_delay_s(attempt, base_s=base_s, max_s=max_s, rand=lambda: r)
    ceiling = min(max_s, base_s * 2 ** min(max(attempt - 1, 0), 32))
    assert 0 <= delay <= max_s
    assert ceiling / 2 <= delay <= ceiling + 1e-9


@PROPS
@given(
    st.floats(min_value=0.001, max_value=600),
    st.floats(min_value=0.001, max_value=43200),
    st.integers(min_value=1, max_value=200),
)
def test_backoff_ceiling_is_monotone(base_s: float, max_s: float, attempts: int) -> None:
    assume(max_s >= base_s)
    for rand in (lambda: 0.0, lambda: 0.999999):
        delays = [
            retry_delay_s(a, base_s=base_s, max_s=max_s, rand=rand) for a in range(1, attempts + 1)
        ]
        assert all(b >= a - 1e-9 for a, b in itertools.pairwise(delays))
        assert delays[-1] <= max_s


def test_backoff_jitter_spreads_retries() -> None:
    import random  # noqa: PLC0415

    rng = random.Random(3)
    delays = {round(retry_delay_s(3, base_s=30, max_s=3600, rand=rng.random), 3) for _ in range(50)}
    assert len(delays) > 40  # not lockstep
    assert min(delays) >= 60  # equal jitter: never less than half the ceiling (120 s)


@pytest.mark.parametrize("attempt", [1, 2, 10, 33, 10**6])
def test_backoff_huge_attempts_stay_at_the_cap(attempt: int) -> None:
    delay = retry_delay_s(attempt, base_s=30, max_s=3600, rand=lambda: 0.5)
    assert delay <= 3600


@PROPS
@given(st.text(max_size=40), recipients)
@example("abc\x00def", "ok-001@orders.example.com")
@example("abc def", "ok-001@orders.example.com")
def test_a_trusted_notification_plans_a_spawnable_environment(mail_id: str, recipient: str) -> None:
    """Whatever passes parse_body + check_trusted yields env values exec accepts."""
    assume(recipient.strip())
    doc = valid_notification([recipient])
    doc["mail"]["messageId"] = mail_id
    ref = parse_or_refuse(json.dumps(doc))
    if ref is None:
        return
    try:
        check_trusted(ref, ("mf-bucket",), "incoming/")
    except BadNotificationError:
        return
    for route in (STORE_ROUTE, LOOSE_ROUTE, ENV_ONLY_ROUTE):
        decision = plan_delivery(
            (route,), ref.recipients[0], sender=ref.sender, mail_id=ref.mail_id, base_env={}
        )
        if isinstance(decision, DeliveryPlan):
            for name, value in decision.env.items():
                assert "\x00" not in value, name


any_text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=80)


@PROPS
@given(any_text, any_text, any_text)
@example("x" * 2000 + "@orders.example.com", "shop@example.com", "s")
@example("注" * 300 + "@orders.example.com", "shop@example.com", "s")
@example("ok-001@orders.example.com", "\ud800", "s")
@example("ok-001@orders.example.com\ud800", "shop@example.com", "s")
@example("ok-001@orders.example.com", "shop@example.com", "\udfff")
def test_a_parsed_notification_can_be_stored(recipient: str, sender: str, subject: str) -> None:
    """What parse_body accepts, DynamoDB can key and botocore can encode: valid UTF-8
    everywhere, and a recipient that fits a sort key (1024 bytes)."""
    doc = valid_notification([recipient] if recipient.strip() else None)
    doc["mail"]["source"] = sender
    doc["mail"]["commonHeaders"]["subject"] = subject
    ref = parse_or_refuse(json.dumps(doc))
    if ref is None:
        return
    for text in (ref.mail_id, ref.bucket, ref.key, ref.sender, ref.subject, *ref.recipients):
        text.encode("utf-8")  # raises on a lone surrogate
    assert all(len(r.encode("utf-8")) <= 1024 for r in ref.recipients)


# --- the dead-letter attributes: SQS's character set -----------------------------------------


def sqs_allowed(text: str) -> bool:
    """SQS's set for bodies and string attributes, written out from its documentation."""
    return all(
        ord(c) in (0x9, 0xA, 0xD)
        or 0x20 <= ord(c) <= 0xD7FF
        or 0xE000 <= ord(c) <= 0xFFFD
        or 0x10000 <= ord(c) <= 0x10FFFF
        for c in text
    )


@PROPS
@given(any_text, st.integers(min_value=8, max_value=400))
@example("a\x00b\x1bc\ud800d\ufffe\\", 64)
@example("é" * 500, 9)
@example("", 8)
def test_sqs_text_is_always_accepted_by_sqs(value: str, max_bytes: int) -> None:
    """Whatever a notification carries, its escaped form is in SQS's set, encodes, is not
    empty and fits the cap; text already in the set (no backslash) that fits passes as is."""
    out = sqs_text(value, max_bytes)
    assert out
    assert sqs_allowed(out)
    assert len(out.encode("utf-8")) <= max_bytes
    if sqs_allowed(value) and "\\" not in value and 0 < len(value.encode("utf-8")) <= max_bytes:
        assert out == value


def unescape(text: str) -> str:
    return re.sub(
        r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})",
        lambda m: "\\" if m[1] == "\\" else chr(int(m[1][1:], 16)),
        text,
    )


@PROPS
@given(any_text.filter(bool))
def test_sqs_text_escapes_read_back(value: str) -> None:
    """Uncut, the escapes are unambiguous: undoing them gives the input back."""
    assert unescape(sqs_text(value, 10_000)) == value
