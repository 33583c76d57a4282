"""`mailflow hold` and `mailflow release` (as postfix's `postsuper -h` / `-H`): parse, render.

The work lives in ops/holds.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from mailflow.cli.render import print_json, say
from mailflow.cli.runtime import run_async
from mailflow.errors import MailflowError
from mailflow.exitcodes import EXIT_CONFIG, EXIT_OK
from mailflow.timestamps import iso

if TYPE_CHECKING:
    from mailflow.config import Settings


def _target(args: argparse.Namespace, settings: Settings, command: str) -> tuple[str, str] | None:
    from mailflow.ops.holds import hold_target  # noqa: PLC0415 - keep `--help` fast

    try:
        return hold_target(settings, args.key, args.route)
    except MailflowError as exc:
        sys.stderr.write(f"mailflow {command}: {exc}\n")
        return None


def cmd_hold(args: argparse.Namespace, settings: Settings) -> int:
    """Hold a key, a route, or a key on every route."""
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.ops.holds import place_hold  # noqa: PLC0415
    from mailflow.ops.retry import operator_id  # noqa: PLC0415

    target = _target(args, settings, "hold")
    if target is None:
        return EXIT_CONFIG

    async def main() -> int:
        async with open_clients(mail_region=settings.mail_region) as clients:
            doc = await place_hold(
                clients, settings, *target, by=operator_id(), note=args.note or ""
            )
        hold = doc["hold"]
        if args.json:
            print_json(doc)
        else:
            say(
                f"held {hold['route']}#{hold['key']} since {iso(hold['held_at'])}: no new run"
                " starts; runs already started finish (see `mailflow status`)"
            )
        return EXIT_OK

    return run_async(main)


def cmd_release(args: argparse.Namespace, settings: Settings) -> int:
    """Lift a hold and queue its held mail again."""
    from mailflow.aws import open_clients  # noqa: PLC0415
    from mailflow.ops.holds import lift_hold  # noqa: PLC0415

    target = _target(args, settings, "release")
    if target is None:
        return EXIT_CONFIG

    async def main() -> int:
        async with open_clients(mail_region=settings.mail_region) as clients:
            doc = await lift_hold(clients, settings, *target)
        if args.json:
            print_json(doc)
        else:
            count = sum(len(r["recipients"]) for r in doc["requeued"])
            state = "released" if doc["existed"] else "was not held"
            say(f"{doc['hold']} {state}; {count} held deliveries queued again")
        return EXIT_OK

    return run_async(main)


def render_holds(report: dict[str, Any]) -> list[str]:
    """Lines for `mailflow status`: the holds and what waits behind them, since when."""
    lines = []
    for hold in report["holds"]:
        note = f" ({hold['note']})" if hold["note"] else ""
        lines.append(
            f"hold {hold['route']}#{hold['key']} since {iso(hold['held_at'])}"
            f" by {hold['held_by']}{note}"
        )
    lines.extend(
        f"held: {key['deliveries']} deliveries of {key['route']}#{key['key']}"
        f" since {iso(key['held_since'])}"
        for key in report["held_keys"]
    )
    if report["unreleased"]:
        lines.append(
            f"{report['unreleased']} held deliveries have no hold any more: run"
            " `mailflow release` for their key again"
        )
    return lines or ["holds: none"]


def register(sub: Any) -> None:
    """Add `hold` and `release` to `mailflow`'s subparsers."""
    for name, handler, text in (
        ("hold", cmd_hold, "hold a store's (a key's) or a route's mail: it waits, nothing runs"),
        ("release", cmd_release, "lift a hold: the held mail is queued again, oldest first"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("key", nargs="?", metavar="KEY", help="route key (store), e.g. 001")
        p.add_argument("--route", metavar="ROUTE", help="only this route (alone: all its keys)")
        if name == "hold":
            p.add_argument("--note", help="why (shown by `mailflow status`)")
        p.add_argument("--json", action="store_true", help="one JSON object")
        p.set_defaults(handler=handler)
