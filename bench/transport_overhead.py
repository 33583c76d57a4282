"""Per-request cost of the two processor transports, php-cli spawned by the worker (exec)
against php-fpm's runner spawning it (fastcgi): docs/fastcgi.md's "Overhead" table.

    python bench/transport_overhead.py [--n 200]

Prints, for N sequential requests each, the median and p90 of: `php -r 'exit(0);'` by exec
and by fastcgi, a command the runner refuses (transport + runner, no spawn), `/bin/true` by
exec (the spawn alone); then N runs of `php -r 'exit(0);'` 8 at a time on each transport.
Needs php and php-fpm. Timings, so it is a benchmark, not a test: the suite checks that both
transports behave the same (tests/e2e/test_fastcgi_sidecar.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from load import RUNNER_SCRIPT, start_fpm, stop_fpm
from mailflow.outcome import ProcessResult
from mailflow.processors.exec import ExecProcessor, ProcessRequest
from mailflow.processors.fastcgi import FastCGIProcessor

EXIT0 = ("php", "-r", "exit(0);")
MAIL = b"From: a@example.com\r\nSubject: order\r\n\r\nbody\r\n"


def _request(argv: tuple[str, ...], mail: Path) -> ProcessRequest:
    return ProcessRequest(
        argv=argv,
        stdin_path=mail,
        timeout_s=30.0,
        kill_grace_s=1.0,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
    )


async def _sequential(
    processor: ExecProcessor | FastCGIProcessor,
    argv: tuple[str, ...],
    mail: Path,
    n: int,
    check: Callable[[ProcessResult], bool],
) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        result = await processor.run(_request(argv, mail))
        samples.append(time.perf_counter() - started)
        if not check(result):
            raise SystemExit(f"unexpected result: {result}")
    return samples


async def _concurrent(
    processor: ExecProcessor | FastCGIProcessor, mail: Path, n: int, width: int
) -> float:
    gate = asyncio.Semaphore(width)  # as the worker: at most MAILFLOW_CONCURRENCY in flight

    async def one() -> ProcessResult:
        async with gate:
            return await processor.run(_request(EXIT0, mail))

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)))
    failed = [r for r in results if r.exit_code != 0]
    if failed:
        raise SystemExit(f"{len(failed)} of {n} failed, first: {failed[0]}")
    return time.perf_counter() - started


async def _measure(address: str, mail: Path, n: int, width: int) -> None:
    fastcgi = FastCGIProcessor(address, str(RUNNER_SCRIPT))
    ok: Callable[[ProcessResult], bool] = lambda r: r.exit_code == 0  # noqa: E731
    sequential = {
        "exec  php -r 'exit(0);'": await _sequential(ExecProcessor(), EXIT0, mail, n, ok),
        "fcgi  php -r 'exit(0);'": await _sequential(fastcgi, EXIT0, mail, n, ok),
        "fcgi  refused (transport + runner only)": await _sequential(
            fastcgi, ("sh", "-c", "true"), mail, n, lambda r: r.refused
        ),
        "exec  /bin/true": await _sequential(ExecProcessor(), ("/bin/true",), mail, n, ok),
    }
    print(f"per-request latency over {n} sequential requests (ms), python {sys.version.split()[0]}")
    for name, samples in sequential.items():
        ms = sorted(s * 1000 for s in samples)
        print(f"  {name:42s} median {statistics.median(ms):7.2f}  p90 {ms[int(0.9 * n)]:7.2f}")
    for name, processor in (("exec", ExecProcessor()), ("fcgi", fastcgi)):
        total = await _concurrent(processor, mail, n, width)
        label = f"{name}  x{n}, {width} at a time"
        print(f"  {label:42s} total {total * 1000:8.1f} ms  ({n / total:6.1f}/s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="requests per row (default 200)")
    parser.add_argument("--width", type=int, default=8, help="in flight at once (default 8)")
    args = parser.parse_args()
    php = shutil.which("php")
    if php is None:
        print("needs php", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mailflow-overhead-") as tmp:
        mail = Path(tmp) / "mail.eml"
        mail.write_bytes(MAIL)
        fpm = start_fpm(Path(tmp), args.width, allow=[["php", "-r"], [php, "-r"]])
        if fpm is None:
            print("needs php-fpm and sidecar/run-local", file=sys.stderr)
            return 2
        try:
            asyncio.run(_measure(fpm[1], mail, args.n, args.width))
        finally:
            stop_fpm(fpm[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
