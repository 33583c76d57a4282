"""`mailflow dev`: everything on one machine, no Docker, no AWS account.

Starts an embedded moto server (unless AWS_ENDPOINT_URL points somewhere already),
provisions, runs the worker with the sample legacy processor, sends the sample mails and
logs each outcome readably. Ctrl-C drains and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
from pathlib import Path

import structlog

from mailflow import logs
from mailflow.aws.ledger import TERMINAL, Ledger
from mailflow.config import Route, Settings
from mailflow.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK
from mailflow.mail.summary import header_addresses, split_head

log = structlog.get_logger("mailflow.dev")

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
#: The key `mailflow dev` stores mail under (created by provision, like SES's receipt rule key).
DEV_KMS_KEY = "alias/mailflow-dev"


def sample_route(examples: Path) -> tuple[Route, str]:
    """The sample processor: PHP when php-cli exists, else the Python twin (with a warning)."""
    php = shutil.which("php")
    if php:
        command = f"{php} {examples / 'legacy' / 'receive_mail.php'} {{store}}"
        kind = "php"
    else:
        command = f"{sys.executable} {examples / 'legacy' / 'receive_mail.py'} {{store}}"
        kind = "python"
    route = Route(name="store", match=r"ne-(?P<store>[0-9]{3})@.+", command=command, key="store")
    return route, kind


def run_dev(args: argparse.Namespace) -> int:
    """`mailflow dev`: start an embedded moto server unless AWS_ENDPOINT_URL names a backend,
    provision it, run a worker and send the sample mails from examples/mail.

    Runs until interrupted; with `--exit-when-done`, returns once every sample delivery is
    terminal (exit 1 if they did not all get there in time). Exit 2 without the examples."""
    if not (EXAMPLES / "mail").is_dir():
        sys.stderr.write(f"mailflow dev: examples not found at {EXAMPLES}\n")
        return EXIT_CONFIG
    server = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        from mailflow.dev.motoserver import MotoServer  # noqa: PLC0415 - dev extra

        server = MotoServer(port=args.port).start()
        os.environ["AWS_ENDPOINT_URL"] = server.url
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            os.environ.setdefault(name, value)
    orders = Path(os.environ.get("ORDERS_DIR", REPO / "var" / "orders"))
    orders.mkdir(parents=True, exist_ok=True)
    os.environ["ORDERS_DIR"] = str(orders)
    route, kind = sample_route(EXAMPLES)
    settings = Settings(
        routes=(route,),
        pass_env=("ORDERS_DIR",),
        retry_base_s=2,
        retry_max_s=10,
        visibility_timeout_s=30,
        lease_s=30,
        wait_time_s=2,
        shutdown_grace_s=10,
        health_file=REPO / "var" / "worker.health",
        log_format=os.environ.get("MAILFLOW_LOG_FORMAT", "console"),
        # Stored the way a receipt rule with a KMS key stores mail, so the decrypting path runs
        # too. MAILFLOW_KMS_KEY names another key; set it empty for unencrypted mail.
        kms_key=os.environ.get("MAILFLOW_KMS_KEY", DEV_KMS_KEY) or None,
    )
    logs.configure(settings.log_format, settings.log_level)
    if kind == "python":
        log.warning(
            "php_missing",
            using="examples/legacy/receive_mail.py",
            hint="apt-get install php-cli to run the PHP sample processor",
        )
    log.info(
        "dev_backend",
        endpoint=os.environ["AWS_ENDPOINT_URL"],
        orders_dir=str(orders),
        kms_key=settings.kms_key or "(none: mail stored unencrypted)",
    )
    try:
        return asyncio.run(_dev(settings, exit_when_done=args.exit_when_done))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if server is not None:
            server.stop()


async def _dev(settings: Settings, *, exit_when_done: bool) -> int:
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.dev.provision import provision  # noqa: PLC0415
    from mailflow.dev.ses import receive_mail, topic_arn  # noqa: PLC0415
    from mailflow.worker.loop import Worker  # noqa: PLC0415

    async with open_clients(mail_region=settings.mail_region) as clients:
        await provision(clients, settings)
        worker = Worker(settings, clients)
        running = asyncio.create_task(worker.run())
        arn = await topic_arn(clients, settings)
        sent: list[str] = []
        for path in sorted((EXAMPLES / "mail").glob("*.eml")):
            raw = path.read_bytes()
            recipients = header_addresses(split_head(raw)) or ["ne-001@orders.example.com"]
            mail_id = await receive_mail(
                clients, settings, raw, recipients, "shop@example.com", arn=arn
            )
            log.info("sample_sent", file=path.name, mail_id=mail_id, to=recipients)
            sent.append(mail_id)
        if exit_when_done:
            ok = await _wait_terminal(Ledger(clients.dynamodb, settings.table), sent, running)
            worker.request_stop()
            code = await running
            return code if ok else EXIT_FAILURE
        code = await running
        return code if code != EXIT_OK else EXIT_OK


async def _wait_terminal(
    ledger: Ledger,
    mail_ids: list[str],
    running: asyncio.Task[int],
    timeout_s: float = 120,
) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while not running.done():
                records = [r for m in mail_ids for r in await ledger.get_mail(m)]
                if len({r["mail_id"] for r in records}) == len(mail_ids) and all(
                    r.get("status") in TERMINAL for r in records
                ):
                    for r in records:
                        log.info(
                            "sample_result",
                            mail_id=r["mail_id"],
                            recipient=r["recipient"],
                            status=r["status"],
                            reason=r.get("reason"),
                            subject=r.get("subject"),
                        )
                    return True
                await asyncio.sleep(0.5)
    return False
