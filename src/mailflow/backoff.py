"""Retry policy for deliveries: `(attempt) -> seconds`. Pure; the random source is injected.

Exponential with a cap, then "equal jitter": half the delay is fixed, half is random. Full
jitter would sometimes retry a failing legacy script almost at once; none would make every
delivery that failed together retry together (a store's outage ends, fifty orders retry in
the same second).
"""

from __future__ import annotations

import random
from collections.abc import Callable


def retry_delay_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before attempt `attempt + 1`, given that attempt `attempt` (1-based) failed."""
    exponent = min(max(attempt - 1, 0), 32)  # 2**32 * base is past any sane cap already
    ceiling = min(max_s, base_s * (2**exponent))
    return float(ceiling / 2 + rand() * ceiling / 2)
