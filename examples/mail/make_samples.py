"""Write the sample order mails in this directory: `python examples/mail/make_samples.py`.

The .eml files are committed; this script documents exactly how their bytes were made and
regenerates them byte for byte (no clock, no randomness). See README.md for the order format.
"""

from __future__ import annotations

import base64
import itertools
import quopri
from pathlib import Path

HERE = Path(__file__).resolve().parent
CRLF = "\r\n"


def sjis_pair_to_jis(lead: int, trail: int) -> bytes:
    """One Shift_JIS (CP932) double-byte code → its JIS X 0208 row/cell bytes."""
    if lead >= 0xE0:
        lead -= 0x40
    row = (lead - 0x81) * 2 + 0x21
    if trail >= 0x9F:
        return bytes((row + 1, trail - 0x9F + 0x21))
    return bytes((row, trail - 0x40 + 0x21 - (1 if trail >= 0x80 else 0)))


def iso2022jp(text: str) -> bytes:
    """ISO-2022-JP the way Windows mailers write it (CP50221): JIS X 0208 runs taken from
    CP932, so NEC row 13 (①②) and U+FF5E FULLWIDTH TILDE (～, JIS 0x2141) are encodable."""
    out = bytearray()
    double = False
    for char in text:
        if char in "\r\n" or char.isascii():
            if double:
                out += b"\x1b(B"
                double = False
            out += char.encode("ascii")
            continue
        code = char.encode("cp932")
        if len(code) != 2 or code[0] >= 0xF0:  # half-width kana, IBM extensions: not here
            raise ValueError(f"{char!r} has no JIS X 0208 (NEC) code")
        if not double:
            out += b"\x1b$B"
            double = True
        out += sjis_pair_to_jis(code[0], code[1])
    if double:
        out += b"\x1b(B"
    return bytes(out)


def encoded_word(charset: str, data: bytes) -> str:
    return f"=?{charset}?B?{base64.b64encode(data).decode('ascii')}?="


def crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", CRLF)


def headers(lines: list[str]) -> str:
    return CRLF.join(lines) + CRLF + CRLF


def received(recipient: str, host: str, queue_id: str, date: str) -> list[str]:
    return [
        "Received: from app01.internal (app01.internal [10.0.1.15])",
        f"\tby {host} (Postfix) with ESMTP id {queue_id}",
        f"\tfor <{recipient}>; {date}",
    ]


ORDER_001 = """\
山田 太郎 様

このたびは さくら商店 をご利用いただき、誠にありがとうございます。
以下の内容でご注文を承りました。

注文番号: 100123
注文日時: 2024-12-03 10:14:52
お客様名: 山田 太郎
商品コード: SKR-0001
商品名: 特選ギフトセット①（3～5人前）
数量: 2
単価: 5,400円
商品コード: SKR-0107
商品名: 季節の和菓子詰め合わせ②
数量: 1
単価: 3,240円
送料: 0円
合計: 14,040円

お届け予定: 12月5日～12月7日
※ ご不明な点は本メールにご返信ください。

--
さくら商店 受注センター
https://shop.example.jp/
"""


def order_001() -> bytes:
    subject_1 = iso2022jp("【ご注文確認】注文番号 100123")
    subject_2 = iso2022jp(" ①お届け 12/5～12/7")
    head = headers(
        [
            "Return-Path: <orders@shop.example.jp>",
            *received(
                "ne-001@orders.example.com",
                "mail.shop.example.jp",
                "4Y2B7X1ZqTz9sQ",
                "Tue,  3 Dec 2024 10:15:01 +0900 (JST)",
            ),
            "From: "
            + encoded_word("ISO-2022-JP", iso2022jp("さくら商店 受注センター"))
            + " <orders@shop.example.jp>",
            "To: ne-001@orders.example.com",
            "Subject: " + encoded_word("ISO-2022-JP", subject_1),
            " " + encoded_word("ISO-2022-JP", subject_2),
            "Date: Tue, 03 Dec 2024 10:15:00 +0900",
            "Message-ID: <20241203101500.100123@shop.example.jp>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=ISO-2022-JP",
            "Content-Transfer-Encoding: 7bit",
            "X-Mailer: SakuraCart/3.2",
        ]
    )
    return head.encode("ascii") + iso2022jp(crlf(ORDER_001))


ORDER_002 = """\
髙橋 花子 様

株式会社テスト通販をご利用いただきありがとうございます。ご注文内容をお知らせします。

注文番号: 200456
注文日時: 2024-12-03 11:02:10
お客様名: 髙橋 花子
商品コード: TS-1001
商品名: 国産りんごジュース 1L×6本 ①
数量: 3
単価: 2,980円
商品コード: TS-2040
商品名: 手作り焼き菓子セット（10～12個入）
数量: 1
単価: 1,650円
送料: 880円
合計: 11,470円

発送予定日: 即日～翌営業日
お振込先名義: ｶ)ﾃｽﾄﾂｳﾊﾝ
株式会社テスト通販 お客様窓口 03-0000-0000
"""


def order_002() -> bytes:
    head = headers(
        [
            "Return-Path: <info@tsuhan.example.co.jp>",
            *received(
                "ne-002@orders.example.com",
                "mail.tsuhan.example.co.jp",
                "4Y2C0Q6hVbz3kM",
                "Tue,  3 Dec 2024 11:02:13 +0900 (JST)",
            ),
            "From: 株式会社テスト通販 <info@tsuhan.example.co.jp>",
            "To: ne-002@orders.example.com",
            "Subject: 【受注】注文番号 200456 ①即日発送～ご確認ください",
            "Date: Tue, 03 Dec 2024 11:02:12 +0900",
            "Message-ID: <200456.1733191332@tsuhan.example.co.jp>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=Shift_JIS",
            "Content-Transfer-Encoding: 8bit",
        ]
    )
    return head.encode("cp932") + crlf(ORDER_002).encode("cp932")


ORDER_003_TEXT = """\
佐藤 一郎 様

ご注文ありがとうございます。ご注文内容は以下のとおりです。
明細は添付の CSV もご覧ください。

注文番号: 300789
注文日時: 2024-12-04 09:30:00
お客様名: 佐藤 一郎
商品コード: GRN-550
商品名: 宇治抹茶 缶入り 100g
数量: 4
単価: 1,296円
送料: 0円
合計: 5,184円

みどり茶舗 オンラインストア
"""

ORDER_003_HTML = """\
<!DOCTYPE html>
<html lang="ja"><head><meta charset="utf-8"><title>ご注文確認</title></head>
<body>
<p>佐藤 一郎 様</p>
<p>ご注文ありがとうございます。</p>
<table>
<tr><th>注文番号</th><td>300789</td></tr>
<tr><th>商品</th><td>宇治抹茶 缶入り 100g &times; 4</td></tr>
<tr><th>合計</th><td>5,184円</td></tr>
</table>
</body></html>
"""

ORDER_003_CSV = """\
注文番号,商品コード,商品名,数量,単価
300789,GRN-550,宇治抹茶 缶入り 100g,4,1296
"""


def base64_lines(data: bytes) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return CRLF.join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + CRLF


def order_003() -> bytes:
    subject = "【みどり茶舗】ご注文ありがとうございます（注文番号 300789）".encode()
    # Three encoded words cut inside three-byte characters, as some mailers do: only the
    # bytes of adjacent words joined before decoding give the text back.
    cuts = (0, 31, 62, len(subject))
    boundary = "----=_Part_300789_1733272200"
    head = headers(
        [
            "Return-Path: <shop@midori.example.net>",
            *received(
                "ne-003@orders.example.com",
                "mail.midori.example.net",
                "4Y2Dk81mNcz7Rw",
                "Wed,  4 Dec 2024 09:30:04 +0900 (JST)",
            ),
            (
                'From: "=?UTF-8?Q?=E3=81=BF=E3=81=A9=E3=82=8A=E8=8C=B6=E8=88=97?="'
                " <shop@midori.example.net>"
            ),
            "To: ne-003@orders.example.com",
            "Subject: " + encoded_word("UTF-8", subject[cuts[0] : cuts[1]]),
            *("\t" + encoded_word("UTF-8", subject[a:b]) for a, b in itertools.pairwise(cuts[1:])),
            "Date: Wed, 04 Dec 2024 09:30:02 +0900",
            "Message-ID: <300789.20241204093002@midori.example.net>",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/mixed; boundary="{boundary}"',
        ]
    )
    html = quopri.encodestring(crlf(ORDER_003_HTML).encode()).decode("ascii")
    body = (
        "This is a multi-part message in MIME format." + CRLF + CRLF
        + f"--{boundary}" + CRLF
        + "Content-Type: text/plain; charset=UTF-8" + CRLF
        + "Content-Transfer-Encoding: base64" + CRLF + CRLF
        + base64_lines(crlf(ORDER_003_TEXT).encode())
        + f"--{boundary}" + CRLF
        + "Content-Type: text/html; charset=UTF-8" + CRLF
        + "Content-Transfer-Encoding: quoted-printable" + CRLF + CRLF
        + crlf(html)
        + f"--{boundary}" + CRLF
        + 'Content-Type: text/csv; charset=Shift_JIS; name="order-300789.csv"' + CRLF
        + "Content-Transfer-Encoding: base64" + CRLF
        + "Content-Disposition: attachment;" + CRLF
        + " filename*=UTF-8''%E6%B3%A8%E6%96%87%E6%98%8E%E7%B4%B0-300789.csv;" + CRLF
        + ' filename="order-300789.csv"' + CRLF + CRLF
        + base64_lines(crlf(ORDER_003_CSV).encode("cp932"))
        + f"--{boundary}--" + CRLF
    )  # fmt: skip
    return head.encode("ascii") + body.encode("ascii")


ORDER_004 = """\
鈴木 次郎 様

ご注文を承りました。

注文番号: 400321
注文日時: 2024-12-05 14:20:00
お客様名: 鈴木 次郎
商品コード: ECJ-77
商品名: 北海道産 新巻鮭 ①切り身（2～3kg）
数量: 1
単価: 7,800円
合計: 7,800円

北の海産 通販部
"""


def order_004() -> bytes:
    subject = "【北の海産】ご注文確認 注文番号 400321 ①～"
    head = headers(
        [
            "Return-Path: <order@kita.example.org>",
            *received(
                "ne-004@orders.example.com",
                "mail.kita.example.org",
                "4Y2Ff93aLkz1Pq",
                "Thu,  5 Dec 2024 14:20:03 +0900 (JST)",
            ),
            "From: "
            + encoded_word("EUC-JP", "北の海産".encode("euc_jp"))
            + " <order@kita.example.org>",
            "To: ne-004@orders.example.com",
            # CP51932 (Windows EUC-JP): ① is NEC row 13 (0xADA1), ～ is 0xA1C1.
            "Subject: " + encoded_word("EUC-JP", eucjp_ms(subject)),
            "Date: Thu, 05 Dec 2024 14:20:01 +0900",
            "Message-ID: <400321@kita.example.org>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=EUC-JP",
            "Content-Transfer-Encoding: 8bit",
        ]
    )
    return head.encode("ascii") + eucjp_ms(crlf(ORDER_004))


def eucjp_ms(text: str) -> bytes:
    """EUC-JP as CP51932: JIS X 0208 codes (from CP932) with the high bit set."""
    out = bytearray()
    for char in text:
        if char.isascii():
            out += char.encode("ascii")
            continue
        code = char.encode("cp932")
        if len(code) != 2 or code[0] >= 0xF0:
            raise ValueError(f"{char!r} has no JIS X 0208 (NEC) code")
        out += bytes(byte | 0x80 for byte in sjis_pair_to_jis(code[0], code[1]))
    return bytes(out)


ORDER_999 = """\
お問い合わせ窓口 御中

店舗アドレスの設定を誤ったため、受注メールが info 宛てに届いています。

注文番号: 999001
お客様名: 田中 三郎
商品コード: MISC-1
数量: 1
合計: 1,100円
"""


def order_999_unroutable() -> bytes:
    head = headers(
        [
            "Return-Path: <noreply@misc.example.com>",
            *received(
                "info@orders.example.com",
                "mail.misc.example.com",
                "4Y2Gz10bWnz5Ht",
                "Fri,  6 Dec 2024 16:45:31 +0900 (JST)",
            ),
            "From: =?UTF-8?B?" + base64.b64encode("なんでも雑貨".encode()).decode() + "?="
            " <noreply@misc.example.com>",
            "To: info@orders.example.com",
            "Subject: =?UTF-8?B?"
            + base64.b64encode("ご注文のお知らせ（注文番号 999001）".encode()).decode()
            + "?=",
            "Date: Fri, 06 Dec 2024 16:45:30 +0900",
            "Message-ID: <999001@misc.example.com>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=UTF-8",
            "Content-Transfer-Encoding: 8bit",
        ]
    )
    return head.encode("ascii") + crlf(ORDER_999).encode()


SAMPLES = {
    "order-001-iso2022jp.eml": order_001,
    "order-002-shiftjis.eml": order_002,
    "order-003-multipart.eml": order_003,
    "order-004-eucjp.eml": order_004,
    "order-999-unroutable.eml": order_999_unroutable,
}


def main() -> None:
    for name, make in SAMPLES.items():
        (HERE / name).write_bytes(make())


if __name__ == "__main__":
    main()
