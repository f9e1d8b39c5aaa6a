"""The assessment job: read history from InfluxDB, assess every forecast tag, write the results back.

One pass (`run_pass`):

1. For every tag the site marks for forecasting (`Site.forecast_tags`), read ``analytics.history``
   of good-quality values, aggregated by the server to ``analytics.step`` (InfluxQL).
2. Assess them (`assess.assess_series`) in a local process pool, or on a Dask cluster.
3. Write ``asset_health`` and ``forecast`` points, an ``events`` point where the flag differs from
   the last flag stored before this pass, ``inventory`` points, and the pass's own metrics
   (docs/measurements.md).

The assessment time is "now" floored to the step and every value derives from data before it, so
running the same pass twice writes identical points (idempotent). A series that cannot be read or
fitted is reported with its reason, counted in ``flowline_analytics_series_total{result}``, and the
pass goes on.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import pandas as pd
from threadpoolctl import threadpool_limits

from flowline.analytics.assess import Assessment, SeriesSpec, assess_series
from flowline.analytics.rules import AssessmentRules, Flag, rules_for
from flowline.core.config import AnalyticsConfig, CollectorsConfig, HistorianConfig, OpcUaCollectorConfig
from flowline.core.metrics import Metrics
from flowline.core.points import Point
from flowline.historian.errors import HistorianError
from flowline.historian.query import HistorianReader, quote_literal
from flowline.historian.writer import HistorianWriter
from flowline.inventory import Site
from flowline.inventory.rates import expected_per_hour, opcua_default_interval_ms

log = logging.getLogger(__name__)

Item = tuple[SeriesSpec, pd.Series]
Progress = Callable[[int], None]


def series_specs(site: Site) -> list[SeriesSpec]:
    """One spec per forecast tag, with its alarm limits and the asset's consequence weight."""
    specs = []
    for asset, tag in site.forecast_tags():
        alarm = tag.alarm
        specs.append(
            SeriesSpec(
                site=site.site,
                asset=asset.id,
                tag=tag.name,
                high=alarm.high if alarm else None,
                low=alarm.low if alarm else None,
                consequence_weight=asset.consequence.weight(),
                criticality=asset.criticality.value,
                unit=tag.unit,
            )
        )
    return specs


def _assess_chunk(chunk: Sequence[Item], rules: AssessmentRules, end: pd.Timestamp | None) -> list[Assessment]:
    # Multi-threaded BLAS on these tiny matrices only fights the other workers for the cores
    # (measured: 4-6x slower per fit on a loaded 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        return [assess_series(raw, spec, rules, end) for spec, raw in chunk]


def _chunks(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def assess_many(
    items: Sequence[Item],
    rules: AssessmentRules,
    end: pd.Timestamp | None = None,
    *,
    workers: int | None = None,
    dask_scheduler: str | None = None,
    progress: Progress | None = None,
) -> list[Assessment]:
    """Assess many series, in input order: in-process (``workers=1``), in a process pool (default:
    one worker per core), or on the Dask cluster at ``dask_scheduler``."""
    workers = workers or os.cpu_count() or 1
    if dask_scheduler is not None:
        return _assess_dask(items, rules, end, dask_scheduler, progress)
    if workers <= 1 or len(items) < 2:
        out = []
        for spec, raw in items:
            out.extend(_assess_chunk([(spec, raw)], rules, end))
            if progress:
                progress(1)
        return out
    # Several chunks per worker so a chunk of slow (fitted) series does not leave a core idle.
    size = max(1, math.ceil(len(items) / (workers * 8)))
    results: list[Assessment] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for chunk, done in zip(
            _chunks(items, size),
            pool.map(_assess_chunk, _chunks(items, size), [rules] * len(items), [end] * len(items)),
            strict=False,
        ):
            results.extend(done)
            if progress:
                progress(len(chunk))
    return results


def _assess_dask(
    items: Sequence[Item], rules: AssessmentRules, end: pd.Timestamp | None, address: str, progress: Progress | None
) -> list[Assessment]:
    from distributed import Client

    with Client(address) as client:  # type: ignore[no-untyped-call]
        chunks = _chunks(items, max(1, math.ceil(len(items) / 64)))
        futures = client.map(_assess_chunk, chunks, rules=rules, end=end, pure=False)
        results: list[Assessment] = []
        for chunk, future in zip(chunks, futures, strict=True):
            results.extend(future.result())
            if progress:
                progress(len(chunk))
        return results


# --- points ---------------------------------------------------------------------------------------


def health_point(a: Assessment) -> Point:
    s = a.spec
    fields: dict[str, float | int | bool | str] = {
        "health_score": float(a.health_score),
        "flag_level": int(a.flag),
        "flag": a.flag.name,
        "p_cross": float(a.p_cross),
        "trend_per_day": float(a.trend_per_day),
        "trend_significant": bool(a.trend_significant),
        "anomaly_score": float(a.anomaly_score),
        "surprise": float(a.surprise),
        "risk": float(a.risk),
        "model": a.model,
    }
    if a.hours_to_alarm is not None:
        fields["hours_to_alarm"] = float(a.hours_to_alarm)
    if a.alarm_limit is not None:
        fields["alarm_limit"] = float(a.alarm_limit)
    # The engineering unit of alarm_limit and trend_per_day, so a dashboard row carries its own unit.
    fields["unit"] = s.unit or ""
    return Point(
        "asset_health",
        {"site": s.site, "asset": s.asset, "tag": s.tag, "criticality": s.criticality},
        fields,
        int(a.assessed_at.value),
    )


def forecast_points(a: Assessment) -> list[Point]:
    if a.forecast is None:
        return []
    tags = {"site": a.spec.site, "asset": a.spec.asset, "tag": a.spec.tag}
    stamps = pd.DatetimeIndex(a.forecast.index).as_unit("ns").asi8
    return [
        Point("forecast", tags, {"yhat": float(y), "lower": float(lo), "upper": float(hi)}, int(ts))
        for ts, y, lo, hi in zip(
            stamps, a.forecast["yhat"], a.forecast["lower"], a.forecast["upper"], strict=True
        )
    ]


def event_point(a: Assessment, previous: Flag) -> Point | None:
    """A ``flag_raised``/``flag_cleared`` event when the flag differs from the previous one."""
    if a.flag == previous:
        return None
    kind = "flag_raised" if a.flag > previous else "flag_cleared"
    s = a.spec
    when = f" (alarm limit {a.alarm_limit:g} in {a.hours_to_alarm:.0f} h)" if (
        a.alarm_limit is not None and a.hours_to_alarm is not None
    ) else ""
    return Point(
        "events",
        {"site": s.site, "asset": s.asset, "tag": s.tag, "kind": kind},
        {
            "title": f"{s.asset} {s.tag}: {previous.name} -> {a.flag.name}",
            "text": (
                f"health {a.health_score:.0f}, p_cross {a.p_cross:.2f}, trend {a.trend_per_day:+.3g}/day"
                f"{when}, model {a.model}"
            ),
            "flag": a.flag.name,
            "previous_flag": previous.name,
        },
        int(a.assessed_at.value),
    )


def inventory_points(site: Site, timestamp_ns: int, opcua: OpcUaCollectorConfig | None = None) -> list[Point]:
    forecast = set((a.id, t.name) for a, t in site.forecast_tags())
    opcua_interval_ms = opcua_default_interval_ms(opcua)
    points = []
    for asset, tag in site.iter_tags():
        fields: dict[str, float | int | bool | str] = {
            "name": asset.name,
            "unit": tag.unit or "",
            "forecast": (asset.id, tag.name) in forecast,
        }
        expected = expected_per_hour(tag, opcua_interval_ms)
        if expected is not None:
            fields["expected_per_hour"] = expected
        if tag.alarm is not None and tag.alarm.high is not None:
            fields["alarm_high"] = float(tag.alarm.high)
        if tag.alarm is not None and tag.alarm.low is not None:
            fields["alarm_low"] = float(tag.alarm.low)
        points.append(
            Point(
                "inventory",
                {
                    "site": site.site,
                    "asset": asset.id,
                    "tag": tag.name,
                    "criticality": asset.criticality.value,
                    "zone": asset.zone or "",
                    "type": asset.type,
                    "source": tag.source.kind,
                },
                fields,
                timestamp_ns,
            )
        )
    return points


# --- the pass -------------------------------------------------------------------------------------


def not_assessed_note(assessments: Sequence[Assessment]) -> str | None:
    """``3 of 20 series not assessed (1 failed, 2 skipped)``, or None when every series was assessed.

    A pass that skipped series is not good news: "no asset is degrading" would then only speak for
    the series that were looked at. The job, the PNG report and the demo all print this instead.
    """
    if not assessments:
        return "no series was assessed (the site has no forecast tags, or none matched)"
    missing = [a for a in assessments if a.result != "ok"]
    if not missing:
        return None
    failed = sum(a.result == "failed" for a in missing)
    return (
        f"{len(missing)} of {len(assessments)} series not assessed "
        f"({failed} failed, {len(missing) - failed} skipped)"
    )


@dataclass
class PassReport:
    assessed_at: pd.Timestamp
    assessments: list[Assessment] = field(default_factory=list)
    points_written: int = 0
    events: int = 0

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "failed": 0, "skipped": 0}
        for a in self.assessments:
            out[a.result] += 1
        return out

    def ranked(self, min_flag: Flag = Flag.WATCH) -> list[Assessment]:
        """Assessed series at or above ``min_flag``, highest risk first, then soonest crossing."""
        flagged = [a for a in self.assessments if a.result == "ok" and a.flag >= min_flag]
        return sorted(
            flagged,
            key=lambda a: (-int(a.flag), -a.risk, a.hours_to_alarm if a.hours_to_alarm is not None else math.inf),
        )

    def failures(self) -> list[Assessment]:
        return [a for a in self.assessments if a.result != "ok"]

    def summary_line(self, with_note: bool = True) -> str:
        counts = self.counts()
        note = not_assessed_note(self.assessments) if with_note else None
        return (
            f"{counts['ok']} assessed, {counts['failed']} failed, {counts['skipped']} skipped; "
            f"{self.events} flag events, {self.points_written} points written" + (f"; WARNING: {note}" if note else "")
        )

    def summary(self) -> dict[str, object]:
        """What the status file keeps of a pass (read by `flowline status` and the demo)."""
        return {
            "assessed_at": self.assessed_at.isoformat(),
            **self.counts(),
            "flagged": [
                {"asset": a.spec.asset, "tag": a.spec.tag, "flag": a.flag.name} for a in self.ranked(Flag.DEGRADING)
            ],
            "not_assessed": not_assessed_note(self.assessments),
            "reasons": [f"{a.result}: {a.spec.key}: {a.reason}" for a in self.failures()][:20],
        }


def historian_section(config_historian: HistorianConfig | None, analytics: AnalyticsConfig) -> HistorianConfig:
    section = analytics.historian or config_historian
    if section is None:
        raise ValueError("no historian: give an 'analytics.historian' or a 'historian' section in the config")
    return section


def parse_duration(text: str) -> pd.Timedelta:
    """An InfluxQL-style duration (``10m``, ``14d``, ``1h``) as a Timedelta."""
    return pd.Timedelta(text[:-1] + "D" if text.endswith("d") else text)


def assessment_time(now: pd.Timestamp, step: str) -> pd.Timestamp:
    stamp = pd.Timestamp(now)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.floor(parse_duration(step))


def read_previous_flags(reader: HistorianReader, site: str, before: pd.Timestamp) -> dict[tuple[str, str], Flag]:
    """The newest stored flag per (asset, tag) strictly before ``before`` (so a rerun sees the same)."""
    q = (
        'SELECT last("flag_level") AS "flag_level" FROM "asset_health" '
        f'WHERE "site" = {quote_literal(site)} AND time < {int(before.value)} GROUP BY "asset", "tag"'
    )
    frame = reader.query_df(q)
    if frame.empty or "flag_level" not in frame:
        return {}
    return {(str(r.asset), str(r.tag)): Flag(int(r.flag_level)) for r in frame.itertuples()}


def read_items(
    reader: HistorianReader,
    specs: Iterable[SeriesSpec],
    analytics: AnalyticsConfig,
    end: pd.Timestamp,
    progress: Progress | None = None,
) -> tuple[list[Item], list[Assessment]]:
    """History per spec; a read that fails becomes a failed assessment, not a failed pass."""
    start = end - parse_duration(analytics.history)
    items: list[Item] = []
    failed: list[Assessment] = []
    for spec in specs:
        try:
            frame = reader.read_tag_history(spec.site, spec.asset, spec.tag, start, end, step=analytics.step)
            items.append((spec, frame["value"]))
        except HistorianError as exc:
            failed.append(Assessment(spec, end, "failed", f"read failed: {exc}"))
        if progress:
            progress(1)
    return items, failed


def run_pass(
    site: Site,
    historian: HistorianConfig,
    analytics: AnalyticsConfig,
    *,
    now: pd.Timestamp | None = None,
    metrics: Metrics | None = None,
    workers: int | None = None,
    dask_scheduler: str | None = None,
    progress: Callable[[str, int], Progress] | None = None,
    collectors: CollectorsConfig | None = None,
) -> PassReport:
    """One assessment pass; ``progress(description, total)`` returns an advance callback.
    ``collectors`` gives the default OPC UA sampling for the inventory's ``expected_per_hour``."""
    end = assessment_time(now if now is not None else pd.Timestamp.now(tz="UTC"), analytics.step)
    rules = rules_for(analytics)
    specs = series_specs(site)
    reader = HistorianReader.from_config(historian)
    out_config = historian
    if historian.analytics_database:
        out_config = historian.model_copy(update={"database": historian.analytics_database})
    out_reader = HistorianReader.from_config(out_config)
    writer = HistorianWriter.from_config(out_config)
    try:
        items, failed = read_items(reader, specs, analytics, end, progress("read", len(specs)) if progress else None)
        assessed = assess_many(
            items,
            rules,
            end,
            workers=workers or analytics.workers,
            dask_scheduler=dask_scheduler or analytics.dask_scheduler,
            progress=progress("assess", len(items)) if progress else None,
        )
        report = PassReport(end, assessed + failed)
        previous = read_previous_flags(out_reader, site.site, end)
        points: list[Point] = inventory_points(site, int(end.value), collectors.opcua if collectors else None)
        for a in report.assessments:
            if metrics is not None:
                metrics.inc("analytics_series_total", result=a.result)
            if a.result != "ok":
                log.warning("%s not assessed: %s", a.spec.key, a.reason)
                continue
            points.append(health_point(a))
            points.extend(forecast_points(a))
            event = event_point(a, previous.get((a.spec.asset, a.spec.tag), Flag.OK))
            if event is not None:
                points.append(event)
                report.events += 1
        if metrics is not None:
            points.extend(metrics.snapshot(int(end.value)))
        report.points_written = writer.write(points).written
        return report
    finally:
        reader.close()
        out_reader.close()
        writer.close()
