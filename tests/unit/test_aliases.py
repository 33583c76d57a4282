"""`mailflow aliases import|check`: the aliases(5) reader, shell refusals, route families, and
the migration run end to end as real `mailflow` processes on a generated 500-line file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailflow.config import Route, Settings
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


def mailflow(*args: str, code: int, cwd: Path, extra_env: dict[str, str] | None = None):
    """The installed console script (what an operator and CI run), as a real process."""
    script = Path(sys.executable).with_name("mailflow")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mailflow"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFLOW_")}
    env.update(extra_env or {})
    done = subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == code, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    return done


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


# --- the 500-line legacy file, end to end as real processes -----------------------------------


@dataclass
class Legacy:
    """A generated aliases file and what must become of each alias."""

    lines: list[str] = field(default_factory=list)
    #: alias → the argv the legacy shell ran for it (must come out the same).
    same: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: alias → a piece of the reason it is not carried over.
    refused: dict[str, str] = field(default_factory=dict)
    #: line number → a piece of the reason that line is unreadable.
    unreadable: dict[int, str] = field(default_factory=dict)

    def add(self, *lines: str) -> int:
        self.lines += lines
        return len(self.lines) - len(lines) + 1

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


STORES = range(1, 421)
SET_ASIDE = {42: "duplicate", 100: "redirect", 200: "variable", 300: "builtin"}
CITIES = ["tokyo", "osaka", "nagoya", "sapporo", "fukuoka", "kobe", "kyoto", "sendai"]


def legacy_aliases() -> Legacy:
    """ne-001…ne-420 in every spelling, a city family, odd aliases, every refused kind."""
    legacy = Legacy()
    unreadable_first = legacy.add("   a stray continuation before any alias")
    legacy.unreadable[unreadable_first] = "continuation line with no alias before it"
    legacy.add("# /etc/aliases of the order host", "", "postmaster: root", "root: ops@example.com")
    legacy.refused |= {"postmaster": "forwards to an address", "root": "forwards to an address"}
    styles = [
        'ne-{n}: | "php {r} {n}"',
        'ne-{n}: "|php {r} {n}"',
        'ne-{n}: |"php {r} {n}"',
        "ne-{n}: |php {r} {n}",
    ]
    for number in STORES:
        n = f"{number:03d}"
        if number % 50 == 0:
            legacy.add("", f"# stores from {n}")
        argv = ("php", RECEIVE, n)
        if SET_ASIDE.get(number) == "redirect":
            legacy.add(f'ne-{n}: "|php {RECEIVE} {n} >> /var/log/ne-{n}.log 2>&1"')
            legacy.refused[f"ne-{n}"] = "redirection (>)"
            continue
        if SET_ASIDE.get(number) == "variable":
            legacy.add(f'ne-{n}: "|php {RECEIVE} $STORE"')
            legacy.refused[f"ne-{n}"] = "$ (variable"
            continue
        if SET_ASIDE.get(number) == "builtin":
            legacy.add(f'ne-{n}: "|exec php {RECEIVE} {n}"')
            legacy.refused[f"ne-{n}"] = "'exec' is a shell builtin"
            continue
        if number % 23 == 0:
            legacy.add(f"ne-{n}:", f'\t| "php {RECEIVE}', f'    {n}"')
        elif number % 37 == 0:
            legacy.add(styles[number % 4].format(n=n, r=RECEIVE).replace("ne-", "NE-", 1))
        else:
            legacy.add(styles[number % 4].format(n=n, r=RECEIVE))
        legacy.same[f"ne-{n}"] = argv
    # Duplicates: one repeated as it was, one whose later line changed its command.
    legacy.add('ne-013: "|php /app/legacy/receive_mail.php 013"')
    legacy.add('ne-042: "|php /app/legacy/receive_mail.php 042 --legacy-stock"')
    legacy.same["ne-042"] = ("php", RECEIVE, "042", "--legacy-stock")
    for city in CITIES:
        legacy.add(f'shop-{city}: "|/usr/bin/php /app/legacy/shop.php --store {city} --notify"')
        legacy.same[f"shop-{city}"] = (
            "/usr/bin/php",
            "/app/legacy/shop.php",
            "--store",
            city,
            "--notify",
        )
    odd = {
        "stock: \"|php /app/legacy/stock_import.php --source 'warehouse 2'\"": (
            "stock",
            ("php", "/app/legacy/stock_import.php", "--source", "warehouse 2"),
        ),
        'Orders-Admin: |"/usr/local/bin/order-admin --notify"': (
            "orders-admin",
            ("/usr/local/bin/order-admin", "--notify"),
        ),
        'json: "|php /app/legacy/hook.php \'{\\"a\\": 1}\'"': (
            "json",
            ("php", "/app/legacy/hook.php", '{"a": 1}'),
        ),
    }
    for line, (name, argv) in odd.items():
        legacy.add(line)
        legacy.same[name] = argv
    refusals = {
        "sales": ("sales@example.com", "forwards to an address"),
        "mbox": ("/var/mail/orders", "appends to a file"),
        "team": (":include:/etc/mail/team", ":include:"),
        "both": ('"|php a.php", ops@example.com', "2 targets"),
        "piped": ('"|php a.php | tee /tmp/x"', "a pipe"),
        "fed": ('"|php a.php < /dev/null"', "redirection (<)"),
        "listed": ('"|php a.php; echo done"', "; (a command list)"),
        "anded": ('"|php a.php && echo ok"', "&&"),
        "ticked": ('"|php a.php `date`"', "command substitution"),
        "globbed": ('"|php /app/*.php"', "a glob"),
        "tilded": ('"|php ~/a.php"', "home-directory"),
        "assigned": ('"|LANG=C php a.php"', "variable assignment"),
        "commented": ('"|php a.php # note"', "a shell comment"),
        "braced": ('"|php a.php {a,b}"', "braces"),
    }
    for name, (target, reason) in refusals.items():
        legacy.add(f"{name}: {target}")
        legacy.refused[name] = reason
    for line, reason in [
        ('broken: "|php a.php', "unterminated double quote"),
        ("empty:", "no target after ':'"),
        ("gap: |a,,|b", "target 2 is empty"),
        ("no colon here", "no ':'"),
    ]:
        legacy.unreadable[legacy.add(line)] = reason
    while len(legacy.lines) < 500:
        legacy.add("# (padding: the real file has notes like this between its entries)")
    return legacy


def test_import_then_check_a_500_line_aliases_file(tmp_path: Path) -> None:
    legacy = legacy_aliases()
    assert len(legacy.lines) >= 500
    aliases = tmp_path / "aliases"
    aliases.write_text(legacy.text, encoding="utf-8")
    routes_file = tmp_path / "routes.json"

    imported = mailflow(
        "aliases",
        "import",
        str(aliases),
        "--domain",
        DOMAIN,
        "--group",
        "store",
        "--out",
        str(routes_file),
        code=1,  # something was left out, and listed
        cwd=tmp_path,
    )
    assert imported.stdout == ""
    listed = imported.stderr.split("NOT carried over", 1)[1]
    for name, reason in legacy.refused.items():
        line = next(n for n, text in enumerate(legacy.lines, 1) if text.startswith(f"{name}:"))
        assert f"line {line}: {name}: " in listed
        assert reason in listed
    for line, reason in legacy.unreadable.items():
        assert f"line {line}:" in listed
        assert reason in listed
    assert "sendmail keeps the last" in imported.stderr

    # The routes file is what the worker loads, and it is short.
    routes = Settings(routes_file=routes_file).routes
    by_name = {r.name: r for r in routes}
    assert by_name["ne-store"].command == f"php {RECEIVE} {{store}}"
    assert by_name["shop-store"].match.startswith("shop-(?P<store>")
    assert len(routes) == 2 + 4  # two families; ne-042 (changed), stock, orders-admin, json
    assert "ne-store" in imported.stderr

    checked = mailflow(
        "aliases",
        "check",
        str(aliases),
        "--domain",
        DOMAIN,
        "--routes",
        str(routes_file),
        "--json",
        code=1,  # the refused aliases are not carried over
        cwd=tmp_path,
    )
    report = json.loads(checked.stdout)
    rows = {row["alias"]: row for row in report["aliases"] if row["alias"]}
    for name, argv in legacy.same.items():
        assert rows[name]["status"] == "same", rows[name]
        assert rows[name]["mailflow_argv"] == list(argv) == rows[name]["alias_argv"]
    for name, reason in legacy.refused.items():
        assert rows[name]["status"] == "not_carried_over"
        assert reason in rows[name]["detail"]
    unreadable = {
        row["line"]: row for row in report["aliases"] if row["detail"].startswith("unreadable")
    }
    assert set(unreadable) == set(legacy.unreadable)
    covered = sum(1 for row in rows.values() if row["route"] == "ne-store")
    assert covered == len(STORES) - 4  # three refused stores and the changed ne-042
    assert report["counts"] == {
        "same": len(legacy.same),
        "different": 0,
        "unroutable": 0,
        "not_carried_over": len(legacy.refused) + len(legacy.unreadable),
    }
    assert not report["passed"]

    # The importable part passes: the acceptance test for a deployment that knowingly leaves
    # the rest to the MTA in front of SES.
    accepted = mailflow(
        "aliases",
        "check",
        str(aliases),
        "--domain",
        DOMAIN,
        "--accept-refused",
        code=0,
        cwd=tmp_path,
        extra_env={"MAILFLOW_ROUTES_FILE": str(routes_file)},  # the settings, as the worker
    )
    assert accepted.stdout.rstrip().endswith("(not carried over accepted)")
    assert f"ok: {len(legacy.same)} same" in accepted.stdout


def test_check_fails_on_routes_that_run_something_else(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text(
        "".join(f'ne-{n:03d}: | "php {RECEIVE} {n:03d}"\n' for n in range(1, 6))
        + 'shop-kobe: "|php /app/legacy/shop.php kobe"\n',
        encoding="utf-8",
    )
    # mailflow's built-in default route runs the sample script, not the production one.
    checked = mailflow(
        "aliases",
        "check",
        str(aliases),
        "--domain",
        DOMAIN,
        "--accept-refused",
        code=1,
        cwd=tmp_path,
    )
    assert "different" in checked.stdout
    assert "unroutable" in checked.stdout
    assert "FAILED: 5 different, 1 unroutable" in checked.stdout

    # Widening the imported regex by hand is the operator's call; check still proves argv.
    routes_file = tmp_path / "routes.json"
    mailflow(
        "aliases",
        "import",
        str(aliases),
        "--domain",
        DOMAIN,
        "--out",
        str(routes_file),
        code=0,
        cwd=tmp_path,
    )
    routes = json.loads(routes_file.read_text())
    routes[0]["match"] = r"ne-(?P<id>[0-9]{3})@orders\.example\.com"
    routes_file.write_text(json.dumps(routes))
    mailflow(
        "aliases",
        "check",
        str(aliases),
        "--domain",
        DOMAIN,
        "--routes",
        str(routes_file),
        code=0,
        cwd=tmp_path,
    )
    routes[0]["command"] = f"php {RECEIVE} 001"
    routes_file.write_text(json.dumps(routes))
    wrong = mailflow(
        "aliases",
        "check",
        str(aliases),
        "--domain",
        DOMAIN,
        "--routes",
        str(routes_file),
        "--json",
        code=1,
        cwd=tmp_path,
    )
    statuses = [row["status"] for row in json.loads(wrong.stdout)["aliases"]]
    assert statuses == ["same", "different", "different", "different", "different", "same"]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    aliases = tmp_path / "aliases"
    aliases.write_text("a: |b\n", encoding="utf-8")
    missing = mailflow(
        "aliases", "import", str(tmp_path / "nope"), "--domain", DOMAIN, code=2, cwd=tmp_path
    )
    assert "cannot read" in missing.stderr
    mailflow("aliases", "import", str(aliases), "--domain", "no such domain", code=2, cwd=tmp_path)
    unwritable = mailflow(
        "aliases",
        "import",
        str(aliases),
        "--domain",
        DOMAIN,
        "--out",
        str(tmp_path / "no-such-dir" / "routes.json"),
        code=2,
        cwd=tmp_path,
    )
    assert "cannot write" in unwritable.stderr
    bad_routes = tmp_path / "routes.json"
    bad_routes.write_text('[{"name": "x"}]')
    broken = mailflow(
        "aliases",
        "check",
        str(aliases),
        "--domain",
        DOMAIN,
        "--routes",
        str(bad_routes),
        code=2,
        cwd=tmp_path,
    )
    assert f"routes_file {bad_routes}" in broken.stderr


def test_the_example_round_trip_is_what_the_readme_shows(tmp_path: Path) -> None:
    example = REPO / "examples" / "aliases"
    out = tmp_path / "routes.json"
    imported = mailflow(
        "aliases",
        "import",
        str(example / "aliases"),
        "--domain",
        DOMAIN,
        "--group",
        "store",
        "--out",
        str(out),
        code=1,
        cwd=tmp_path,
    )
    assert out.read_text() == (example / "routes.json").read_text()
    readme = (REPO / "README.md").read_text()
    assert (example / "routes.json").read_text().strip() in readme
    assert "12 aliases carried over in 3 routes; 4 not carried over" in imported.stderr
    checked = mailflow(
        "aliases",
        "check",
        str(example / "aliases"),
        "--domain",
        DOMAIN,
        "--routes",
        str(out),
        code=1,
        cwd=tmp_path,
    )
    assert "FAILED: 12 same, 4 not_carried_over" in checked.stdout
    assert "FAILED: 12 same, 4 not_carried_over" in readme
    mailflow(
        "aliases",
        "check",
        str(example / "aliases"),
        "--domain",
        DOMAIN,
        "--routes",
        str(out),
        "--accept-refused",
        code=0,
        cwd=tmp_path,
    )
