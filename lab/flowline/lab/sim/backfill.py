"""Backfill: N days of the plant's history, with past timestamps, through the pipeline.

The points go into an OT spool folder (``SpoolWriter.append_points``), which the OT sender forwards
like any other spool, so analytics get weeks of history within minutes and every point crosses the
same DMZ checks as live data. Points are ``telemetry`` points tagged ``origin=backfill``.

The spool folder must not be open by another writer (one writer per folder): give the backfill its
own folder and list it among the OT sender's spools (``relay_ot.spools``, e.g. ``backfill``).

Usage::

    result = backfill(Plant(site, seed=7, epoch_ns=now), Path("data/spool/backfill"), days=14, step_s=60)
    result.points        # days * 86400 / step_s * number of tags
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowline.core.errors import FlowlineError
from flowline.core.points import Point, TagRef, telemetry_point
from flowline.core.spool import SpoolFullError, SpoolWriter
from flowline.lab.sim.plant import NS_PER_S, Plant

ORIGIN = {"origin": "backfill"}
Progress = Callable[[int, int], None]  # (points written so far, total points)


class BackfillError(FlowlineError):
    """The backfill could not be written (spool full for too long, bad arguments)."""


@dataclass(frozen=True)
class BackfillResult:
    points: int
    records: int
    start_ns: int  # first timestamp written
    end_ns: int  # last timestamp written
    step_ns: int


def backfill_times(end_ns: int, days: float, step_s: float) -> np.ndarray:
    """Timestamps on the step grid, from ``end - days`` up to and including the last step before ``end``."""
    if days <= 0 or step_s <= 0:
        raise BackfillError(f"days ({days}) and step ({step_s} s) must be positive")
    step_ns = int(step_s * NS_PER_S)
    last = end_ns - end_ns % step_ns
    count = int(days * 86_400 * NS_PER_S // step_ns)
    return np.arange(last - (count - 1) * step_ns, last + 1, step_ns, dtype=np.int64)


def backfill(
    plant: Plant,
    spool: Path | SpoolWriter,
    days: float = 14.0,
    step_s: float = 60.0,
    end_ns: int | None = None,
    batch_points: int = 5000,
    progress: Progress | None = None,
    full_timeout_s: float = 300.0,
) -> BackfillResult:
    """Write every tag of ``plant.site`` for ``days`` before ``end_ns`` (default now) into ``spool``."""
    times = backfill_times(time.time_ns() if end_ns is None else end_ns, days, step_s)
    site = plant.site
    pairs = site.iter_tags()
    refs = [TagRef(site.site, asset.id, tag.name, tag.unit, extra=dict(ORIGIN)) for asset, tag in pairs]
    total = len(times) * len(pairs)
    steps_per_batch = max(1, batch_points // max(1, len(pairs)))
    writer = spool if isinstance(spool, SpoolWriter) else SpoolWriter(spool)
    written = records = 0
    try:
        for first in range(0, len(times), steps_per_batch):
            chunk = times[first : first + steps_per_batch]
            columns = [plant.series(asset.id, tag.name, chunk).tolist() for asset, tag in pairs]
            stamps = chunk.tolist()
            points = [
                telemetry_point(ref, values[i], ts)
                for i, ts in enumerate(stamps)
                for ref, values in zip(refs, columns, strict=True)
            ]
            _append(writer, points, full_timeout_s)
            written += len(points)
            records += 1
            if progress is not None:
                progress(written, total)
    finally:
        if writer is not spool:
            writer.close()
    return BackfillResult(written, records, int(times[0]), int(times[-1]), int(step_s * NS_PER_S))


def _append(writer: SpoolWriter, points: list[Point], timeout_s: float) -> None:
    """Append, waiting while the spool is full: the OT sender drains it (back-pressure, not loss)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            writer.append_points(points)
            return
        except SpoolFullError as exc:
            if time.monotonic() > deadline:
                raise BackfillError(
                    f"spool {writer.folder} stayed full for {timeout_s:g} s; is the OT sender running?"
                ) from exc
            time.sleep(0.5)
