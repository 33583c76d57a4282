<?php
// Chaos processor: behaves as the recipient's mode says, and writes an append-only ledger of
// what it did to $CHAOS_DIR/effects.log, one line per event:
//
//   <time> start  <delivery_id> <attempt> <pid> <mode> <stdin sha256> <stdin bytes>
//   <time> effect <delivery_id> <attempt> <pid> first|replay
//   <time> exit   <delivery_id> <attempt> <pid> <code>
//
// `effect` is the side effect (the order import). A naive legacy script performs it on every
// successful run; the `first|replay` word shows what an idempotent one would do with
// MAILFLOW_DELIVERY_ID as its key (an O_EXCL marker per delivery): `replay` = a second run
// that the key would have turned into a no-op.
//
// Modes (argv[1]); "attempt" is MAILFLOW_ATTEMPT:
//   ok     effect, exit 0
//   slow   sleep CHAOS_SLOW_S (1.5), effect, linger CHAOS_LINGER_S (1.0), exit 0: the linger is
//          the window between a side effect and the outcome write
//   flaky  attempt 1: exit 75; later: effect, exit 0
//   e71    attempt 1: exit 71; later: effect, exit 0
//   e75    exit 75 always (ends attempts_exhausted)
//   e1     exit 1 (permanent)
//   sig    attempt 1: SIGKILL itself; later: effect, exit 0
//   hang   attempt 1: sleep past any timeout; later: effect, exit 0
$mode = $argv[1] ?? 'ok';
$dir = getenv('CHAOS_DIR') ?: sys_get_temp_dir();
$id = getenv('MAILFLOW_DELIVERY_ID') ?: 'none';
$attempt = (int) (getenv('MAILFLOW_ATTEMPT') ?: 0);
$pid = getmypid();
$raw = stream_get_contents(STDIN);

function note(string $dir, string $line): void {
    file_put_contents("$dir/effects.log", sprintf("%.3f %s\n", microtime(true), $line), FILE_APPEND | LOCK_EX);
}

function effect(string $dir, string $id, int $attempt, int $pid): void {
    @mkdir("$dir/done", 0777, true);
    $marker = @fopen("$dir/done/" . hash('sha256', $id), 'x');
    $word = $marker === false ? 'replay' : 'first';
    if ($marker !== false) { fclose($marker); }
    note($dir, "effect $id $attempt $pid $word");
}

function finish(string $dir, string $id, int $attempt, int $pid, int $code): never {
    note($dir, "exit $id $attempt $pid $code");
    exit($code);
}

note($dir, sprintf("start %s %d %d %s %s %d", $id, $attempt, $pid, $mode, hash('sha256', $raw), strlen($raw)));
$first = $attempt <= 1;
switch ($mode) {
    case 'ok':
        effect($dir, $id, $attempt, $pid);
        finish($dir, $id, $attempt, $pid, 0);
    case 'slow':
        usleep((int) ((float) (getenv('CHAOS_SLOW_S') ?: 1.5) * 1e6));
        effect($dir, $id, $attempt, $pid);
        usleep((int) ((float) (getenv('CHAOS_LINGER_S') ?: 1.0) * 1e6));
        finish($dir, $id, $attempt, $pid, 0);
    case 'flaky':
    case 'e71':
        if ($first) { fwrite(STDERR, "temporarily unavailable\n"); finish($dir, $id, $attempt, $pid, $mode === 'flaky' ? 75 : 71); }
        effect($dir, $id, $attempt, $pid);
        finish($dir, $id, $attempt, $pid, 0);
    case 'e75':
        fwrite(STDERR, "stock database locked\n");
        finish($dir, $id, $attempt, $pid, 75);
    case 'e1':
        fwrite(STDERR, "broken order\n");
        finish($dir, $id, $attempt, $pid, 1);
    case 'sig':
        if ($first) { posix_kill($pid, SIGKILL); sleep(5); }
        effect($dir, $id, $attempt, $pid);
        finish($dir, $id, $attempt, $pid, 0);
    case 'hang':
        if ($first) { sleep(3600); }
        effect($dir, $id, $attempt, $pid);
        finish($dir, $id, $attempt, $pid, 0);
    default:
        echo "5.5.0 unknown mode $mode\n";
        finish($dir, $id, $attempt, $pid, 64);
}
