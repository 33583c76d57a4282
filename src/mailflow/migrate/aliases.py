"""The aliases(5) reader: text → aliases with their line numbers, and every problem found.

It reads the file the way sendmail and postfix do:

- A logical line starts with non-whitespace; a line that starts with a space or a tab continues
  it. Blank lines and lines whose first non-blank character is `#` are ignored (postfix's
  rule), so a comment may sit between a line and its continuation.
- `name: target, target, …`. The name ends at the first `:`; names are case-insensitive, so
  the lower-cased name is what a route matches (mailflow lower-cases recipients too).
- Targets are split at commas outside double quotes. Each target then loses its quoting the
  way sendmail's `stripquotes` does it: unescaped `"` are removed and `\\x` becomes `x`. So
  `"|php r.php 001"`, `|"php r.php 001"` and `| "php r.php 001"` all run `php r.php 001`.
- A target is a command (`|…`), an include (`:include:…`), a file (`/…`) or an address.

A line that cannot be read is reported with its number and reason and carries nothing over;
it never stops the rest of the file from being read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TargetKind = Literal["command", "address", "file", "include"]


@dataclass(frozen=True, slots=True)
class Target:
    """One right-hand-side item of an alias, unquoted."""

    kind: TargetKind
    #: The command without its `|`, the address, or the path.
    value: str
    #: As written in the file (surrounding whitespace removed), for messages.
    written: str


@dataclass(frozen=True, slots=True)
class Alias:
    """One alias as the MTA would use it after reading the whole file."""

    #: Lower-cased: the local part a route must match.
    name: str
    written_name: str
    #: First physical line of the logical line that defined it.
    line: int
    targets: tuple[Target, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """Something an operator must read: bad input, or a surprise the MTA resolved silently."""

    line: int
    #: The alias concerned, lower-cased, when the line got as far as naming one.
    name: str | None
    reason: str
    #: True when this line carries nothing over (an error); False for a warning.
    dropped: bool


@dataclass(frozen=True, slots=True)
class AliasesFile:
    """The aliases in file order (a duplicate sits at its last definition) and the problems."""

    aliases: tuple[Alias, ...]
    problems: tuple[Problem, ...]


class _LineError(ValueError):
    """A logical line that cannot be read; the message is the reason shown to the operator."""


def parse_aliases(text: str) -> AliasesFile:
    """Read a whole aliases file; never raises on bad content."""
    problems: list[Problem] = []
    by_name: dict[str, Alias] = {}
    for line_no, line in _logical_lines(text, problems):
        name = _name_of(line)
        try:
            alias = _parse_line(line_no, line)
        except _LineError as exc:
            problems.append(Problem(line_no, name, str(exc), dropped=True))
            continue
        earlier = by_name.pop(alias.name, None)
        if earlier is not None:
            problems.append(_duplicate(earlier, alias))
        by_name[alias.name] = alias
    aliases = sorted(by_name.values(), key=lambda a: a.line)
    problems.sort(key=lambda p: p.line)
    return AliasesFile(tuple(aliases), tuple(problems))


def _duplicate(earlier: Alias, later: Alias) -> Problem:
    if _meaning(earlier) == _meaning(later):
        reason = f"duplicate of line {earlier.line} with the same targets"
    else:
        reason = (
            f"duplicate of line {earlier.line} with different targets: sendmail keeps the"
            f" last (this line, which is what is carried over); postalias keeps the first"
        )
    return Problem(later.line, later.name, reason, dropped=False)


def _meaning(alias: Alias) -> list[tuple[TargetKind, str]]:
    """What the targets do, however they were quoted."""
    return [(t.kind, t.value) for t in alias.targets]


def _logical_lines(text: str, problems: list[Problem]) -> list[tuple[int, str]]:
    """(first line number, joined text) of each logical line."""
    lines: list[tuple[int, str]] = []
    for line_no, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not lines:
                problems.append(
                    Problem(
                        line_no, None, "continuation line with no alias before it", dropped=True
                    ),
                )
                continue
            first, joined = lines[-1]
            # The continuation's own leading whitespace is the separator, as in the MTAs.
            lines[-1] = (first, joined + line.rstrip())
            continue
        lines.append((line_no, line.rstrip()))
    return lines


def _name_of(line: str) -> str | None:
    name, colon, _ = line.partition(":")
    name = name.strip()
    usable = colon and name and not name.startswith('"') and not _undecodable(name)
    return name.lower() if usable else None


def read_aliases(raw: bytes) -> AliasesFile:
    """Read file content: UTF-8, where a line with other bytes is reported, not fatal.

    Legacy files often carry comments in another charset (EUC-JP, Shift_JIS); comments are
    ignored, and an alias line that is not UTF-8 is reported with its number.
    """
    return parse_aliases(raw.decode("utf-8-sig", errors="surrogateescape"))


def _undecodable(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _parse_line(line_no: int, line: str) -> Alias:
    if _undecodable(line):
        raise _LineError("bytes that are not UTF-8 (convert the file to UTF-8)")
    if line.startswith('"'):
        raise _LineError("quoted alias names are not supported (no address has that form)")
    written_name, colon, rhs = line.partition(":")
    written_name = written_name.strip()
    if not colon:
        raise _LineError("no ':' after the alias name")
    if not written_name:
        raise _LineError("empty alias name before ':'")
    if any(ch.isspace() for ch in written_name):
        raise _LineError(f"alias name {written_name!r} contains whitespace (a missing ':'?)")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in written_name):
        raise _LineError("alias name contains a control character")
    if "@" in written_name:
        raise _LineError(f"alias name {written_name!r} is an address; aliases are local parts")
    targets = tuple(_target(item) for item in _split_targets(rhs))
    return Alias(written_name.lower(), written_name, line_no, targets)


def _split_targets(rhs: str) -> list[str]:
    """Comma-separated items, commas inside double quotes (or escaped) not counting."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    chars = iter(rhs)
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise _LineError("backslash at the end of the line escapes nothing")
            current += (ch, escaped)
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quoted:
        raise _LineError('unterminated double quote (")')
    items.append("".join(current))
    for position, item in enumerate(items, start=1):
        if not item.strip():
            where = "no target after ':'" if len(items) == 1 else f"target {position} is empty"
            raise _LineError(f"empty target: {where}")
    return [item.strip() for item in items]


def unquote(item: str) -> str:
    """sendmail's `stripquotes`: drop unescaped double quotes, `\\x` → `x`."""
    out: list[str] = []
    chars = iter(item)
    for ch in chars:
        if ch == "\\":
            out.append(next(chars, ""))
        elif ch != '"':
            out.append(ch)
    return "".join(out)


def _target(written: str) -> Target:
    value = unquote(written).strip()
    if value.startswith("|"):
        command = value[1:].strip()
        if not command:
            raise _LineError(f"empty command in target {written!r}")
        return Target("command", command, written)
    if value.lower().startswith(":include:"):
        return Target("include", value[len(":include:") :].strip(), written)
    if value.startswith("/"):
        return Target("file", value, written)
    return Target("address", value, written)
