<?php
// Security probe processor: records what the processor can see, then exits with argv[1].
// Writes $PROBE_DIR/<attempt>-<pid>.json: its environment, its open file descriptors, and
// what its stdin is (path, mode of the file and of the directory it lives in).
/**
 * Every /proc/<pid>/environ this process can open. With PROBE_MARK set, AWS_ variables count
 * only in processes whose environment also holds that mark (the test's own process tree, not
 * whatever else runs on a shared machine).
 *
 * @return array{readable: list<int>, aws: list<string>}
 */
function scan_environ(): array
{
    $mark = getenv('PROBE_MARK') ?: '';
    $readable = [];
    $aws = [];
    foreach (glob('/proc/[0-9]*/environ') ?: [] as $path) {
        $pid = (int) explode('/', $path)[2];
        $raw = @file_get_contents($path);
        if ($raw === false || $pid === getmypid()) {
            continue;
        }
        $readable[] = $pid;
        if ($mark !== '' && !str_contains($raw, $mark)) {
            continue;
        }
        foreach (explode("\0", $raw) as $pair) {
            if (str_starts_with($pair, 'AWS_')) {
                $aws[] = "$pid:" . explode('=', $pair, 2)[0];
            }
        }
    }
    return ['readable' => $readable, 'aws' => $aws];
}

if (PHP_SAPI !== 'cli' || realpath($_SERVER['SCRIPT_FILENAME'] ?? '') !== __FILE__) {
    return;  // included for scan_environ()
}
$code = (int) ($argv[1] ?? 0);
$dir = getenv('PROBE_DIR') ?: sys_get_temp_dir();
$stdin = @readlink('/proc/self/fd/0');
$fds = array_values(array_diff(scandir('/proc/self/fd'), ['.', '..']));
$report = [
    'argv' => $argv,
    'env' => getenv(),
    'fds' => array_map(fn($fd) => [$fd, @readlink("/proc/self/fd/$fd")], $fds),
    'stdin_path' => $stdin,
    'stdin_mode' => $stdin ? sprintf('%o', fileperms('/proc/self/fd/0') & 0777) : null,
    'stdin_dir_mode' => ($stdin && is_dir(dirname($stdin))) ? sprintf('%o', fileperms(dirname($stdin)) & 0777) : null,
    'stdin_bytes' => strlen(stream_get_contents(STDIN)),
    'uid' => function_exists('posix_geteuid') ? posix_geteuid() : getmyuid(),  // getmyuid() is the script file's owner
    // The worker's own environment, through /proc: it must be closed to us even though we
    // run as the worker's uid (it holds the worker's AWS credentials, or ECS's credentials URI).
    'parent_environ_readable' => ($parent = @file_get_contents('/proc/' . posix_getppid() . '/environ')) !== false,
    'parent_environ_planted' => $parent !== false && str_contains($parent, 'planted'),
    // Every process's environment we can open (PID 1, php-fpm, a health check, ...): none may
    // hold an AWS_ variable.
    'environ' => scan_environ(),
];
file_put_contents("$dir/" . (getenv('MAILFLOW_ATTEMPT') ?: '0') . '-' . getmypid() . '.json', json_encode($report));
if ($code !== 0) { fwrite(STDERR, "probe failing with $code\n"); }
exit($code);
