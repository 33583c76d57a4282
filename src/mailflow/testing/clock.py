"""A clock a test moves by hand: time stands still until `advance`."""

from __future__ import annotations

from collections.abc import Callable


class ManualClock:
    """Callable like `time.time`; `advance(s)` moves it and wakes whoever waits on time
    (a fake queue's long poll, a message whose visibility timeout ran out)."""

    def __init__(self, start_s: float = 1_800_000_000.0) -> None:
        self.now_s = start_s
        self._listeners: list[Callable[[], None]] = []

    def __call__(self) -> float:
        """The current time, in epoch seconds."""
        return self.now_s

    def advance(self, seconds: float) -> None:
        """Move time forward and tell the listeners."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now_s += seconds
        for listener in list(self._listeners):
            listener()

    def on_advance(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every `advance`."""
        self._listeners.append(listener)
