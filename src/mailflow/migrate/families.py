"""Aliases that differ only in one token, which also appears in their command, form a family.

`ne-001: |php r.php 001` … `ne-450: |php r.php 450` is one family: name prefix `ne-`, the
token, and the command with the token's place marked. Each alias is split at every maximal
run of digits and every maximal run of letters-and-digits. The token's occurrences in the
command give candidate shapes: up to four occurrences in every combination (so a `1` that
also sits in `php8.1` does not spoil the shape), beyond that all of them, the whole words,
and those standing apart. The shape shared by the most aliases wins, its aliases are taken,
and so on; an alias no other alias shares a shape with stays on its own.

A family renders each member's argv exactly by construction (the shape is the member's argv
cut at the token), and its regex accepts exactly the members' values, no other: a store that
was not in the aliases file stays unroutable, as it bounced before.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

from mailflow.routing import SAFE_VALUE

#: Occurrences of a token in a command up to this are tried in every combination (2^n - 1
#: shapes); beyond it only all of them, the whole words, and those standing apart.
MAX_OCCURRENCES = 4

#: A hole in a shape: where the family's token goes.
HOLE = None

Word = tuple[str | None, ...]
Shape = tuple[str, str, tuple[Word, ...]]

_RUNS = (re.compile(r"[0-9]+"), re.compile(r"[a-z0-9]+"))


@dataclass(frozen=True, slots=True)
class Member:
    """A carried-over alias: lower-cased name and the argv its command runs."""

    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Family:
    """Members `prefix + value + suffix` whose argv is `words` with each hole set to value."""

    prefix: str
    suffix: str
    words: tuple[Word, ...]
    #: (member name, its value), in the order the members were given.
    values: tuple[tuple[str, str], ...]


def find_families(members: Sequence[Member]) -> tuple[list[Family], list[Member]]:
    """Families of two or more members, and the members left on their own (input order)."""
    by_shape: dict[Shape, dict[str, str]] = {}
    for member in members:
        for shape, value in _shapes(member):
            by_shape.setdefault(shape, {}).setdefault(member.name, value)
    order = {m.name: i for i, m in enumerate(members)}
    shapes = list(by_shape.items())
    # Lazy greedy: the shape with the most members not yet taken (then the one using the
    # token in more places, then a stable order); a popped entry whose count went stale is
    # pushed back with its current count.
    heap = [
        (-len(found), -_holes(shape), repr(shape), index)
        for index, (shape, found) in enumerate(shapes)
        if len(found) >= 2
    ]
    heapq.heapify(heap)
    taken: set[str] = set()
    families: list[Family] = []
    while heap:
        count, holes, tiebreak, index = heapq.heappop(heap)
        (prefix, suffix, words), found = shapes[index]
        live = [(n, v) for n, v in found.items() if n not in taken]
        if len(live) < 2:
            continue
        if len(live) != -count:
            heapq.heappush(heap, (-len(live), holes, tiebreak, index))
            continue
        live.sort(key=lambda item: order[item[0]])
        families.append(Family(prefix, suffix, words, tuple(live)))
        taken.update(n for n, _ in live)
    families.sort(key=lambda f: order[f.values[0][0]])
    return families, [m for m in members if m.name not in taken]


def render(words: Iterable[Word], value: str) -> tuple[str, ...]:
    """A member's argv: the shape with every hole set to its value."""
    return tuple("".join(value if p is HOLE else p for p in word) for word in words)


def _holes(shape: Shape) -> int:
    return sum(piece is HOLE for word in shape[2] for piece in word)


def _shapes(member: Member) -> list[tuple[Shape, str]]:
    shapes: list[tuple[Shape, str]] = []
    spans = {m.span() for pattern in _RUNS for m in pattern.finditer(member.name)}
    for start, end in sorted(spans):
        value = member.name[start:end]
        if not SAFE_VALUE.fullmatch(value):
            continue
        places = [
            (index, at)
            for index, word in enumerate(member.argv)
            for at in _occurrences(word, value)
        ]
        if not places:
            continue
        prefix, suffix = member.name[:start], member.name[end:]
        for chosen in _choices(member.argv, value, places):
            words = tuple(
                _cut(word, value, [at for i, at in chosen if i == index])
                for index, word in enumerate(member.argv)
            )
            shapes.append(((prefix, suffix, words), value))
    return shapes


def _choices(
    argv: tuple[str, ...],
    value: str,
    places: list[tuple[int, int]],
) -> set[tuple[tuple[int, int], ...]]:
    """Which occurrences of the token become the hole: every combination of a few; and always
    all of them, the whole words, and those not inside a longer run of letters and digits."""
    chosen: set[tuple[tuple[int, int], ...]] = {tuple(places)}
    if len(places) <= MAX_OCCURRENCES:
        for count in range(1, len(places)):
            chosen.update(combinations(places, count))
    whole = tuple(p for p in places if argv[p[0]] == value)
    apart = tuple(p for p in places if _stands_apart(argv[p[0]], p[1], len(value)))
    chosen.update(c for c in (whole, apart) if c)
    return chosen


def _stands_apart(word: str, start: int, length: int) -> bool:
    before = word[start - 1 : start]
    after = word[start + length : start + length + 1]
    return not before.isalnum() and not after.isalnum()


def _occurrences(word: str, value: str) -> list[int]:
    found: list[int] = []
    at = word.find(value)
    while at >= 0:
        found.append(at)
        at = word.find(value, at + len(value))
    return found


def _cut(word: str, value: str, starts: list[int]) -> Word:
    """`word` as literal pieces with a hole at each start (the literal `word` if none)."""
    if not starts:
        return (word,)
    pieces: list[str | None] = []
    position = 0
    for start in sorted(starts):
        pieces += [word[position:start], HOLE]
        position = start + len(value)
    pieces.append(word[position:])
    return tuple(pieces)
