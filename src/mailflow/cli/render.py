"""Deliveries as operators read them: JSON objects for scripts, rich tables for people."""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from mailflow.timestamps import iso

#: Always present in `--json` output, in this order (null when unknown).
DELIVERY_FIELDS = (
    "mail_id",
    "recipient",
    "status",
    "outcome",
    "attempts",
    "exit_code",
    "signal",
    "reason",
    "detail",
    "route",
    "argv",
    "subject",
    "from",
    "to",
    "date",
    "message_id_header",
    "size_bytes",
    "bucket",
    "key",
    "archived_key",
    "sender",
    "received_at",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
    "next_attempt_at",
    "lease_owner",
    "lease_expires_at",
    "duration_ms",
    "stdout_tail",
    "stderr_tail",
    "verdicts",
    "parse_defects",
    "last_reason",
    "enhanced_status",
    "archived_bucket",
    "archived_at",
    "archive_note",
    "requeue_count",
    "requeued_at",
    "recovered_by",
    "history",
)
TIME_FIELDS = frozenset(f for f in DELIVERY_FIELDS if f.endswith("_at"))

#: The operators' words (DESIGN §3).
#: Each state as the shop's staff call it, in the order `status` lists them.
STATUS_JA = {
    "received": "未処理",
    "processing": "未処理",
    "retrying": "リトライ",
    "succeeded": "成功",
    "failed": "失敗",
    "archived": "保管",
}


#: Format characters that reorder what a terminal shows (bidi overrides, isolates, marks).
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def terminal_text(value: object) -> str:
    """`value` as text safe to print on a terminal: control characters (ESC sequences, BEL,
    CR, C1 controls such as CSI) and bidi overrides escaped as `\\xNN` / `\\uNNNN`;
    newline and tab kept. Processor output and mail headers are hostile input."""
    out = []
    for ch in str(value):
        if ch in "\n\t" or (unicodedata.category(ch) != "Cc" and ch not in BIDI_CONTROLS):
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def delivery_json(record: Mapping[str, Any]) -> dict[str, Any]:
    """A ledger record as `--json` shows it: every DELIVERY_FIELDS key, in order (null when
    absent), times (`*_at`, also inside `history`) as ISO-8601 UTC strings."""
    out: dict[str, Any] = {}
    for name in DELIVERY_FIELDS:
        value = record.get(name)
        if name in TIME_FIELDS:
            value = iso(value)
        elif name == "history" and isinstance(value, list):
            value = [
                {k: (iso(v) if k.endswith("_at") else v) for k, v in entry.items()}
                for entry in value
                if isinstance(entry, dict)
            ]
        out[name] = value
    return out


def print_json(doc: Any) -> None:
    """`doc` as indented JSON on stdout (what every `--json` prints)."""
    sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def print_rows(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A titled table of plain values (None shows as empty)."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else terminal_text(v) for v in row))
    print_table(table)


def say(text: str) -> None:
    """One line for a person, printed as is (no rich markup)."""
    Console(soft_wrap=True, highlight=False).print(text, markup=False)


def deliveries_table(records: Iterable[Mapping[str, Any]], title: str = "") -> Table:
    """Deliveries as a rich table for people, one row each, every cell terminal-safe."""
    table = Table(title=title or None, show_lines=False)
    for col in (
        "mail_id",
        "recipient",
        "status",
        "att",
        "exit",
        "reason",
        "route",
        "subject",
        "updated",
    ):
        table.add_column(col, overflow="fold")
    for r in records:
        status = str(r.get("status", ""))
        outcome = r.get("outcome")
        shown = f"{status}/{outcome}" if status == "archived" and outcome else status
        cells = (
            str(r.get("mail_id", "")),
            str(r.get("recipient", "")),
            f"{shown} {STATUS_JA.get(status, '')}",
            str(r.get("attempts", "")),
            "" if r.get("exit_code") is None else str(r.get("exit_code")),
            str(r.get("reason", "") or ""),
            str(r.get("route", "") or ""),
            str(r.get("subject", "") or "")[:60],
            iso(r.get("updated_at")) or "",
        )
        table.add_row(*(terminal_text(c) for c in cells))
    return table


def print_table(table: Table) -> None:
    """Print a rich table on stdout, without wrapping rows into the terminal width."""
    Console(soft_wrap=False).print(table)


def print_record(record: Mapping[str, Any], keys: Sequence[str] = DELIVERY_FIELDS) -> None:
    """One delivery for people: each non-empty field on its own line, its history as one
    line per attempt; values are printed terminal-safe."""
    doc = delivery_json(record)
    console = Console()
    for key in keys:
        value = doc.get(key)
        if value in (None, "", [], {}):
            continue
        if key == "history":
            console.print("[bold]history[/bold]:")
            for entry in value:
                console.print(
                    terminal_text(
                        f"  #{entry.get('attempt')} {entry.get('status')} {entry.get('reason')}"
                        f" exit={entry.get('exit_code')} by {entry.get('worker')}"
                        f" at {entry.get('finished_at')}"
                    ),
                    markup=False,
                    highlight=False,
                )
                if entry.get("stderr_tail"):
                    tail = terminal_text(str(entry["stderr_tail"])[-300:])
                    console.print("    stderr: " + tail, markup=False, highlight=False)
            continue
        console.print(f"[bold]{key}[/bold]: ", end="")
        console.print(terminal_text(value), markup=False, highlight=False)
