<?php
// Test processor: behaves as its first argument says, records what it saw.
//   behave.php MODE STORE
// Every run appends one line to $LEDGER_DIR/effects.log and keeps a copy of stdin.
$mode = $argv[1] ?? 'ok';
$store = $argv[2] ?? '000';
$ledger = getenv('LEDGER_DIR') ?: sys_get_temp_dir();
$raw = stream_get_contents(STDIN);
$id = getenv('MAILFLOW_DELIVERY_ID') ?: 'none';
$attempt = (int) (getenv('MAILFLOW_ATTEMPT') ?: 0);
$safe = preg_replace('/[^A-Za-z0-9]/', '_', $id);
foreach (['stdin', 'env', 'argv'] as $d) { @mkdir("$ledger/$d", 0777, true); }
file_put_contents("$ledger/stdin/$safe.$attempt", $raw);
$env = [];
foreach (getenv() as $k => $v) { $env[] = $k; }
sort($env);
file_put_contents("$ledger/env/$safe", implode("\n", $env));
file_put_contents("$ledger/argv/$safe", json_encode($argv));
$line = sprintf("%s %d %s %s %d %d start\n", $id, $attempt, $mode, hash('sha256', $raw), strlen($raw), getmypid());
file_put_contents("$ledger/effects.log", $line, FILE_APPEND | LOCK_EX);

function done(string $ledger, string $id, int $attempt, string $mode, int $code): never {
    file_put_contents("$ledger/effects.log", sprintf("%s %d %s - 0 %d exit=%d\n", $id, $attempt, $mode, getmypid(), $code), FILE_APPEND | LOCK_EX);
    exit($code);
}
switch ($mode) {
    case 'ok': done($ledger, $id, $attempt, $mode, 0);
    case 'exit75': fwrite(STDERR, "temporarily unavailable\n"); done($ledger, $id, $attempt, $mode, 75);
    case 'exit71': done($ledger, $id, $attempt, $mode, 71);
    case 'exit1': fwrite(STDERR, "broken order\n"); done($ledger, $id, $attempt, $mode, 1);
    case 'flaky':  // 75 on the first attempt, then success
        done($ledger, $id, $attempt, $mode, $attempt <= 1 ? 75 : 0);
    case 'print4': echo "4.3.0 stock database busy\n"; done($ledger, $id, $attempt, $mode, 1);
    case 'print5': echo "5.1.1 unknown store\n"; done($ledger, $id, $attempt, $mode, 75);
    case 'slow': usleep((int) (getenv('SLOW_S') ?: 2) * 1000000); done($ledger, $id, $attempt, $mode, 0);
    case 'noisy':  // 80 KB of bytes that are not UTF-8 on each stream, then success
        echo str_repeat("\xff", 80000); fwrite(STDERR, str_repeat("\xfe", 80000));
        done($ledger, $id, $attempt, $mode, 0);
    case 'hang': sleep(3600); done($ledger, $id, $attempt, $mode, 0);
    case 'stubborn':  // the first attempt ignores SIGTERM and hangs (only SIGKILL ends it)
        if ($attempt <= 1) { pcntl_signal(SIGTERM, SIG_IGN); sleep(3600); }
        done($ledger, $id, $attempt, $mode, 0);
    case 'grandchild':
        $p = proc_open(['sleep', '3600'], [], $pipes);
        $status = proc_get_status($p);
        file_put_contents("$ledger/grandchild.pid", (string) $status['pid']);
        sleep(3600);
        done($ledger, $id, $attempt, $mode, 0);
    case 'signal': posix_kill(getmypid(), SIGKILL); sleep(5); exit(0);
    default: echo "5.5.0 unknown mode $mode\n"; done($ledger, $id, $attempt, $mode, 64);
}
