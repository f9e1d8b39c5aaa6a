"""Exponential back-off with full jitter: every reconnect and retry loop in Flowline uses this one.

Full jitter (a uniform delay up to the current ceiling) keeps a fleet of collectors and senders that
lost the same peer from reconnecting in lock-step when it comes back.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays between ``low`` and ``high`` seconds; the ceiling doubles per attempt until `reset`."""

    def __init__(self, low: float, high: float) -> None:
        if not 0 < low <= high:
            raise ValueError(f"back-off needs 0 < low <= high, got {low} and {high}")
        self.low, self.high, self.attempt = low, high, 0

    def next_delay(self) -> float:
        ceiling = min(self.high, self.low * 2 ** min(self.attempt, 30))  # capped: long outages overflow
        self.attempt += 1
        return random.uniform(self.low / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
