"""``flowline analyze`` (the scheduled assessment job), ``flowline detect`` (causal CSV scoring) and
``flowline export``.

Only click is imported at module level: pandas, scipy, statsmodels and rich cost seconds to import
and ``flowline detect --help`` (or a typo in an option) must answer at once. Each command imports
what it needs when it runs.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from flowline.analytics.job import PassReport
    from flowline.inventory import Site

log = logging.getLogger("flowline.analytics")


def ranked_table(report: PassReport) -> Table:
    """The ranked degrading-asset table the job and the demo print."""
    from rich.table import Table

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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    from rich.console import Console

    from flowline.analytics.job import historian_section, not_assessed_note, parse_duration, run_pass
    from flowline.core.cli import service_logging
    from flowline.core.config import load_config
    from flowline.core.errors import ConfigError
    from flowline.core.metrics import Metrics
    from flowline.core.status import ProcessStatus
    from flowline.historian.errors import HistorianError
    from flowline.inventory import load_site
    from flowline.inventory.loader import SiteFileError

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
        raise click.ClickException(
            "--dask-scheduler needs Dask: uv sync --extra dask (or pip install 'flowline-plant-analytics[dask]')"
        )
    metrics = Metrics("analytics", site.site, config.instance)
    if period is not None:
        service_logging()
    with ProcessStatus(config.data_dir, "analytics") as status:
        while True:
            started = time.monotonic()
            try:
                with _progress(console) as progress:
                    report = run_pass(
                        site, historian, config.analytics, metrics=metrics, workers=workers,
                        dask_scheduler=dask_scheduler, progress=progress, collectors=config.collectors,
                    )
            except HistorianError as exc:
                if report_path is not None:  # an empty report must say the analysis was skipped, and why
                    from flowline.analytics.api import write_report_png

                    write_report_png([], report_path, site=site, skipped_reason=f"analysis skipped: {exc}")
                status.connected(historian.url, "source", False, error=str(exc))
                status.extra["last_pass"] = {"error": str(exc)}
                if period is None:
                    status.fail(f"analytics pass failed: {exc}")
                    raise click.ClickException(str(exc)) from exc
                log.error("analytics pass failed, retrying at the next interval: %s", exc)
            else:
                status.ok(historian.url, "source")
                status.extra["last_pass"] = report.summary()
                _print_pass(console, report, report_path, site)
                if period is not None:  # a service: one timestamped line per pass in its log
                    note = not_assessed_note(report.assessments)
                    (log.warning if note else log.info)("analytics pass: %s", report.summary_line())
            if period is None:
                return
            time.sleep(max(0.0, period - (time.monotonic() - started)))


def _print_pass(console: Console, report: PassReport, report_path: Path | None, site: Site) -> None:
    from flowline.analytics.job import not_assessed_note

    counts = report.counts()
    note = not_assessed_note(report.assessments)
    if report.ranked():
        console.print(ranked_table(report))
    elif note is None:
        console.print(f"No asset at WATCH or worse ({counts['ok']} series assessed).")
    else:
        console.print(f"No assessed series at WATCH or worse, but {note}: their assets' health is unknown.")
    if report_path is not None:
        from flowline.analytics.api import write_report_png  # matplotlib only when asked

        plotted = write_report_png(report.assessments, report_path, site=site)
        click.echo(f"report: {plotted} flagged asset(s) plotted in {report_path}")
    for a in report.failures():
        click.echo(f"  {a.result}: {a.spec.key}: {a.reason}")
    click.echo(report.summary_line(with_note=False))
    if note is not None:
        console.print(f"[bold yellow]WARNING: {note}; the reasons are listed above.[/bold yellow]", highlight=False)


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
@click.option(
    "--watch-surprise", type=float, default=None,
    help="WATCH when the alert reaches this -log10 probability (default: the analytics job's, see "
    "docs/anomaly.md); each +1 means about ten times fewer alerts.",
)
@click.option(
    "--fix-time-order", is_flag=True,
    help="Sort rows by time and keep the last row of each repeated timestamp (counted and reported); "
    "without it such an export is refused.",
)
def detect(
    csv_path: str, time_col: str, value_col: str, out_path: str | None, alarm_high: float | None,
    alarm_low: float | None, span: float, horizon_hours: float, watch_surprise: float | None, fix_time_order: bool,
) -> None:
    """Score a CSV series row by row, causally: each row's score uses only that row and earlier ones.

    Adds level, trend_per_hour, sigma, anomaly, hours_to_alarm, surprise, false_alerts_per_week,
    score (0-1) and flag (OK/WATCH/DEGRADING/CRITICAL) to every row. Non-numeric and empty values
    are scored as missing and counted on stderr.

    \b
    Examples:
      flowline detect --csv p101.csv --time-col time --value-col value --alarm-high 7.1 --out scored.csv
      flowline detect --csv merged.csv --time-col ts --value-col vib --fix-time-order | tail
    """
    import pandas as pd

    from flowline.analytics.detect import DetectorSettings, score_csv

    settings = DetectorSettings(span=span, horizon_hours=horizon_hours, alarm_high=alarm_high, alarm_low=alarm_low)
    if watch_surprise is not None:
        settings = replace(settings, watch_surprise=watch_surprise)
    try:
        scored, report = score_csv(csv_path, time_col, value_col, settings, fix_time_order=fix_time_order)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise click.ClickException(str(exc)) from exc
    for line in report.lines():
        click.echo(line, err=True)
    if out_path is None:
        scored.to_csv(sys.stdout)
        return
    scored.to_csv(out_path)
    counts = scored["flag"].value_counts().to_dict()
    click.echo(f"{len(scored)} rows scored -> {out_path}; flags: {counts}", err=True)


@click.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), default=None,
    help="Flowline config YAML (default: $FLOWLINE_CONFIG, else .flowline-demo/flowline.yaml here or above).",
)
@click.option("--asset", "assets", multiple=True, help="Asset id (repeatable; default: every asset of the site).")
@click.option("--tag", "tags", multiple=True, help="Tag name (repeatable; default: every tag of the assets).")
@click.option("--start", default=None, help="Start time (ISO 8601; without offset: in --tz).")
@click.option("--end", default=None, help="End time (default: now).")
@click.option("--days", type=float, default=None, help="Days before --end when --start is not given (default 14).")
@click.option(
    "--resolution", type=click.Choice(["auto", "raw", "1m", "1h"]), default="auto", show_default=True,
    help="auto: raw up to 2 days, 1-minute rollup up to 31 days, 1-hour beyond.",
)
@click.option(
    "--quality", type=click.Choice(["good", "all"]), default="good", show_default=True,
    help="good: good samples only; all: every sample with its quality column.",
)
@click.option("--wide", is_flag=True, help="One column per asset/tag instead of one row per value.")
@click.option("--tz", default="UTC", show_default=True, help="Time zone of the output times and of naive inputs.")
@click.option(
    "--format", "file_format", type=click.Choice(["parquet", "csv"]), default=None,
    help="Output format (default: from the --out suffix, .parquet or .csv).",
)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output file.")
def export(
    config_path: Path | None, assets: tuple[str, ...], tags: tuple[str, ...], start: str | None, end: str | None,
    days: float | None, resolution: str, quality: str, wide: bool, tz: str, file_format: str | None, out_path: Path,
) -> None:
    """Write tags of one or several assets to Parquet or CSV, streamed in chunks.

    The same rows as `flowline.analytics.data.DataSource.load` (columns time, asset, tag, value,
    quality; rollups add min, max, count), read window by window so memory stays bounded.

    \b
    Examples:
      flowline export --asset P-102 --days 90 --out p102.parquet
      flowline export --asset P-102 --asset E-201 --start 2026-01-01 --end 2026-01-08 --resolution 1m --out x.csv
      flowline export --config /etc/flowline/flowline.yaml --asset P-102 --wide --tz Europe/Oslo --out p102.csv
    """
    from flowline.analytics.data import ParquetUnavailableError, connect
    from flowline.core.errors import ConfigError
    from flowline.historian.errors import HistorianError
    from flowline.inventory.loader import SiteFileError

    try:
        source = connect(config_path)
        started = time.monotonic()
        plan = source.plan(
            list(assets) or None, list(tags) or None, start=start, end=end, days=days,
            resolution=resolution,  # type: ignore[arg-type]
            quality=quality,  # type: ignore[arg-type]
            tz=tz,
        )
        result = source.export(
            out_path, plan, layout="wide" if wide else "long",
            file_format=file_format,  # type: ignore[arg-type]
            progress=sys.stderr.isatty(),
        )
    except (ConfigError, SiteFileError, HistorianError, ParquetUnavailableError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"{result.rows:,} rows ({len(plan.series)} tags, {plan.resolution}, {plan.start:%Y-%m-%d %H:%M} to "
        f"{plan.end:%Y-%m-%d %H:%M} UTC) -> {out_path} ({result.format}) in {time.monotonic() - started:.1f} s"
    )
