"""`mailflow aliases import|check`: the aliases(5) reader, shell refusals, route families.

The migration run end to end as real `mailflow` processes on a generated 500-line file is in
tests/e2e/test_aliases_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailflow.config import Route
from mailflow.migrate.aliases import parse_aliases, read_aliases
from mailflow.migrate.carry import Carried, Refusal, carry_over
from mailflow.migrate.check import check_aliases
from mailflow.migrate.importer import import_aliases
from mailflow.migrate.patterns import one_of
from mailflow.migrate.shell import shell_needs
from mailflow.routing import DeliveryPlan, Unroutable, plan_delivery

REPO = Path(__file__).resolve().parents[2]
DOMAIN = "orders.example.com"
RECEIVE = "/app/legacy/receive_mail.php"


# --- the reader -------------------------------------------------------------------------------


def test_every_spelling_of_a_pipe_runs_the_same_command() -> None:
    parsed = parse_aliases(
        "# comment\n"
        "\n"
        'a1: | "php r.php 001"\n'
        'a2: "|php r.php 001"\n'
        'a3: |"php r.php 001"\n'
        "a4: |php r.php 001\n"
        "a5:\n"
        "   # a comment between a line and its continuation is skipped\n"
        '\t| "php r.php 001"\n'
        'A6: "|php \\"r.php\\" 001"\n',
    )
    assert parsed.problems == ()
    assert [a.name for a in parsed.aliases] == ["a1", "a2", "a3", "a4", "a5", "a6"]
    assert parsed.aliases[4].line == 7
    assert parsed.aliases[5].written_name == "A6"
    for alias in parsed.aliases:
        carried = carry_over(alias, DOMAIN)
        assert isinstance(carried, Carried), alias
        assert carried.argv == ("php", "r.php", "001")


def test_target_kinds() -> None:
    parsed = parse_aliases(
        "a: someone@example.com\nb: /var/mail/b\nc: :include:/etc/mail/c\nd: root\n"
        'e: "|php x.php", root\n',
    )
    kinds = {a.name: [t.kind for t in a.targets] for a in parsed.aliases}
    assert kinds == {
        "a": ["address"],
        "b": ["file"],
        "c": ["include"],
        "d": ["address"],
        "e": ["command", "address"],
    }
    reasons = {a.name: carry_over(a, DOMAIN) for a in parsed.aliases}
    assert all(isinstance(r, Refusal) for r in reasons.values())
    assert "forwards to an address" in str(reasons["a"])
    assert "appends to a file" in str(reasons["b"])
    assert ":include:" in str(reasons["c"])
    assert "2 targets" in str(reasons["e"])


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('ok: |"a"\nbad: "|php x.php 001\nok2: |b\n', 2, "unterminated double quote"),
        ("ok: |a\nbad:\nok2: |b\n", 2, "empty target: no target after ':'"),
        ("bad: |a,,|b\n", 1, "empty target: target 2 is empty"),
        ("bad: |a,\n", 1, "empty target: target 2 is empty"),
        ("bad: |\n", 1, "empty command"),
        ("  stray\nok: |a\n", 1, "continuation line with no alias before it"),
        ("just some words\n", 1, "no ':' after the alias name"),
        ("bad name: |a\n", 1, "contains whitespace"),
        ('"quoted": |a\n', 1, "quoted alias names are not supported"),
        ("a@b.example: |a\n", 1, "is an address"),
        (": |a\n", 1, "empty alias name"),
        ("bad: |a \\", 1, "backslash at the end of the line"),
        ("bad\x01name: |a\n", 1, "control character"),
    ],
)
def test_bad_input_gets_its_line_and_reason(text: str, line: int, reason: str) -> None:
    parsed = parse_aliases(text)
    problems = [p for p in parsed.problems if p.dropped]
    assert len(problems) == 1, parsed.problems
    assert problems[0].line == line
    assert reason in problems[0].reason
    # The rest of the file is still read.
    assert {a.name for a in parsed.aliases} == {n for n in ("ok", "ok2") if f"{n}:" in text}


def test_a_line_that_is_not_utf8_is_reported_not_fatal() -> None:
    raw = "# 受注\n".encode("euc-jp") + b"ok: |a\nbad\xff: |b\nok2: |c\n"
    parsed = read_aliases(raw)
    assert [a.name for a in parsed.aliases] == ["ok", "ok2"]
    (problem,) = parsed.problems
    assert (problem.line, problem.name) == (3, None)
    assert "not UTF-8" in problem.reason


def test_a_byte_order_mark_is_not_part_of_the_first_name() -> None:
    parsed = read_aliases(b"\xef\xbb\xbfok: |a\n")
    assert [a.name for a in parsed.aliases] == ["ok"]


def test_a_name_too_long_for_an_address_is_refused_by_import_and_check() -> None:
    name = "n" * (320 - len(DOMAIN))
    parsed = parse_aliases(f"{name}: |a\nok: |b\n")
    result = import_aliases(parsed, DOMAIN)
    (refusal,) = result.refused
    assert refusal.name == name
    assert "longer than 320 characters" in refusal.reason
    report = check_aliases(parsed, tuple(r.route for r in result.routes), DOMAIN)
    assert [r.status for r in report.rows] == ["not_carried_over", "same"]


def test_duplicates_keep_the_last_and_say_so() -> None:
    parsed = parse_aliases(
        'x: "|php a.php 1"\ny: |b\nX: |"php a.php 1"\ny: |c\n',
    )
    assert [(a.name, a.line) for a in parsed.aliases] == [("x", 3), ("y", 4)]
    assert parsed.aliases[1].targets[0].value == "c"
    same, different = parsed.problems
    assert (same.line, same.dropped) == (3, False)
    assert "same targets" in same.reason
    assert (different.line, different.name) == (4, "y")
    assert "line 2" in different.reason
    assert "sendmail keeps the last" in different.reason


# --- shell refusals ---------------------------------------------------------------------------

REFUSED_COMMANDS = {
    "pipe": ("php a.php | tee /tmp/x", "a pipe"),
    "redirect_out": ("php a.php >> /var/log/a 2>&1", "redirection (>)"),
    "redirect_in": ("php a.php < /dev/null", "redirection (<)"),
    "list": ("php a.php; echo done", "; (a command list)"),
    "and": ("php a.php && echo ok", "&&"),
    "background": ("php a.php &", "background"),
    "variable": ("php a.php $HOME", "$ (variable"),
    "braced_variable": ('php a.php "${STORE}"', "$ (variable"),
    "substitution": ("php a.php $(date)", "$ (variable"),
    "backticks": ("php a.php `date`", "command substitution"),
    "glob_star": ("php /app/*.php", "a glob"),
    "glob_question": ("php /app/a?.php", "a glob"),
    "glob_class": ("php /app/[ab].php", "a glob"),
    "tilde": ("php ~/a.php", "home-directory"),
    "comment": ("php a.php # note", "a shell comment"),
    "assignment": ("LANG=C php a.php", "variable assignment"),
    "builtin": ("exec php a.php", "'exec' is a shell builtin"),
    "cd": ("cd /app", "'cd' is a shell builtin"),
    "subshell": ("(php a.php)", "subshell"),
    "braces": ("php a.php {a,b}", "braces"),
    "escaped_dollar_in_double_quotes": ('php "a\\$b"', "backslash before $"),
    "unterminated_single": ("php 'a", "unterminated single quote"),
    "tab_is_fine_newline_is_not": ("php a.php\nrm -rf /", "newline"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_COMMANDS))
def test_commands_that_need_a_shell_are_refused_with_the_reason(kind: str) -> None:
    command, reason = REFUSED_COMMANDS[kind]
    found = shell_needs(command)
    assert found is not None
    assert reason in found


def test_every_reason_is_named_at_once() -> None:
    found = shell_needs("cat > /var/spool/$(date +%s).eml 2>&1")
    assert found is not None
    for reason in ("redirection (>)", "$ (variable", "&"):
        assert reason in found


@pytest.mark.parametrize(
    "command",
    [
        "php /app/legacy/receive_mail.php 001",
        "php 'a b' \"c d\" e\\ f",
        "/usr/bin/php --config=/etc/x.ini a#b a=b 100%",
        "php '{json}' 'a|b' \"a;b\" '$HOME' '*'",
        "php\ta.php",
        "php !x ^y",
    ],
)
def test_commands_that_need_no_shell_are_accepted(command: str) -> None:
    assert shell_needs(command) is None


# --- patterns ---------------------------------------------------------------------------------


def test_numeric_runs_become_ranges_and_admit_nothing_else() -> None:
    values = [f"{n:03d}" for n in range(1, 451) if n not in (13, 200)] + ["7", "0999"]
    pattern = one_of(values)
    assert "|2[1-9][0-9]|3[0-9]{2}|" in pattern
    compiled = __import__("regex").compile(f"(?:{pattern})")
    universe = {f"{n:03d}" for n in range(1000)} | {str(n) for n in range(100)} | {"0999"}
    assert {v for v in universe if compiled.fullmatch(v)} == set(values)


# --- import and check in-process --------------------------------------------------------------


def test_a_family_is_one_route_that_runs_each_members_argv() -> None:
    text = "".join(f'ne-{n:03d}: | "php {RECEIVE} {n:03d}"\n' for n in range(1, 31))
    text += 'ne-100: "|php /app/legacy/other.php 100"\n'
    result = import_aliases(parse_aliases(text), "Orders.Example.COM", group="store")
    assert result.complete
    family, single = result.routes
    assert family.route == Route(
        name="ne-store",
        match=r"ne-(?P<store>00[1-9]|0[1-2][0-9]|030)@orders\.example\.com",
        command=f"php {RECEIVE} {{store}}",
        key="store",
    )
    assert len(family.aliases) == 30
    assert single.route.match == r"ne-100@orders\.example\.com"
    routes = (family.route, single.route)
    # A store that was not in the file bounced before; it stays unroutable.
    assert isinstance(plan_delivery(routes, f"ne-031@{DOMAIN}", sender="", mail_id="m"), Unroutable)
    plan = plan_delivery(routes, f"NE-007@{DOMAIN.upper()}", sender="", mail_id="m")
    assert isinstance(plan, DeliveryPlan)
    assert plan.argv == ("php", RECEIVE, "007")


def test_a_token_that_also_sits_elsewhere_in_the_command_still_makes_a_family() -> None:
    # `1` is in `php8.1` too: only the argument's occurrence must become the placeholder.
    text = "".join(f"s-{n}: |/usr/bin/php8.1 /app/r.php --store {n}\n" for n in range(1, 10))
    result = import_aliases(parse_aliases(text), DOMAIN)
    (family,) = result.routes
    assert family.route.command == "/usr/bin/php8.1 /app/r.php --store {id}"
    assert family.route.match == r"s-(?P<id>[1-9])@orders\.example\.com"


def test_literal_braces_and_quotes_survive_the_template() -> None:
    text = "a: \"|php x.php '{json}' 'it''s' \\\"q\\\" ''\"\n"
    result = import_aliases(parse_aliases(text), DOMAIN)
    (route,) = result.routes
    report = check_aliases(parse_aliases(text), (route.route,), DOMAIN)
    assert [r.status for r in report.rows] == ["same"]
    assert report.rows[0].mailflow_argv == ("php", "x.php", "{json}", "its", "q", "")


def test_check_sees_a_wrong_route() -> None:
    parsed = parse_aliases("".join(f"ne-{n:03d}: |php {RECEIVE} {n:03d}\n" for n in range(1, 5)))
    wrong = Route(name="s", match=r"ne-(?P<n>[0-9]{3})@.+", command=f"php {RECEIVE} 001")
    report = check_aliases(parsed, (wrong,), DOMAIN)
    assert [r.status for r in report.rows] == ["same", "different", "different", "different"]
    assert report.rows[1].detail == "argv[2]: alias '002', mailflow '001'"
    assert not report.passed(accept_refused=True)


def test_a_route_mailflow_would_run_differently_is_refused_not_written(monkeypatch) -> None:
    # Simulate a template bug: the proof through mailflow's routing must catch it.
    from mailflow.migrate import importer  # noqa: PLC0415

    real = importer.template_word
    monkeypatch.setattr(
        importer,
        "template_word",
        lambda pieces, group: real(["x" if p == "b" else p for p in pieces], group),
    )
    result = import_aliases(parse_aliases("one: |php a b\ntwo: |php c d\n"), DOMAIN)
    assert [r.route.name for r in result.routes] == ["two"]
    (refusal,) = result.refused
    assert refusal.name == "one"
    assert "would run ['php', 'a', 'x']" in refusal.reason
    assert "import bug" in refusal.reason


def test_bad_domain_and_group_are_refused() -> None:
    parsed = parse_aliases("a: |b\n")
    with pytest.raises(ValueError, match="not a domain"):
        import_aliases(parsed, "not a domain")
    with pytest.raises(ValueError, match="builtin placeholder"):
        import_aliases(parsed, DOMAIN, group="recipient")
