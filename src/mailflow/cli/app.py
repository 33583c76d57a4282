"""`mailflow …`: one entry point, one Settings object, one logging setup, named exit codes."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from mailflow import __version__, logs
from mailflow.cli import aliases as cli_aliases
from mailflow.cli import holds as cli_holds
from mailflow.cli import ops as cli_ops
from mailflow.cli.runtime import run_async
from mailflow.config import Settings, describe_validation_error
from mailflow.errors import MailflowError
from mailflow.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

log = structlog.get_logger("mailflow.cli.app")

Handler = Callable[[argparse.Namespace, Settings], int]


def load_settings(**overrides: Any) -> Settings:
    """Settings from MAILFLOW_* variables (and `overrides`); a test seam.

    Raises pydantic's ValidationError on bad configuration (`main` turns it into exit 2)."""
    return Settings(**overrides)


# --- commands ---------------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow worker`: run until SIGTERM/SIGINT, then drain.

    Exit 0 after a clean drain, EXIT_DRAIN_TIMEOUT (3) when running deliveries outlived the
    shutdown grace and were handed back."""
    from mailflow.aws import open_clients  # noqa: PLC0415 - keep `--help` fast
    from mailflow.processors.exec import forbid_environ_reads  # noqa: PLC0415
    from mailflow.worker.loop import Worker  # noqa: PLC0415

    # The processors we spawn run as our uid: keep them out of /proc/<us>/environ.
    forbid_environ_reads()

    async def main() -> int:
        async with open_clients(
            settings.concurrency * 2 + 8,
            mail_region=settings.mail_region,
            client=settings.aws_client,
        ) as clients:
            return await Worker(settings, clients).run()

    return run_async(main)


def cmd_provision(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow provision`: create the bucket, topic, queue and DLQ, and table (idempotent);
    prints their names, ARN and URLs as JSON."""
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.cli.render import print_json  # noqa: PLC0415
    from mailflow.dev.provision import provision  # noqa: PLC0415

    async def main() -> int:
        async with open_clients(mail_region=settings.mail_region) as clients:
            print_json(await provision(clients, settings))
        return EXIT_OK

    return run_async(main)


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow send`: act as SES receiving each file (store it in S3, publish the notification);
    prints one mail id per file. Exit 2, nothing sent, if a file is missing."""
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.dev.ses import receive_mail, topic_arn  # noqa: PLC0415

    files: list[Path] = args.files
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.stderr.write(f"mailflow send: no such file: {', '.join(missing)}\n")
        return EXIT_CONFIG

    async def main() -> int:
        async with open_clients(mail_region=settings.mail_region) as clients:
            arn = await topic_arn(clients, settings)
            for path in files:
                mail_id = await receive_mail(
                    clients,
                    settings,
                    path.read_bytes(),
                    args.to,
                    args.sender,
                    arn=arn,
                    verdict=args.verdict,
                )
                sys.stdout.write(mail_id + "\n")
                sys.stdout.flush()
        return EXIT_OK

    return run_async(main)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow list`: deliveries, newest update first, filtered by the options."""
    from mailflow.cli.browse import list_deliveries  # noqa: PLC0415

    return run_async(lambda: list_deliveries(args, settings))


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow show MAIL_ID`: a mail's deliveries and where its object is; exit 1 if none."""
    from mailflow.cli.browse import show_mail  # noqa: PLC0415

    return run_async(lambda: show_mail(args, settings))


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow check`: the container health check. Exit 0 when the worker's health file is at
    most `health_max_age_s` old, 1 when it is older or missing."""
    from mailflow.worker.health import health_age_s  # noqa: PLC0415

    age = health_age_s(settings.health_file)
    if age is None:
        sys.stderr.write(f"unhealthy: no health file at {settings.health_file}\n")
        return EXIT_FAILURE
    if age > settings.health_max_age_s:
        sys.stderr.write(
            f"unhealthy: health file {age:.1f}s old (max {settings.health_max_age_s:.0f}s)\n",
        )
        return EXIT_FAILURE
    sys.stdout.write(f"ok: health file {age:.1f}s old\n")
    return EXIT_OK


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow dev`: the embedded moto server, provisioning, a worker and sample mails."""
    from mailflow.dev.run import run_dev  # noqa: PLC0415

    return run_dev(args)


def cmd_smtp(args: argparse.Namespace, settings: Settings) -> int:
    """`mailflow smtp`: the SMTP SES-receiving emulator, until SIGTERM/SIGINT."""
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.dev.smtp import serve  # noqa: PLC0415
    from mailflow.signals import stop_signals  # noqa: PLC0415

    async def main() -> int:
        stop = asyncio.Event()
        with stop_signals(stop.set):
            async with open_clients(mail_region=settings.mail_region) as clients:
                await serve(settings, clients, args.host, args.port, args.domain, stop)
        return EXIT_OK

    return run_async(main)


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `mailflow` argument parser; each subcommand sets `handler` to its `cmd_*` function."""
    parser = argparse.ArgumentParser(
        prog="mailflow",
        description=(
            "Order-mail worker: SES → S3 + SNS → SQS → DynamoDB claim → legacy processor."
            " Configuration comes from MAILFLOW_* environment variables (see README);"
            " AWS endpoints and region from the standard AWS_* variables."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mailflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="run the worker until SIGTERM/SIGINT (drains gracefully)")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("provision", help="create bucket, topic, queue + DLQ, table (idempotent)")
    p.set_defaults(handler=cmd_provision)

    p = sub.add_parser("send", help="emulate SES receiving: store mail files, publish notices")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument(
        "--to",
        action="append",
        required=True,
        metavar="ADDR",
        help="envelope recipient (repeat for several)",
    )
    p.add_argument(
        "--from",
        dest="sender",
        default="sender@example.com",
        metavar="ADDR",
        help="envelope sender (default: %(default)s)",
    )
    p.add_argument(
        "--verdict",
        default="PASS",
        choices=["PASS", "FAIL", "GRAY"],
        help="SES spam/virus verdicts to claim (default: %(default)s)",
    )
    p.set_defaults(handler=cmd_send)

    p = sub.add_parser("list", help="list deliveries (table, or --json)")
    p.add_argument("--status", help="received|processing|retrying|succeeded|failed|archived|orphan")
    p.add_argument("--route", help="only this route")
    p.add_argument("--recipient", help="only this recipient (exact, case-insensitive)")
    p.add_argument("--since", help="only updated since: ISO time or age like 30m, 2h, 1d")
    p.add_argument("--limit", type=int, default=100, help="at most N rows (default 100)")
    p.add_argument("--json", action="store_true", help="a JSON array of delivery objects")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("show", help="every delivery of one mail, with its attempt history")
    p.add_argument("mail_id")
    p.add_argument("--json", action="store_true", help="a JSON array of delivery objects")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("check", help="health check: exit 0 if the worker's health file is fresh")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser(
        "dev",
        help="embedded default: moto server, provision, worker, sample mails (Ctrl-C stops)",
    )
    p.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop once every sample delivery is terminal (for scripts and tests)",
    )
    p.add_argument("--port", type=int, default=0, help="moto server port (default: free port)")
    p.set_defaults(handler=cmd_dev)

    p = sub.add_parser("smtp", help="SES-receiving emulator over SMTP (stores to S3, notifies)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument(
        "--domain",
        action="append",
        default=None,
        metavar="DOMAIN",
        help="accept mail for this domain (repeat; default: orders.example.com)",
    )
    p.set_defaults(handler=cmd_smtp)

    cli_ops.register(sub)
    cli_aliases.register(sub)
    cli_holds.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, load settings, configure logging and run the command; returns the exit code.

    Bad configuration is EXIT_CONFIG (2) before anything starts; a `MailflowError` is printed as
    one line (no traceback) and is EXIT_FAILURE (1)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "smtp" and not args.domain:
        args.domain = ["orders.example.com"]
    try:
        settings = load_settings()
    except ValidationError as exc:
        sys.stderr.write(f"mailflow: bad configuration: {describe_validation_error(exc)}\n")
        return EXIT_CONFIG
    logs.configure(settings.log_format, settings.log_level)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except MailflowError as exc:
        # An expected failure with a clear message: no traceback for the operator.
        log.error("command_failed", command=args.command, error=str(exc))  # noqa: TRY400
        sys.stderr.write(f"mailflow {args.command}: {exc}\n")
        return EXIT_FAILURE
