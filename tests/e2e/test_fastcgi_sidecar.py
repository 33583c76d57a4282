"""The processor contract against both transports, with real processes.

`exec` spawns php-cli directly; `fastcgi` goes through a real php-fpm started with
sidecar/run-local and sidecar/runner.php. The contract tests are parametrized over both
(fixture `processor`); the rest exercise what only the FastCGI path has: the allow-list,
php-fpm's own failures, broken peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import textwrap
import time
from pathlib import Path

import pytest

from mailflow.outcome import ProcessResult, Verdict, classify
from mailflow.processors.exec import ExecProcessor, ProcessRequest
from mailflow.processors.fastcgi import FastCGIAddress, FastCGIProcessor
from support.php_fpm import (
    RUNNER_SCRIPT,
    fastcgi_get,
    free_port,
    require_binary,
    running_php_fpm,
)

MIB = 1024 * 1024
#: The PATH sidecar/pool.conf gives the runner (env[PATH]).
POOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PHP_SCRIPTS = {
    # exit.php CODE [STDOUT] [STDERR]
    "exit.php": """
        <?php
        fwrite(STDOUT, $argv[2] ?? '');
        fwrite(STDERR, $argv[3] ?? '');
        exit((int) $argv[1]);
    """,
    # Streams stdin through sha256: "<hex> <bytes>".
    "sha256.php": """
        <?php
        $ctx = hash_init('sha256');
        $n = 0;
        while (!feof(STDIN)) {
            $chunk = fread(STDIN, 1 << 16);
            if ($chunk === false) { exit(71); }
            $n += strlen($chunk);
            hash_update($ctx, $chunk);
        }
        echo hash_final($ctx), ' ', $n, "\\n";
    """,
    "env.php": """
        <?php
        echo json_encode(getenv(), JSON_FORCE_OBJECT);
    """,
    # sleeper.php PIDFILE [ignore-term]: a grandchild `sleep` in the same process group,
    # "<pid> <grandchild pid>" in PIDFILE, then sleep.
    "sleeper.php": """
        <?php
        if (($argv[2] ?? '') === 'ignore-term') {
            pcntl_signal(SIGTERM, SIG_IGN);
        }
        $gc = proc_open(['sleep', '300'], [0 => ['file', '/dev/null', 'r'],
            1 => STDOUT, 2 => STDERR], $pipes);
        $gcpid = proc_get_status($gc)['pid'];
        file_put_contents($argv[1] . '.tmp', getmypid() . ' ' . $gcpid);
        rename($argv[1] . '.tmp', $argv[1]);
        echo "started\\n";
        while (true) { sleep(1); }
    """,
    # Leaves a grandchild holding stdout behind and exits 0 at once (fork: PHP would wait
    # for a proc_open child at exit).
    "leaver.php": """
        <?php
        $pid = pcntl_fork();
        if ($pid === 0) {
            pcntl_exec('/bin/sleep', ['300']);
        }
        file_put_contents($argv[1], (string) $pid);
        echo "bye\\n";
        exit(0);
    """,
    # Never reads stdin.
    "no_stdin.php": """
        <?php
        echo "ignored stdin\\n";
        exit(0);
    """,
    "cwd.php": """
        <?php
        echo getcwd();
    """,
    # Not a runner: what php-fpm answers when SCRIPT_FILENAME points here.
    "garbage.php": """
        <?php
        echo "this is not JSON";
    """,
}


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("php-scripts")
    paths = {}
    for name, body in PHP_SCRIPTS.items():
        path = directory / name
        path.write_text(textwrap.dedent(body).lstrip())
        paths[name.removesuffix(".php")] = str(path)
    return paths


@pytest.fixture(scope="module")
def php() -> str:
    return require_binary("php")


@pytest.fixture(scope="module")
def allow(scripts) -> list[list[str]]:
    return [
        *(["php", path] for name, path in scripts.items() if name != "garbage"),
        ["php", "-r"],
        ["/nonexistent/bin/tool"],
    ]


@pytest.fixture(scope="module")
def fpm(tmp_path_factory, allow, php):
    with running_php_fpm(tmp_path_factory.mktemp("fpm"), allow) as running:
        yield running


@pytest.fixture(params=["exec", "fastcgi"])
def processor(request, php):
    """The same contract, two transports."""
    if request.param == "exec":
        return ExecProcessor()
    fpm = request.getfixturevalue("fpm")
    return FastCGIProcessor(fpm.address, fpm.runner_script)


@pytest.fixture
def fastcgi(fpm) -> FastCGIProcessor:
    return FastCGIProcessor(fpm.address, fpm.runner_script)


@pytest.fixture
def mail(tmp_path) -> Path:
    path = tmp_path / "mail.eml"
    path.write_bytes(b"From: a@example.com\r\nSubject: order\r\n\r\nbody\r\n")
    return path


@pytest.fixture(scope="module")
def big_mail(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("big") / "big.eml"
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(40):
            chunk = os.urandom(MIB)
            digest.update(chunk)
            f.write(chunk)
    return path, digest.hexdigest()


# --- helpers ------------------------------------------------------------------------------------


BASE_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "LANG": "C.UTF-8",
    "HOME": "/nonexistent",
    "SENDER": "shop@example.com",
    "RECIPIENT": "ne-001@orders.example.com",
    "MAILFLOW_MAIL_ID": "0123456789abcdef",
}


def req(argv, stdin_path, **kwargs) -> ProcessRequest:
    kwargs.setdefault("timeout_s", 30.0)
    kwargs.setdefault("kill_grace_s", 1.0)
    kwargs.setdefault("env", dict(BASE_ENV))
    return ProcessRequest(argv=tuple(argv), stdin_path=stdin_path, **kwargs)


def run(processor, request) -> ProcessResult:
    return asyncio.run(processor.run(request))


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_gone(pids, timeout_s=5.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def kill_quietly(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


async def wait_for_file(path: Path, timeout_s=10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


# --- the contract, on both transports -----------------------------------------------------------


def test_exit_0_with_stdout(processor, scripts, mail):
    result = run(
        processor, req(["php", scripts["exit"], "0", "imported order 42\n", "note\n"], mail)
    )
    assert result.transport_error is None
    assert (result.exit_code, result.signal, result.timed_out) == (0, None, False)
    assert result.stdout_tail == b"imported order 42\n"
    assert result.stdout_head == b"imported order 42\n"
    assert result.stderr_tail == b"note\n"
    assert classify(result).verdict is Verdict.SUCCESS


@pytest.mark.parametrize(
    ("code", "stdout", "verdict", "reason"),
    [
        (75, "", Verdict.RETRY, "tempfail_exit_75"),
        (71, "", Verdict.RETRY, "tempfail_exit_71"),
        (1, "", Verdict.PERMANENT, "exit_1"),
        (1, "4.3.0 database locked\n", Verdict.RETRY, "enhanced_status_4.3.0"),
        (75, "5.1.1 unknown store\n", Verdict.PERMANENT, "enhanced_status_5.1.1"),
    ],
)
def test_exit_status_semantics(processor, scripts, mail, code, stdout, verdict, reason):
    result = run(processor, req(["php", scripts["exit"], str(code), stdout], mail))
    assert result.exit_code == code
    outcome = classify(result)
    assert (outcome.verdict, outcome.reason) == (verdict, reason)


def test_tails_are_bounded(processor, scripts, mail):
    noise = "x" * 10_000 + "END"
    result = run(processor, req(["php", scripts["exit"], "1", noise, noise], mail, tail_bytes=300))
    assert result.stdout_tail == noise[-300:].encode()
    assert result.stderr_tail == noise[-300:].encode()
    assert result.stdout_head == noise[:64].encode()


def test_forty_mib_mail_arrives_byte_identical(processor, scripts, big_mail):
    path, digest = big_mail
    started = time.monotonic()
    result = run(processor, req(["php", scripts["sha256"]], path))
    elapsed = time.monotonic() - started
    assert result.transport_error is None, result.transport_error
    assert result.exit_code == 0, result.stderr_tail
    assert result.stdout_tail.decode().split() == [digest, str(40 * MIB)]
    print(f"\n40 MiB through {type(processor).__name__}: {elapsed:.3f}s")


def test_empty_mail(processor, scripts, tmp_path):
    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"")
    result = run(processor, req(["php", scripts["sha256"]], empty))
    assert result.stdout_tail.decode().split() == [hashlib.sha256(b"").hexdigest(), "0"]


def test_processor_that_ignores_stdin(processor, scripts, tmp_path):
    path = tmp_path / "mail.eml"
    path.write_bytes(os.urandom(4 * MIB))
    result = run(processor, req(["php", scripts["no_stdin"]], path))
    assert result.transport_error is None, result.transport_error
    assert result.exit_code == 0
    assert result.stdout_tail == b"ignored stdin\n"


def test_env_is_exactly_what_was_sent(processor, scripts, mail, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWORKER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    env = {**BASE_ENV, "UTF8": "注文 ✓", "EMPTY": "", "QUOTE": "a'b\"c $x `y`"}
    result = run(processor, req(["php", scripts["env"]], mail, env=env))
    assert result.exit_code == 0, result.stderr_tail
    # Through the runner, PATH is the sidecar's own (runner.php never trusts the client's).
    expected = env if isinstance(processor, ExecProcessor) else {**env, "PATH": POOL_PATH}
    assert json.loads(result.stdout_tail) == expected


def test_cwd(processor, scripts, mail, tmp_path):
    result = run(processor, req(["php", scripts["cwd"]], mail, cwd=tmp_path))
    assert result.stdout_tail.decode() == str(tmp_path)


def test_timeout_kills_the_whole_group(processor, scripts, mail, tmp_path):
    pidfile = tmp_path / "pids"
    started = time.monotonic()
    result = run(
        processor,
        req(["php", scripts["sleeper"], str(pidfile)], mail, timeout_s=1.0, kill_grace_s=1.0),
    )
    elapsed = time.monotonic() - started
    pids = [int(p) for p in pidfile.read_text().split()]
    try:
        assert result.transport_error is None, result.transport_error
        assert result.timed_out
        assert result.signal == 15  # SIGTERM was enough
        assert result.stdout_head == b"started\n"
        assert classify(result).verdict is Verdict.RETRY
        assert classify(result).reason == "timeout"
        assert elapsed < 5
        assert wait_gone(pids) == [], "child or grandchild survived the timeout"
    finally:
        kill_quietly(pids)


def test_sigterm_ignored_means_sigkill_after_grace(processor, scripts, mail, tmp_path, php):
    pidfile = tmp_path / "pids"
    started = time.monotonic()
    result = run(
        processor,
        req(
            ["php", scripts["sleeper"], str(pidfile), "ignore-term"],
            mail,
            timeout_s=0.5,
            kill_grace_s=1.0,
        ),
    )
    elapsed = time.monotonic() - started
    pids = [int(p) for p in pidfile.read_text().split()]
    try:
        assert result.timed_out
        assert result.signal == 9
        assert 1.4 <= elapsed < 6
        assert wait_gone(pids) == []
    finally:
        kill_quietly(pids)


def test_grandchild_left_behind_is_killed(processor, scripts, mail, tmp_path):
    pidfile = tmp_path / "gc"
    started = time.monotonic()
    result = run(processor, req(["php", scripts["leaver"], str(pidfile)], mail))
    elapsed = time.monotonic() - started
    grandchild = int(pidfile.read_text())
    try:
        assert result.exit_code == 0
        assert result.stdout_tail == b"bye\n"
        assert elapsed < 5  # the pipe drain waits about a second, not 300
        assert wait_gone([grandchild]) == []
    finally:
        kill_quietly([grandchild])


def test_cancellation_kills_the_group(processor, scripts, mail, tmp_path):
    pidfile = tmp_path / "pids"

    async def scenario():
        task = asyncio.create_task(
            processor.run(
                req(["php", scripts["sleeper"], str(pidfile)], mail, timeout_s=60, kill_grace_s=1),
            ),
        )
        await wait_for_file(pidfile)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    pids = [int(p) for p in pidfile.read_text().split()]
    try:
        # fastcgi: the runner notices the closed connection at its next keep-alive write.
        assert wait_gone(pids, timeout_s=8) == [], "cancelled run left processes behind"
    finally:
        kill_quietly(pids)


def test_missing_executable_is_a_spawn_failure(processor, mail):
    result = run(processor, req(["/nonexistent/bin/tool"], mail))
    assert result.transport_error is not None
    assert "spawn failed" in result.transport_error
    assert classify(result).verdict is Verdict.RETRY


# --- FastCGI only -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["sh", "-c", "echo owned"],
        ["php", "/app/legacy/other.php"],
        ["php"],  # shorter than every prefix
        ["/nonexistent/bin/tool2"],
    ],
)
def test_commands_off_the_allow_list_are_refused(fastcgi, mail, argv):
    result = run(fastcgi, req(argv, mail))
    assert result.refused
    assert result.transport_error is None
    assert result.exit_code is None
    assert b"allow-list" in result.stderr_tail
    assert json.dumps(argv, separators=(",", ":")).encode() in result.stderr_tail
    assert classify(result).verdict is Verdict.PERMANENT
    assert classify(result).reason == "refused"


def test_a_client_cannot_send_its_own_allow_list(fpm, mail):
    class Sneaky(FastCGIProcessor):
        def params(self, request, content_length):
            return super().params(request, content_length) | {
                "MAILFLOW_RUNNER_ALLOW": '[["sh"]]',
            }

    result = run(Sneaky(fpm.address, fpm.runner_script), req(["sh", "-c", "true"], mail))
    assert result.refused


def _fake_php(directory: Path) -> Path:
    """A `php` that is not PHP: it only says it ran."""
    directory.mkdir(parents=True, exist_ok=True)
    fake = directory / "php"
    fake.write_text("#!/bin/sh\necho hijacked\n")
    fake.chmod(0o755)
    return fake


def test_the_runner_finds_programs_on_its_own_path(fastcgi, scripts, mail, tmp_path):
    fake_dir = _fake_php(tmp_path / "bin").parent
    env = {**BASE_ENV, "PATH": f"{fake_dir}:{BASE_ENV['PATH']}"}
    result = run(fastcgi, req(["php", scripts["env"]], mail, env=env))
    assert result.exit_code == 0, (result.stdout_tail, result.stderr_tail, result.transport_error)
    assert b"hijacked" not in result.stdout_tail
    assert json.loads(result.stdout_tail)["PATH"] == POOL_PATH


def test_loader_and_php_variables_sent_by_the_client_are_dropped(fastcgi, scripts, mail, tmp_path):
    ini_dir = tmp_path / "ini"
    ini_dir.mkdir()
    prepend = tmp_path / "prepend.php"
    prepend.write_text("<?php echo 'owned';\n")
    (ini_dir / "zz-evil.ini").write_text(f"auto_prepend_file={prepend}\n")
    hostile = {
        "LD_PRELOAD": "/nonexistent/evil.so",
        "LD_LIBRARY_PATH": str(tmp_path),
        "PHP_INI_SCAN_DIR": str(ini_dir),
        "PHPRC": str(ini_dir),
        "PHP_VALUE": f"auto_prepend_file={prepend}",
        "BASH_ENV": str(prepend),
        "GLIBC_TUNABLES": "glibc.malloc.check=3",
    }
    result = run(fastcgi, req(["php", scripts["env"]], mail, env={**BASE_ENV, **hostile}))
    assert result.exit_code == 0, (result.stdout_tail, result.stderr_tail, result.transport_error)
    assert not result.stdout_tail.startswith(b"owned")
    seen = json.loads(result.stdout_tail)
    assert sorted(set(hostile) & set(seen)) == []
    assert seen["SENDER"] == BASE_ENV["SENDER"]  # the rest arrives


def test_php_ini_params_for_php_fpm_are_refused(fpm, scripts, mail):
    class Sneaky(FastCGIProcessor):
        def params(self, request, content_length):
            return super().params(request, content_length) | {
                "PHP_VALUE": "memory_limit=1M",
            }

    result = run(Sneaky(fpm.address, fpm.runner_script), req(["php", scripts["env"]], mail))
    assert result.transport_error is not None
    assert "PHP_VALUE" in result.transport_error
    assert result.exit_code is None


def test_allow_list_matches_the_absolute_program(fastcgi, scripts, mail, tmp_path):
    import shutil  # noqa: PLC0415

    php_on_pool_path = shutil.which("php", path=POOL_PATH)
    assert php_on_pool_path is not None
    # The absolute path of the allow-listed bare name is the same program: allowed.
    result = run(fastcgi, req([php_on_pool_path, scripts["exit"], "0", "ok"], mail))
    assert (result.exit_code, result.stdout_tail) == (0, b"ok")
    # Another file called php is another program: refused, even when the cwd holds it.
    fake = _fake_php(tmp_path / "elsewhere")
    for argv0 in (str(fake), "./php"):
        result = run(fastcgi, req([argv0, scripts["exit"], "0"], mail, cwd=fake.parent))
        assert result.refused, (argv0, result)


def test_connection_refused_is_a_transport_error(mail):
    result = run(FastCGIProcessor(f"127.0.0.1:{free_port()}", RUNNER_SCRIPT), req(["php"], mail))
    assert result.transport_error is not None
    assert "connect to 127.0.0.1" in result.transport_error
    assert "refused" in result.transport_error.lower()
    assert classify(result).verdict is Verdict.RETRY


def test_missing_unix_socket_is_a_transport_error(mail, tmp_path):
    result = run(FastCGIProcessor(str(tmp_path / "nope.sock"), RUNNER_SCRIPT), req(["php"], mail))
    assert result.transport_error is not None
    assert classify(result).verdict is Verdict.RETRY


def test_missing_spool_file_is_a_transport_error(fastcgi, tmp_path):
    result = run(fastcgi, req(["php"], tmp_path / "gone.eml"))
    assert result.transport_error is not None
    assert "spool file" in result.transport_error


def test_wrong_runner_path_is_a_transport_error(fpm, mail):
    result = run(FastCGIProcessor(fpm.address, "/nonexistent/runner.php"), req(["php"], mail))
    assert result.transport_error is not None
    assert "HTTP 404" in result.transport_error
    assert classify(result).verdict is Verdict.RETRY


def test_a_non_runner_script_is_a_malformed_answer(fpm, scripts, mail):
    result = run(FastCGIProcessor(fpm.address, scripts["garbage"]), req(["php"], mail))
    assert result.transport_error is not None
    assert "malformed runner answer" in result.transport_error


def test_a_bad_request_is_a_transport_error(fpm, scripts, mail):
    class Broken(FastCGIProcessor):
        def params(self, request, content_length):
            return super().params(request, content_length) | {"MAILFLOW_ARGV": "{not json"}

    result = run(Broken(fpm.address, fpm.runner_script), req(["php", scripts["exit"], "0"], mail))
    assert result.transport_error is not None
    assert "HTTP 400" in result.transport_error
    assert "MAILFLOW_ARGV is not JSON" in result.transport_error


def test_a_param_too_large_for_php_fpm_is_refused(fastcgi, scripts, mail):
    env = {**BASE_ENV, "HUGE": "x" * 70_000}
    result = run(fastcgi, req(["php", scripts["env"]], mail, env=env))
    assert result.refused
    assert b"not encodable" in result.stderr_tail


def test_ping_page(fpm):
    assert fastcgi_get(fpm.address, "/ping") == (200, b"pong")


def test_healthcheck_script(fpm, php):
    import subprocess  # noqa: PLC0415 - only this test runs a command

    ok = subprocess.run(
        [php, str(Path(RUNNER_SCRIPT).parent / "healthcheck"), fpm.address],
        capture_output=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(
        [php, str(Path(RUNNER_SCRIPT).parent / "healthcheck"), f"127.0.0.1:{free_port()}"],
        capture_output=True,
        check=False,
    )
    assert down.returncode == 1
    assert b"connect" in down.stderr


def test_address_parsing():
    assert str(FastCGIAddress.parse("127.0.0.1:9000")) == "127.0.0.1:9000"
    assert FastCGIAddress.parse("[::1]:9000").host == "::1"
    assert FastCGIAddress.parse("/run/php.sock").path == "/run/php.sock"
    for bad in ("localhost", "host:", ":9000", "host:99999", "relative.sock"):
        with pytest.raises(ValueError, match="FastCGI address"):
            FastCGIAddress.parse(bad)
    with pytest.raises(ValueError, match="absolute"):
        FastCGIProcessor("127.0.0.1:9000", "runner.php")


@pytest.fixture(scope="module")
def fpm_unix_short_terminate(tmp_path_factory, allow, php):
    """A second pool: unix socket, and php-fpm kills requests after 2 s."""
    directory = tmp_path_factory.mktemp("fpm-unix")
    with running_php_fpm(
        directory,
        allow,
        unix_socket=True,
        max_children=2,
        extra_env={"MAILFLOW_FPM_REQUEST_TERMINATE_TIMEOUT": "2"},
    ) as running:
        yield running


def test_unix_socket(fpm_unix_short_terminate, scripts, mail):
    fpm = fpm_unix_short_terminate
    result = run(
        FastCGIProcessor(fpm.address, fpm.runner_script),
        req(["php", scripts["exit"], "0", "ok"], mail),
    )
    assert (result.exit_code, result.stdout_tail) == (0, b"ok")


def test_php_fpm_killing_the_runner_is_a_transport_error(
    fpm_unix_short_terminate, scripts, mail, tmp_path
):
    """request_terminate_timeout is a last resort: the worker sees a broken request (retry),
    and the legacy process, in its own session, outlives the runner (documented)."""
    fpm = fpm_unix_short_terminate
    pidfile = tmp_path / "pids"
    result = run(
        FastCGIProcessor(fpm.address, fpm.runner_script),
        req(["php", scripts["sleeper"], str(pidfile)], mail, timeout_s=30),
    )
    pids = [int(p) for p in pidfile.read_text().split()]
    try:
        assert result.transport_error is not None
        assert classify(result).verdict is Verdict.RETRY
        assert result.duration_s < 10
    finally:
        kill_quietly(pids)


@pytest.fixture(scope="module")
def fpm_without_allow_list(tmp_path_factory, php):
    with running_php_fpm(tmp_path_factory.mktemp("fpm-empty"), None) as running:
        yield running


def test_no_allow_list_refuses_everything(fpm_without_allow_list, scripts, mail):
    fpm = fpm_without_allow_list
    result = run(
        FastCGIProcessor(fpm.address, fpm.runner_script), req(["php", scripts["exit"], "0"], mail)
    )
    assert result.refused
    assert b"allow-list is empty" in result.stderr_tail


# --- broken peers (not php-fpm) -----------------------------------------------------------------


async def _with_server(handler, body):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await body(f"127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "protocol error"),
        (b"", "closed the connection before END_REQUEST"),
        (b"\x01\x06\x00\x01\x00\x10\x00", "inside a record"),  # cut inside a header
    ],
)
def test_broken_peer_is_a_transport_error(mail, reply, expected):
    async def handler(reader, writer):
        await reader.read(100)
        writer.write(reply)
        await writer.drain()
        writer.close()

    async def body(address):
        return await FastCGIProcessor(address, RUNNER_SCRIPT).run(req(["php"], mail))

    result = asyncio.run(_with_server(handler, body))
    assert result.transport_error is not None
    assert expected in result.transport_error
    assert classify(result).verdict is Verdict.RETRY


def test_silent_peer_hits_the_worker_side_budget(mail):
    async def handler(reader, writer):
        while await reader.read(65536):
            pass
        writer.close()

    async def body(address):
        processor = FastCGIProcessor(address, RUNNER_SCRIPT, response_margin_s=0.3)
        return await processor.run(req(["php"], mail, timeout_s=0.2, kill_grace_s=0.0))

    started = time.monotonic()
    result = asyncio.run(_with_server(handler, body))
    assert result.transport_error is not None
    assert "no answer from the runner within 0.5s" in result.transport_error
    assert time.monotonic() - started < 3


def test_a_broken_allow_list_is_a_transport_error(tmp_path, scripts, mail):
    """A typo in the sidecar's config must not fail every order permanently: retry instead."""
    bad = {"MAILFLOW_RUNNER_ALLOW": '["php"]'}  # a list of strings, not of argv prefixes
    with running_php_fpm(tmp_path / "fpm", None, extra_env=bad) as fpm:
        result = run(
            FastCGIProcessor(fpm.address, fpm.runner_script),
            req(["php", scripts["exit"], "0"], mail),
        )
    assert result.transport_error is not None
    assert "HTTP 500" in result.transport_error
    assert "MAILFLOW_RUNNER_ALLOW" in result.transport_error
    assert classify(result).verdict is Verdict.RETRY
