"""``flowline analyze`` (the scheduled assessment job) and ``flowline detect`` (causal CSV scoring)."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flowline.analytics.detect import DetectorSettings, score_csv
from flowline.analytics.job import PassReport, historian_section, parse_duration, run_pass
from flowline.core.config import load_config
from flowline.core.errors import ConfigError
from flowline.core.metrics import Metrics
from flowline.historian.errors import HistorianError
from flowline.inventory import load_site
from flowline.inventory.loader import SiteFileError


def ranked_table(report: PassReport) -> Table:
    """The ranked degrading-asset table the job and the demo print."""
    table = Table(title=f"Assets at WATCH or worse, {report.assessed_at:%Y-%m-%d %H:%M} UTC")
    for col in ("asset", "tag", "flag", "health", "hours to alarm", "p_cross", "trend/day", "risk", "model"):
        table.add_column(col)
    for a in report.ranked():
        table.add_row(
            a.spec.asset,
            a.spec.tag,
            a.flag.name,
            f"{a.health_score:.0f}",
            "-" if a.hours_to_alarm is None else f"{a.hours_to_alarm:.0f}",
            f"{a.p_cross:.2f}",
            f"{a.trend_per_day:+.3g}",
            f"{a.risk:.2f}",
            a.model,
        )
    return table


@contextmanager
def _progress(console: Console) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as bar:

        def make(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        yield make


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="Flowline config YAML.")
@click.option("--once", is_flag=True, help="Run one pass and exit (the default when --every is not given).")
@click.option("--every", default=None, help="Run a pass every interval, e.g. 15m (overrides analytics.every).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Local worker processes (default: cores).")
@click.option("--dask-scheduler", default=None, help="Run the assessments on this Dask scheduler (tcp://host:8786).")
@click.option(
    "--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Also write a PNG of every asset at DEGRADING or worse (history, forecast band, alarm limit).",
)
def analyze(
    config_path: Path, once: bool, every: str | None, workers: int | None, dask_scheduler: str | None,
    report_path: Path | None,
) -> None:
    """Assess every forecast tag: forecasts, time to alarm limit, health flags, written to InfluxDB.

    Prints the ranked table of assets at WATCH or worse; series that could not be assessed are
    listed with the reason and the pass goes on.

    \b
    Examples:
      flowline analyze --config flowline.yaml --once --report flagged.png
      flowline analyze --config flowline.yaml --every 15m --workers 4
      flowline analyze --config flowline.yaml --once --dask-scheduler tcp://10.0.0.5:8786
    """
    # Piped output (logs, the demo) must not squeeze asset names into "P-1…": give it room.
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        config = load_config(config_path)
        site = load_site(config.site_file)
        historian = historian_section(config.historian, config.analytics)
        interval = every or (None if once else config.analytics.every)
        period = parse_duration(interval).total_seconds() if interval else None
    except (ConfigError, SiteFileError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if dask_scheduler and importlib.util.find_spec("distributed") is None:
        raise click.ClickException("--dask-scheduler needs Dask: pip install 'flowline[dask]'")
    metrics = Metrics("analytics", site.site, config.instance)
    while True:
        started = time.monotonic()
        try:
            with _progress(console) as progress:
                report = run_pass(
                    site, historian, config.analytics, metrics=metrics, workers=workers,
                    dask_scheduler=dask_scheduler, progress=progress, collectors=config.collectors,
                )
        except HistorianError as exc:
            if period is None:
                raise click.ClickException(str(exc)) from exc
            console.print(f"[red]pass failed, retrying next interval: {exc}[/red]")
        else:
            counts = report.counts()
            console.print(ranked_table(report))
            if report_path is not None:
                from flowline.analytics.api import write_report_png  # matplotlib only when asked

                plotted = write_report_png(report.assessments, report_path)
                click.echo(f"report: {plotted} flagged asset(s) plotted in {report_path}")
            for a in report.failures():
                click.echo(f"  {a.result}: {a.spec.key}: {a.reason}")
            click.echo(
                f"{counts['ok']} assessed, {counts['failed']} failed, {counts['skipped']} skipped; "
                f"{report.events} flag events, {report.points_written} points written"
            )
        if period is None:
            return
        time.sleep(max(0.0, period - (time.monotonic() - started)))


@click.command()
@click.option("--csv", "csv_path", required=True, type=click.Path(exists=True, dir_okay=False), help="CSV export.")
@click.option("--time-col", required=True, help="Column with timestamps (ISO 8601 or anything pandas parses).")
@click.option("--value-col", required=True, help="Column with the numeric values.")
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False), default=None, help="Write scored CSV here (default stdout)."
)
@click.option("--alarm-high", type=float, default=None, help="High alarm limit (enables hours to alarm).")
@click.option("--alarm-low", type=float, default=None, help="Low alarm limit.")
@click.option("--span", type=float, default=144.0, show_default=True, help="Smoothing span in rows.")
@click.option("--horizon-hours", type=float, default=168.0, show_default=True)
def detect(
    csv_path: str, time_col: str, value_col: str, out_path: str | None, alarm_high: float | None,
    alarm_low: float | None, span: float, horizon_hours: float,
) -> None:
    """Score a CSV series row by row, causally: each row's score uses only that row and earlier ones.

    Adds level, trend_per_hour, sigma, anomaly, hours_to_alarm, score (0-1) and flag
    (OK/WATCH/DEGRADING/CRITICAL) to every row.

    \b
    Examples:
      flowline detect --csv p101.csv --time-col time --value-col value --alarm-high 7.1 --out scored.csv
      flowline detect --csv export.csv --time-col ts --value-col vib | tail
    """
    settings = DetectorSettings(span=span, horizon_hours=horizon_hours, alarm_high=alarm_high, alarm_low=alarm_low)
    try:
        scored = score_csv(csv_path, time_col, value_col, settings)
    except (ValueError, pd.errors.ParserError) as exc:
        raise click.ClickException(str(exc)) from exc
    if out_path is None:
        scored.to_csv(sys.stdout)
        return
    scored.to_csv(out_path)
    counts = scored["flag"].value_counts().to_dict()
    click.echo(f"{len(scored)} rows scored -> {out_path}; flags: {counts}", err=True)
