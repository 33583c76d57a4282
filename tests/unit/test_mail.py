"""mailflow.mail.summary: header summary, Japanese charsets, hostile input. No network, no AWS."""

from __future__ import annotations

import base64
import codecs
import dataclasses
import functools
import importlib.util
import time
from email.header import Header
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailflow.mail import charsets
from mailflow.mail import summary as mail
from mailflow.mail.summary import (
    HEAD_BUDGET_BYTES,
    MailSummary,
    header_addresses,
    received_for,
    split_head,
    summarize,
)
from support.hostile_corpus import hostile_mails

SAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mail"
TILDE = "\uff5e"  # ～ FULLWIDTH TILDE: what Japanese Windows mailers mean by JIS 0x2141
QUICK = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def b64_word(charset: str, data: bytes) -> bytes:
    return b"=?" + charset.encode() + b"?B?" + base64.b64encode(data) + b"?="


def subject_of(header_value: bytes) -> MailSummary:
    return summarize(b"Subject: " + header_value + b"\r\n\r\nbody")


def cp50221(text: str) -> bytes:
    """ISO-2022-JP as Windows writes it, from the sample generator (NEC row 13, U+FF5E)."""
    return _make_samples().iso2022jp(text)


@functools.cache
def _make_samples():  # the committed generator doubles as the test's CP50221 encoder
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the sample mails ----------------------------------------------------------------------

EXPECTED = {
    "order-001-iso2022jp.eml": (
        "さくら商店 受注センター <orders@shop.example.jp>",
        "ne-001@orders.example.com",
        f"【ご注文確認】注文番号 100123 ①お届け 12/5{TILDE}12/7",
        (),
    ),
    "order-002-shiftjis.eml": (
        "株式会社テスト通販 <info@tsuhan.example.co.jp>",
        "ne-002@orders.example.com",
        f"【受注】注文番号 200456 ①即日発送{TILDE}ご確認ください",
        (
            "raw 8-bit bytes in From (decoded as cp932)",
            "raw 8-bit bytes in Subject (decoded as cp932)",
        ),
    ),
    "order-003-multipart.eml": (
        "みどり茶舗 <shop@midori.example.net>",
        "ne-003@orders.example.com",
        "【みどり茶舗】ご注文ありがとうございます（注文番号 300789）",
        (),
    ),
    "order-004-eucjp.eml": (
        "北の海産 <order@kita.example.org>",
        "ne-004@orders.example.com",
        f"【北の海産】ご注文確認 注文番号 400321 ①{TILDE}",
        (),
    ),
    "order-999-unroutable.eml": (
        "なんでも雑貨 <noreply@misc.example.com>",
        "info@orders.example.com",
        "ご注文のお知らせ（注文番号 999001）",
        (),
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_summary_is_exact(name):
    raw = (SAMPLES / name).read_bytes()
    from_, to, subject, defects = EXPECTED[name]
    summary = summarize(split_head(raw))
    assert summary.from_ == from_
    assert summary.to == to
    assert summary.subject == subject
    assert summary.defects == defects
    assert summary.date.endswith("+0900")
    assert summary.message_id_header.startswith("<")
    assert summary.message_id_header.endswith(">")
    assert summary.content_type.split(";")[0] in {"text/plain", "multipart/mixed"}
    assert received_for(raw) == [to]
    assert header_addresses(raw) == [to]
    assert summarize(raw) == summary  # a whole mail is summarized by its head


def test_samples_keep_circled_digits_and_fullwidth_tilde():
    for name in ("order-001-iso2022jp.eml", "order-002-shiftjis.eml", "order-004-eucjp.eml"):
        subject = summarize((SAMPLES / name).read_bytes()).subject
        assert "①" in subject, name
        assert TILDE in subject, name
        assert "\u301c" not in subject, name  # never WAVE DASH for one mail and ～ for another
        assert "\ufffd" not in subject, name


def test_samples_are_what_the_generator_writes():
    generator = _make_samples()
    assert set(generator.SAMPLES) == {path.name for path in SAMPLES.glob("*.eml")}
    for name, make in generator.SAMPLES.items():
        assert (SAMPLES / name).read_bytes() == make(), f"{name}: rerun make_samples.py"


def test_sample_bytes_are_what_the_readme_promises():
    raw_002 = (SAMPLES / "order-002-shiftjis.eml").read_bytes()
    head_002 = split_head(raw_002)
    assert "①".encode("cp932") in head_002  # raw 8-bit CP932 in the Subject
    assert f"即日発送{TILDE}".encode("cp932") in head_002
    assert b"charset=Shift_JIS" in head_002
    raw_001 = (SAMPLES / "order-001-iso2022jp.eml").read_bytes()
    assert raw_001.isascii()  # 7bit ISO-2022-JP throughout
    assert b"-!" in raw_001  # ① and ② as NEC row 13 (JIS 0x2D21, 0x2D22) in the body
    assert b'-"' in raw_001
    raw_003 = (SAMPLES / "order-003-multipart.eml").read_bytes()
    csv = raw_003.split(b'filename="order-300789.csv"\r\n\r\n')[1].split(b"\r\n--")[0]
    assert any(byte >= 0x80 for byte in base64.b64decode(csv))
    unroutable = summarize((SAMPLES / "order-999-unroutable.eml").read_bytes())
    assert unroutable.to == "info@orders.example.com"


# --- split_head --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "head"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\nB: 2\n\nbody", b"A: 1\nB: 2\n"),
        (b"A: 1\r\nB: 2\n\r\nbody", b"A: 1\r\nB: 2\n"),
        (b"A: 1\nB: 2\r\n\nbody", b"A: 1\nB: 2\r\n"),
        (b"A: 1\r\n folded\r\n\r\n", b"A: 1\r\n folded\r\n"),
        (b"A: 1\r\nno blank line at all", b"A: 1\r\nno blank line at all"),
        (b"\r\nbody only", b""),
        (b"\nbody only", b""),
        (b"", b""),
    ],
)
def test_split_head(raw, head):
    assert split_head(raw) == head


def test_split_head_truncates_to_budget():
    raw = b"X: " + b"a" * (2 * HEAD_BUDGET_BYTES) + b"\r\n\r\nbody"
    head = split_head(raw)
    assert len(head) == HEAD_BUDGET_BYTES
    assert raw.startswith(head)
    assert "header block truncated at 262144 bytes" in summarize(head).defects
    blank_just_past_budget = b"X: " + b"a" * (HEAD_BUDGET_BYTES - 4) + b"\r\n\r\nbody"
    assert len(split_head(blank_just_past_budget)) == HEAD_BUDGET_BYTES


# --- RFC 2047 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "subject"),
    [
        (b"=?utf-8?Q?a?= =?utf-8?Q?b?=", "ab"),  # whitespace between words goes
        (b"=?utf-8?Q?a?=\r\n\t =?utf-8?Q?b?=", "ab"),  # also when folded
        (b"=?utf-8?Q?a?=  plain  =?utf-8?Q?b?=", "a  plain  b"),  # next to text it stays
        (b"x =?utf-8?Q?a?=", "x a"),
        (b"=?utf-8?Q?a?==?utf-8?Q?b?=", "ab"),  # no whitespace at all
        (b"=?UTF-8?q?Hello_World=21?=", "Hello World!"),
        (b"=?utf-8?Q?=E6=B3=A8=E6=96=87?=", "注文"),
        (b"=?utf-8?B?5rOo5paH?=", "注文"),
        (b"=?utf-8?B?5rOo5paH?", "=?utf-8?B?5rOo5paH?"),  # unterminated: left as it is
        (b"=?utf-8?X?abc?=", "=?utf-8?X?abc?="),  # unknown encoding: left as it is
        (b"=?utf-8*ja?B?5rOo5paH?=", "注文"),  # RFC 2231 language tag
        (b"=?utf-8?B?5rOo5pa?=", "注\ufffd"),  # missing padding is fine; short tail replaced
        (b"=?utf-8?B?44GC?= =?iso-2022-jp?B?GyRCJCQbKEI=?=", "あい"),  # two charsets
        (b"=?utf-8?Q?tab=09and=0D=0Anewline?=", "tab and  newline"),
        (b"=?utf-8?Q?a=E2=80=AEb=00c?=", "abc"),  # bidi override and NUL removed
        (b"plain", "plain"),
        (b"   padded   ", "padded"),
        (b"", ""),
    ],
)
def test_encoded_words(value, subject):
    assert subject_of(value).subject == subject


def test_multibyte_character_split_across_encoded_words():
    data = "【ご注文】確認".encode()
    for cut in range(1, len(data)):
        value = b64_word("UTF-8", data[:cut]) + b"\r\n " + b64_word("utf-8", data[cut:])
        summary = subject_of(value)
        assert summary.subject == "【ご注文】確認", cut
        assert summary.defects == ("no From header", "no To header", "no Date header",
                                   "no Message-ID header")  # fmt: skip
    sjis = "注文①".encode("cp932")
    value = b64_word("shift_jis", sjis[:1]) + b" " + b64_word("Shift_JIS", sjis[1:])
    assert subject_of(value).subject == "注文①"


def test_split_character_is_not_joined_across_text():
    data = "注".encode()
    summary = subject_of(b64_word("utf-8", data[:1]) + b" x " + b64_word("utf-8", data[1:]))
    assert summary.subject.startswith("\ufffd x ")
    assert "undecodable bytes in Subject (replaced)" in summary.defects


def test_invalid_base64_is_decoded_leniently_and_noted():
    summary = subject_of(b"=?utf-8?B?5r!Oo5*paH?= =?utf-8?B?A?=")
    assert summary.subject == "注文"
    assert "invalid base64 in an encoded word in Subject (decoded leniently)" in summary.defects


def test_encoded_word_inside_quoted_display_name():
    summary = summarize(
        b'From: "=?UTF-8?B?5bGx55SwIOWkqumDjg==?=" <Taro@Example.JP>\r\n'
        b"To: =?iso-2022-jp?B?GyRCOzNFRBsoQg==?= <ne-001@orders.example.com>, b@example.jp\r\n"
    )
    assert summary.from_ == "山田 太郎 <Taro@Example.JP>"
    assert summary.to == "山田 <ne-001@orders.example.com>, b@example.jp"


def test_long_encoded_word():
    text = "注文確認①" * 5_000  # 75 KB of UTF-8, 100 KB of base64
    summary = subject_of(b64_word("utf-8", text.encode()))
    assert summary.subject == text[: mail.MAX_FIELD_CHARS]
    assert f"subject longer than {mail.MAX_FIELD_CHARS} characters (cut)" in summary.defects
    assert len(summary.as_record()["subject"]) == 998


# --- Japanese charsets -------------------------------------------------------------------


def test_iso2022jp_nec_row_13_and_fullwidth_tilde():
    text = f"①②③ⅠⅡ㍉㈱ 12/5{TILDE}12/7 －￠￡￢∥"
    summary = subject_of(b64_word("ISO-2022-JP", cp50221(text)))
    assert summary.subject == text
    assert "undecodable" not in " ".join(summary.defects)


def test_iso2022jp_maps_like_cp932_with_or_without_nec_characters():
    # JIS 0x2141 alone (Python's iso2022_jp alone would say U+301C WAVE DASH) and next to ①.
    assert subject_of(b64_word("iso-2022-jp", b"\x1b$B!A\x1b(B")).subject == TILDE
    assert subject_of(b64_word("iso-2022-jp", b"\x1b$B-!!A\x1b(B")).subject == "①" + TILDE
    assert subject_of(b64_word("iso-2022-jp", b'\x1b$B!]!q!r"L!B\x1b(B')).subject == "－￠￡￢∥"


def test_iso2022jp_other_sets():
    kana = b"\x1b(I1'\x1b(B"  # JIS X 0201 katakana by escape
    assert subject_of(b64_word("iso-2022-jp", kana)).subject == "ｱｧ"
    shifted = b"a\x0e12\x0fb"  # ... and by SO/SI (CP50222)
    assert subject_of(b64_word("iso-2022-jp", shifted)).subject == "aｱｲb"
    broken = b"\x1b(I1\x7f2\x1b(B"
    assert subject_of(b64_word("iso-2022-jp", broken)).subject == "ｱ\ufffdｲ"
    jis_x0212 = "丂".encode("iso2022_jp_2")
    assert jis_x0212.startswith(b"\x1b$(D")
    assert subject_of(b64_word("iso-2022-jp", jis_x0212)).subject == "丂"
    gb2312 = "们".encode("iso2022_jp_2")  # ESC $ A: ISO-2022-JP-2's Chinese set
    assert subject_of(b64_word("iso-2022-jp-2", gb2312)).subject == "们"
    roman = b"\x1b(Ja\\b\x1b(B"  # JIS X 0201 Roman reads as ASCII, as on Windows
    assert subject_of(b64_word("iso-2022-jp", roman)).subject == "a\\b"
    announcer = b'\x1b&@\x1b$B$"\x1b(B'  # JIS X 0208-1990 announcer
    assert subject_of(b64_word("iso-2022-jp", announcer)).subject == "あ"


def test_iso2022jp_broken_escapes_are_replaced_not_fatal():
    summary = subject_of(b64_word("iso-2022-jp", b'\x1b$B$"\x1b(Z\x1b$B\x7f\x7f'))
    assert summary.subject.startswith("あ")
    assert "\ufffd" in summary.subject
    assert "undecodable bytes in Subject (replaced)" in summary.defects


def test_unencoded_iso2022jp_header():
    summary = subject_of(cp50221("注文①"))
    assert summary.subject == "注文①"
    assert "unencoded ISO-2022-JP in Subject" in summary.defects


@pytest.mark.parametrize("label", ["Shift_JIS", "shift-jis", "x-sjis", "Windows-31J", "MS932",
                                   "cp932", "SJIS"])  # fmt: skip
def test_shift_jis_labels_mean_cp932(label):
    text = f"髙橋①{TILDE}ｶﾀｶﾅ"
    assert subject_of(b64_word(label, text.encode("cp932"))).subject == text


def test_shift_jis_with_jis_x0213_character():
    text = "ㇰ注文"  # JIS X 0213 only: not in CP932
    summary = subject_of(b64_word("shift_jis", text.encode("shift_jis_2004")))
    assert summary.subject == text


@pytest.mark.parametrize("label", ["EUC-JP", "euc_jp", "x-euc-jp", "eucJP-ms", "CP51932"])
def test_euc_jp_labels_mean_cp51932(label):
    # ① is NEC row 13 (0xADA1); ～ is 0xA1C1; ｱ is SS2 kana; ㇰ is JIS X 0213.
    data = b"\xad\xa1\xa1\xc1\x8e\xb1" + "注文".encode("euc_jp") + "ㇰ".encode("euc_jis_2004")
    assert subject_of(b64_word(label, data)).subject == f"①{TILDE}ｱ注文ㇰ"


def test_euc_jp_jis_x0212():
    data = "丂".encode("euc_jp")
    assert data.startswith(b"\x8f")
    assert subject_of(b64_word("euc-jp", data)).subject == "丂"


# --- raw 8-bit headers, unknown and lying charsets ---------------------------------------


@pytest.mark.parametrize(
    ("raw", "subject", "defect"),
    [
        ("注文確認①～".encode(), f"注文確認①{TILDE}", None),  # RFC 6532: no defect
        ("注文確認①～".encode("cp932"), f"注文確認①{TILDE}", "decoded as cp932"),
        ("髙橋ｶﾀｶﾅ".encode("cp932"), "髙橋ｶﾀｶﾅ", "decoded as cp932"),
        ("注文確認のお知らせ".encode("euc_jp"), "注文確認のお知らせ", "decoded as euc-jp"),
        ("注文確認".encode("euc_jp"), "注文確認", "decoded as euc-jp"),  # kanji only
        ("café".encode("latin-1"), "café", "decoded as latin-1"),
        (b"\xff\xfe\xfd", "ÿþý", "decoded as latin-1"),
    ],
)
def test_raw_8bit_headers(raw, subject, defect):
    summary = subject_of(raw)
    assert summary.subject == subject
    notes = [note for note in summary.defects if note.startswith("raw 8-bit")]
    if defect is None:
        assert notes == []
    else:
        assert notes == [f"raw 8-bit bytes in Subject ({defect})"]


def test_raw_8bit_from_keeps_address():
    summary = summarize("From: 山田 太郎 <yamada@example.jp>\r\n".encode("cp932"))
    assert summary.from_ == "山田 太郎 <yamada@example.jp>"


def test_unknown_charset():
    summary = subject_of(b"=?x-foo?Q?caf=E9?=")
    assert summary.subject == "café"
    assert "unknown charset x-foo in Subject (decoded as latin-1)" in summary.defects
    japanese = subject_of(b64_word("x-unknown", "注文".encode()))
    assert japanese.subject == "注文"
    assert "unknown charset x-unknown in Subject (decoded as utf-8)" in japanese.defects


@pytest.mark.parametrize("codec", ["rot13", "zlib", "base64", "hex", "punycode", "idna",
                                   "unicode_escape", "undefined", "utf-8-sig", "mbcs"])  # fmt: skip
def test_python_only_codecs_are_not_charsets(codec):
    summary = subject_of(b"=?" + codec.encode() + b"?Q?abc=5Cu0041?=")
    assert summary.subject == "abc\\u0041"
    assert f"unknown charset {codec} in Subject (decoded as us-ascii)" in summary.defects


@pytest.mark.parametrize(
    ("label", "data", "subject", "defect"),
    [
        (
            "ISO-2022-JP",
            "注文①".encode(),
            "注文①",
            "declares ISO-2022-JP but is not (decoded as utf-8)",
        ),
        ("us-ascii", "注文".encode(), "注文", "declares us-ascii but is not (decoded as utf-8)"),
        ("iso-8859-1", "注文".encode(), "注文", "declares iso-8859-1 but is utf-8"),
        ("windows-1252", "é".encode(), "é", "declares windows-1252 but is utf-8"),
        ("utf-8", "注文①".encode("cp932"), "注文①", "declares utf-8 but is not (decoded as cp932)"),
        ("Shift_JIS", b"\x1b$B%F%9%H\x1b(B", "テスト", "declares Shift_JIS but is iso-2022-jp"),
    ],
)
def test_lying_charsets(label, data, subject, defect):
    summary = subject_of(b64_word(label, data))
    assert summary.subject == subject
    assert f"Subject {defect}" in summary.defects


def test_undecodable_bytes_are_replaced():
    summary = subject_of(b64_word("utf-8", b"ok \xff\xfe\xfd"))
    assert summary.subject == "ok \ufffd\ufffd\ufffd"
    assert "undecodable bytes in Subject (replaced)" in summary.defects


def test_declared_latin1_is_still_latin1():
    summary = subject_of(b"=?iso-8859-1?Q?caf=E9?=")
    assert summary.subject == "café"
    assert not [note for note in summary.defects if "Subject" in note]


OTHER_CHARSETS = [
    ("koi8-r", "Заказ"),
    ("gb2312", "订单"),
    ("big5", "訂單"),
    ("ks_c_5601-1987", "주문"),
    ("utf-16", "注文"),
    ("windows-1251", "Заказ"),
]


@pytest.mark.parametrize(("label", "text"), OTHER_CHARSETS)
def test_other_mail_charsets(label, text):
    codec = {"gb2312": "gb18030", "big5": "cp950", "ks_c_5601-1987": "cp949"}.get(label, label)
    summary = subject_of(b64_word(label, text.encode(codec)))
    assert summary.subject == text
    assert not [note for note in summary.defects if "Subject" in note]


# --- header syntax -----------------------------------------------------------------------


def test_missing_headers():
    summary = summarize(b"X-Other: 1\r\n\r\nbody")
    assert summary == MailSummary(
        from_="",
        to="",
        subject="",
        date="",
        message_id_header="",
        content_type="",
        defects=("no From header", "no To header", "no Subject header", "no Date header",
                 "no Message-ID header"),
    )  # fmt: skip


def test_empty_input():
    summary = summarize(b"")
    assert summary.subject == ""
    assert summary.defects[0] == "empty header block"
    assert "no Subject header" in summary.defects


def test_nul_bytes_are_removed():
    summary = summarize(b"Subj\x00ect: a\x00b\r\nFrom: x@\x00y\r\n\r\n")
    assert summary.subject == "ab"
    assert summary.from_ == "x@y"
    assert "NUL bytes in header block (removed)" in summary.defects


def test_mixed_line_endings_and_folding():
    head = b"Subject: one\r\n two\n\tthree\r\nFrom: a@example.jp\nTo: b@example.jp\r\n\nbody"
    summary = summarize(head)
    assert summary.subject == "one two three"
    assert summary.from_ == "a@example.jp"
    assert summary.to == "b@example.jp"


def test_lines_without_colon_and_orphan_continuations():
    head = (
        b"  orphan continuation\r\n"
        b"From sender@example.jp Tue Dec  3 10:15:00 2024\r\n"
        b"no colon\r\n"
        b" its continuation\r\n"
        b"Subject : spaced name\r\n"
        b"Bad Name: x\r\n"
    )
    summary = summarize(head)
    assert summary.subject == "spaced name"
    assert "3 header line(s) without a name and colon ignored" in summary.defects
    assert "1 continuation line(s) before the first header ignored" in summary.defects


def test_duplicate_headers_first_wins():
    summary = summarize(b"Subject: first\r\nSUBJECT: second\r\nFrom: a@x\r\nfrom: b@x\r\n")
    assert summary.subject == "first"
    assert summary.from_ == "a@x"
    assert "duplicate Subject header (first kept)" in summary.defects
    assert "duplicate From header (first kept)" in summary.defects


def test_ten_thousand_header_lines():
    lines = [b"X-F%05d: v" % i for i in range(10_000)]
    head = b"\r\n".join([*lines, b"Subject: found", b"From: a@example.jp"]) + b"\r\n\r\n"
    started = time.perf_counter()
    summary = summarize(head)
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"summarize: 10,000 header lines, {len(head)} bytes: {elapsed_ms:.1f} ms")
    assert summary.subject == "found"


def test_timing_of_large_heads():
    """Prints figures; asserts only that each returns."""
    cases = {
        "10,000 lines": b"".join(b"X-H%05d: %s\r\n" % (i, b"v" * 20) for i in range(10_000)),
        "one 256 KiB line": b"Subject: " + b"a" * HEAD_BUDGET_BYTES,
        "1,000 encoded words": b"Subject: "
        + b" ".join([b64_word("utf-8", "注文".encode())] * 1000),
        "200 KB ISO-2022-JP word": b"Subject: " + b64_word("iso-2022-jp", cp50221("①" * 70_000)),
        "250 KB raw EUC-JP": b"Subject: " + "注文のお知らせ".encode("euc_jp") * 12_000,
        "10,000 addresses": b"To: " + b", ".join(b"u%05d@example.jp" % i for i in range(10_000)),
    }
    for name, head in cases.items():
        started = time.perf_counter()
        summarize(head)
        print(f"summarize {name}: {(time.perf_counter() - started) * 1000:.1f} ms")


def test_control_characters_never_reach_the_record():
    summary = summarize(b"Subject: a\x1b[31mred\x7f\r\nFrom: =?utf-8?Q?x=0Ay=E2=80=AE?= <a@b>\r\n")
    assert summary.subject == "a[31mred"
    assert summary.from_ == "x y <a@b>"  # a line break becomes a space


def test_as_record_caps_every_string():
    summary = MailSummary(
        from_="f" * 5000,
        to="t" * 5000,
        subject="s" * 5000,
        date="d" * 5000,
        message_id_header="m" * 5000,
        content_type="c" * 5000,
        defects=("x" * 5000, "short"),
    )
    record = summary.as_record()
    assert set(record) == {"from", "to", "subject", "date", "message_id_header",
                           "content_type", "parse_defects"}  # fmt: skip
    assert len(record["from"]) == 998
    assert len(record["subject"]) == 998
    for key in ("to", "date", "message_id_header", "content_type"):
        assert len(record[key]) == 256
    assert [len(defect) for defect in record["parse_defects"]] == [256, 5]


def test_defects_are_bounded():
    value = b" ".join(b"=?x-cs-%d?Q?a?=" % i for i in range(1000))
    defects = subject_of(value).defects
    assert len(defects) == mail.MAX_DEFECTS
    assert defects[-1].startswith("... and ")


def test_summarize_never_raises_even_on_a_bug(monkeypatch):
    def broken(head):
        raise RuntimeError(head)

    monkeypatch.setattr(mail, "_summarize", broken)
    summary = summarize(b"Subject: x\r\n")
    assert summary.subject == ""
    assert summary.defects == ("header summary failed: RuntimeError",)


# --- recipients for the reconciler --------------------------------------------------------

SES_RECEIVED = (
    b"Return-Path: <sender@example.jp>\r\n"
    b"Received: from mail-yw1-f180.google.com (mail-yw1-f180.google.com [209.85.128.180])\r\n"
    b" by inbound-smtp.ap-northeast-1.amazonaws.com with SMTP id 0f1b2c3d4e5f\r\n"
    b" for NE-001@Orders.Example.com;\r\n"
    b" Tue, 03 Dec 2024 01:15:02 +0000 (UTC)\r\n"
    b"Received: from app01 by mail.example.jp for <older@example.jp>; Tue, 03 Dec 2024\r\n"
    b"To: ne-001@orders.example.com\r\n\r\nbody for <nobody@example.jp>"
)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (SES_RECEIVED, ["ne-001@orders.example.com"]),
        (b"Received: from a by b with ESMTP id c\r\n for <X@Y.jp>; date\r\n", ["x@y.jp"]),
        (b"Received: from a by b for x@y.jp\r\n", ["x@y.jp"]),
        (b"Received: from a by b; Tue, 3 Dec 2024\r\n", []),
        (b"Received: from a (for the record) by b\r\n", []),
        (b"Subject: no received\r\n", []),
        (b"", []),
        (b"\xff\x00Received: \xff for <a@b>\r\n", []),  # not a header name
        (b"Received: \xff\xfe for <a@b>;\r\n", ["a@b"]),
    ],
)
def test_received_for(head, expected):
    assert received_for(head) == expected


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (
            (
                b'To: "Yamada, Taro" <Taro@Example.JP>, ne-001@orders.example.com\r\n'
                b"Cc: =?utf-8?Q?A=2C_B?= <c@example.jp>, TARO@example.jp\r\n"
                b"To: late@example.jp\r\n"
            ),
            ["taro@example.jp", "ne-001@orders.example.com", "late@example.jp", "c@example.jp"],
        ),
        (b"To: undisclosed-recipients:;\r\n", []),
        (b"To: team: a@x.jp, b@x.jp;\r\n", ["a@x.jp", "b@x.jp"]),
        (b"To: not an address, @, a@\r\n", []),
        ("To: 山田 <y@example.jp>\r\n".encode("cp932"), ["y@example.jp"]),
        (b"Cc: only@cc.jp\r\n", ["only@cc.jp"]),
        (b"Subject: none\r\n", []),
        (b"To: " + b"(" * 5000 + b"a@b\r\n", []),
    ],
)
def test_header_addresses(head, expected):
    assert header_addresses(head) == expected


# --- internal tables ---------------------------------------------------------------------


def test_jis_to_microsoft_table_is_complete():
    """The six-entry table is exactly where Python's JIS and CP932 mappings differ."""
    differences = {}
    table = charsets._jis_table()
    for c1 in range(0x21, 0x7F):
        for c2 in range(0x21, 0x7F):
            try:
                jis = bytes((0x1B, 0x24, 0x42, c1, c2)).decode("iso2022_jp")
            except UnicodeDecodeError:
                continue
            microsoft = table[(c1 << 8) | c2]
            if jis != microsoft:
                differences[ord(jis)] = microsoft
    assert differences == charsets._JIS_TO_MICROSOFT


def test_generic_charset_table_names_real_codecs():
    for codec in charsets._GENERIC_CODECS.values():
        codecs.lookup(codec)


# --- the hostile corpus ------------------------------------------------------------------

HOSTILE = hostile_mails(40 * 1024 * 1024)


@pytest.mark.parametrize(("name", "raw"), HOSTILE, ids=[name for name, _ in HOSTILE])
def test_hostile_mail_never_raises(name, raw):
    summary = summarize(split_head(raw))
    assert isinstance(summary, MailSummary)
    assert summary == summarize(raw)
    assert all(isinstance(value, str) for value in dataclasses.astuple(summary)[:6])
    record = summary.as_record()
    assert len(record["subject"]) <= 998
    assert isinstance(received_for(raw), list)
    assert isinstance(header_addresses(raw), list)


def test_hostile_corpus_shape():
    names = [name for name, _ in HOSTILE]
    assert len(names) == len(set(names))
    assert all(len(raw) < 5 * 1024 * 1024 for _, raw in HOSTILE)
    for expected in ("empty-file", "boundary-never-closed", "1000-part-multipart",
                     "100-deep-nested-multipart", "10000-header-lines", "mixed-crlf-lf",
                     "100k-encoded-word", "lying-charset-iso2022jp-is-utf8"):  # fmt: skip
        assert expected in names
    small = hostile_mails(1000)
    assert [name for name, _ in small] == names
    assert all(len(raw) <= 1000 for _, raw in small)


def test_hostile_corpus_items_say_what_they_are():
    corpus = dict(HOSTILE)
    assert corpus["empty-file"] == b""
    lying = summarize(corpus["lying-charset-iso2022jp-is-utf8"])
    assert lying.subject == "注文①"
    assert "Subject declares ISO-2022-JP but is not (decoded as utf-8)" in lying.defects
    assert "unknown charset" in " ".join(summarize(corpus["unknown-charset"]).defects)
    assert corpus["1000-part-multipart"].count(b"\r\n--p\r\n") == 1000
    assert corpus["100-deep-nested-multipart"].count(b"multipart/mixed") == 100
    assert b"\r\n" in corpus["mixed-crlf-lf"]
    assert b"\r\n" not in corpus["mixed-crlf-lf"].replace(b"\r\n", b"")
    assert received_for(corpus["received-for-abuse"]) == ["ne-001@orders.example.com"]


# --- properties --------------------------------------------------------------------------


@QUICK
@given(st.binary(max_size=4096))
def test_summarize_never_raises_on_bytes(data):
    summary = summarize(data)
    for value in dataclasses.astuple(summary)[:6]:
        assert isinstance(value, str)
        value.encode("utf-8")  # storable: no lone surrogates
        assert not any(ch < " " for ch in value)
    received_for(data)
    header_addresses(data)


HEADER_NAMES = ["Subject", "From", "To", "Cc", "Date", "Message-ID", "Content-Type",
                "Received", "X-Other", "subject", "", " ", "=?utf-8?"]  # fmt: skip
ENCODED_BITS = st.sampled_from(["=?", "?=", "?B?", "?Q?", "=?utf-8?B?", "=?iso-2022-jp?b?",
                                "=?x-foo?q?", "\x1b$B", "\x1b(B", "=E3", "_", "<", ">", "@",
                                ",", '"', "(", ")", ";", "for "])  # fmt: skip


@QUICK
@given(
    st.lists(
        st.tuples(
            st.sampled_from(HEADER_NAMES),
            st.lists(st.one_of(st.text(max_size=20), ENCODED_BITS), max_size=12).map("".join),
            st.sampled_from(["\r\n", "\n", "\r\n ", "\n\t", "\r"]),
        ),
        max_size=20,
    ),
    st.sampled_from(["utf-8", "cp932", "euc_jp", "iso2022_jp", "latin-1"]),
)
def test_summarize_never_raises_on_header_text(fields, encoding):
    text = "".join(f"{name}: {value}{end}" for name, value, end in fields)
    data = (
        text.encode(encoding, "replace")
        if encoding != "utf-8"
        else text.encode("utf-8", "surrogatepass")
    )
    summary = summarize(data)
    assert isinstance(summary.subject, str)
    received_for(data)
    header_addresses(data)


@QUICK
@given(st.binary(max_size=2048), st.sampled_from([b"\r\n\r\n", b"\n\n", b"\r\n\n", b"\n\r\n", b""]),
       st.binary(max_size=256))  # fmt: skip
def test_split_head_is_a_bounded_prefix(before, blank, after):
    data = before + blank + after
    head = split_head(data)
    assert data.startswith(head)
    assert len(head) <= HEAD_BUDGET_BYTES
    assert b"\n\n" not in head
    assert b"\n\r\n" not in head


def test_split_head_is_a_bounded_prefix_of_large_input():
    for size in (HEAD_BUDGET_BYTES - 1, HEAD_BUDGET_BYTES, HEAD_BUDGET_BYTES + 1, 1_000_000):
        data = b"X: y\r\n" * (size // 6) + b"z" * (size % 6)
        head = split_head(data)
        assert data.startswith(head)
        assert len(head) == min(size, HEAD_BUDGET_BYTES)


SAFE_TEXT = st.text(
    st.characters(
        blacklist_categories=("Cc", "Cs"),
        blacklist_characters="\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    ),
    max_size=80,
)


@QUICK
@given(SAFE_TEXT)
def test_utf8_encoded_word_round_trip(text):
    encoded = Header(text, "utf-8").encode()
    summary = summarize(b"Subject: " + encoded.encode("ascii") + b"\n\n")
    assert summary.subject == text.strip(" ")


JIS_ALPHABET = st.sampled_from(
    list("abcXYZ019 !#%&*+-./:;<>?@[]^_{|}")
    + list("あいうえおがぱゃっをんアイウエオヴャッヲン一二三注文確認番号商品数量合計東京髙")
    + list("、。「」【】（）＋－×÷＝≠・ー\u301c\u2016\u2212\u00a2\u00a3\u00ac")
)


@QUICK
@given(st.lists(JIS_ALPHABET, max_size=60).map("".join))
def test_iso2022jp_encoded_word_round_trip(text):
    try:
        text.encode("iso2022_jp")
    except UnicodeEncodeError:
        return  # 髙 and friends: not in JIS X 0208, so not this codec's text
    encoded = Header(text, "iso-2022-jp").encode()
    summary = summarize(b"Subject: " + encoded.encode("ascii") + b"\n\n")
    assert summary.subject == text.translate(charsets._JIS_TO_MICROSOFT).strip(" ")
