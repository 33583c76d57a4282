"""Envelope recipient → what to run. Pure: no I/O, no clock.

This is the replacement for one `/etc/aliases` line such as
`ne-001: | "php /app/legacy/receive_mail.php 001"`, with two differences that matter:
there is no shell, ever (the template is split once with shlex and each token formatted on
its own), and every value that reaches argv is checked against a safe character set first.
"""

from __future__ import annotations

import shlex
import string
from dataclasses import dataclass
from functools import cache

import regex

from mailflow.config import Route

#: RFC 5321 allows 64 + 1 + 255 octets for a path; SES will accept longer junk. Anything past
#: this is refused before a route regex ever sees it (with the regex timeout as a second fence).
MAX_RECIPIENT_CHARS = 320
MATCH_TIMEOUT_S = 0.05

#: What a placeholder value may contain when it lands in argv or the environment: the
#: characters of real store addresses. No whitespace, quotes, `$`, `;`, `/`, or controls.
SAFE_VALUE = regex.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@%-]{0,254}")

#: postfix's recipient_delimiter: `ne-001+test@…` has extension `test`.
EXTENSION_DELIMITER = "+"


@dataclass(frozen=True, slots=True)
class DeliveryPlan:
    """What to run for one recipient: the route's name, the argv (no shell; every placeholder
    value checked), the processor's environment, and the per-key concurrency: `key` is the
    route's key value for this recipient (the store), `max_in_flight_per_key` its limit."""

    route: str
    argv: tuple[str, ...]
    env: dict[str, str]
    key: str | None
    max_in_flight_per_key: int | None


@dataclass(frozen=True, slots=True)
class Unroutable:
    """No route can take this recipient. Recorded as failed, never retried, never lost."""

    reason: str
    detail: str


RouteDecision = DeliveryPlan | Unroutable


@cache
def _compiled(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern)


@cache
def _tokens(command: str) -> tuple[str, ...]:
    return tuple(shlex.split(command))


def normalize_recipient(recipient: str) -> str:
    """The form recipients are routed and recorded under: stripped, lower-cased."""
    return recipient.strip().lower()


def address_parts(recipient: str) -> tuple[str, str, str]:
    """(local, domain, extension) of an address; the extension is what follows `+`."""
    local, _, domain = recipient.rpartition("@")
    if not local:  # no '@' at all
        local, domain = domain, ""
    base, sep, extension = local.partition(EXTENSION_DELIMITER)
    return (local, domain, extension if sep and base else "")


def _has_control(value: str) -> bool:
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)


def _clean_env_value(value: str) -> str:
    """The environment cannot carry NUL, and a newline in SENDER helps nobody."""
    return "".join(ch for ch in value if ch.isprintable())[:998]


def plan_delivery(
    routes: tuple[Route, ...],
    recipient: str,
    *,
    sender: str,
    mail_id: str,
    base_env: dict[str, str] | None = None,
) -> RouteDecision:
    """First matching route wins; its template becomes argv with validated values."""
    recipient = normalize_recipient(recipient)
    if len(recipient) > MAX_RECIPIENT_CHARS:
        return Unroutable("unroutable", f"recipient longer than {MAX_RECIPIENT_CHARS} chars")
    if _has_control(recipient):
        # No SMTP address carries controls; a NUL would even make exec refuse the environment.
        return Unroutable("unroutable", "recipient contains control characters")
    local, domain, extension = address_parts(recipient)
    for route in routes:
        try:
            found = _compiled(route.match).fullmatch(recipient, timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            return Unroutable("unroutable", f"route {route.name}: regex timed out")
        if found is None:
            continue
        values: dict[str, str] = {
            "recipient": recipient,
            "local": local,
            "domain": domain,
            "extension": extension,
            "sender": sender,
            "mail_id": mail_id,
        }
        values.update({k: v for k, v in found.groupdict().items() if v is not None})
        try:
            argv = render_argv(route.command, values)
        except UnsafeValueError as exc:
            return Unroutable("unsafe_argument", f"route {route.name}: {exc}")
        key = values.get(route.key) if route.key else None
        env = dict(base_env or {})
        env.update(
            {
                "SENDER": _clean_env_value(sender),
                "RECIPIENT": recipient,
                "ORIGINAL_RECIPIENT": recipient,
                "LOCAL": local,
                "DOMAIN": domain,
                "EXTENSION": extension,
                "MAILFLOW_MAIL_ID": mail_id,
                "MAILFLOW_DELIVERY_ID": delivery_id(mail_id, recipient),
                "MAILFLOW_ROUTE": route.name,
            },
        )
        return DeliveryPlan(
            route=route.name,
            argv=argv,
            env=env,
            key=key,
            max_in_flight_per_key=route.max_in_flight_per_key,
        )
    return Unroutable("unroutable", "no route matches the recipient")


class UnsafeValueError(ValueError):
    """A placeholder value that must not reach argv."""


def render_argv(command: str, values: dict[str, str]) -> tuple[str, ...]:
    """Split the template once, then format each token on its own: no shell, no re-splitting.

    Only placeholders that appear in the template are validated, so an odd sender address
    does not block a route that never uses `{sender}`.
    """
    argv = []
    for token in _tokens(command):
        used = {name for _, name, _, _ in string.Formatter().parse(token) if name}
        for name in used:
            value = values.get(name, "")
            if not SAFE_VALUE.fullmatch(value):
                raise UnsafeValueError(f"{{{name}}}={value[:80]!r} is outside the safe set")
        argv.append(token.format_map(values))
    return tuple(argv)


def delivery_id(mail_id: str, recipient: str) -> str:
    """Stable across attempts and workers: the legacy script's idempotency key."""
    return f"{mail_id}:{normalize_recipient(recipient)}"
