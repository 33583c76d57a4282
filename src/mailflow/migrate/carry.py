"""Can mailflow run what an alias ran? Its argv, or the reason it cannot be carried over.

A route runs one command per recipient, without a shell. So an alias carries over when it has
exactly one target, that target is a `|command`, and the command needs no `/bin/sh`. Mail
forwarded to an address, appended to a file, or read from an `:include:` list is not
mailflow's job; an alias that fans out to several targets would need several deliveries.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailflow.migrate.aliases import Alias, Target
from mailflow.migrate.shell import sh_words, shell_needs
from mailflow.routing import MAX_RECIPIENT_CHARS


@dataclass(frozen=True, slots=True)
class Carried:
    """An alias mailflow can run: the argv `/bin/sh` would have run for it."""

    alias: Alias
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An alias, or an unreadable line, that is not carried over, and why."""

    line: int
    #: Lower-cased alias name; None for a line too broken to name one.
    name: str | None
    reason: str


def carry_over(alias: Alias, domain: str) -> Carried | Refusal:
    """The alias's argv, or the reason mailflow cannot run the same thing for it."""
    if len(f"{alias.name}@{domain}") > MAX_RECIPIENT_CHARS:
        return Refusal(
            alias.line,
            alias.name,
            f"<alias>@{domain} is longer than {MAX_RECIPIENT_CHARS} characters:"
            " mailflow refuses such a recipient",
        )
    if len(alias.targets) != 1:
        kinds = ", ".join(_describe(t) for t in alias.targets)
        return Refusal(
            alias.line,
            alias.name,
            f"{len(alias.targets)} targets ({kinds}): a route runs one command per recipient",
        )
    (target,) = alias.targets
    if target.kind != "command":
        return Refusal(alias.line, alias.name, _WHY[target.kind])
    need = shell_needs(target.value)
    if need is not None:
        return Refusal(alias.line, alias.name, f"command needs /bin/sh: {need}")
    return Carried(alias, sh_words(target.value))


_WHY = {
    "address": "forwards to an address: a route runs a command, it does not forward mail",
    "file": "appends to a file: a route runs a command, it does not write mailboxes",
    "include": "reads its targets from another file (:include:): import that file on its own",
}


def _describe(target: Target) -> str:
    what = {
        "command": "a command",
        "address": "an address",
        "file": "a file",
        "include": "an :include: list",
    }[target.kind]
    return f"{what} {target.written!r}"
