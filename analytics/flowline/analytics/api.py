"""The data scientist's API: pandas in, pandas out, same assessment as the job.

    >>> from flowline.analytics.api import load_history, assess, plot_assessment
    >>> hist = load_history(historian_config, "north-field", "P-101", "vibration_rms", days=14)
    >>> a = assess(hist, SeriesSpec("north-field", "P-101", "vibration_rms", high=7.1))
    >>> a.flag, a.hours_to_alarm, a.forecast.head()
    >>> plot_assessment(a).savefig("p101.png")   # a matplotlib Figure (Agg), no pyplot needed
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

# Figures are built on `matplotlib.figure.Figure` (rendered by Agg), never through pyplot: no GUI
# backend, no global state, safe in servers, threads and notebooks alike.
from matplotlib.figure import Figure

from flowline.analytics.assess import Assessment, SeriesSpec, assess_series
from flowline.analytics.rules import AssessmentRules, Flag
from flowline.core.config import HistorianConfig
from flowline.core.points import Quality
from flowline.historian.query import HistorianReader

__all__ = ["Assessment", "SeriesSpec", "assess", "load_history", "plot_assessment", "write_report_png"]


def load_history(
    historian: HistorianConfig,
    site: str,
    asset: str,
    tag: str,
    *,
    days: float = 14,
    end: pd.Timestamp | None = None,
    step: str | None = None,
) -> pd.DataFrame:
    """A tag's history with quality: columns ``value``, ``quality`` (0 good, 1 uncertain, 2 bad),
    UTC index. Raw samples, or server-side means per ``step`` (quality = worst in the step)."""
    end = pd.Timestamp.now(tz="UTC") if end is None else pd.Timestamp(end)
    reader = HistorianReader.from_config(historian)
    try:
        return reader.read_tag_history(
            site, asset, tag, end - pd.Timedelta(days=days), end, step=step, good_only=False, with_quality=True
        )
    finally:
        reader.close()


def assess(
    history: pd.DataFrame | pd.Series,
    spec: SeriesSpec,
    rules: AssessmentRules | None = None,
    end: pd.Timestamp | None = None,
) -> Assessment:
    """The job's assessment; a DataFrame with a ``quality`` column is reduced to good values first."""
    if isinstance(history, pd.DataFrame):
        if "quality" in history:
            history = history[history["quality"] == int(Quality.GOOD)]
        history = history["value"]
    return assess_series(history, spec, rules, end)


def plot_assessment(a: Assessment, ax: Any = None) -> Any:
    """History, forecast with its prediction band, and the alarm limit; returns the figure."""
    if ax is None:
        fig = Figure(figsize=(10, 4))
        ax = fig.subplots()
    else:
        fig = ax.figure
    if a.history is not None:
        ax.plot(a.history.index, a.history.to_numpy(), color="tab:blue", lw=1, label="history")
    if a.forecast is not None:
        f = a.forecast
        ax.plot(f.index, f["yhat"].to_numpy(), color="tab:orange", lw=1.5, label=f"forecast ({a.model})")
        ax.fill_between(f.index, f["lower"].to_numpy(), f["upper"].to_numpy(), color="tab:orange", alpha=0.25,
                        label="prediction interval")
    if a.alarm_limit is not None:
        ax.axhline(a.alarm_limit, color="tab:red", ls="--", lw=1, label=f"alarm limit {a.alarm_limit:g}")
    ax.axvline(a.assessed_at, color="grey", lw=0.8)
    when = f", alarm in {a.hours_to_alarm:.0f} h" if a.hours_to_alarm is not None else ""
    ax.set_title(
        f"{a.spec.asset} {a.spec.tag}: {a.flag.name} (health {a.health_score:.0f}, "
        f"p_cross {a.p_cross:.2f}{when})"
    )
    ax.set_ylabel(a.spec.unit or "")
    ax.legend(loc="upper left", fontsize="small")
    fig.autofmt_xdate()
    return fig


def write_report_png(assessments: Sequence[Assessment], path: str | Path, min_flag: Flag = Flag.DEGRADING) -> int:
    """One panel per assessment at or above ``min_flag`` (worst first) in one PNG; returns the count.
    With nothing flagged the PNG says so, so a report always exists."""
    chosen = sorted(
        (a for a in assessments if a.result == "ok" and a.flag >= min_flag), key=lambda a: (-int(a.flag), -a.risk)
    )
    rows = max(1, len(chosen))
    fig = Figure(figsize=(10, 3.2 * rows))
    axes = fig.subplots(rows, 1, squeeze=False)
    if not chosen:
        axes[0][0].text(0.5, 0.5, f"no asset at {min_flag.name} or worse", ha="center", va="center")
        axes[0][0].set_axis_off()
    for a, row in zip(chosen, axes, strict=False):
        plot_assessment(a, row[0])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return len(chosen)
