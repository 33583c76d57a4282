"""Raw mail bytes → a small decoded header summary. Pure: no I/O, no clock, never raises.

The summary is for people (operators' tables, the delivery record) and for the reconciler
(who was this orphan mail for?). The processor always gets the raw bytes; nothing here decides
whether a mail is delivered.

Japanese order mail is the point. Real mailers write the Windows supersets of the Japanese
charsets whatever label they put on the mail: `Shift_JIS` means CP932 (NEC row 13 with the
circled digits, IBM extensions), `ISO-2022-JP` often means CP50220/50221 (the same rows,
escaped), `EUC-JP` may mean CP51932. So every Japanese label decodes through the CP932
repertoire, and the six JIS X 0208 code points whose Unicode mapping differs between the JIS
and the Microsoft tables (see `_JIS_TO_MICROSOFT`) decode the Microsoft way, the same whichever
of the three encodings carried them: JIS 0x2141 is U+FF5E FULLWIDTH TILDE in a Shift_JIS mail
and in an ISO-2022-JP mail alike, never U+301C WAVE DASH in one and U+FF5E in the other.

Header parsing is a small linear loop over the head (no `email.message_from_bytes`): it must
stay fast and quiet on 10,000 header lines, NUL bytes, lines without a colon and megabytes of
encoded words.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from email.utils import getaddresses

from mailflow.mail.charsets import charset_key, decode_declared, decode_raw

HEAD_BUDGET_BYTES = 256 * 1024

#: RFC 5322's line limit; what a subject or sender may occupy on the record.
LONG_FIELD_CHARS = 998
SHORT_FIELD_CHARS = 256
MAX_DEFECTS = 32
#: What a summary field may hold at all (a 200 KB subject helps no one, and the summary also
#: feeds size-limited messages such as the emulated SES notification); see also as_record().
MAX_FIELD_CHARS = 10_000
#: Above this, From/To are shown as decoded text instead of being parsed as address lists
#: (the address parser is Python code; a 200 KB To header is not worth the time).
_ADDRESS_PARSE_MAX_CHARS = 4096

_BLANK_LINE = re.compile(rb"\n\r?\n")
_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
#: C0/C1 controls, lone surrogates, and the bidirectional overrides/isolates that could make
#: an operator's table show a subject or sender other than the one received.
_CONTROL = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_LINE_BREAKS = re.compile(r"[\t\r\n]")
#: RFC 2047 encoded word. The text excludes `?` and whitespace, so a scan from one `=?` never
#: runs past the next `?`: linear time on any input.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")
_BASE64_PADDING = re.compile(rb"=+")
_RECEIVED_FOR = re.compile(r"\bfor\s+<?([^\s<>;@]+@[^\s<>;]+?)>?(?=[\s;]|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class MailSummary:
    """Decoded header fields of one mail, for operators and the delivery record.

    Every field is text safe to show (controls and bidi overrides removed, at most
    MAX_FIELD_CHARS); an absent header is "". `defects` says in words what could not be read."""

    from_: str
    to: str
    subject: str
    date: str
    message_id_header: str
    content_type: str
    defects: tuple[str, ...] = ()

    def as_record(self) -> dict[str, str | list[str]]:
        """The summary as delivery-record attributes, every string bounded."""
        return {
            "from": self.from_[:LONG_FIELD_CHARS],
            "to": self.to[:SHORT_FIELD_CHARS],
            "subject": self.subject[:LONG_FIELD_CHARS],
            "date": self.date[:SHORT_FIELD_CHARS],
            "message_id_header": self.message_id_header[:SHORT_FIELD_CHARS],
            "content_type": self.content_type[:SHORT_FIELD_CHARS],
            "parse_defects": [defect[:SHORT_FIELD_CHARS] for defect in self.defects],
        }


# --- the head --------------------------------------------------------------------------------


def split_head(data: bytes) -> bytes:
    """The header block: everything before the first empty line (CRLF, LF or mixed), with
    the last header line's terminator, at most HEAD_BUDGET_BYTES. A prefix of `data`."""
    window = bytes(data[: HEAD_BUDGET_BYTES + 3])
    if window.startswith((b"\n", b"\r\n")):
        return b""
    blank = _BLANK_LINE.search(window)
    end = blank.start() + 1 if blank else len(window)
    return window[: min(end, HEAD_BUDGET_BYTES)]


#: Headers the summary and the address helpers read; every other header is skipped unjoined.
_SINGLE = ("from", "to", "subject", "date", "message-id", "content-type", "received")
_LISTED = ("to", "cc")
_DISPLAY_NAMES = {
    "from": "From",
    "to": "To",
    "cc": "Cc",
    "subject": "Subject",
    "date": "Date",
    "message-id": "Message-ID",
    "content-type": "Content-Type",
    "received": "Received",
}


@dataclass(slots=True)
class _Fields:
    """What one pass over the header lines keeps: the first of each wanted header, and every
    To and Cc (for the reconciler). Values are unfolded (CR LF removed, the WSP kept)."""

    first: dict[str, bytes] = field(default_factory=dict)
    listed: dict[str, list[bytes]] = field(default_factory=dict)
    defects: list[str] = field(default_factory=list)
    nameless: int = 0
    orphans: int = 0
    duplicates: list[str] = field(default_factory=list)
    #: The header being read: its key (None when it is not one we want) and its lines.
    name: str | None = None
    parts: list[bytes] = field(default_factory=list)
    started: bool = False

    def line(self, line: bytes) -> None:
        if line[0] in b" \t":  # a continuation
            if self.name is not None:
                self.parts.append(line)
            elif not self.started:
                self.orphans += 1
            return
        self.flush()
        self.started = True
        label, colon, value = line.partition(b":")
        label = label.rstrip(b" \t")
        if not colon or not _HEADER_NAME.fullmatch(label):
            self.nameless += 1
            return
        key = label.decode("ascii").lower()
        if key in _SINGLE or key in _LISTED:
            self.name, self.parts = key, [value]

    def flush(self) -> None:
        name = self.name
        if name is None:
            return
        value = b"".join(self.parts)
        self.name, self.parts = None, []
        if name in _LISTED:
            self.listed.setdefault(name, []).append(value)
        if name not in self.first:
            self.first[name] = value
        elif name != "received":  # many Received headers are normal
            self.duplicates.append(_DISPLAY_NAMES[name])

    def finish(self) -> None:
        self.flush()
        if self.nameless:
            self.defects.append(f"{self.nameless} header line(s) without a name and colon ignored")
        if self.orphans:
            self.defects.append(
                f"{self.orphans} continuation line(s) before the first header ignored"
            )
        self.defects.extend(f"duplicate {label} header (first kept)" for label in self.duplicates)


def _parse_fields(data: bytes) -> _Fields:
    """One linear pass over the header lines of `data` (a head or a whole mail)."""
    fields = _Fields()
    head = split_head(data)
    if len(head) >= HEAD_BUDGET_BYTES:
        fields.defects.append(f"header block truncated at {HEAD_BUDGET_BYTES} bytes")
    if not head.strip():
        fields.defects.append("empty header block")
        return fields
    if b"\x00" in head:
        fields.defects.append("NUL bytes in header block (removed)")
        head = head.replace(b"\x00", b"")
    for line in head.split(b"\n"):
        stripped = line.removesuffix(b"\r")
        if stripped:
            fields.line(stripped)
    fields.finish()
    return fields


# --- charsets --------------------------------------------------------------------------------


# --- RFC 2047 --------------------------------------------------------------------------------


def _word_bytes(encoding: str, text: str) -> tuple[bytes, bool]:
    """The bytes of one encoded word's text, and whether its base64 was broken (decoded
    leniently: foreign characters dropped, padding inside or missing tolerated)."""
    if encoding in "Qq":
        return binascii.a2b_qp(text.encode("utf-8", "replace"), header=True), False
    raw = text.encode("ascii", "replace")
    cleaned = _NOT_BASE64.sub(b"", raw)
    broken = len(cleaned) != len(raw)
    decoded = bytearray()
    for chunk in _BASE64_PADDING.split(cleaned):
        usable = chunk[: len(chunk) - 1] if len(chunk) % 4 == 1 else chunk
        broken = broken or len(usable) != len(chunk)
        try:
            decoded += binascii.a2b_base64(usable + b"=" * (-len(usable) % 4))
        except binascii.Error:
            broken = True
    return bytes(decoded), broken


class _WordDecoder:
    """RFC 2047 for one header value. Whitespace between adjacent encoded words goes; the
    bytes of adjacent words of one charset are decoded together, so a multibyte character
    split across two words survives. Memoized: hostile headers repeat one word thousands of
    times."""

    def __init__(self, where: str, defects: list[str]) -> None:
        self.where = where
        self.defects = defects
        self.pieces: list[str] = []
        self.charset: str | None = None  # of the pending run of adjacent words
        self.pending = bytearray()
        self.payloads: dict[tuple[str, str], tuple[bytes, bool]] = {}
        self.texts: dict[tuple[str, bytes], tuple[str, list[str]]] = {}

    def run(self, text: str) -> str:
        position = 0
        for word in _ENCODED_WORD.finditer(text):
            between = text[position : word.start()]
            charset, encoding, payload = word.groups()
            adjacent = self.charset is not None and not between.strip(" \t\r\n")
            if not adjacent or charset_key(charset) != charset_key(self.charset or ""):
                self.flush()
                if not adjacent:
                    self.pieces.append(between)
                self.charset = charset
            self.add(encoding, payload)
            position = word.end()
        self.flush()
        self.pieces.append(text[position:])
        return "".join(self.pieces)

    def add(self, encoding: str, payload: str) -> None:
        key = (encoding.upper(), payload)
        found = self.payloads.get(key)
        if found is None:
            found = self.payloads[key] = _word_bytes(encoding, payload)
        self.pending += found[0]
        if found[1]:
            self.defects.append(
                f"invalid base64 in an encoded word in {self.where} (decoded leniently)"
            )

    def flush(self) -> None:
        if self.charset is None:
            return
        key = (self.charset, bytes(self.pending))
        found = self.texts.get(key)
        if found is None:
            notes: list[str] = []
            found = self.texts[key] = (decode_declared(key[1], key[0], self.where, notes), notes)
        self.pieces.append(found[0])
        self.defects.extend(found[1])
        self.pending.clear()
        self.charset = None


def _decode_words(text: str, where: str, defects: list[str]) -> str:
    """Decode the RFC 2047 encoded words in a header value."""
    return _WordDecoder(where, defects).run(text) if "=?" in text else text


def _clean(text: str) -> str:
    """No control characters or lone surrogates on the record; tabs and breaks are spaces."""
    return _CONTROL.sub("", _LINE_BREAKS.sub(" ", text)).strip(" ")


def _decoded_text(raw: bytes, where: str, defects: list[str]) -> str:
    return _clean(_decode_words(decode_raw(raw, where, defects), where, defects))


def _display_addresses(raw: bytes, where: str, defects: list[str]) -> str:
    """From/To for people: `山田 太郎 <a@example.jp>, b@example.jp`; decoded text when the
    value is not a clean address list."""
    text = decode_raw(raw, where, defects)
    if len(text) <= _ADDRESS_PARSE_MAX_CHARS:
        pairs = _address_pairs([text])
        if pairs and all("@" in address for _, address in pairs):
            shown = []
            for name, address in pairs:
                display = _clean(_decode_words(name, where, defects))
                shown.append(f"{display} <{address}>" if display else address)
            return _clean(", ".join(shown))
    return _clean(_decode_words(text, where, defects))


def _address_pairs(values: list[str]) -> list[tuple[str, str]]:
    try:
        return [(name, address.strip()) for name, address in getaddresses(values) if address]
    except Exception:  # RecursionError on nested comments, anything else in a hostile header
        return []


# --- public ----------------------------------------------------------------------------------


def summarize(head: bytes) -> MailSummary:
    """Decoded summary of a mail's header block (or of a whole mail, or its first bytes).
    Never raises: what could not be read is said in `defects`."""
    try:
        return _summarize(head)
    except Exception as exc:  # a last fence: a hostile mail must never crash a delivery
        return MailSummary(
            from_="",
            to="",
            subject="",
            date="",
            message_id_header="",
            content_type="",
            defects=(f"header summary failed: {type(exc).__name__}",),
        )


def _summarize(head: bytes) -> MailSummary:
    fields = _parse_fields(head)
    defects = fields.defects
    first = fields.first
    for key in ("from", "to", "subject", "date", "message-id"):
        if key not in first:
            defects.append(f"no {_DISPLAY_NAMES[key]} header")

    def text(key: str) -> str:
        return _decoded_text(first.get(key, b""), _DISPLAY_NAMES[key], defects)

    def plain(key: str) -> str:
        return _clean(decode_raw(first.get(key, b""), _DISPLAY_NAMES[key], defects))

    summary = {
        "from_": _display_addresses(first.get("from", b""), "From", defects),
        "to": _display_addresses(first.get("to", b""), "To", defects),
        "subject": text("subject"),
        "date": text("date"),
        "message_id_header": plain("message-id"),
        "content_type": plain("content-type"),
    }
    for key, value in summary.items():
        if len(value) > MAX_FIELD_CHARS:
            summary[key] = value[:MAX_FIELD_CHARS]
            defects.append(f"{key.rstrip('_')} longer than {MAX_FIELD_CHARS} characters (cut)")
    unique = list(dict.fromkeys(defects))
    if len(unique) > MAX_DEFECTS:
        unique[MAX_DEFECTS - 1 :] = [f"... and {len(unique) - MAX_DEFECTS + 1} more defects"]
    return MailSummary(**summary, defects=tuple(unique))


def received_for(head: bytes) -> list[str]:
    """The envelope recipient(s) in the `for` clause of the top `Received:` header (the one
    SES adds), lower-cased; empty when there is none."""
    try:
        raw = _parse_fields(head).first.get("received")
        if raw is None:
            return []
        text = raw.decode("utf-8", "replace")
        found = (match.group(1).lower() for match in _RECEIVED_FOR.finditer(text))
        return list(dict.fromkeys(found))
    except Exception:
        return []


def header_addresses(head: bytes) -> list[str]:
    """Addresses in every To and Cc header (To first), lower-cased, deduplicated, in order.
    Only real addresses (with `@`); groups, display names and junk are dropped."""
    try:
        fields = _parse_fields(head)
        ignored: list[str] = []
        values = [
            decode_raw(raw, "To/Cc", ignored)
            for key in _LISTED
            for raw in fields.listed.get(key, [])
        ]
        found = (
            _CONTROL.sub("", address).lower()
            for _, address in _address_pairs(values)
            if "@" in address
        )
        return list(dict.fromkeys(found))
    except Exception:
        return []
