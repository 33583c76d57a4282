"""Properties of the sendmail migration: what it accepts, real `/bin/sh` splits the same way;
its regexes admit exactly the aliases' tokens; any generated family round-trips."""

from __future__ import annotations

import shlex
import shutil
import string
import subprocess

import regex
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailflow.migrate.aliases import parse_aliases
from mailflow.migrate.check import check_aliases
from mailflow.migrate.importer import import_aliases
from mailflow.migrate.patterns import digit_range, one_of, template_word
from mailflow.migrate.shell import shell_needs
from mailflow.routing import render_argv

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DOMAIN = "orders.example.com"

#: Every character sh treats specially, and some it does not.
SHELL_ALPHABET = "ab1 \t-./=%:,@+!^'\"\\|&;<>()$`*?[]{}~#"
SHELLS = [path for path in ("/bin/sh", shutil.which("bash")) if path]


def sh_split(shell: str, command: str) -> list[str]:
    """The words a real shell makes of `command` (as arguments of printf, one per line)."""
    done = subprocess.run(
        [shell, "-c", "printf '%s\\n' " + command],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout.split("\n")[:-1]


@PROPS
@given(st.text(alphabet=SHELL_ALPHABET, min_size=1, max_size=12))
@example("a 'b c' \"d e\" f\\ g")
@example("a#b '{x}' \"it's\"")
def test_accepted_commands_split_like_real_shells(command: str) -> None:
    # Most random strings are refused (that is the point); those accepted must split alike.
    if shell_needs(command) is None:
        for shell in SHELLS:
            assert sh_split(shell, command) == shlex.split(command), shell


quoted_word = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "-./=%:,@+", min_size=1, max_size=6),
    st.text(alphabet=SHELL_ALPHABET.replace("'", ""), max_size=6).map(lambda t: f"'{t}'"),
    st.text(alphabet=SHELL_ALPHABET.replace('"', "").replace("$", "").replace("`", ""), max_size=6)
    .filter(lambda t: not t.endswith("\\"))
    .map(lambda t: f'"{t}"'),
    st.sampled_from(list("|&;<>()$`*?[]{}~# '\"")).map(lambda c: "\\" + c),
)


@PROPS
@given(st.lists(st.lists(quoted_word, min_size=1, max_size=3).map("".join), min_size=1, max_size=5))
def test_quoted_words_are_accepted_and_split_like_real_shells(words: list[str]) -> None:
    command = "php " + " ".join(words)
    # Quoting and escaping alone never need a shell: every such command is carried over.
    assert shell_needs(command) is None, command
    for shell in SHELLS:
        assert sh_split(shell, command) == shlex.split(command), shell


@PROPS
@given(
    st.integers(1, 3).flatmap(
        lambda w: st.tuples(st.just(w), st.integers(0, 10**w - 1), st.integers(0, 10**w - 1))
    )
)
def test_digit_ranges_admit_exactly_the_range(case: tuple[int, int, int]) -> None:
    width, a, b = case
    low, high = min(a, b), max(a, b)
    pattern = regex.compile(
        "(?:" + "|".join(digit_range(f"{low:0{width}d}", f"{high:0{width}d}")) + ")"
    )
    admitted = {n for n in range(10**width) if pattern.fullmatch(f"{n:0{width}d}")}
    assert admitted == set(range(low, high + 1))


tokens = st.text(alphabet="0123456789abz-", min_size=1, max_size=4)


@PROPS
@given(st.sets(tokens, min_size=1, max_size=40), st.sets(tokens, max_size=40))
def test_one_of_admits_exactly_its_values(values: set[str], others: set[str]) -> None:
    pattern = regex.compile("(?:" + one_of(values) + ")")
    for candidate in values | others:
        assert bool(pattern.fullmatch(candidate)) == (candidate in values), candidate


@PROPS
@given(
    st.lists(
        st.one_of(st.none(), st.text(max_size=8).filter(lambda t: "\x00" not in t)), max_size=5
    ),
    st.text(alphabet="abc019", min_size=1, max_size=4),
)
def test_a_template_word_renders_back_to_the_word(pieces: list[str | None], value: str) -> None:
    token = template_word(pieces, "id")
    expected = "".join(value if p is None else p for p in pieces)
    assert render_argv(token, {"id": value}) == (expected,)


# --- families round-trip ----------------------------------------------------------------------

#: Literal words never contain a token (tokens are digits or lower-case), but need quoting.
literal = st.text(alphabet="ABCXYZ/._-= '\"", min_size=1, max_size=8)


@st.composite
def families(draw: st.DrawFn) -> tuple[str, str, str, list[str], list[str | None]]:
    """(prefix, suffix, kind, tokens, argv with None where the token goes)."""
    kind = draw(st.sampled_from(["digits", "letters"]))
    if kind == "digits":
        width = draw(st.integers(1, 4))
        numbers = draw(st.sets(st.integers(0, 10**width - 1), min_size=2, max_size=60))
        values = [f"{n:0{width}d}" for n in sorted(numbers)]
        prefix = draw(st.sampled_from(["ne-", "store", "s_", "", "x."]))
    else:
        values = sorted(
            draw(
                st.sets(
                    st.text(alphabet="abcdefgh", min_size=1, max_size=6), min_size=2, max_size=20
                )
            )
        )
        prefix = draw(st.sampled_from(["shop-", "", "o."]))
    suffix = draw(st.sampled_from(["", "-orders", ".in"]))
    argv = draw(st.lists(st.one_of(literal, st.none()), min_size=1, max_size=5))
    if None not in argv:
        argv.insert(draw(st.integers(0, len(argv))), None)
    argv = ["/usr/bin/php", *argv]
    return prefix, suffix, kind, values, argv


def alias_line(name: str, command: str, style: int) -> str:
    """An alias line in one of the four spellings of a pipe (quoted for RFC 822 as needed)."""
    rfc822 = command.replace("\\", "\\\\").replace('"', '\\"')
    if style == 0:
        return f'{name}: "|{rfc822}"'
    if style == 1:
        return f'{name}: | "{rfc822}"'
    if style == 2:
        return f'{name}:\n\t|"{rfc822}"'
    if not any(c in command for c in ',"\\'):
        return f"{name}: |{command}"
    return f'{name}: |"{rfc822}"'


@PROPS
@given(families(), st.randoms(use_true_random=False))
def test_any_family_imports_to_one_route_and_checks_clean(family, rng) -> None:
    prefix, suffix, _, values, argv = family
    lines = []
    for value in values:
        words = [value if w is None else w for w in argv]
        name = prefix + value + suffix
        if rng.random() < 0.2:
            name = name.upper()
        lines.append(alias_line(name, shlex.join(words), rng.randrange(4)))
    text = "\n".join(lines) + "\n"
    parsed = parse_aliases(text)
    assert parsed.problems == ()
    result = import_aliases(parsed, DOMAIN)
    assert result.complete, result.refused
    assert len(result.routes) == 1, [r.route for r in result.routes]
    assert len(result.routes[0].aliases) == len(values)
    report = check_aliases(parsed, tuple(r.route for r in result.routes), DOMAIN)
    assert report.passed(), [r for r in report.rows if r.status != "same"]


@PROPS
@given(
    st.lists(
        st.tuples(
            st.text(alphabet="abc01-", min_size=1, max_size=5),
            st.lists(
                st.text(alphabet="ab01 ./'\"", min_size=1, max_size=5), min_size=1, max_size=4
            ),
        ),
        min_size=1,
        max_size=30,
        unique_by=lambda item: item[0],
    ),
)
def test_any_aliases_file_of_commands_imports_and_checks_clean(entries) -> None:
    # Tokens may now sit anywhere in the commands: families may or may not form; every alias
    # must still come out with its own argv.
    text = "".join(
        alias_line(name, shlex.join(["php", *words]), style=i % 4) + "\n"
        for i, (name, words) in enumerate(entries)
    )
    parsed = parse_aliases(text)
    assert parsed.problems == ()
    result = import_aliases(parsed, DOMAIN)
    assert result.complete, result.refused
    assert sum(len(r.aliases) for r in result.routes) == len(entries)
    report = check_aliases(parsed, tuple(r.route for r in result.routes), DOMAIN)
    assert report.passed(), [r for r in report.rows if r.status != "same"]
