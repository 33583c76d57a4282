"""aliases(5) → routes for `MAILFLOW_ROUTES_FILE`: families as one route each, the rest exact.

Every route written is proven before it is returned: each alias it covers is planned through
mailflow's own routing (`check.probe`) against the whole route list, and must come out on that
route with the alias's argv. An alias that does not is refused with what mailflow would have
run, so a bug here shows up as a refusal, never as a wrong command in production.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailflow.config import BUILTIN_PLACEHOLDERS, Route
from mailflow.migrate.aliases import Alias, AliasesFile, Problem
from mailflow.migrate.carry import Carried, Refusal, carry_over
from mailflow.migrate.check import probe
from mailflow.migrate.families import Member, find_families
from mailflow.migrate.patterns import literal, one_of, template_word

DEFAULT_GROUP = "id"
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_ROUTE_NAME_CHARS = 64


@dataclass(frozen=True, slots=True)
class ImportedRoute:
    """A route and the aliases it carries over (file order)."""

    route: Route
    aliases: tuple[Alias, ...]


@dataclass(frozen=True, slots=True)
class ImportResult:
    """Routes written, aliases (and lines) not carried over, and warnings to read."""

    routes: tuple[ImportedRoute, ...]
    refused: tuple[Refusal, ...]
    warnings: tuple[Problem, ...]

    def routes_document(self) -> list[dict[str, Any]]:
        """The routes file's content: a JSON list `MAILFLOW_ROUTES_FILE` accepts."""
        return [r.route.model_dump(exclude_none=True) for r in self.routes]

    @property
    def complete(self) -> bool:
        """Nothing was left out."""
        return not self.refused


def validate_domain(domain: str) -> str:
    """The lower-cased domain, or ValueError saying why it cannot be one."""
    lowered = domain.strip().lower()
    if not _DOMAIN.fullmatch(lowered) or ".." in lowered:
        raise ValueError(f"{domain!r} is not a domain name")
    return lowered


def validate_group(group: str) -> str:
    """A usable named-group (and placeholder) name, or ValueError."""
    if not group.isidentifier() or not group.isascii():
        raise ValueError(f"{group!r} is not a usable group name (letters, digits, _)")
    if group in BUILTIN_PLACEHOLDERS:
        raise ValueError(f"{group!r} is a builtin placeholder; choose another group name")
    return group


def import_aliases(
    parsed: AliasesFile,
    domain: str,
    *,
    group: str = DEFAULT_GROUP,
) -> ImportResult:
    """Carry over what can be, refuse the rest with reasons; every route proven by probing."""
    domain = validate_domain(domain)
    group = validate_group(group)
    refused = [
        Refusal(p.line, p.name, f"unreadable: {p.reason}") for p in parsed.problems if p.dropped
    ]
    carried: list[Carried] = []
    for alias in parsed.aliases:
        outcome = carry_over(alias, domain)
        if isinstance(outcome, Carried):
            carried.append(outcome)
        else:
            refused.append(outcome)
    # A second pass only happens when the proof failed for some alias (a bug, reported as
    # a refusal): those aliases are taken out and the routes built again without them.
    for _ in range(len(carried) + 1):
        routes = _build(carried, domain, group)
        unproven = _unproven(routes, domain, {c.alias.name: c.argv for c in carried})
        if not unproven:
            break
        refused += unproven
        names = {r.name for r in unproven}
        carried = [c for c in carried if c.alias.name not in names]
    refused.sort(key=lambda r: r.line)
    warnings = tuple(p for p in parsed.problems if not p.dropped)
    return ImportResult(tuple(routes), tuple(refused), warnings)


def _build(carried: Sequence[Carried], domain: str, group: str) -> list[ImportedRoute]:
    aliases = {c.alias.name: c.alias for c in carried}
    families, singles = find_families([Member(c.alias.name, c.argv) for c in carried])
    at_domain = "@" + literal(domain)
    names: set[str] = set()
    built: list[tuple[int, ImportedRoute]] = []
    for family in families:
        route = Route(
            name=_unique(family.prefix + group + family.suffix, names),
            match=(
                f"{literal(family.prefix)}(?P<{group}>{one_of(v for _, v in family.values)})"
                f"{literal(family.suffix)}{at_domain}"
            ),
            command=" ".join(template_word(w, group) for w in family.words),
            key=group,
        )
        members = tuple(aliases[name] for name, _ in family.values)
        built.append((members[0].line, ImportedRoute(route, members)))
    for single in singles:
        route = Route(
            name=_unique(single.name, names),
            match=literal(single.name) + at_domain,
            command=" ".join(template_word((word,), group) for word in single.argv),
        )
        alias = aliases[single.name]
        built.append((alias.line, ImportedRoute(route, (alias,))))
    built.sort(key=lambda item: item[0])
    return [route for _, route in built]


def _unique(wanted: str, taken: set[str]) -> str:
    base = _NAME_UNSAFE.sub("_", wanted)[:_ROUTE_NAME_CHARS] or "alias"
    name, n = base, 1
    while name in taken:
        n += 1
        tail = f"-{n}"
        name = base[: _ROUTE_NAME_CHARS - len(tail)] + tail
    taken.add(name)
    return name


def _unproven(
    routes: Sequence[ImportedRoute],
    domain: str,
    argv_of: dict[str, tuple[str, ...]],
) -> list[Refusal]:
    """Aliases that mailflow's routing does not send to their route with their argv."""
    table = tuple(r.route for r in routes)
    failed: list[Refusal] = []
    for imported in routes:
        for alias in imported.aliases:
            seen = probe(table, f"{alias.written_name}@{domain}")
            if seen.route == imported.route.name and seen.argv == argv_of[alias.name]:
                continue
            what = f"would run {list(seen.argv)}" if seen.argv is not None else seen.detail
            failed.append(
                Refusal(
                    alias.line,
                    alias.name,
                    f"mailflow's routing disagrees with the import ({what});"
                    " an import bug, please report it",
                ),
            )
    return failed
