"""Running one command's coroutine: a fresh event loop, Ctrl-C as a named exit code."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from mailflow.exitcodes import EXIT_INTERRUPTED


def run_async(coro_fn: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command's main coroutine; its result is the exit code."""
    try:
        return asyncio.run(coro_fn())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
