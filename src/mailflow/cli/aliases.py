"""`mailflow aliases import|check`: the sendmail migration, parsed and rendered here.

The work lives in `mailflow.migrate`; this module reads files, writes the routes file, prints
tables for people (stderr for import, whose stdout may be the routes) and JSON for scripts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from mailflow.config import Settings, describe_validation_error
from mailflow.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    from mailflow.migrate.aliases import AliasesFile, Problem
    from mailflow.migrate.carry import Refusal
    from mailflow.migrate.check import CheckReport, CheckRow
    from mailflow.migrate.importer import ImportResult


class _UsageError(Exception):
    """Bad arguments or an unreadable input file: exit 2, nothing written."""


def _read(path: Path) -> AliasesFile:
    from mailflow.migrate.aliases import read_aliases  # noqa: PLC0415 - keep `--help` fast

    try:
        return read_aliases(path.read_bytes())
    except OSError as exc:
        raise _UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


#: Tables in CI logs and pipes: wide enough that argv and reasons stay on one line or two.
PIPE_WIDTH = 160


def _console(stream: TextIO) -> Console:
    width = None if stream.isatty() else PIPE_WIDTH
    return Console(file=stream, soft_wrap=True, highlight=False, width=width)


def _argv_text(argv: tuple[str, ...] | None) -> str:
    return "" if argv is None else shlex.join(argv)


def _problem_lines(console: Console, title: str, items: list[Refusal] | list[Problem]) -> None:
    if not items:
        return
    console.print(f"{title} ({len(items)}):", markup=False)
    for item in items:
        name = f" {item.name}:" if item.name else ""
        console.print(f"  line {item.line}:{name} {item.reason}", markup=False)


# --- import -----------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow aliases import`: turn an /etc/aliases file into a routes document.

    Writes the routes to `--out` or stdout and a summary to stderr. Exit 0 when every alias was
    carried over, 1 when some were not (they are listed), 2 on unusable input (nothing written)."""
    from mailflow.migrate.importer import import_aliases  # noqa: PLC0415

    try:
        parsed = _read(args.file)
        result = import_aliases(parsed, args.domain, group=args.group)
    except (_UsageError, ValueError) as exc:
        sys.stderr.write(f"mailflow aliases import: {exc}\n")
        return EXIT_CONFIG
    document = json.dumps(result.routes_document(), ensure_ascii=False, indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(document)
        sys.stdout.flush()
    else:
        try:
            args.out.write_text(document, encoding="utf-8")
        except OSError as exc:
            sys.stderr.write(f"mailflow aliases import: cannot write {args.out}: {exc}\n")
            return EXIT_CONFIG
    _import_summary(result, args.out)
    return EXIT_OK if result.complete else EXIT_FAILURE


def _import_summary(result: ImportResult, out: Path | None) -> None:
    console = _console(sys.stderr)
    table = Table(title=f"routes written to {out or 'stdout'}")
    for column in ("route", "aliases", "match", "command"):
        table.add_column(column, overflow="fold")
    for imported in result.routes:
        route = imported.route
        table.add_row(route.name, str(len(imported.aliases)), route.match, route.command)
    console.print(table)
    carried = sum(len(r.aliases) for r in result.routes)
    console.print(
        f"{carried} aliases carried over in {len(result.routes)} routes;"
        f" {len(result.refused)} not carried over",
        markup=False,
    )
    _problem_lines(console, "warnings", list(result.warnings))
    _problem_lines(console, "NOT carried over", list(result.refused))


# --- check ------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow aliases check`: for each alias, compare what sendmail would run with what the
    worker's routes run. Exit 0 when all agree (`--accept-refused` lets refused ones pass), 1
    when any differ, 2 on unusable input."""
    from mailflow.migrate.check import check_aliases  # noqa: PLC0415
    from mailflow.migrate.importer import validate_domain  # noqa: PLC0415

    try:
        domain = validate_domain(args.domain)
        parsed = _read(args.file)
        if args.routes is not None:
            settings = Settings(routes_file=args.routes)
    except ValidationError as exc:
        sys.stderr.write(f"mailflow aliases check: {describe_validation_error(exc)}\n")
        return EXIT_CONFIG
    except (_UsageError, ValueError) as exc:
        sys.stderr.write(f"mailflow aliases check: {exc}\n")
        return EXIT_CONFIG
    report = check_aliases(parsed, settings.routes, domain)
    passed = report.passed(accept_refused=args.accept_refused)
    if args.json:
        _check_json(report, passed, parsed)
    else:
        _check_table(report, passed, args.accept_refused, parsed)
    return EXIT_OK if passed else EXIT_FAILURE


def _row_json(row: CheckRow) -> dict[str, Any]:
    return {
        "line": row.line,
        "alias": row.name,
        "recipient": row.recipient,
        "status": row.status,
        "alias_targets": row.alias_targets,
        "alias_argv": None if row.alias_argv is None else list(row.alias_argv),
        "route": row.route,
        "mailflow_argv": None if row.mailflow_argv is None else list(row.mailflow_argv),
        "detail": row.detail,
    }


def _check_json(report: CheckReport, passed: bool, parsed: AliasesFile) -> None:
    document = {
        "domain": report.domain,
        "passed": passed,
        "counts": report.counts(),
        "aliases": [_row_json(row) for row in report.rows],
        "warnings": [
            {"line": p.line, "alias": p.name, "reason": p.reason}
            for p in parsed.problems
            if not p.dropped
        ],
    }
    sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def _check_table(
    report: CheckReport,
    passed: bool,
    accept_refused: bool,
    parsed: AliasesFile,
) -> None:
    console = _console(sys.stdout)
    counts = report.counts()
    mismatched = [r for r in report.rows if r.status in ("different", "unroutable")]
    if mismatched:
        table = Table(title=f"aliases mailflow would run differently ({report.domain})")
        for column in ("line", "alias", "status", "alias runs", "mailflow runs", "route", "why"):
            table.add_column(column, overflow="fold")
        for row in mismatched:
            table.add_row(
                str(row.line),
                row.name or "",
                row.status,
                _argv_text(row.alias_argv),
                _argv_text(row.mailflow_argv),
                row.route or "",
                row.detail,
            )
        console.print(table)
    refused = [r for r in report.rows if r.status == "not_carried_over"]
    if refused:
        console.print(f"not carried over ({len(refused)}):", markup=False)
    for row in refused:
        name = f" {row.name}:" if row.name else ""
        routed = f" [mailflow: route {row.route} runs {_argv_text(row.mailflow_argv)}]"
        console.print(
            f"  line {row.line}:{name} {row.detail}{routed if row.route else ''}",
            markup=False,
        )
    _problem_lines(console, "warnings", [p for p in parsed.problems if not p.dropped])
    summary = ", ".join(f"{count} {status}" for status, count in counts.items() if count)
    verdict = "ok" if passed else "FAILED"
    accepted = (
        " (not carried over accepted)" if accept_refused and counts["not_carried_over"] else ""
    )
    console.print(f"{verdict}: {summary or 'no aliases'}{accepted}", markup=False)


# --- parser -----------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add `aliases import` and `aliases check` to `mailflow`'s subparsers."""
    top = sub.add_parser(
        "aliases",
        help="migration from sendmail: import /etc/aliases into routes, check they agree",
    )
    commands = top.add_subparsers(dest="aliases_command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "import",
        help="write routes for an aliases(5) file; exit 1 listing what was not carried over",
    )
    p.add_argument("file", type=Path, metavar="FILE", help="the aliases file (e.g. /etc/aliases)")
    p.add_argument("--domain", required=True, help="the domain the aliases received mail for")
    p.add_argument(
        "--out",
        type=Path,
        metavar="ROUTES.json",
        help="write the routes here (default: stdout); the summary always goes to stderr",
    )
    p.add_argument(
        "--group",
        default="id",
        help="name of the token a family route captures, e.g. store (default: %(default)s)",
    )
    p.set_defaults(handler=cmd_import)

    p = commands.add_parser(
        "check",
        help="for every alias, mailflow's argv next to the alias's; exit 0 only if all agree",
    )
    p.add_argument("file", type=Path, metavar="FILE", help="the aliases file (e.g. /etc/aliases)")
    p.add_argument("--domain", required=True, help="the domain the aliases received mail for")
    p.add_argument(
        "--routes",
        type=Path,
        metavar="ROUTES.json",
        help="routes file to check (default: the routes from the settings, as the worker loads)",
    )
    p.add_argument(
        "--accept-refused",
        action="store_true",
        help="aliases that cannot be carried over are listed but do not fail the check",
    )
    p.add_argument("--json", action="store_true", help="one JSON object with every alias")
    p.set_defaults(handler=cmd_check)
