"""Hostile mails: what an open MX receives sooner or later. Importable by any test:

    from support.hostile_corpus import hostile_mails

    for name, raw in hostile_mails(settings.max_mail_bytes): ...

Every item is deterministic (no clock, seeded randomness), well below 5 MB, and at most
`max_mail_bytes` long (a longer item is cut to that size: a cut mail is still a hostile mail).
The one-byte-over case (`max_mail_bytes + 1`) is not here: the caller makes it, because only
the caller knows how to produce it cheaply for its own limit.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable

CRLF = b"\r\n"
_SEED = 20241203


def _mail(headers: list[bytes], body: bytes = b"hello\r\n", sep: bytes = CRLF) -> bytes:
    return sep.join(headers) + sep + sep + body


def _basic(
    extra: list[bytes] | None = None, to: bytes = b"ne-001@orders.example.com"
) -> list[bytes]:
    """Ordinary headers plus `extra`; an extra header replaces the ordinary one of its name."""
    extra = extra or []
    names = {line.partition(b":")[0].lower() for line in extra}
    usual = [
        b"From: sender@example.jp",
        b"To: " + to,
        b"Subject: hostile",
        b"Date: Tue, 03 Dec 2024 10:15:00 +0900",
        b"Message-ID: <hostile@example.jp>",
    ]
    return [*(line for line in usual if line.partition(b":")[0].lower() not in names), *extra]


def _multipart(boundary: bytes, parts: list[bytes], *, close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary + CRLF + part + CRLF for part in parts)
    return body + (b"--" + boundary + b"--" + CRLF if close else b"")


def _nested(depth: int) -> bytes:
    inner = b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for level in range(depth, 0, -1):
        boundary = b"b%d" % level
        inner = (
            b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
            + _multipart(boundary, [inner])
        )  # fmt: skip
    return _mail(_basic([b"MIME-Version: 1.0"]), b"", CRLF)[:-2] + inner


def _random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _cases() -> dict[str, Callable[[], bytes]]:
    cases: dict[str, Callable[[], bytes]] = {}
    # --- empty and headless -------------------------------------------------------------
    cases["empty-file"] = lambda: b""
    cases["only-blank-lines"] = lambda: b"\r\n\r\n\r\n"
    cases["body-without-headers"] = lambda: b"\r\n" + "注文番号: 1\r\n".encode()
    cases["headers-only-no-body"] = lambda: CRLF.join(_basic()) + CRLF
    cases["headers-only-no-final-newline"] = lambda: CRLF.join(_basic())
    cases["missing-all-usual-headers"] = lambda: _mail([b"X-Only: this"])
    cases["single-byte"] = lambda: b"\xff"
    cases["random-binary-64k"] = lambda: _random_bytes(64 * 1024, _SEED)
    cases["random-binary-with-blank-line"] = lambda: (
        _random_bytes(4096, _SEED + 1) + b"\r\n\r\n" + _random_bytes(4096, _SEED + 2)
    )

    # --- header syntax ------------------------------------------------------------------
    cases["nul-bytes-in-headers"] = lambda: _mail(
        [b"From: a\x00b@example.jp", b"To: ne-001@orders.example.com\x00", b"Sub\x00ject: x\x00y"]
    )
    cases["8bit-garbage-in-headers"] = lambda: _mail(
        [b"From: \xff\xfe\x80 <a@example.jp>", b"To: ne-001@orders.example.com",
         b"Subject: \x81\x00\xa0\xff\xe3\x81", b"X-\xff: \xfe"]
    )  # fmt: skip
    cases["lines-without-colon"] = lambda: _mail(
        [b"From sender@example.jp Tue Dec  3 10:15:00 2024", b"no colon here", *_basic(),
         b"another line without a colon"]
    )  # fmt: skip
    cases["continuation-before-first-header"] = lambda: _mail([b"  folded first", *_basic()])
    cases["mixed-crlf-lf"] = lambda: (
        b"From: a@example.jp\r\nTo: ne-001@orders.example.com\nSubject: mixed\r\n"
        b" folded\n\tagain\r\nDate: x\n\r\nbody\nline\r\n"
    )
    cases["bare-cr-line-endings"] = lambda: _mail(_basic(), b"body\r", b"\r")
    cases["duplicate-headers"] = lambda: _mail(
        [*_basic(), b"Subject: second", b"From: other@example.jp", b"To: ne-002@orders.example.com"]
    )
    cases["10000-header-lines"] = lambda: _mail(
        _basic([b"X-Filler-%05d: %s" % (i, b"v" * 16) for i in range(10_000)])
    )
    cases["one-300k-header-line"] = lambda: _mail([b"X-Long: " + b"a" * 300_000, *_basic()])
    cases["300k-of-folded-subject"] = lambda: _mail(
        [*_basic(), b"Subject: start" + b"\r\n continued" * 30_000]
    )
    cases["header-name-only"] = lambda: _mail([b":", b": no name", b"Subject:", b"To:"])
    cases["deeply-nested-comments-in-from"] = lambda: _mail(
        [b"From: " + b"(" * 20_000 + b"a@example.jp", b"To: " + b"(" * 20_000, b"Subject: x"]
    )
    cases["unbalanced-quotes-and-brackets"] = lambda: _mail(
        [b'From: "unterminated <a@example.jp', b"To: <<<ne-001@orders.example.com",
         b'Cc: >>>, ,,, <>, "", @, a@, @b', b"Subject: x"]
    )  # fmt: skip
    cases["10000-recipients"] = lambda: _mail(
        _basic(to=b", ".join(b"u%05d@orders.example.com" % i for i in range(10_000)))
    )
    cases["received-for-abuse"] = lambda: _mail(
        [b"Received: " + b"for for <for@> for " * 10_000 + b"for ne-001@orders.example.com;",
         *_basic()]
    )  # fmt: skip

    # --- charsets and encoded words -----------------------------------------------------
    cases["unknown-charset"] = lambda: _mail(
        _basic([b"Subject: =?x-unknown-42?B?" + base64.b64encode("注文".encode()) + b"?="]),
        "注文".encode("cp932"),
    )
    cases["python-only-codecs-as-charsets"] = lambda: _mail(
        [b"Subject: " + b" ".join(
            b"=?%s?Q?abc?=" % name
            for name in (b"rot13", b"zlib", b"base64", b"hex", b"punycode", b"idna",
                         b"unicode_escape", b"raw_unicode_escape", b"undefined", b"uu", b"bz2")
        )]
    )  # fmt: skip
    cases["lying-charset-iso2022jp-is-utf8"] = lambda: _mail(
        _basic([b"Content-Type: text/plain; charset=ISO-2022-JP",
                b"Subject: =?ISO-2022-JP?B?" + base64.b64encode("注文①".encode()) + b"?="]),
        "注文番号: 1 ①～".encode(),
    )  # fmt: skip
    cases["lying-charset-utf8-is-cp932"] = lambda: _mail(
        _basic([b"Subject: =?UTF-8?B?" + base64.b64encode("注文①～".encode("cp932")) + b"?="])
    )
    cases["lying-charset-sjis-is-iso2022jp"] = lambda: _mail(
        _basic([b"Subject: =?Shift_JIS?B?" + base64.b64encode(b"\x1b$B%F%9%H\x1b(B") + b"?="])
    )
    cases["iso2022jp-unterminated-and-bad-escapes"] = lambda: _mail(
        [b"Subject: =?ISO-2022-JP?B?" + base64.b64encode(b"\x1b$B$\x1b(Z\x1b$(D\x1b") + b"?=",
         b'From: \x1b$B$"$$\x1b(B <a@example.jp>', b"To: \x1b$B\x7f\x7f\x0e\x21\x0f"]
    )  # fmt: skip
    cases["1000-encoded-words"] = lambda: _mail(
        _basic([b"Subject: " + b" ".join(
            b"=?%s?B?%s?=" % (cs, base64.b64encode("あ".encode(cs.decode())))
            for cs in [b"utf-8", b"iso-2022-jp", b"shift_jis", b"euc-jp"] * 250
        )])
    )  # fmt: skip
    cases["1000-unknown-charsets"] = lambda: _mail(
        _basic([b"Subject: " + b" ".join(b"=?x-cs-%d?Q?a?=" % i for i in range(1000))])
    )
    cases["100k-encoded-word"] = lambda: _mail(
        _basic([b"Subject: =?UTF-8?B?" + base64.b64encode("注文".encode() * 12_500) + b"?="])
    )
    cases["100k-q-encoded-word"] = lambda: _mail(
        _basic([b"Subject: =?UTF-8?Q?" + b"=E3=81=82_" * 10_000 + b"?="])
    )
    cases["invalid-base64-in-encoded-word"] = lambda: _mail(
        _basic([b"Subject: =?UTF-8?B?5b!!Gx5*5Sw?= =?UTF-8?B?A?= =?UTF-8?B?====?= =?UTF-8?B??="])
    )
    cases["encoded-word-openers-without-close"] = lambda: _mail(
        _basic([b"Subject: " + b"=?a?q?x" * 30_000])
    )
    cases["encoded-word-control-characters"] = lambda: _mail(
        _basic([b"Subject: =?UTF-8?Q?a=00b=0D=0Ac=1B[31m=E2=80=AE?= =?UTF-16?B?2D3YPQ==?="])
    )
    cases["rfc2231-parameter-abuse"] = lambda: _mail(
        _basic([b"Content-Type: text/plain; "
                + b"; ".join(b"title*%d*=utf-8''%%E3%%81%%82" % i for i in range(2000))])
    )  # fmt: skip

    # --- MIME structure -----------------------------------------------------------------
    cases["boundary-never-closed"] = lambda: _mail(
        _basic([b'Content-Type: multipart/mixed; boundary="open"']),
        _multipart(b"open", [b"Content-Type: text/plain\r\n\r\nfirst"], close=False)
        + b"--open\r\nContent-Type: text/plain\r\n\r\nand it never ends",
    )
    cases["multipart-without-boundary"] = lambda: _mail(
        _basic([b"Content-Type: multipart/mixed"]), b"--x\r\n\r\nwhat\r\n--x--\r\n"
    )
    cases["empty-boundary"] = lambda: _mail(
        _basic([b'Content-Type: multipart/mixed; boundary=""']), b"--\r\n\r\nx\r\n----\r\n"
    )
    cases["1000-part-multipart"] = lambda: _mail(
        _basic([b'Content-Type: multipart/mixed; boundary="p"']),
        _multipart(b"p", [b"Content-Type: text/plain\r\n\r\npart %d" % i for i in range(1000)]),
    )
    cases["100-deep-nested-multipart"] = lambda: _nested(100)
    cases["invalid-base64-body"] = lambda: _mail(
        _basic([b"Content-Transfer-Encoding: base64"]), b"!!!not base64 at all===\r\n\xff\r\n"
    )
    cases["broken-quoted-printable-body"] = lambda: _mail(
        _basic([b"Content-Transfer-Encoding: quoted-printable"]), b"=ZZ=\r\n=E3=8\r\n=" * 100
    )
    cases["nul-bytes-in-body"] = lambda: _mail(_basic(), b"\x00" * 10_000)
    cases["one-megabyte-body-line"] = lambda: _mail(_basic(), b"x" * 1_000_000)
    return cases


def hostile_mails(max_mail_bytes: int) -> list[tuple[str, bytes]]:
    """(name, raw bytes) pairs, each at most `max_mail_bytes` bytes (longer ones are cut)."""
    limit = max(max_mail_bytes, 0)
    return [(name, make()[:limit]) for name, make in _cases().items()]
