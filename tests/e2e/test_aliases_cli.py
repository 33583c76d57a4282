"""`mailflow aliases import|check` end to end as real `mailflow` processes, on a generated
500-line aliases file, the example round trip, usage errors (moved from tests/unit: each
starts the console script, seconds apiece)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mailflow.config import Settings

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
