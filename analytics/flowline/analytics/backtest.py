"""Backtest: what the system would have said then, and how that compares with what happened.

`replay` runs the job's assessment (`assess.assess_series`, the same rules) at every ``every``
over a period. It is causal: the assessment at time t sees only values stamped before t, from the
``window`` before it (the job's ``analytics.history``), so each row is what a pass at t would have
written (flag, hours to alarm, p_cross, health, trend, model).

`score` compares a replay with known event times (work orders, failures, trips; `read_events`
reads them from a CSV):

- a flag is an evaluation at or above ``min_flag`` (default DEGRADING); an **episode** is a run of
  consecutive flagged evaluations of one series;
- an event is **caught** when a series it concerns (same asset; same tag when the event names one)
  was flagged within ``window_hours`` before it; its **lead time** is the event time minus the
  first such flag; otherwise it is **missed**, or **open** when the event lies after the replay's
  end and nothing has been flagged yet (the replay cannot know yet), or **outside** when the
  replay does not reach back to its window;
- an episode is a **false flag** when no event of its series follows within ``window_hours`` of
  its start.

``window_hours`` defaults to twice the forecast horizon: a flag that early is still a warning of
that event, not of another one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flowline.analytics.assess import Assessment, SeriesSpec, assess_series
from flowline.analytics.job import parse_duration
from flowline.analytics.rules import AssessmentRules, Flag
from flowline.core.points import Quality

REPLAY_COLUMNS = [
    "flag", "flag_level", "hours_to_alarm", "p_cross", "health_score", "trend_per_day", "model", "result", "reason",
]
EVENT_COLUMNS = ["time", "asset", "tag", "status", "first_flag", "lead_hours"]


def good_values(history: pd.DataFrame | pd.Series) -> pd.Series:
    """The values an assessment uses: a frame with a ``quality`` column is reduced to good rows."""
    if isinstance(history, pd.Series):
        return history
    if "quality" in history:
        history = history[history["quality"] == int(Quality.GOOD)]
    return history["value"]


def replay(
    history: pd.DataFrame | pd.Series,
    spec: SeriesSpec,
    rules: AssessmentRules | None = None,
    *,
    start: Any = None,
    end: Any = None,
    every: str = "6h",
    window: str = "14d",
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """The assessment at every ``every`` in [start, end], indexed by assessment time (UTC).

    ``history`` is a time-indexed Series or a frame with ``value`` (and ``quality``), as
    `api.load_history` or `DataSource.load(..., layout=...)` per tag return. Assessment times are
    multiples of ``every`` (like the job's, floored to its step); give history whose steps divide
    ``every`` so that no step straddles an assessment time. Defaults: from the first value plus
    the rules' minimum history to the last value.
    """
    rules = rules or AssessmentRules()
    values = good_values(history).dropna()
    index = pd.DatetimeIndex(values.index)
    values.index = index.tz_localize("UTC") if index.tz is None else index.tz_convert("UTC")
    values = values.sort_index()
    if values.empty:
        return pd.DataFrame(columns=REPLAY_COLUMNS, index=pd.DatetimeIndex([], tz="UTC", name="time"))
    step = pd.Timedelta(every)
    lookback = parse_duration(window)
    first = to_utc(start) if start is not None else values.index[0] + pd.Timedelta(hours=rules.min_history_hours)
    last = to_utc(end) if end is not None else values.index[-1] + pd.Timedelta(1, "ns")
    times = pd.date_range(first.ceil(step), last, freq=step)
    stamps = values.index
    rows = []
    for t in times:
        lo, hi = stamps.searchsorted(t - lookback), stamps.searchsorted(t)  # [t - window, t): causal
        rows.append(_row(assess_series(values.iloc[lo:hi], spec, rules, end=t)))
        if progress is not None:
            progress(1)
    frame = pd.DataFrame(rows, index=pd.DatetimeIndex(times, name="time"), columns=REPLAY_COLUMNS)
    frame["flag_level"] = frame["flag_level"].astype("int64")
    return frame


def to_utc(value: Any, tz: str = "UTC") -> pd.Timestamp:
    """A timestamp in UTC; a naive one is read as local time in ``tz``."""
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize(tz)
    return stamp.tz_convert("UTC")


def _row(a: Assessment) -> dict[str, Any]:
    return {
        "flag": a.flag.name,
        "flag_level": int(a.flag),
        "hours_to_alarm": a.hours_to_alarm,
        "p_cross": a.p_cross,
        "health_score": a.health_score,
        "trend_per_day": a.trend_per_day,
        "model": a.model,
        "result": a.result,
        "reason": a.reason,
    }


def read_events(path: str | Path, *, time_col: str = "time", tz: str = "UTC") -> pd.DataFrame:
    """Event times from a CSV (work orders, failures): ``time`` (UTC; naive times are in ``tz``),
    ``asset`` and ``tag`` when the file has them (an empty tag means the whole asset), other
    columns kept as they are."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if time_col not in frame:
        raise ValueError(f"{path}: no column {time_col!r} (columns: {', '.join(frame.columns)})")
    times = []
    for line, text in enumerate(frame[time_col], start=2):
        try:
            times.append(to_utc(text, tz))  # one by one: a file may mix naive and offset times
        except ValueError as exc:
            raise ValueError(f"{path}:{line}: {time_col} {text!r} is not a time ({exc})") from exc
    frame[time_col] = pd.DatetimeIndex(times, tz="UTC")
    return frame.rename(columns={time_col: "time"}).sort_values("time", ignore_index=True)


@dataclass
class BacktestScore:
    """Per-event outcome, the false flags, and the counts (`summary`)."""

    events: pd.DataFrame
    false_flags: pd.DataFrame
    evaluations: int
    min_flag: Flag
    window_hours: float
    summary: dict[str, float | int] = field(default_factory=dict)

    def __str__(self) -> str:
        s = self.summary
        lead = "" if not s.get("caught") else (
            f", lead time median {s['lead_hours_median']:.0f} h (min {s['lead_hours_min']:.0f} h)"
        )
        outside = f"; {s['outside']} event(s) outside the replay's series or period" if s["outside"] else ""
        return (
            f"{s['caught']} of {int(s['events']) - int(s['outside'])} events caught at {self.min_flag.name} or "
            f"worse{lead}; {s['missed']} missed, {s['open']} open, {s['false_flags']} false flag(s) "
            f"in {self.evaluations} evaluations{outside}"
        )


def score(
    replayed: pd.DataFrame,
    events: pd.DataFrame,
    *,
    min_flag: Flag = Flag.DEGRADING,
    window_hours: float | None = None,
    rules: AssessmentRules | None = None,
) -> BacktestScore:
    """Score a replay against events (module docstring). ``replayed`` is one series' `replay`, or
    several concatenated with ``asset`` and ``tag`` columns (`DataSource.backtest`)."""
    hours = window_hours if window_hours is not None else 2 * (rules or AssessmentRules()).horizon_hours
    window = pd.Timedelta(hours=hours)
    frame = replayed.reset_index() if "time" not in replayed.columns else replayed
    if "asset" not in frame:
        frame = frame.assign(asset="", tag="")
    flagged = frame[frame["flag_level"] >= int(min_flag)]
    begin, finish = (frame["time"].min(), frame["time"].max()) if len(frame) else (None, None)
    series = frame[["asset", "tag"]].drop_duplicates().itertuples(index=False)
    keys = [(str(a), str(t)) for a, t in series]

    outcomes = []
    for event in events.itertuples(index=False):
        when = pd.Timestamp(event.time)
        concerned = [k for k in keys if _concerns(event, k)]
        pairs = zip(flagged["asset"], flagged["tag"], strict=True)
        mask = np.array([(a, t) in concerned for a, t in pairs], dtype=bool)
        flags = flagged.loc[mask]
        early = flags[(flags["time"] >= when - window) & (flags["time"] < when)]
        row = {"time": when, "asset": getattr(event, "asset", ""), "tag": getattr(event, "tag", "")}
        if len(early):
            first = early["time"].min()
            row.update(status="caught", first_flag=first, lead_hours=(when - first) / pd.Timedelta(hours=1))
        else:
            row.update(status=_unflagged_status(when, window, begin, finish, bool(concerned)), first_flag=pd.NaT,
                       lead_hours=math.nan)
        outcomes.append(row)
    scored = pd.DataFrame(outcomes, columns=EVENT_COLUMNS)

    false_rows = []
    for (asset, tag), group in frame.sort_values("time").groupby(["asset", "tag"], sort=True):
        mine = [e for e in events.itertuples(index=False) if _concerns(e, (str(asset), str(tag)))]
        for start, stop, peak in _episodes(group, min_flag):
            if not any(start < pd.Timestamp(e.time) <= start + window for e in mine):
                false_rows.append({"asset": asset, "tag": tag, "start": start, "end": stop, "peak_flag": peak})
    false_flags = pd.DataFrame(false_rows, columns=["asset", "tag", "start", "end", "peak_flag"])

    caught = scored[scored["status"] == "caught"]["lead_hours"]
    summary: dict[str, float | int] = {
        "events": len(scored),
        "caught": len(caught),
        "missed": int((scored["status"] == "missed").sum()),
        "open": int((scored["status"] == "open").sum()),
        "outside": int((scored["status"] == "outside").sum()),
        "false_flags": len(false_flags),
        "lead_hours_median": float(caught.median()) if len(caught) else math.nan,
        "lead_hours_min": float(caught.min()) if len(caught) else math.nan,
    }
    return BacktestScore(scored, false_flags, len(frame), min_flag, window / pd.Timedelta(hours=1), summary)


def _unflagged_status(
    when: pd.Timestamp, window: pd.Timedelta, begin: pd.Timestamp | None, finish: pd.Timestamp | None, concerned: bool
) -> str:
    """An event without a flag before it: missed, or not yet decidable (open), or not covered."""
    if begin is None or finish is None or not concerned or when <= begin or when - window > finish:
        return "outside"
    return "open" if when > finish else "missed"


def _concerns(event: Any, key: tuple[str, str]) -> bool:
    """Whether an event row concerns a series: same asset (when both name one), same tag when the
    event names one."""
    asset, tag = key
    event_asset = str(getattr(event, "asset", "") or "")
    event_tag = str(getattr(event, "tag", "") or "")
    if event_asset and asset and event_asset != asset:
        return False
    return not (event_tag and tag and event_tag != tag)


def _episodes(group: pd.DataFrame, min_flag: Flag) -> Iterable[tuple[pd.Timestamp, pd.Timestamp, str]]:
    """Runs of consecutive evaluations at or above ``min_flag``: (first, last, worst flag name)."""
    start: pd.Timestamp | None = None
    last: pd.Timestamp | None = None
    peak = 0
    for when, level in zip(group["time"], group["flag_level"], strict=True):
        if level >= int(min_flag):
            if start is None:
                start, peak = when, level
            last, peak = when, max(peak, int(level))
        elif start is not None and last is not None:
            yield start, last, Flag(peak).name
            start = None
    if start is not None and last is not None:
        yield start, last, Flag(peak).name
