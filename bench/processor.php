<?php
// Bench processor: the stand-in for the legacy script.
//   php bench/processor.php STORE SLEEP_MS TIMES_FILE
// Reads the whole mail from stdin, sleeps SLEEP_MS, and appends one line to TIMES_FILE:
//   <delivery id> <start epoch s> <end epoch s> <stdin bytes>
// The two stamps are the processor's own view of its run (after interpreter start-up, before
// exit): the bench subtracts them from the consumer's stamps to get the consumer's overhead.
$t0 = microtime(true);
$bytes = 0;
while (!feof(STDIN)) {
    $chunk = fread(STDIN, 65536);
    if ($chunk === false) {
        break;
    }
    $bytes += strlen($chunk);
}
usleep(((int) ($argv[2] ?? 100)) * 1000);
$t1 = microtime(true);
$id = getenv('MAILFLOW_DELIVERY_ID') ?: 'none';
file_put_contents($argv[3] ?? '/dev/null', sprintf("%s %.6f %.6f %d\n", $id, $t0, $t1, $bytes), FILE_APPEND | LOCK_EX);
exit(0);
