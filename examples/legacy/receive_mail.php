<?php
// A sample "legacy" order importer, in the shape of the real one:
//   /etc/aliases:  ne-001: | "php /app/legacy/receive_mail.php 001"
// It reads the raw mail on stdin, finds the order lines in the first text part, and writes
// one order file per store. Exit codes follow sendmail/postfix: 0 ok, 75 try again later,
// anything else permanent; a leading "5.x.x"/"4.x.x" on stdout says the same in words.
//
// Order lines it understands (any of ":" or "：" after the key):
//   注文番号: 12345      商品コード: ABC-1      数量: 2      合計: 1,980円

const EX_USAGE = 64;
const EX_DATAERR = 65;
const EX_TEMPFAIL = 75;

function fail(int $code, string $status, string $message): never {
    fwrite(STDOUT, "$status $message\n");
    exit($code);
}

// ISO-2022-JP with NEC/IBM extensions (what Japanese mailers really send): glibc's iconv has
// no CP50221, so map each JIS X 0208 segment to Shift_JIS bytes and decode those as CP932.
function jis_to_utf8(string $s): string {
    $out = '';
    $parts = preg_split('/(\x1b\$[@B]|\x1b\([BJ])/', $s, -1, PREG_SPLIT_DELIM_CAPTURE);
    $double = false;
    foreach ($parts as $part) {
        if ($part === "\x1b\$B" || $part === "\x1b\$@") { $double = true; continue; }
        if ($part === "\x1b(B" || $part === "\x1b(J") { $double = false; continue; }
        if (!$double) { $out .= $part; continue; }
        $sjis = '';
        for ($i = 0; $i + 1 < strlen($part); $i += 2) {
            $c1 = ord($part[$i]); $c2 = ord($part[$i + 1]);
            $s1 = (($c1 + 1) >> 1) + ($c1 <= 0x5e ? 0x70 : 0xb0);
            $s2 = ($c1 & 1) ? $c2 + ($c2 >= 0x60 ? 0x20 : 0x1f) : $c2 + 0x7e;
            $sjis .= chr($s1) . chr($s2);
        }
        $out .= (string) @iconv('CP932', 'UTF-8//IGNORE', $sjis);
    }
    return $out;
}

function to_utf8(string $text, string $charset): string {
    $charset = strtolower(trim($charset, "\"' "));
    if ($charset === 'iso-2022-jp' || $charset === 'iso-2022-jp-ms' || $charset === 'cp50221'
        || str_contains($text, "\x1b\$B")) {
        return jis_to_utf8($text);
    }
    $map = ['shift_jis' => 'CP932', 'sjis' => 'CP932', 'x-sjis' => 'CP932', 'cp932' => 'CP932',
            'windows-31j' => 'CP932', 'euc-jp' => 'EUC-JP-MS', '' => 'UTF-8', 'us-ascii' => 'UTF-8'];
    $from = $map[$charset] ?? $charset;
    $converted = @iconv($from, 'UTF-8//IGNORE', $text);
    if ($converted === false && $from === 'EUC-JP-MS') {
        $converted = @iconv('EUC-JP', 'UTF-8//IGNORE', $text);
    }
    return $converted === false ? $text : $converted;
}

function split_message(string $raw): array {
    $raw = str_replace("\r\n", "\n", $raw);
    $pos = strpos($raw, "\n\n");
    if ($pos === false) { return [$raw, '']; }
    return [substr($raw, 0, $pos), substr($raw, $pos + 2)];
}

function header_value(string $head, string $name): string {
    $head = preg_replace("/\n[ \t]+/", ' ', $head);
    if (preg_match('/^' . preg_quote($name, '/') . ':[ \t]*(.*)$/mi', $head, $m)) {
        return trim($m[1]);
    }
    return '';
}

function decode_body(string $body, string $cte): string {
    $cte = strtolower($cte);
    if ($cte === 'base64') { return (string) base64_decode(preg_replace('/\s+/', '', $body)); }
    if ($cte === 'quoted-printable') { return quoted_printable_decode($body); }
    return $body;
}

// The first text/plain part, decoded to UTF-8 (walks nested multiparts).
function first_text(string $head, string $body, int $depth = 0): ?string {
    $type = header_value($head, 'Content-Type') ?: 'text/plain';
    if ($depth < 10 && preg_match('/^multipart\//i', $type)
        && preg_match('/boundary="?([^";]+)"?/i', $type, $m)) {
        // Index 0 is the preamble ("This is a multi-part message…"): never a part.
        foreach (array_slice(explode('--' . $m[1], $body), 1) as $part) {
            if (str_starts_with($part, '--')) { break; }  // the closing delimiter
            [$h, $b] = split_message(ltrim($part, "\n"));
            $text = first_text($h, $b, $depth + 1);
            if ($text !== null) { return $text; }
        }
        return null;
    }
    if (!preg_match('/^text\/plain/i', $type)) { return null; }
    preg_match('/charset="?([^";\s]+)"?/i', $type, $cm);
    $decoded = decode_body($body, header_value($head, 'Content-Transfer-Encoding'));
    return to_utf8($decoded, $cm[1] ?? 'us-ascii');
}

$store = $argv[1] ?? '';
if (!preg_match('/^[0-9]{3}$/', $store)) {
    fail(EX_USAGE, '5.3.5', "usage: receive_mail.php STORE_ID (3 digits), got '$store'");
}
$raw = stream_get_contents(STDIN);
if ($raw === false || $raw === '') {
    fail(EX_DATAERR, '5.6.0', 'empty mail on stdin');
}
[$head, $body] = split_message($raw);
$text = first_text($head, $body);
if ($text === null || !preg_match('/注文番号\s*[:：]\s*([A-Za-z0-9-]+)/u', $text, $order)) {
    fail(EX_DATAERR, '5.6.0', 'no 注文番号 (order number) in the first text part');
}
$items = [];
if (preg_match_all('/商品コード\s*[:：]\s*(\S+)[\s\S]*?数量\s*[:：]\s*([0-9]+)/u', $text, $mm, PREG_SET_ORDER)) {
    foreach ($mm as $m) { $items[] = ['sku' => $m[1], 'quantity' => (int) $m[2]]; }
}

$dir = (getenv('ORDERS_DIR') ?: __DIR__ . '/../../var/orders') . "/store-$store";
if (!is_dir($dir) && !@mkdir($dir, 0775, true) && !is_dir($dir)) {
    fail(EX_TEMPFAIL, '4.3.0', "cannot create $dir");
}
$record = [
    'store' => $store,
    'order_no' => $order[1],
    'items' => $items,
    'delivery_id' => getenv('MAILFLOW_DELIVERY_ID') ?: null,
    'attempt' => (int) (getenv('MAILFLOW_ATTEMPT') ?: 1),
    'sender' => getenv('SENDER') ?: null,
    'bytes' => strlen($raw),
    'sha256' => hash('sha256', $raw),
];
// Idempotent on the delivery id: a re-run after a crash imports nothing twice.
$file = "$dir/{$order[1]}.json";
if (is_file($file)) {
    $old = json_decode((string) file_get_contents($file), true);
    if (($old['delivery_id'] ?? null) === $record['delivery_id']) {
        fwrite(STDOUT, "order {$order[1]} already imported for this delivery\n");
        exit(0);
    }
}
$tmp = "$file.tmp" . getmypid();
if (file_put_contents($tmp, json_encode($record, JSON_UNESCAPED_UNICODE | JSON_PRETTY_PRINT)) === false
    || !rename($tmp, $file)) {
    fail(EX_TEMPFAIL, '4.3.0', "cannot write $file");
}
fwrite(STDOUT, "imported order {$order[1]} for store $store (" . count($items) . " items)\n");
exit(0);
