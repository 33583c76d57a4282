<?php
/**
 * mailflow runner: the FastCGI end of the processor contract (DESIGN.md §5).
 *
 * The worker sends one FastCGI request per delivery: the command as MAILFLOW_ARGV (a JSON list
 * of strings), its whole environment as MAILFLOW_ENV (a JSON object), MAILFLOW_TIMEOUT_S,
 * MAILFLOW_KILL_GRACE_S, MAILFLOW_TAIL_BYTES, optionally MAILFLOW_CWD, and the raw mail as the
 * request body. This script
 *
 *  - trusts nothing the client sends about *how* to run: the program is looked up on the
 *    runner's own fixed PATH (the pool's env[PATH]), never the PATH in MAILFLOW_ENV, and run by
 *    its absolute path; the child's PATH is the runner's; variables that change how a program
 *    or the loader behaves (LD_*, PHPRC, PHP_INI_SCAN_DIR, PHP_VALUE, BASH_ENV, ...) are
 *    dropped from MAILFLOW_ENV; a request carrying php-fpm's PHP_VALUE / PHP_ADMIN_VALUE
 *    params is refused,
 *  - refuses unless argv, with its program resolved to an absolute path, starts with one of the
 *    prefixes in the *process* environment variable MAILFLOW_RUNNER_ALLOW (set by the pool
 *    config; a FastCGI param of the same name is ignored); a prefix's program is an absolute
 *    path, or a bare name resolved on the runner's PATH,
 *  - runs the command with proc_open in array form (no shell) with the environment sent (minus
 *    the dropped variables, PATH replaced), in a new session and process group (`setsid` from
 *    util-linux execs the command in place: the child's pid is its process group id),
 *  - streams the body to the child's stdin while draining its stdout and stderr (no deadlock),
 *  - on timeout sends SIGTERM to the whole group, then SIGKILL after the kill grace,
 *  - notices a vanished worker (the body ends early, or a keep-alive write fails) and kills the
 *    group the same way,
 *  - answers `Content-Type: application/json`: some newlines (keep-alives), then one JSON object.
 *
 * HTTP status 200 means "the JSON says what happened" (including a refusal or a spawn failure);
 * any other status means the runner itself could not do its job.
 */

declare(strict_types=1);

const RESULT_VERSION = 1;
const HEAD_BYTES = 64;
const CHUNK_BYTES = 65536;
const MAX_TAIL_BYTES = 1048576;
/** Longest sleep of the poll loop; also how late a timeout can fire. */
const POLL_US = 50000;
/** A keep-alive byte goes to the worker this often; a failed write means it is gone. */
const KEEPALIVE_S = 0.5;
/** After the child exits, how long a grandchild may hold its stdout/stderr open. */
const PIPE_DRAIN_S = 1.0;
const SIG_TERM = 15;
const SIG_KILL = 9;
/** The runner's PATH when the pool sets none (the pool config sets env[PATH]). */
const FALLBACK_PATH = '/usr/local/bin:/usr/bin:/bin';
/**
 * Variables a client may not hand the legacy process: they change how the loader, libc, PHP
 * or a shell behave rather than what the script is told. Exact names, and prefixes ending in _.
 */
const DROPPED_ENV = [
    'LD_', 'DYLD_', 'MALLOC_', 'PHPRC', 'PHP_INI_SCAN_DIR', 'PHP_VALUE', 'PHP_ADMIN_VALUE',
    'GLIBC_TUNABLES', 'GCONV_PATH', 'LOCPATH', 'NLSPATH', 'HOSTALIASES', 'RES_OPTIONS',
    'LOCALDOMAIN', 'BASH_ENV', 'ENV', 'SHELLOPTS', 'BASHOPTS', 'PS4', 'IFS', 'CDPATH',
    'PERL5OPT', 'PERL5LIB', 'PYTHONPATH', 'PYTHONSTARTUP', 'PYTHONHOME', 'RUBYOPT', 'NODE_OPTIONS',
];
/** FastCGI params php-fpm itself applies as ini settings of this very script. */
const REFUSED_PARAMS = ['PHP_VALUE', 'PHP_ADMIN_VALUE'];

final class Capture
{
    public string $head = '';
    public string $tail = '';
    public int $total = 0;

    public function __construct(private readonly int $tailBytes)
    {
    }

    public function feed(string $chunk): void
    {
        if (strlen($this->head) < HEAD_BYTES) {
            $this->head .= substr($chunk, 0, HEAD_BYTES - strlen($this->head));
        }
        $this->total += strlen($chunk);
        if ($this->tailBytes === 0) {
            return;
        }
        $this->tail .= $chunk;
        if (strlen($this->tail) > $this->tailBytes) {
            $this->tail = substr($this->tail, -$this->tailBytes);
        }
    }
}

final class BadRequest extends RuntimeException
{
}

function now(): float
{
    return hrtime(true) / 1e9;
}

/** Answer and stop. Only valid before the first keep-alive (headers not yet sent). */
function respond(int $status, array $body): never
{
    if (!headers_sent()) {
        http_response_code($status);
        header('Content-Type: application/json');
        header('Cache-Control: no-store');
    }
    $body['version'] = RESULT_VERSION;
    echo json_encode(
        $body,
        JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE | JSON_PRESERVE_ZERO_FRACTION,
    ), "\n";
    exit(0);
}

function param(string $name): ?string
{
    $value = $_SERVER[$name] ?? null;
    return is_string($value) ? $value : null;
}

function no_nul(string $value, string $what): string
{
    if (str_contains($value, "\0")) {
        throw new BadRequest("$what contains NUL");
    }
    return $value;
}

/** @return list<string> */
function parse_argv(?string $raw): array
{
    if ($raw === null) {
        throw new BadRequest('MAILFLOW_ARGV is missing');
    }
    try {
        $argv = json_decode($raw, false, 4, JSON_THROW_ON_ERROR);
    } catch (JsonException $exc) {
        throw new BadRequest('MAILFLOW_ARGV is not JSON: ' . $exc->getMessage());
    }
    if (!is_array($argv) || $argv === [] || !array_is_list($argv)) {
        throw new BadRequest('MAILFLOW_ARGV must be a non-empty JSON list');
    }
    foreach ($argv as $i => $arg) {
        if (!is_string($arg)) {
            throw new BadRequest("MAILFLOW_ARGV[$i] is not a string");
        }
        no_nul($arg, "MAILFLOW_ARGV[$i]");
    }
    if ($argv[0] === '') {
        throw new BadRequest('MAILFLOW_ARGV[0] is empty');
    }
    return $argv;
}

/** @return array<string, string> */
function parse_env(?string $raw): array
{
    if ($raw === null) {
        throw new BadRequest('MAILFLOW_ENV is missing');
    }
    try {
        $env = json_decode($raw, false, 4, JSON_THROW_ON_ERROR);
    } catch (JsonException $exc) {
        throw new BadRequest('MAILFLOW_ENV is not JSON: ' . $exc->getMessage());
    }
    if (!($env instanceof stdClass)) {
        throw new BadRequest('MAILFLOW_ENV must be a JSON object');
    }
    $clean = [];
    foreach (get_object_vars($env) as $key => $value) {
        $key = (string) $key;
        if ($key === '' || str_contains($key, '=')) {
            throw new BadRequest("MAILFLOW_ENV name '$key' is not a variable name");
        }
        if (!is_string($value)) {
            throw new BadRequest("MAILFLOW_ENV[$key] is not a string");
        }
        $clean[no_nul($key, 'MAILFLOW_ENV name')] = no_nul($value, "MAILFLOW_ENV[$key]");
    }
    return $clean;
}

function parse_number(?string $raw, string $name, float $min, float $max, ?float $default): float
{
    if ($raw === null || $raw === '') {
        if ($default === null) {
            throw new BadRequest("$name is missing");
        }
        return $default;
    }
    if (!is_numeric($raw)) {
        throw new BadRequest("$name is not a number");
    }
    $value = (float) $raw;
    if (!is_finite($value) || $value < $min || $value > $max) {
        throw new BadRequest("$name must be within [$min, $max]");
    }
    return $value;
}

/**
 * The allow-list, from the environment php-fpm gave this process: `getenv(..., true)` skips
 * the FastCGI params, so a client cannot send its own allow-list.
 *
 * @return list<list<string>>|null null when it is not a JSON list of non-empty string lists
 */
function allow_list(): ?array
{
    $raw = getenv('MAILFLOW_RUNNER_ALLOW', true);
    if ($raw === false || trim($raw) === '') {
        return [];
    }
    try {
        $prefixes = json_decode($raw, false, 4, JSON_THROW_ON_ERROR);
    } catch (JsonException) {
        return null;
    }
    if (!is_array($prefixes) || !array_is_list($prefixes)) {
        return null;
    }
    foreach ($prefixes as $prefix) {
        if (!is_array($prefix) || $prefix === [] || !array_is_list($prefix)) {
            return null;
        }
        foreach ($prefix as $token) {
            if (!is_string($token)) {
                return null;
            }
        }
    }
    return $prefixes;
}

/**
 * The allow-list with each prefix's program as an absolute path: a bare name is looked up on
 * the runner's PATH (an absent program stays as written and matches nothing that runs).
 *
 * @param list<list<string>> $prefixes  @return list<list<string>>|null null: a relative path
 */
function absolute_prefixes(array $prefixes, string $runnerPath): ?array
{
    $out = [];
    foreach ($prefixes as $prefix) {
        $program = $prefix[0];
        if (!str_starts_with($program, '/')) {
            if (str_contains($program, '/')) {
                return null;
            }
            $program = resolve_command($program, $runnerPath) ?? $program;
        }
        $out[] = [$program, ...array_slice($prefix, 1)];
    }
    return $out;
}

/** @param list<string> $argv  @param list<list<string>> $prefixes */
function allowed(array $argv, array $prefixes): bool
{
    foreach ($prefixes as $prefix) {
        if (count($prefix) <= count($argv) && array_slice($argv, 0, count($prefix)) === $prefix) {
            return true;
        }
    }
    return false;
}

/**
 * The absolute path of the program $name on the runner's PATH (an absolute $name as is), or
 * null when it is not an executable file. A relative path with a slash is never resolved.
 */
function resolve_command(string $name, string $path): ?string
{
    $executable = static fn (string $file): bool => is_file($file) && is_executable($file);
    if (str_contains($name, '/')) {
        return ($name[0] === '/' && $executable($name)) ? $name : null;
    }
    foreach (explode(':', $path) as $dir) {
        if (str_starts_with($dir, '/') && $executable("$dir/$name")) {
            return "$dir/$name";
        }
    }
    return null;
}

/**
 * The environment the legacy process gets: what the client sent, minus DROPPED_ENV, with the
 * runner's PATH. @param array<string, string> $env  @return array{array<string, string>, list<string>}
 */
function child_env(array $env, string $runnerPath): array
{
    $dropped = [];
    foreach (array_keys($env) as $name) {
        foreach (DROPPED_ENV as $banned) {
            $hit = str_ends_with($banned, '_') ? str_starts_with($name, $banned) : $name === $banned;
            if ($hit) {
                $dropped[] = $name;
                unset($env[$name]);
                break;
            }
        }
    }
    $env['PATH'] = $runnerPath;
    return [$env, $dropped];
}

/**
 * SIGTERM/SIGKILL to the child's process group. The child's pid too: should `setsid` not have
 * made its group yet (a tiny timeout), the signal still stops it before it execs the command.
 */
function signal_group(int $pid, int $signal): void
{
    if (function_exists('posix_kill')) {
        @posix_kill(-$pid, $signal);
        @posix_kill($pid, $signal);
        return;
    }
    // No posix extension: kill(1) from procps/util-linux does the same.
    $name = $signal === SIG_KILL ? 'KILL' : 'TERM';
    foreach (["-$pid", (string) $pid] as $target) {
        $kill = @proc_open(['kill', "-$name", '--', $target], [], $pipes);
        if (is_resource($kill)) {
            proc_close($kill);
        }
    }
}

/** @return list<int> open descriptors above stderr (Linux /proc; none elsewhere) */
function inherited_fds(): array
{
    $entries = @scandir('/proc/self/fd');
    if ($entries === false) {
        return [];
    }
    $fds = [];
    foreach ($entries as $entry) {
        if (ctype_digit($entry) && (int) $entry > 2) {
            $fds[] = (int) $entry;
        }
    }
    return $fds;
}

/** @param list<string> $argv  @return array<string, mixed> */
function outcome_base(array $argv): array
{
    return [
        'refused' => false,
        'reason' => null,
        'error' => null,
        'argv0' => $argv[0] ?? null,
    ];
}

// --- main ---------------------------------------------------------------------------------------

// The runner must outlive a vanished client long enough to kill what it started.
ignore_user_abort(true);
set_time_limit(0);
while (ob_get_level() > 0) {
    ob_end_clean();
}
$started = now();

try {
    foreach (REFUSED_PARAMS as $name) {
        if (param($name) !== null) {
            throw new BadRequest("the $name param is not accepted");
        }
    }
    $argv = parse_argv(param('MAILFLOW_ARGV'));
    $env = parse_env(param('MAILFLOW_ENV'));
    $timeoutS = parse_number(param('MAILFLOW_TIMEOUT_S'), 'MAILFLOW_TIMEOUT_S', 0.001, 86400.0, null);
    $graceS = parse_number(param('MAILFLOW_KILL_GRACE_S'), 'MAILFLOW_KILL_GRACE_S', 0.0, 3600.0, 5.0);
    $tailBytes = (int) parse_number(param('MAILFLOW_TAIL_BYTES'), 'MAILFLOW_TAIL_BYTES', 0, MAX_TAIL_BYTES, 4096);
    $contentLength = (int) parse_number(param('CONTENT_LENGTH'), 'CONTENT_LENGTH', 0, PHP_INT_MAX, 0.0);
    $cwd = param('MAILFLOW_CWD');
    $cwd = ($cwd === null || $cwd === '') ? null : no_nul($cwd, 'MAILFLOW_CWD');
} catch (BadRequest $exc) {
    respond(400, ['error' => 'bad request: ' . $exc->getMessage()]);
}

$result = outcome_base($argv);
// The runner's own PATH (the pool's env[PATH]): the only one used to find a program.
$runnerPath = getenv('PATH', true) ?: FALLBACK_PATH;
$prefixes = allow_list();
$prefixes = $prefixes === null ? null : absolute_prefixes($prefixes, $runnerPath);
if ($prefixes === null) {
    $why = 'MAILFLOW_RUNNER_ALLOW is not a JSON list of argv prefixes whose programs are absolute paths or bare names';
    error_log("mailflow runner: $why");
    respond(500, ['error' => "runner misconfigured: $why"]);
}
$program = resolve_command($argv[0], $runnerPath);
if (!allowed([$program ?? $argv[0], ...array_slice($argv, 1)], $prefixes)) {
    $shown = substr(json_encode($argv, JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE), 0, 300);
    $why = $prefixes === [] ? 'the runner allow-list is empty' : 'argv matches no prefix of the runner allow-list';
    error_log("mailflow runner: refused $shown: $why");
    respond(200, ['refused' => true, 'reason' => "refused by runner: $why: $shown"] + $result);
}

if ($cwd !== null && !is_dir($cwd)) {
    respond(200, ['error' => "spawn failed: cwd $cwd: No such directory"] + $result);
}
if ($program === null) {
    respond(200, ['error' => "spawn failed: {$argv[0]}: No such file or executable"] + $result);
}
if (str_contains($program, '=')) {
    // env(1) below would take it for a variable assignment.
    respond(200, ['error' => "spawn failed: {$argv[0]}: a command name containing '=' cannot be run"] + $result);
}
[$env, $dropped] = child_env($env, $runnerPath);
if ($dropped !== []) {
    error_log('mailflow runner: dropped from the environment sent: ' . implode(' ', $dropped));
}
$setsid = resolve_command('setsid', $runnerPath);
$envTool = resolve_command('env', $runnerPath);
if ($setsid === null || $envTool === null) {
    respond(500, ['error' => 'runner misconfigured: setsid (util-linux) or env (coreutils) not on PATH']);
}

// The chain setsid → env → command execs in place, one pid throughout:
// - `setsid` makes a new session and process group and execs: it does not fork, because a
//   proc_open child is never a group leader. `--wait` only matters if it ever had to fork:
//   it then waits and passes the exit status on. `--` ends its options.
// - `env -i -- NAME=VALUE... command` sets exactly the environment sent: proc_open's own env
//   array silently drops variables whose value is empty (EXTENSION= is a real case).
$command = [$setsid, '--wait', '--', $envTool, '-i', '--'];
foreach ($env as $name => $value) {
    $command[] = "$name=$value";
}
// The resolved absolute path: env(1) must not search a PATH for the program.
array_push($command, $program, ...array_slice($argv, 1));
$descriptors = [0 => ['pipe', 'r'], 1 => ['pipe', 'w'], 2 => ['pipe', 'w']];
// PHP does not close the php-fpm worker's descriptors (the listening socket, this request's
// connection, the log pipe) in the child: cover each with /dev/null, so the legacy process
// holds none of them.
foreach (inherited_fds() as $fd) {
    $descriptors[$fd] = ['file', '/dev/null', 'r'];
}
$proc = @proc_open($command, $descriptors, $pipes, $cwd, $env);
if (!is_resource($proc)) {
    $why = error_get_last()['message'] ?? 'proc_open failed';
    respond(200, ['error' => "spawn failed: $why"] + $result);
}
$pid = (int) proc_get_status($proc)['pid'];
[$stdin, $stdout, $stderr] = [$pipes[0], $pipes[1], $pipes[2]];
foreach ($pipes as $pipe) {
    stream_set_blocking($pipe, false);
}

header('Content-Type: application/json');
header('Cache-Control: no-store');

$input = fopen('php://input', 'rb');
$captures = [1 => new Capture($tailBytes), 2 => new Capture($tailBytes)];
$open = [1 => $stdout, 2 => $stderr];
$pending = '';
$received = 0;
$delivered = 0;
$inputDone = $contentLength === 0 || $input === false;
$stdinOpen = true;
$aborted = false;
$timedOut = false;
$termAt = null;
$killed = false;
$exitedAt = null;
$exitCode = null;
$termSig = null;
$deadline = $started + $timeoutS;
$lastKeepalive = now();
$idleUs = 500;

while (true) {
    $now = now();
    if ($exitedAt === null) {
        $status = proc_get_status($proc);
        if (!$status['running']) {
            // Read once: PHP 8.2 reports the exit code only on the first call after the exit.
            $exitedAt = $now;
            if ($status['signaled']) {
                $termSig = (int) $status['termsig'];
            } else {
                $exitCode = (int) $status['exitcode'];
            }
        }
    }
    if ($exitedAt !== null && ($open === [] || $now - $exitedAt >= PIPE_DRAIN_S)) {
        break;
    }
    if ($exitedAt === null && !$timedOut && $now >= $deadline) {
        $timedOut = true;
    }
    if ($exitedAt === null && ($timedOut || $aborted)) {
        if ($termAt === null) {
            $termAt = $now;
            signal_group($pid, SIG_TERM);
        } elseif (!$killed && $now - $termAt >= $graceS) {
            $killed = true;
            signal_group($pid, SIG_KILL);
        }
    }
    if (!$aborted && $now - $lastKeepalive >= KEEPALIVE_S) {
        // Writing is the only way a php-fpm script learns that its client went away.
        $lastKeepalive = $now;
        echo "\n";
        flush();
        if (connection_aborted()) {
            $aborted = true;
            error_log("mailflow runner: the worker went away; terminating process group $pid");
            continue;
        }
    }

    // Feed the child's stdin from the request body, one chunk at a time.
    if ($stdinOpen && $pending === '' && !$inputDone) {
        $chunk = fread($input, (int) min(CHUNK_BYTES, $contentLength - $received));
        if ($chunk === false || $chunk === '') {
            $inputDone = true;
            if ($received < $contentLength) {
                // php-fpm ends php://input early on an ABORT_REQUEST or a closed connection.
                $aborted = true;
                error_log("mailflow runner: request body ended at $received of $contentLength bytes; terminating process group $pid");
                continue;
            }
        } else {
            $pending = $chunk;
            $received += strlen($chunk);
            $inputDone = $received >= $contentLength;
        }
    }
    if ($stdinOpen && $pending === '' && ($inputDone || $aborted)) {
        fclose($stdin);
        $stdinOpen = false;
    }

    $read = array_values($open);
    $write = ($stdinOpen && $pending !== '') ? [$stdin] : [];
    $except = null;
    if ($read === [] && $write === []) {
        // Only the exit is left to wait for (the pipes usually close a moment before the
        // child can be reaped): poll quickly at first, then back off.
        usleep($idleUs);
        $idleUs = min(POLL_US, $idleUs * 2);
        continue;
    }
    if (@stream_select($read, $write, $except, 0, POLL_US) === false) {
        usleep(POLL_US);
        continue;
    }
    if ($write !== []) {
        $written = @fwrite($stdin, $pending);
        if ($written === false) {
            // EPIPE: the child closed its stdin (or exited). Like a pipe, the rest is dropped.
            fclose($stdin);
            $stdinOpen = false;
            $pending = '';
        } else {
            $delivered += $written;
            $pending = (string) substr($pending, $written);
        }
    }
    foreach ($open as $fd => $pipe) {
        if (!in_array($pipe, $read, true)) {
            continue;
        }
        $data = fread($pipe, CHUNK_BYTES);
        if ($data === false || ($data === '' && feof($pipe))) {
            unset($open[$fd]);
            fclose($pipe);
        } elseif ($data !== '') {
            $captures[$fd]->feed($data);
        }
    }
}

// Whatever the command left behind in its group (a grandchild holding a pipe) goes with it.
signal_group($pid, SIG_KILL);
foreach ($open as $pipe) {
    fclose($pipe);
}
if ($stdinOpen) {
    fclose($stdin);
}
proc_close($proc);

respond(200, [
    'exit_code' => $exitCode,
    'signal' => $termSig,
    'timed_out' => $timedOut,
    'aborted' => $aborted,
    'pid' => $pid,
    'stdin_bytes' => $delivered,
    'stdout_head' => base64_encode($captures[1]->head),
    'stdout_tail' => base64_encode($captures[1]->tail),
    'stdout_bytes' => $captures[1]->total,
    'stderr_head' => base64_encode($captures[2]->head),
    'stderr_tail' => base64_encode($captures[2]->tail),
    'stderr_bytes' => $captures[2]->total,
    'duration_s' => now() - $started,
    'env_dropped' => $dropped,
] + $result);
