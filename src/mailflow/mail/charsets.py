"""Japanese-aware charset decoding for header bytes. Pure: no I/O, never raises.

Real mailers write the Windows supersets of the Japanese charsets whatever label they put on
the mail: `Shift_JIS` means CP932 (NEC row 13 with the circled digits, IBM extensions),
`ISO-2022-JP` often means CP50220/50221 (the same rows, escaped), `EUC-JP` may mean CP51932.
So every Japanese label decodes through the CP932 repertoire, and the six JIS X 0208 code
points whose Unicode mapping differs between the JIS and the Microsoft tables (see
`_JIS_TO_MICROSOFT`) decode the Microsoft way, whichever of the three encodings carried them.

`decode_declared` (a labelled payload: an encoded word, a MIME charset) and `decode_raw` (a
header's own 8-bit bytes, unlabelled) are the entry points; `charset_key` normalises labels.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from functools import cache, lru_cache

#: ISO 2022 escape sequence (ESC, intermediates, final byte), or the SO/SI kana shifts.
_ISO2022_CONTROL = re.compile(rb"\x1b[\x20-\x2f]*[\x30-\x7e]?|[\x0e\x0f]")
_KANA_7BIT = re.compile(rb"[\x21-\x5f\xa1-\xdf]*")
_KANA_TO_8BIT = bytes.maketrans(bytes(range(0x21, 0x60)), bytes(range(0xA1, 0xE0)))
#: What Python's iso2022_jp codec reads differently from Windows (JIS Roman `¥`, katakana by
#: ESC ( I or SO/SI, the JIS X 0212/0213 sets): such input goes through our own decoder.
_OWN_ISO2022 = re.compile(rb"[\x0e\x0f]|\x1b(?:\([^B]|\$\(|[^($])")
#: What Python's cp932 makes of the single bytes 0x80, 0xA0, 0xFD-0xFF: no Japanese text has
#: them, so undeclared bytes that need them are not CP932.
_CP932_FILLERS = re.compile("[\x80\uf8f0-\uf8f3]")
#: What makes Japanese text look like Japanese (kana, CJK punctuation, full-width forms)
#: versus mojibake (half-width katakana, private use).
_JAPANESE_GOOD = re.compile(r"[\u3000-\u30ff\uff01-\uff5e]")
_JAPANESE_BAD = re.compile(r"[\uff61-\uff9f\ue000-\uf8ff]")

#: JIS X 0208 code points that the JIS table (Python's iso2022_jp, euc_jp) and the Microsoft
#: table (cp932) map differently; decoded text always takes the Microsoft side.
_JIS_TO_MICROSOFT = str.maketrans(
    {
        "\u301c": "\uff5e",  # WAVE DASH → FULLWIDTH TILDE                 (JIS 0x2141)
        "\u2016": "\u2225",  # DOUBLE VERTICAL LINE → PARALLEL TO          (JIS 0x2142)
        "\u2212": "\uff0d",  # MINUS SIGN → FULLWIDTH HYPHEN-MINUS         (JIS 0x215D)
        "\u00a2": "\uffe0",  # CENT SIGN → FULLWIDTH CENT SIGN             (JIS 0x2171)
        "\u00a3": "\uffe1",  # POUND SIGN → FULLWIDTH POUND SIGN           (JIS 0x2172)
        "\u00ac": "\uffe2",  # NOT SIGN → FULLWIDTH NOT SIGN               (JIS 0x224C)
    }
)


@lru_cache(maxsize=256)
def charset_key(label: str) -> str:
    """`"Shift_JIS"`, `utf-8*ja` (RFC 2231 language), `UTF8` → `shiftjis`, `utf8`, `utf8`."""
    return re.sub(r"[^a-z0-9]", "", label.partition("*")[0].lower())


_ISO2022JP_KEYS = frozenset(
    {
        "iso2022jp", "csiso2022jp", "xiso2022jp", "jis", "iso2022jp1", "iso2022jp2",
        "iso2022jp3", "iso2022jp2004", "iso2022jpext", "iso2022jpms", "cp50220", "cp50221",
        "cp50222",
    }
)  # fmt: skip
_SHIFT_JIS_KEYS = frozenset(
    {
        "shiftjis", "sjis", "xsjis", "mskanji", "csshiftjis", "windows31j", "cswindows31j",
        "ms932", "cp932", "xmscp932", "ibm943", "sjiswin", "sjisopen", "shiftjis2004",
        "shiftjisx0213",
    }
)  # fmt: skip
_EUC_JP_KEYS = frozenset(
    {
        "eucjp", "xeucjp", "xeuc", "ujis", "cseucpkdfmtjapanese", "cp51932", "eucjis2004",
        "eucjisx0213", "eucjpms", "eucjpwin", "eucjpopen",
    }
)  # fmt: skip
#: Other charsets mail really uses, by key → Python codec. Anything else (including
#: Python-only codecs such as `rot13`, `zlib`, `punycode`, `unicode_escape`) is unknown: a
#: header never gets to pick an arbitrary codec, and hostile labels never reach codecs.lookup.
_SINGLE_BYTE_CODECS = {
    **{f"iso8859{n}": f"iso8859-{n}" for n in (*range(1, 12), 13, 14, 15, 16)},
    **{f"windows125{n}": f"cp125{n}" for n in range(9)},
    **{f"cp125{n}": f"cp125{n}" for n in range(9)},
    "latin1": "latin-1", "l1": "latin-1", "latin2": "iso8859-2", "latin9": "iso8859-15",
    "koi8r": "koi8-r", "koi8u": "koi8-u", "tis620": "tis-620", "cp874": "cp874",
    "windows874": "cp874", "ibm437": "cp437", "cp437": "cp437", "ibm850": "cp850",
    "cp850": "cp850", "ibm866": "cp866", "cp866": "cp866", "macintosh": "mac-roman",
    "macroman": "mac-roman", "iso88598i": "iso8859-8", "iso88596i": "iso8859-6",
}  # fmt: skip
_GENERIC_CODECS = {
    **_SINGLE_BYTE_CODECS,
    "usascii": "ascii", "ascii": "ascii", "ansix341968": "ascii", "us": "ascii",
    "utf8": "utf-8", "utf16": "utf-16", "utf16le": "utf-16-le", "utf16be": "utf-16-be",
    "utf32": "utf-32", "utf32le": "utf-32-le", "utf32be": "utf-32-be", "utf7": "utf-7",
    "unicode11utf7": "utf-7",
    "euckr": "cp949", "ksc56011987": "cp949", "ksc5601": "cp949", "cp949": "cp949",
    "uhc": "cp949", "iso2022kr": "iso2022_kr", "johab": "johab",
    "gb2312": "gb18030", "gbk": "gb18030", "xgbk": "gb18030", "cp936": "gb18030",
    "gb18030": "gb18030", "hzgb2312": "hz", "hz": "hz",
    "big5": "cp950", "xbig5": "cp950", "cp950": "cp950", "big5hkscs": "big5hkscs",
}  # fmt: skip

Decoder = Callable[[bytes, str], str]


def _printable_label(label: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", label)[:40] or "(empty)"


@cache
def _jis_table() -> dict[int, str]:
    """JIS X 0208 row/cell (two 7-bit bytes) → character, in the CP932 repertoire and
    mapping: NEC row 13 (circled digits, Roman numerals, unit symbols), the NEC-selected IBM
    extensions (rows 89-92), and the Microsoft side of the six JIS/Microsoft mapping
    differences. Built once, lazily."""
    table: dict[int, str] = {}
    for c1 in range(0x21, 0x7F):
        s1 = ((c1 + 1) >> 1) + (0x70 if c1 <= 0x5E else 0xB0)
        for c2 in range(0x21, 0x7F):
            s2 = c2 + ((0x20 if c2 >= 0x60 else 0x1F) if c1 & 1 else 0x7E)
            try:
                table[(c1 << 8) | c2] = bytes((s1, s2)).decode("cp932")
            except UnicodeDecodeError:
                continue
    return table


def _fail(encoding: str, data: bytes, reason: str) -> UnicodeDecodeError:
    return UnicodeDecodeError(encoding, data, 0, len(data), reason)


def _decode_jis_pairs(segment: bytes, errors: str) -> str:
    """A JIS X 0208 (two bytes per character) run, in the CP932 repertoire."""
    return (b"\x1b$B" + segment).decode("iso2022_jp", _HANDLERS["jis", errors])


def _decode_other_iso2022(escape: bytes, segment: bytes, codec: str, errors: str) -> str:
    """A run in a set Python's ISO-2022 codecs know (JIS X 0212, JIS X 0213)."""
    return (escape + segment + b"\x1b(B").decode(codec, errors).translate(_JIS_TO_MICROSOFT)


def _decode_kana(segment: bytes, errors: str) -> str:
    """JIS X 0201 katakana (ESC ( I or SO): 0x21-0x5F, or the 8-bit form 0xA1-0xDF."""
    if _KANA_7BIT.fullmatch(segment):
        return segment.translate(_KANA_TO_8BIT).decode("cp932")
    if errors == "strict":
        raise _fail("iso-2022-jp", segment, "not JIS X 0201 katakana")
    return "".join(
        chr(0xFF61 + (byte & 0x7F) - 0x21) if 0x21 <= byte & 0x7F <= 0x5F else "\ufffd"
        for byte in segment
    )


_ASCII, _KANA, _JIS0208, _JIS0212, _JIS0213_1, _JIS0213_2 = range(6)
_ESCAPES = {
    b"\x1b(B": _ASCII,
    b"\x1b(J": _ASCII,  # JIS X 0201 Roman: Windows treats it as ASCII
    b"\x1b(H": _ASCII,
    b"\x1b(I": _KANA,
    b"\x1b$@": _JIS0208,
    b"\x1b$B": _JIS0208,
    b"\x1b$(B": _JIS0208,
    b"\x1b$(D": _JIS0212,
    b"\x1b$(O": _JIS0213_1,
    b"\x1b$(Q": _JIS0213_1,
    b"\x1b$(P": _JIS0213_2,
}


def _decode_iso2022jp_segment(mode: int, segment: bytes, errors: str) -> str:
    if mode == _ASCII:
        return segment.decode("ascii", errors)
    if mode == _KANA:
        return _decode_kana(segment, errors)
    if mode == _JIS0208:
        return _decode_jis_pairs(segment, errors)
    if mode == _JIS0212:
        return _decode_other_iso2022(b"\x1b$(D", segment, "iso2022_jp_2", errors)
    escape = b"\x1b$(Q" if mode == _JIS0213_1 else b"\x1b$(P"
    return _decode_other_iso2022(escape, segment, "iso2022_jp_2004", errors)


def _decode_iso2022jp_windows(data: bytes, errors: str) -> str:
    """ISO-2022-JP as CP50220/50221/50222 write it: JIS X 0208 runs hold NEC row 13 and the
    IBM extensions; also JIS X 0201 katakana by escape or SO/SI, JIS X 0212, JIS X 0213."""
    pieces: list[str] = []
    mode = previous = _ASCII
    position = 0
    for control in _ISO2022_CONTROL.finditer(data):
        if control.start() > position:
            pieces.append(_decode_iso2022jp_segment(mode, data[position : control.start()], errors))
        position = control.end()
        sequence = control.group()
        if sequence == b"\x0e":
            previous, mode = mode, _KANA
        elif sequence == b"\x0f":
            mode = previous
        elif sequence == b"\x1b&@":  # JIS X 0208-1990 announcer: the next escape decides
            continue
        elif sequence in _ESCAPES:
            mode = _ESCAPES[sequence]
        elif errors == "strict":
            raise _fail("iso-2022-jp", data, "unsupported escape sequence")
        else:
            pieces.append("\ufffd")
    pieces.append(_decode_iso2022jp_segment(mode, data[position:], errors))
    return "".join(pieces)


def _decode_iso2022jp(data: bytes, errors: str) -> str:
    if not _OWN_ISO2022.search(data):
        try:  # the common case in C, NEC/IBM codes filled in by the error handler
            return data.decode("iso2022_jp", _HANDLERS["jis", "strict"]).translate(
                _JIS_TO_MICROSOFT
            )
        except UnicodeDecodeError:
            pass
    try:
        return _decode_iso2022jp_windows(data, "strict")
    except UnicodeDecodeError:
        pass
    for codec in ("iso2022_jp_2", "iso2022_jp_ext", "iso2022_jp_2004"):  # ESC $ A, ESC . A ...
        try:
            return data.decode(codec).translate(_JIS_TO_MICROSOFT)
        except UnicodeDecodeError:
            continue
    if errors == "strict":
        raise _fail("iso-2022-jp", data, "not ISO-2022-JP")
    return _decode_iso2022jp_windows(data, errors)


def _decode_shift_jis(data: bytes, errors: str) -> str:
    try:
        return data.decode("cp932")
    except UnicodeDecodeError:
        pass
    try:  # JIS X 0213 characters beyond CP932
        return data.decode("shift_jis_2004").translate(_JIS_TO_MICROSOFT)
    except UnicodeDecodeError:
        if errors == "strict":
            raise
    return data.decode("cp932", errors)


def _decode_euc_jp(data: bytes, errors: str) -> str:
    """EUC-JP as CP51932: the codec in C; two-byte codes it lacks (NEC row 13, IBM
    extensions) come from the CP932 table, JIS X 0213 ones from euc_jis_2004."""
    return data.decode("euc_jp", _HANDLERS["euc", errors]).translate(_JIS_TO_MICROSOFT)


#: JIS rows of NEC special characters (13) and NEC-selected IBM extensions (89-92): what
#: CP932 has beyond JIS X 0208, so what Python's JIS codecs stop at.
_WINDOWS_ROWS = frozenset({0x2D, 0x79, 0x7A, 0x7B, 0x7C})


def _windows_run(data: bytes, start: int, high_bit: int) -> tuple[str, int] | None:
    """The two-byte code at `start`, and the run of NEC/IBM codes after it, from the CP932
    table: one error-handler call per run, not per character. `high_bit` is 0x80 for EUC."""
    table = _jis_table()
    chars: list[str] = []
    position, end = start, len(data) - 1
    while position < end:
        c1, c2 = data[position], data[position + 1]
        if c1 & 0x80 != high_bit or c2 & 0x80 != high_bit:
            break
        char = table.get(((c1 & 0x7F) << 8) | (c2 & 0x7F))
        if char is None or (chars and c1 & 0x7F not in _WINDOWS_ROWS):
            break
        chars.append(char)
        position += 2
    return ("".join(chars), position) if chars else None


def _jis_fill(exc: UnicodeDecodeError) -> tuple[str, int] | None:
    """Characters for ISO-2022-JP two-byte codes Python's JIS table lacks."""
    return _windows_run(exc.object, exc.start, 0)


def _euc_fill(exc: UnicodeDecodeError) -> tuple[str, int] | None:
    """Characters for EUC-JP codes Python's euc_jp codec lacks: CP932 rows, then JIS X 0213."""
    data, start = exc.object, exc.start
    run = _windows_run(data, start, 0x80)
    if run is not None:
        return run
    code = data[start : start + (3 if data[start] == 0x8F else 2)]
    try:
        return code.decode("euc_jis_2004").translate(_JIS_TO_MICROSOFT), start + len(code)
    except UnicodeDecodeError:
        return None


def _error_handler(
    fill: Callable[[UnicodeDecodeError], tuple[str, int] | None], *, replace: bool
) -> Callable[[UnicodeError], tuple[str, int]]:
    def handle(exc: UnicodeError) -> tuple[str, int]:
        if not isinstance(exc, UnicodeDecodeError):
            raise exc
        filled = fill(exc)
        if filled is not None:
            return filled
        if replace:
            return "\ufffd", exc.end
        raise exc

    return handle


def _register_handlers() -> dict[tuple[str, str], str]:
    """Codec error handlers that fill in the Windows codes, so the common path stays in C.
    (The registry is process-wide; the names are ours.)"""
    names = {}
    for kind, fill in (("jis", _jis_fill), ("euc", _euc_fill)):
        for errors in ("strict", "replace"):
            name = f"mailflow.charsets.{kind}-{errors}"
            codecs.register_error(name, _error_handler(fill, replace=errors == "replace"))
            names[kind, errors] = name
    return names


_HANDLERS = _register_handlers()


def _decoder_for(key: str) -> tuple[Decoder, str] | None:
    """(decoder, codec name) for a charset key, or None if unknown."""
    if key in _ISO2022JP_KEYS:
        return _decode_iso2022jp, "iso-2022-jp"
    if key in _SHIFT_JIS_KEYS:
        return _decode_shift_jis, "cp932"
    if key in _EUC_JP_KEYS:
        return _decode_euc_jp, "euc-jp"
    codec = _GENERIC_CODECS.get(key)
    if codec is None:
        return None

    def decode(data: bytes, errors: str) -> str:
        return data.decode(codec, errors)

    return decode, codec


def _decode_utf8(data: bytes, errors: str) -> str:
    return data.decode("utf-8", errors)


def _strict(decoder: Decoder, data: bytes) -> str | None:
    try:
        return decoder(data, "strict")
    except (UnicodeError, LookupError, ValueError):
        return None


def _japanese_score(text: str) -> int:
    sample = text[:4096]  # plenty to tell text from mojibake
    return len(_JAPANESE_GOOD.findall(sample)) - len(_JAPANESE_BAD.findall(sample))


def _guess(data: bytes, *, last_resort: bool = True) -> tuple[str, str] | None:
    """Undeclared bytes: (text, what it was decoded as). Order: US-ASCII (ISO-2022-JP when
    it has escapes), UTF-8, CP932 or EUC-JP, latin-1. When CP932 and EUC-JP both decode,
    EUC-JP wins only if its text looks more Japanese (kana, CJK punctuation; fewer half-width
    katakana): EUC-JP bytes are nearly always valid CP932 mojibake."""
    if data.isascii():
        if b"\x1b" in data and (jis := _strict(_decode_iso2022jp, data)) is not None:
            return jis, "iso-2022-jp"
        return data.decode("ascii"), "us-ascii"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    sjis = _strict(_decode_shift_jis, data)
    if sjis is not None and _CP932_FILLERS.search(sjis):
        sjis = None
    euc = _strict(_decode_euc_jp, data)
    if sjis is not None and (euc is None or _japanese_score(sjis) >= _japanese_score(euc)):
        return sjis, "cp932"
    if euc is not None:
        return euc, "euc-jp"
    return (data.decode("latin-1"), "latin-1") if last_resort else None


def decode_declared(data: bytes, charset: str, where: str, defects: list[str]) -> str:
    """Bytes under a declared charset: the Japanese supersets, lies detected, never raises."""
    label = _printable_label(charset)
    found = _decoder_for(charset_key(charset))
    if found is None:
        guessed, used = _guess(data) or ("", "")
        defects.append(f"unknown charset {label} in {where} (decoded as {used})")
        return guessed
    decoder, codec = found
    lie = _obvious_lie(data, codec)
    if lie is not None:
        defects.append(f"{where} declares {label} but is {lie[1]}")
        return lie[0]
    text = _strict(decoder, data)
    if text is None:
        other = None if _mostly_utf8(data, codec) else _guess(data, last_resort=False)
        if (
            other is not None
            and other[1] != codec
            and not (b"\x1b" in data and other[1] == "us-ascii")
        ):
            defects.append(f"{where} declares {label} but is not (decoded as {other[1]})")
            return other[0]
        defects.append(f"undecodable bytes in {where} (replaced)")
        try:
            text = decoder(data, "replace")
        except (UnicodeError, LookupError, ValueError):
            text = data.decode("ascii", "replace")
    return text


def _mostly_utf8(data: bytes, codec: str) -> bool:
    """Declared UTF-8 with a few bad bytes (a cut or corrupted character) is still UTF-8:
    replacing the bad bytes beats reading the whole value as CP932 mojibake."""
    if codec != "utf-8":
        return False
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    good = len(text) - len(text.encode("ascii", "ignore")) - bad
    return good >= bad and good > 0


def _obvious_lie(data: bytes, codec: str) -> tuple[str, str] | None:
    """Bytes that decode under their label but plainly are something else: ISO-2022-JP
    escapes under another label, UTF-8 under a single-byte label (those accept anything)."""
    if b"\x1b$" in data and codec != "iso-2022-jp":
        jis = _strict(_decode_iso2022jp, data)
        if jis is not None:
            return jis, "iso-2022-jp"
    if codec in _SINGLE_BYTE_CODECS.values() and not data.isascii():
        utf8 = _strict(_decode_utf8, data)
        if utf8 is not None:
            return utf8, "utf-8"
    return None


def decode_raw(data: bytes, where: str, defects: list[str]) -> str:
    """A header value's own bytes (before RFC 2047) to text."""
    if data.isascii() and b"\x1b" not in data:
        return data.decode("ascii")
    text, used = _guess(data) or ("", "")
    if used == "iso-2022-jp":
        defects.append(f"unencoded ISO-2022-JP in {where}")
    elif used == "us-ascii":
        defects.append(f"stray escape sequences in {where} (removed)")
    elif used != "utf-8":  # raw UTF-8 is RFC 6532; anything else is a guess worth noting
        defects.append(f"raw 8-bit bytes in {where} (decoded as {used})")
    return text
