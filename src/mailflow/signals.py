"""SIGTERM and SIGINT as a callback on the running event loop, for as long as a block runs.

ECS stops a task with SIGTERM (then SIGKILL after `stopTimeout`); a terminal sends SIGINT.
The handlers are removed on the way out, so a long-running piece (the worker, the reconcile
loop, the SMTP emulator) leaves the process's signal disposition as it found it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals(callback: Callable[[], None]) -> Iterator[bool]:
    """Call `callback` on SIGTERM/SIGINT while the block runs. Yields False (and installs
    nothing) off the main thread, where Python cannot receive signals."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback)
    try:
        yield True
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
