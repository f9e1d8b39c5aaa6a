"""Incremental rollups of ``telemetry`` to 1 minute and 1 hour, by our own job (no continuous queries).

Each tier reads the raw measurement with server-side InfluxQL aggregation (``GROUP BY time(step), *``)
and writes ``telemetry_1m`` / ``telemetry_1h`` (same tags; fields ``mean``, ``min``, ``max``,
``count``, ``last_quality``) with line protocol, so it works the same on InfluxDB 1.x, 2.x and 3.x.
``mean``/``min``/``max``/``count`` cover good-quality samples only (quality 0), so a bad reading
never skews a long-range chart; ``last_quality`` is the quality of the last sample of the window
whatever it was, so a window with only bad samples is still visible (``count=0``).
Both tiers are computed from raw data, so the hourly figures are exact, not means of means.

A JSON checkpoint keeps, per tier, the end of the last completed window. Only windows that ended
``lag`` ago are rolled up (late data within the lag is included). Re-running a window writes
identical points (same series and timestamp), so a crash between writing and checkpointing is
harmless. Retention per tier: the ``rollup_1m``/``rollup_1h`` retention policies on 1.x (created by
`flowline.historian.setup`); on 2.x the DBRP-mapped buckets of the same names; on 3.x a database per
tier with its retention period.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from flowline.core.config import HistorianConfig
from flowline.core.files import atomic_write_json
from flowline.core.points import TELEMETRY, FieldValue, Point
from flowline.historian.connection import Connection
from flowline.historian.query import HistorianReader, measurement_ref
from flowline.historian.tiers import NS, TIERS, RollupTier
from flowline.historian.writer import HistorianWriter


@dataclass(frozen=True)
class TierRun:
    tier: str
    windows: int  # windows advanced (with or without data)
    points: int  # rollup points written
    checkpoint_ns: int | None


class Checkpoint:
    """``{tier name: end of the last completed window (ns)}``, replaced atomically on every save."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return {str(k): int(v) for k, v in data.items()}

    def save(self, state: dict[str, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, state)


class RollupJob:
    def __init__(
        self,
        conn: Connection,
        checkpoint: Checkpoint,
        *,
        source_policy: str | None = None,
        lag_s: float = 120.0,
        tiers: tuple[RollupTier, ...] = TIERS,
    ) -> None:
        self.reader = HistorianReader(conn)
        self.writers = {t.name: HistorianWriter(replace(conn, retention_policy=t.policy)) for t in tiers}
        self.database = conn.database
        self.source_policy = source_policy
        self.checkpoint = checkpoint
        self.lag_ns = int(lag_s * NS)
        self.tiers = tiers

    @classmethod
    def from_config(
        cls, config: HistorianConfig, checkpoint_path: str | Path, tiers: tuple[RollupTier, ...] = TIERS
    ) -> RollupJob:
        return cls(
            Connection.from_config(config),
            Checkpoint(checkpoint_path),
            source_policy=config.retention_policy,
            lag_s=config.rollup_lag_s,
            tiers=tiers,
        )

    def close(self) -> None:
        self.reader.close()
        for writer in self.writers.values():
            writer.close()

    def run_once(self, now_ns: int) -> list[TierRun]:
        """Roll up every complete window since the checkpoint (first run: since the oldest data)."""
        state = self.checkpoint.load()
        runs = []
        for tier in self.tiers:
            end = (now_ns - self.lag_ns) // tier.step_ns * tier.step_ns
            start = state.get(tier.name)
            if start is None:
                oldest = self._oldest_raw_ns()
                if oldest is None:
                    runs.append(TierRun(tier.name, 0, 0, None))
                    continue
                start = oldest // tier.step_ns * tier.step_ns
            windows = points = 0
            while start < end:
                chunk_end = min(end, start + tier.step_ns * tier.windows_per_query)
                rollup = self._compute(tier, start, chunk_end)
                points += self.writers[tier.name].write(rollup).written
                windows += (chunk_end - start) // tier.step_ns
                start = state[tier.name] = chunk_end
                self.checkpoint.save(state)
            runs.append(TierRun(tier.name, windows, points, state.get(tier.name)))
        return runs

    def _source(self) -> str:
        return measurement_ref(self.database, self.source_policy, TELEMETRY)

    def _oldest_raw_ns(self) -> int | None:
        series = self.reader.query(f'SELECT first("quality") FROM {self._source()}')
        return int(series[0].values[0][0]) if series and series[0].values else None

    def _compute(self, tier: RollupTier, start: int, end: int) -> list[Point]:
        window = f"WHERE time >= {start} AND time < {end}"
        group = f"GROUP BY time({tier.step_s}s), * fill(none)"
        stats = self.reader.query(
            'SELECT mean("value") AS "mean", min("value") AS "min", max("value") AS "max", '
            f'count("value") AS "count" FROM {self._source()} {window} AND "quality" = 0 {group}'
        )
        last = self.reader.query(f'SELECT last("quality") AS "last_quality" FROM {self._source()} {window} {group}')
        rows: dict[tuple[tuple[tuple[str, str], ...], int], dict[str, FieldValue]] = {}
        for series in last:
            tags = tuple(sorted((k, v) for k, v in series.tags.items() if v))
            for ts, quality in series.values:
                rows[(tags, int(ts))] = {"count": 0, "last_quality": int(quality)}
        for series in stats:
            tags = tuple(sorted((k, v) for k, v in series.tags.items() if v))
            for ts, mean, low, high, count in series.values:
                # JSON turns 2.0 into 2: force floats, or InfluxDB would see an integer field.
                fields = rows.setdefault((tags, int(ts)), {})
                fields.update(mean=float(mean), min=float(low), max=float(high), count=int(count))
        return [Point(tier.measurement, dict(tags), fields, ts) for (tags, ts), fields in rows.items()]
