"""A processor in-process, for logic tests: behaves as the route's argv says, records each run.

The route `behave {mode} {store}` (see `behave_route`) plays the modes of the php test
processor (tests/processors/behave.php) without starting a process: `ok`, `exit1`, `exit75`,
`flaky` (75 on the first attempt, then 0), `print4` / `print5` (an enhanced status code on
stdout), `slow` (runs `slow_s`), `hang` (runs into the timeout). What the transports
themselves do (process groups, signals, FastCGI) is the end-to-end tests' business.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mailflow.config import Route
from mailflow.outcome import ProcessResult
from mailflow.processors.exec import ProcessRequest


def behave_route(name: str = "behave", max_in_flight_per_key: int | None = None) -> Route:
    """`<mode>-<store>@orders.example.com` runs mode MODE for store STORE (the key)."""
    return Route(
        name=name,
        match=r"(?P<mode>[a-z0-9]+)-(?P<store>[0-9]{3})@orders\.example\.com",
        command="behave {mode} {store}",
        key="store",
        max_in_flight_per_key=max_in_flight_per_key,
    )


@dataclass(frozen=True, slots=True)
class Run:
    """One run as the processor saw it."""

    delivery_id: str
    attempt: int
    mode: str
    store: str
    stdin: bytes
    env: dict[str, str]


@dataclass
class ScriptedProcessor:
    """`mailflow.processors.exec.Processor`, in memory. `runs` lists every run started;
    `running` counts the runs in progress (and `peak` the most at once); `overlaps` counts
    runs that started while another run of the same store was in progress."""

    slow_s: float = 0.2
    runs: list[Run] = field(default_factory=list)
    running: int = 0
    peak: int = 0
    overlaps: int = 0
    closed: bool = False
    _busy_stores: dict[str, int] = field(default_factory=dict)

    async def run(self, request: ProcessRequest) -> ProcessResult:
        """Play the mode named by argv[1]."""
        argv = request.argv
        mode = argv[1] if len(argv) > 1 else "ok"
        store = argv[2] if len(argv) > 2 else "000"
        attempt = int(request.env.get("MAILFLOW_ATTEMPT", "0"))
        self.runs.append(
            Run(
                delivery_id=request.env.get("MAILFLOW_DELIVERY_ID", ""),
                attempt=attempt,
                mode=mode,
                store=store,
                stdin=request.stdin_path.read_bytes(),
                env=dict(request.env),
            ),
        )
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self._busy_stores.get(store, 0):
            self.overlaps += 1
        self._busy_stores[store] = self._busy_stores.get(store, 0) + 1
        try:
            return await self._play(mode, attempt, request.timeout_s)
        finally:
            self.running -= 1
            self._busy_stores[store] -= 1

    async def _play(self, mode: str, attempt: int, timeout_s: float) -> ProcessResult:
        if mode == "slow":
            await asyncio.sleep(self.slow_s)
        if mode == "hang":
            await asyncio.sleep(timeout_s)
            return ProcessResult(timed_out=True, signal=9, duration_s=timeout_s)
        results = {
            "ok": ProcessResult(exit_code=0),
            "slow": ProcessResult(exit_code=0),
            "exit1": ProcessResult(exit_code=1, stderr_tail=b"broken order\n"),
            "exit75": ProcessResult(exit_code=75, stderr_tail=b"temporarily unavailable\n"),
            "flaky": ProcessResult(exit_code=75 if attempt <= 1 else 0),
            "print4": ProcessResult(
                exit_code=1,
                stdout_head=b"4.3.0 stock database busy\n",
                stdout_tail=b"4.3.0 stock database busy\n",
            ),
            "print5": ProcessResult(
                exit_code=75,
                stdout_head=b"5.1.1 unknown store\n",
                stdout_tail=b"5.1.1 unknown store\n",
            ),
        }
        return results.get(mode, ProcessResult(exit_code=2, stderr_tail=b"unknown mode\n"))

    async def close(self) -> None:
        """Nothing to release."""
        self.closed = True
