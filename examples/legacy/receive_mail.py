"""The Python twin of receive_mail.php, for machines without php-cli (`mailflow dev` warns).

Same contract: `receive_mail.py STORE` with the raw mail on stdin; exit 0 ok, 75 try later,
64/65 permanent with a leading RFC 3463 status on stdout; one order file per store.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import os
import re
import sys
from pathlib import Path

EX_USAGE, EX_DATAERR, EX_TEMPFAIL = 64, 65, 75
CHARSETS = {
    "iso-2022-jp": "iso2022_jp_ext",
    "shift_jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "euc-jp": "euc_jis_2004",
}


def fail(code: int, status: str, message: str) -> None:
    sys.stdout.write(f"{status} {message}\n")
    sys.exit(code)


def first_text(raw: bytes) -> str | None:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in msg.walk():
        if part.get_content_type() != "text/plain":
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = (part.get_content_charset() or "utf-8").lower()
        codec = CHARSETS.get(charset, charset)
        if codec == "iso2022_jp_ext":
            try:
                return payload.decode("iso2022_jp_2004")
            except (UnicodeDecodeError, LookupError):
                pass
        try:
            return payload.decode(codec, errors="replace")
        except LookupError:
            return payload.decode("utf-8", errors="replace")
    return None


def main() -> None:
    store = sys.argv[1] if len(sys.argv) > 1 else ""
    if not re.fullmatch(r"[0-9]{3}", store):
        fail(EX_USAGE, "5.3.5", f"usage: receive_mail.py STORE_ID (3 digits), got {store!r}")
    raw = sys.stdin.buffer.read()
    if not raw:
        fail(EX_DATAERR, "5.6.0", "empty mail on stdin")
    text = first_text(raw) or ""
    order = re.search(r"注文番号\s*[:：]\s*([A-Za-z0-9-]+)", text)
    if order is None:
        fail(EX_DATAERR, "5.6.0", "no 注文番号 (order number) in the first text part")
        return
    items = [
        {"sku": m.group(1), "quantity": int(m.group(2))}
        for m in re.finditer(r"商品コード\s*[:：]\s*(\S+)[\s\S]*?数量\s*[:：]\s*([0-9]+)", text)
    ]
    base = os.environ.get("ORDERS_DIR") or str(Path(__file__).parents[2] / "var" / "orders")
    folder = Path(base) / f"store-{store}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{order.group(1)}.json"
        record = {
            "store": store,
            "order_no": order.group(1),
            "items": items,
            "delivery_id": os.environ.get("MAILFLOW_DELIVERY_ID"),
            "attempt": int(os.environ.get("MAILFLOW_ATTEMPT", "1")),
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        fail(EX_TEMPFAIL, "4.3.0", f"cannot write the order file: {exc}")
    sys.stdout.write(f"imported order {order.group(1)} for store {store} ({len(items)} items)\n")


if __name__ == "__main__":
    main()
