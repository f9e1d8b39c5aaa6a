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
from flowline.analytics.backtest import good_values
from flowline.analytics.job import not_assessed_note
from flowline.analytics.rules import AssessmentRules, Flag
from flowline.core.config import HistorianConfig
from flowline.historian.query import HistorianReader
from flowline.inventory import Site

__all__ = [
    "Assessment",
    "SeriesSpec",
    "assess",
    "load_history",
    "plot_assessment",
    "report_figure",
    "write_report_png",
]


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
    return assess_series(good_values(history), spec, rules, end)


def _asset_label(a: Assessment, site: Site | None) -> str:
    """``P-102 Crude export pump B (criticality A)``, from the site file when there is one."""
    asset = site.assets_by_id.get(a.spec.asset) if site is not None else None
    name = f" {asset.name}" if asset is not None else ""
    return f"{a.spec.asset}{name} (criticality {a.spec.criticality})"


def plot_assessment(a: Assessment, ax: Any = None, site: Site | None = None) -> Any:
    """History, forecast with its prediction band, the alarm limit and the assessment time; returns
    the figure. With the site file the title names the asset."""
    if ax is None:
        fig = Figure(figsize=(10, 4))
        ax = fig.subplots()
    else:
        fig = ax.figure
    unit = a.spec.unit or ""
    if a.history is not None:
        ax.plot(a.history.index, a.history.to_numpy(), color="tab:blue", lw=1, label="history")
    if a.forecast is not None:
        f = a.forecast
        ax.plot(f.index, f["yhat"].to_numpy(), color="tab:orange", lw=1.5, label=f"forecast ({a.model})")
        ax.fill_between(f.index, f["lower"].to_numpy(), f["upper"].to_numpy(), color="tab:orange", alpha=0.25,
                        label="prediction interval")
    if a.alarm_limit is not None:
        label = f"alarm limit {a.alarm_limit:g} {unit}".rstrip()
        ax.axhline(a.alarm_limit, color="tab:red", ls="--", lw=1, label=label)
    ax.axvline(a.assessed_at, color="grey", lw=0.8, label=f"now (assessed {a.assessed_at:%Y-%m-%d %H:%M} UTC)")
    ax.annotate("now", (a.assessed_at, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                textcoords="offset points", color="grey", fontsize="small")
    when = f", alarm in {a.hours_to_alarm:.0f} h" if a.hours_to_alarm is not None else ", no crossing forecast"
    ax.set_title(
        f"{_asset_label(a, site)} {a.spec.tag}: {a.flag.name} (health {a.health_score:.0f}, "
        f"P(cross) {a.p_cross:.2f}{when})",
        fontsize="medium",
    )
    ax.set_ylabel(unit)
    ax.legend(loc="upper left", fontsize="small")
    fig.autofmt_xdate()
    return fig


def _page(fig: Figure, title: str, lines: Sequence[str]) -> None:
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.62, title, ha="center", va="center", fontsize="large", weight="bold")
    ax.text(0.5, 0.45, "\n".join(lines), ha="center", va="top", fontsize="medium")


def write_report_png(
    assessments: Sequence[Assessment],
    path: str | Path,
    min_flag: Flag = Flag.DEGRADING,
    site: Site | None = None,
    skipped_reason: str | None = None,
) -> int:
    """`report_figure` saved as a PNG at ``path``; returns how many assessments it plots."""
    fig, plotted = report_figure(assessments, min_flag, site, skipped_reason)
    fig.savefig(path, dpi=90)
    return plotted


def report_figure(
    assessments: Sequence[Assessment],
    min_flag: Flag = Flag.DEGRADING,
    site: Site | None = None,
    skipped_reason: str | None = None,
) -> tuple[Figure, int]:
    """One panel per assessment at or above ``min_flag`` (worst first), and how many.

    The header names the site and the assessment time. A report always exists: with nothing flagged
    it says so; when nothing could be assessed (``skipped_reason``, or no series assessed) it says
    the analysis was skipped and why, so an empty page is never mistaken for a healthy plant."""
    ok = [a for a in assessments if a.result == "ok"]
    chosen = sorted((a for a in ok if a.flag >= min_flag), key=lambda a: (-int(a.flag), -a.risk))
    site_name = site.site if site is not None else (assessments[0].spec.site if assessments else "")
    when = max((a.assessed_at for a in assessments), default=None)
    stamp = f"{when:%Y-%m-%d %H:%M} UTC" if when is not None else "no assessment time"
    fig = Figure(figsize=(10, 3.2 * max(1, len(chosen)) + 0.6))
    fig.suptitle(f"Flowline reliability report: {site_name or 'unknown site'}, assessed {stamp}", weight="bold")
    # Some series not assessed is not good news: said in red at the top of every page.
    note = not_assessed_note(assessments) if ok else None
    if note is not None:
        fig.text(0.5, 1 - 0.45 / fig.get_figheight(), f"Analysis incomplete: {note}", ha="center", color="tab:red")
    if skipped_reason is not None or not ok:
        reasons = [skipped_reason] if skipped_reason else [f"{a.spec.key}: {a.result}: {a.reason}" for a in assessments]
        _page(fig, "Analysis skipped: no tag was assessed", [*reasons[:12], *(["…"] if len(reasons) > 12 else [])]
              or ["no forecast tag in the site file"])
    elif not chosen:
        lines = [f"{len(ok)} tags assessed, all below {min_flag.name}"]
        if note is not None:
            lines.append(f"Analysis incomplete: {note}: their assets' health is unknown")
        subject = "asset" if note is None else "assessed series"
        title = f"No {subject} at {min_flag.name} or worse"
        _page(fig, title, lines)
    else:
        axes = fig.subplots(len(chosen), 1, squeeze=False)
        for a, row in zip(chosen, axes, strict=False):
            plot_assessment(a, row[0], site)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig, len(chosen)
