"""The historian's storage tiers: raw data and its 1-minute and 1-hour rollups, each with a retention.

Shared by set-up (which creates the retention policies), the rollup job (which fills them) and the
readers (which pick one by time range), so none of them imports another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flowline.core.config import HistorianConfig

RAW_POLICY = "raw"
ROLLUP_1M_POLICY = "rollup_1m"
ROLLUP_1H_POLICY = "rollup_1h"

_DURATION_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+)(w|d|h|m|s)")


def duration_seconds(text: str) -> int | None:
    """Seconds in an InfluxQL duration such as ``90d`` or ``1h30m``; ``None`` for ``INF``."""
    if text.upper() == "INF":
        return None
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a retention duration (e.g. 90d, 52w, 12h or INF)")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in parts)


@dataclass(frozen=True)
class Tier:
    policy: str
    duration: str  # InfluxQL duration or INF
    default: bool = False


def tiers(config: HistorianConfig) -> list[Tier]:
    for text in (config.raw_retention, config.rollup_1m_retention, config.rollup_1h_retention):
        duration_seconds(text)  # validate early, with a clear message
    return [
        Tier(RAW_POLICY, config.raw_retention, default=True),
        Tier(ROLLUP_1M_POLICY, config.rollup_1m_retention),
        Tier(ROLLUP_1H_POLICY, config.rollup_1h_retention),
    ]


NS = 1_000_000_000


@dataclass(frozen=True)
class RollupTier:
    name: str
    step_s: int
    measurement: str
    policy: str | None  # retention policy the tier is written to (None: the database default)
    windows_per_query: int  # bounds the size of each read

    @property
    def step_ns(self) -> int:
        return self.step_s * NS


# One query covers an hour of 1-minute windows or a day of hourly ones for every series at once:
# small enough to hold in memory with thousands of tags, large enough to backfill quickly.
TIERS = (
    RollupTier("1m", 60, "telemetry_1m", ROLLUP_1M_POLICY, 60),
    RollupTier("1h", 3600, "telemetry_1h", ROLLUP_1H_POLICY, 24),
)
TIERS_BY_NAME = {tier.name: tier for tier in TIERS}
