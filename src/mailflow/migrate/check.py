"""The migration's acceptance test: per alias, mailflow's argv next to the alias's own.

mailflow's side comes from `plan_delivery`, the function the worker itself uses to turn a
recipient into argv, with the routes the worker would load. The alias's side is its command
split the way `/bin/sh` splits it. An alias whose command needs a shell (or that is not a
command) cannot be compared: it is reported as not carried over, with the reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from mailflow.config import Route
from mailflow.migrate.aliases import AliasesFile
from mailflow.migrate.carry import Carried, carry_over
from mailflow.routing import DeliveryPlan, plan_delivery

#: What the planner is given for the parts of a delivery an alias never saw. A route whose
#: argv uses `{sender}` or `{mail_id}` shows these values, and so cannot match an alias.
PROBE_SENDER = "sender@example.com"
PROBE_MAIL_ID = "aliases-check"

Status = Literal["same", "different", "unroutable", "not_carried_over"]
STATUSES: tuple[Status, ...] = ("same", "different", "unroutable", "not_carried_over")


@dataclass(frozen=True, slots=True)
class Probe:
    """What mailflow would do for one recipient: a route and argv, or why not."""

    route: str | None
    argv: tuple[str, ...] | None
    detail: str


@dataclass(frozen=True, slots=True)
class CheckRow:
    """One alias (or unreadable line): both argvs and the verdict."""

    line: int
    name: str | None
    recipient: str | None
    status: Status
    #: The alias's targets as written.
    alias_targets: str
    alias_argv: tuple[str, ...] | None
    route: str | None
    mailflow_argv: tuple[str, ...] | None
    detail: str


@dataclass(frozen=True, slots=True)
class CheckReport:
    """Every row, in file order, and the verdict over them."""

    domain: str
    rows: tuple[CheckRow, ...]

    def counts(self) -> dict[str, int]:
        """Rows per status, every status present."""
        found = Counter(row.status for row in self.rows)
        return {status: found[status] for status in STATUSES}

    def passed(self, *, accept_refused: bool = False) -> bool:
        """Every alias runs the same argv (not-carried-over ones allowed if `accept_refused`)."""
        allowed = {"same", "not_carried_over"} if accept_refused else {"same"}
        return all(row.status in allowed for row in self.rows)


def probe(routes: tuple[Route, ...], recipient: str) -> Probe:
    """The worker's own routing decision for `recipient`."""
    decision = plan_delivery(routes, recipient, sender=PROBE_SENDER, mail_id=PROBE_MAIL_ID)
    if isinstance(decision, DeliveryPlan):
        return Probe(decision.route, decision.argv, "")
    return Probe(None, None, f"{decision.reason}: {decision.detail}")


def check_aliases(parsed: AliasesFile, routes: tuple[Route, ...], domain: str) -> CheckReport:
    """Compare, for every alias of `parsed`, its argv with mailflow's for `<alias>@<domain>`."""
    rows: list[CheckRow] = [
        CheckRow(
            p.line,
            p.name,
            None,
            "not_carried_over",
            "",
            None,
            None,
            None,
            f"unreadable: {p.reason}",
        )
        for p in parsed.problems
        if p.dropped
    ]
    for alias in parsed.aliases:
        recipient = f"{alias.written_name}@{domain}"
        seen = probe(routes, recipient)
        written = ", ".join(t.written for t in alias.targets)
        carried = carry_over(alias, domain)
        if not isinstance(carried, Carried):
            status: Status = "not_carried_over"
            expected = None
            detail = carried.reason
        elif seen.argv is None:
            status, expected, detail = "unroutable", carried.argv, seen.detail
        else:
            expected = carried.argv
            status = "same" if seen.argv == expected else "different"
            detail = "" if status == "same" else _first_difference(expected, seen.argv)
        rows.append(
            CheckRow(
                alias.line,
                alias.name,
                recipient,
                status,
                written,
                expected,
                seen.route,
                seen.argv,
                detail,
            ),
        )
    rows.sort(key=lambda r: r.line)
    return CheckReport(domain, tuple(rows))


def _first_difference(expected: tuple[str, ...], actual: tuple[str, ...]) -> str:
    for index, (want, got) in enumerate(zip(expected, actual, strict=False)):
        if want != got:
            return f"argv[{index}]: alias {want!r}, mailflow {got!r}"
    return f"alias has {len(expected)} words, mailflow {len(actual)}"
