"""Route regexes and command templates that say exactly what the aliases said, readably.

- `literal`: a regex for one exact string, escaping only what is special.
- `one_of`: a regex for exactly a set of tokens; runs of three or more consecutive numbers of
  one width become digit ranges (`001`…`450` → `00[1-9]|0[1-9][0-9]|[1-3][0-9]{2}|4[0-4][0-9]|450`),
  so a family of hundreds of stores stays one readable line and still admits no other store.
- `template_word`: one argv word as a route command token, with `{placeholder}` holes.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()#&~ \t\n\r\v\f")
_BARE_TOKEN = re.compile(r"[A-Za-z0-9_@%+=:,./{}-]+")

#: A run of consecutive numbers shorter than this is listed value by value.
MIN_RANGE_RUN = 3


def literal(text: str) -> str:
    """A regex that matches `text` and nothing else."""
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in text)


def one_of(values: Iterable[str]) -> str:
    """An alternation (no group) matching exactly `values`, digit runs compressed."""
    words = sorted(set(values))
    parts: list[str] = []
    by_width: dict[int, list[int]] = {}
    for word in words:
        if word.isascii() and word.isdigit():
            by_width.setdefault(len(word), []).append(int(word))
        else:
            parts.append(literal(word))
    for width, numbers in sorted(by_width.items()):
        for low, high in _runs(numbers):
            lo, hi = f"{low:0{width}d}", f"{high:0{width}d}"
            if high - low + 1 >= MIN_RANGE_RUN:
                parts += digit_range(lo, hi)
            else:
                parts += [f"{n:0{width}d}" for n in range(low, high + 1)]
    return "|".join(parts)


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


def digit_range(lo: str, hi: str) -> list[str]:
    """Alternatives matching exactly the same-width digit strings from `lo` to `hi`."""
    if len(lo) != len(hi) or lo > hi:
        raise ValueError(f"not a range of one width: {lo!r}..{hi!r}")
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [_digit_class(lo, hi)]
    if lo[0] == hi[0]:
        return [lo[0] + part for part in digit_range(lo[1:], hi[1:])]
    rest = len(lo) - 1
    low_full = lo[1:] == "0" * rest
    high_full = hi[1:] == "9" * rest
    parts: list[str] = []
    if not low_full:
        parts += [lo[0] + part for part in digit_range(lo[1:], "9" * rest)]
    first = lo[0] if low_full else chr(ord(lo[0]) + 1)
    last = hi[0] if high_full else chr(ord(hi[0]) - 1)
    if first <= last:
        parts.append(_digit_class(first, last) + "[0-9]" + (f"{{{rest}}}" if rest > 1 else ""))
    if not high_full:
        parts += [hi[0] + part for part in digit_range("0" * rest, hi[1:])]
    return parts


def _digit_class(first: str, last: str) -> str:
    return first if first == last else f"[{first}-{last}]"


def template_word(pieces: Iterable[str | None], placeholder: str) -> str:
    """One command-template token: literal pieces (braces doubled) and `{placeholder}` holes.

    The token is quoted only when mailflow's split would otherwise cut or unquote it, so that
    splitting the template gives back this one token, whatever the word holds.
    """
    token = "".join(
        "{" + placeholder + "}" if p is None else p.replace("{", "{{").replace("}", "}}")
        for p in pieces
    )
    return token if _BARE_TOKEN.fullmatch(token) else shlex.quote(token)
