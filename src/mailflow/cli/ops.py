"""Operator subcommands beyond the worker's own: registered into the main parser.

`status`, `retry`, `redrive`, `parse`, `reconcile`: rich tables for people by default, one JSON
document on stdout with `--json` (logs go to stderr either way), exit codes from exitcodes.py.
The work itself lives in mailflow.ops; this module parses, and renders with cli.render.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mailflow.cli.render import STATUS_JA, print_json, print_rows, say
from mailflow.cli.runtime import run_async
from mailflow.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    from mailflow.config import Settings
    from mailflow.ops.reconcile import PassReport, Tracker

# --- status -----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow status`: deliveries per state, the oldest unfinished one, queue and DLQ depth."""
    from mailflow.aws import open_clients  # noqa: PLC0415 - keep `--help` fast
    from mailflow.cli.holds import render_holds  # noqa: PLC0415
    from mailflow.ops.holds import holds_report  # noqa: PLC0415
    from mailflow.ops.status import status_report  # noqa: PLC0415

    async def main() -> int:
        async with open_clients(mail_region=settings.mail_region) as clients:
            report = await status_report(clients, settings, exact=args.exact)
            report["holds"] = await holds_report(clients, settings)
        if args.json:
            print_json(report)
            return EXIT_OK
        counts = report["counts"]
        estimate = " (estimate)" if report["archived_count"] == "estimate" else ""
        rows = [
            (s, STATUS_JA[s], counts[s] if s != "archived" else f"{counts[s]}{estimate}")
            for s in STATUS_JA
        ]
        print_rows("deliveries by state", ("state", "状態", "deliveries"), rows)
        oldest = report["oldest_unfinished"]
        say(
            "oldest unfinished: "
            + (
                f"{oldest['mail_id']} {oldest['recipient']} {oldest['status']},"
                f" {oldest['age_s']:.0f}s old"
                if oldest
                else "none"
            )
        )
        q = report["queue"]
        say(
            f"queue: {q.get('queue_visible', 0)} visible, {q.get('queue_in_flight', 0)} in"
            f" flight; DLQ: {q.get('dlq_visible', '-')} visible"
        )
        if report["orphans_for_operator"]:
            say(
                f"orphans for an operator: {report['orphans_for_operator']} (stored mail without"
                " a notification whose recipients only To/Cc name; `mailflow list --status"
                " orphan`)"
            )
        for line in render_holds(report["holds"]):
            say(line)
        return EXIT_OK

    return run_async(main)


# --- retry ------------------------------------------------------------------------------------


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow retry`: reopen the failed deliveries of the named mails (or of every mail with
    `--status failed`) and queue them again, restoring archived mail first.

    Exit 1 if a named mail could not be retried; with `--status`, mails that had nothing to
    retry do not count as failures. Exit 2 on bad arguments."""
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.aws.ledger import Ledger  # noqa: PLC0415
    from mailflow.aws.queue import Queue  # noqa: PLC0415
    from mailflow.cli.browse import parse_since  # noqa: PLC0415
    from mailflow.ops.retry import Retrier, failed_mail_ids  # noqa: PLC0415

    if bool(args.mail_ids) == bool(args.status):
        sys.stderr.write("mailflow retry: name MAIL_IDs, or use --status failed (not both)\n")
        return EXIT_CONFIG
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        sys.stderr.write(f"mailflow retry: {exc}\n")
        return EXIT_CONFIG

    async def main() -> int:
        async with open_clients(mail_region=settings.mail_region) as clients:
            mail_ids = list(dict.fromkeys(args.mail_ids)) or await failed_mail_ids(
                Ledger(clients.dynamodb, settings.table), since, args.limit
            )
            queue = await Queue.resolve(clients.sqs, settings.queue, settings.dlq)
            retrier = Retrier(settings, clients, queue, force=args.force, dry_run=args.dry_run)
            results = [await retrier.retry(m) for m in mail_ids]
        if args.json:
            print_json([r.as_json() for r in results])
        else:
            print_rows(
                f"retry: {sum(r.ok for r in results)} of {len(results)} mails",
                ("mail_id", "result", "recipients", "restored from", "skipped"),
                [
                    (
                        r.mail_id,
                        r.result,
                        ", ".join(r.recipients),
                        r.restored_from,
                        "; ".join(f"{s['recipient']}: {s['why']}" for s in r.skipped),
                    )
                    for r in results
                ],
            )
        explicit = bool(args.mail_ids)
        bad = [r for r in results if not r.ok and (explicit or r.result != "nothing_to_retry")]
        return EXIT_FAILURE if bad else EXIT_OK

    return run_async(main)


# --- redrive ----------------------------------------------------------------------------------


def cmd_redrive(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow redrive`: move DLQ messages back to the queue; exit 1 if some failed to move."""
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.ops.redrive import redrive  # noqa: PLC0415

    async def main() -> int:
        async with open_clients(mail_region=settings.mail_region) as clients:
            out = await redrive(
                clients, settings, dry_run=args.dry_run, limit=args.limit, wait_s=args.wait
            )
        if args.json:
            print_json(out)
        elif args.dry_run:
            say(f"redrive (dry run): {out['dlq_before']} messages in the DLQ would move")
        else:
            say(
                f"redrive: moved {out['moved']} messages from the DLQ to the queue"
                f" ({out['method']}); DLQ now {out['dlq_after']}"
            )
        return EXIT_FAILURE if out.get("failed") else EXIT_OK

    return run_async(main)


# --- parse ------------------------------------------------------------------------------------


def _parse_stored(url: str, to: list[str], settings: Settings) -> dict[str, Any] | None:
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.errors import MailflowError  # noqa: PLC0415
    from mailflow.ops.parse import parse_object  # noqa: PLC0415

    async def main() -> dict[str, Any] | None:
        async with open_clients(mail_region=settings.mail_region) as clients:
            try:
                return await parse_object(clients, url, to, settings)
            except (MailflowError, ValueError) as exc:
                sys.stderr.write(f"mailflow parse: {url}: {exc}\n")
                return None

    return asyncio.run(main())


def cmd_parse(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow parse FILE|s3://...`: what the worker would read from a mail and where it would
    route each recipient, without running anything.

    Exit 0 when every `--to` recipient (or, without `--to`, at least one) would be delivered;
    1 otherwise or when the object cannot be read; 2 when the file does not exist."""
    from mailflow.ops.parse import parse_file  # noqa: PLC0415

    if args.file.startswith("s3://"):
        found = _parse_stored(args.file, args.to or [], settings)
        if found is None:
            return EXIT_FAILURE
        doc = found
    else:
        path = Path(args.file)
        if not path.is_file():
            sys.stderr.write(f"mailflow parse: no such file: {path}\n")
            return EXIT_CONFIG
        doc = parse_file(path, args.to or [], settings)
    if args.json:
        print_json(doc)
    else:
        summary = doc["summary"]
        for name in ("from", "to", "subject", "date", "message_id_header", "content_type"):
            say(f"{name}: {summary.get(name, '')}")
        say(f"sender: {doc['sender']}  size: {doc['size_bytes']} bytes  sha256: {doc['sha256']}")
        if doc.get("encrypted"):
            say("stored encrypted (KMS): decrypted, GCM tag verified")
        for defect in summary.get("parse_defects", []):
            say(f"defect: {defect}")
        print_rows(
            f"recipients (from {doc['recipients_from']})",
            ("recipient", "decision", "route", "argv / detail"),
            [
                (
                    d["recipient"],
                    d["decision"],
                    d.get("route"),
                    " ".join(d["argv"]) if "argv" in d else d.get("detail"),
                )
                for d in doc["deliveries"]
            ],
        )
    routed = [d for d in doc["deliveries"] if d["decision"] == "deliver"]
    if args.to:
        return EXIT_OK if len(routed) == len(doc["deliveries"]) else EXIT_FAILURE
    return EXIT_OK if routed else EXIT_FAILURE


# --- reconcile --------------------------------------------------------------------------------


class _RichTracker:
    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task: Any = None

    def phase(self, name: str, total: int) -> None:
        self.task = self.progress.add_task(name, total=max(total, 1), completed=total == 0)

    def advance(self) -> None:
        if self.task is not None:
            self.progress.advance(self.task)


@contextmanager
def _tracker(enabled: bool) -> Iterator[Tracker | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield None
        return
    from rich.progress import Progress  # noqa: PLC0415

    with Progress(console=console, transient=True) as progress:
        yield _RichTracker(progress)


def _show_report(report: PassReport, args: argparse.Namespace) -> None:
    if args.json:
        if args.loop:  # one JSON document per line, one line per pass
            sys.stdout.write(json.dumps(report.as_json(), ensure_ascii=False) + "\n")
            sys.stdout.flush()
        else:
            print_json(report.as_json())
        return
    shown = [a for a in report.actions if a.result != "skipped" or args.verbose]
    if shown:  # the essentials; `--json` has every field
        rows = [(f"{a.phase}: {a.what}", a.result, a.mail_id,
                 a.dest if a.phase == "archive" and a.dest else f"{a.recipient or ''} {a.detail}")
                for a in shown]  # fmt: skip
        print_rows("", ("action", "result", "mail_id", "where / detail"), rows)
    say(report.summary_line())


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow reconcile`: one reconciler pass (or one every `--loop` seconds until a signal).

    Without `--loop`, exit 1 when the pass recorded errors; with it, a failed pass is reported
    and the next one runs."""
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.aws.queue import Queue  # noqa: PLC0415
    from mailflow.errors import MailflowError  # noqa: PLC0415
    from mailflow.ops.reconcile import PHASES, NullTracker, ReconcileOptions, Reconciler  # noqa: PLC0415
    from mailflow.signals import stop_signals  # noqa: PLC0415

    options = ReconcileOptions(
        limit=args.limit, dry_run=args.dry_run, grace_s=args.grace,
        requeue_every_s=args.requeue_every, archive_grace_s=args.archive_grace,
        orphan_age_s=args.orphan_age, phases=tuple(args.only or PHASES),
    )  # fmt: skip

    async def main() -> int:
        stop = asyncio.Event()
        with stop_signals(stop.set):
            return await _reconcile_loop(stop)

    async def _reconcile_loop(stop: asyncio.Event) -> int:
        code = EXIT_OK
        async with open_clients(mail_region=settings.mail_region) as clients:
            queue = await Queue.resolve(clients.sqs, settings.queue, settings.dlq)
            reconciler = Reconciler(settings, clients, queue, options, should_stop=stop.is_set)
            while True:
                with _tracker(not args.json) as tracker:
                    reconciler.tracker = tracker or NullTracker()
                    try:
                        report = await reconciler.run_pass()
                    except MailflowError as exc:
                        if not args.loop:
                            raise
                        sys.stderr.write(f"mailflow reconcile: pass failed: {exc}\n")
                        report = None
                if report is not None:
                    _show_report(report, args)
                    code = EXIT_FAILURE if report.errors and not args.loop else code
                if not args.loop or stop.is_set():
                    return code
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=args.loop)

    return run_async(main)


# --- parser -----------------------------------------------------------------------------------


def _seconds(value: str) -> float:
    """A non-negative number of seconds."""
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 0")
    return number


def register(sub: Any) -> None:
    """Add the operator commands to `mailflow`'s subparsers."""
    p = sub.add_parser("status", help="deliveries by state, oldest unfinished, queue and DLQ depth")
    p.add_argument(
        "--exact", action="store_true", help="count archived deliveries exactly (scans the table)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser(
        "retry",
        help="reopen failed deliveries (restoring archived mail) and queue them again",
    )
    p.add_argument("mail_ids", nargs="*", metavar="MAIL_ID")
    p.add_argument(
        "--status", choices=["failed"], help="every mail with a failed delivery, archived or not"
    )
    p.add_argument("--since", help="with --status: finished since (ISO time, or 30m, 2h, 1d)")
    p.add_argument("--limit", type=int, default=100, help="with --status: at most N mails")
    p.add_argument(
        "--force",
        action="store_true",
        help="also retry quarantined mail (delivered despite its SES verdict)",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would be retried")
    p.add_argument("--json", action="store_true", help="a JSON array, one object per mail")
    p.set_defaults(handler=cmd_retry)

    p = sub.add_parser("redrive", help="move DLQ messages back to the main queue")
    p.add_argument("--dry-run", action="store_true", help="only count the DLQ's messages")
    p.add_argument(
        "--limit", type=int, default=10_000, help="at most N messages (receive/send fallback only)"
    )
    p.add_argument(
        "--wait",
        type=_seconds,
        default=60.0,
        help="seconds to wait for an SQS move task to finish (default 60)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(handler=cmd_redrive)

    p = sub.add_parser(
        "parse", help="header summary and route decision for a mail file or stored object"
    )
    p.add_argument(
        "file", metavar="FILE.eml|s3://BUCKET/KEY", help="a stored object is decrypted if need be"
    )
    p.add_argument(
        "--to",
        action="append",
        metavar="ADDR",
        help="envelope recipient (repeat); default: from Received:/To:/Cc:",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(handler=cmd_parse)

    p = sub.add_parser("reconcile", help="archive finished mail, requeue lost work, find orphans")
    p.add_argument(
        "--loop",
        type=_seconds,
        metavar="EVERY_S",
        help="run a pass every EVERY_S seconds until SIGTERM (default: one pass)",
    )
    p.add_argument("--limit", type=int, default=100, help="at most N items per phase and pass")
    p.add_argument("--dry-run", action="store_true", help="say what would be done; write nothing")
    p.add_argument(
        "--grace",
        type=_seconds,
        default=60.0,
        help="requeue only work overdue by this many seconds (default 60)",
    )
    p.add_argument(
        "--requeue-every",
        type=_seconds,
        default=300.0,
        help="requeue one delivery at most this often, seconds (default 300)",
    )
    p.add_argument(
        "--archive-grace",
        type=_seconds,
        default=60.0,
        help="archive mail finished at least this many seconds ago (default 60)",
    )
    p.add_argument(
        "--orphan-age",
        type=_seconds,
        default=None,
        help="seconds before an unrecorded object is an orphan (default MAILFLOW_ORPHAN_AGE_S)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=["orphans", "requeue", "archive"],
        help="run only this phase (repeat for several)",
    )
    p.add_argument("--verbose", action="store_true", help="also list skipped items")
    p.add_argument(
        "--json", action="store_true", help="one JSON object (with --loop: one line per pass)"
    )
    p.set_defaults(handler=cmd_reconcile)
