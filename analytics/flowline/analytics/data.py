"""Data access for notebooks and exports: many tags into one DataFrame, streamed in bounded chunks.

    >>> from flowline.analytics.data import connect
    >>> fl = connect()            # FLOWLINE_CONFIG, else .flowline-demo/flowline.yaml here or above
    >>> df = fl.load(["P-102", "E-201"], days=14)                  # long: time, asset, tag, value, ...
    >>> wide = fl.load("P-102", days=2, layout="wide", tz="Europe/Oslo")

**Which config** (`find_config`): the file named by ``FLOWLINE_CONFIG``; otherwise
``.flowline-demo/flowline.yaml`` in the current folder or the nearest parent that has one (what
``scripts/demo --keep`` leaves running; the notebooks run from ``notebooks/`` and find it too).
Reads use the analytics account (``analytics.historian``, else ``historian``).

**Resolution** (`choose_resolution`), unless asked: raw samples for ranges up to 2 days, the
1-minute rollup up to 31 days, the 1-hour rollup beyond. A rollup row has ``value`` (mean),
``min``, ``max``, ``count`` over good samples and ``quality`` (the last sample's quality in the
window). Where the rollup job has not (yet) covered a window, the same figures are computed from
the raw data by the server, so the newest hour and installs without rollups read the same way.

**Quality**: ``quality="good"`` keeps good samples only (raw: quality 0; rollups: windows with at
least one good sample); ``quality="all"`` keeps everything with its ``quality`` column (0 good,
1 uncertain, 2 bad). **Time zones**: naive ``start``/``end`` are read in ``tz``; times come back
in ``tz`` (default UTC).

**Bounded memory**: a read is split into time windows sized so that one window holds about
``chunk_rows`` rows (raw: assuming one sample per second per tag); `iter_frames` yields one
DataFrame per window and `export` writes each to the file before reading the next, so memory
does not grow with the range. `load` concatenates them (its memory is the result's).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import pandas as pd

from flowline.analytics.assess import SeriesSpec
from flowline.analytics.backtest import REPLAY_COLUMNS, replay, to_utc
from flowline.analytics.job import parse_duration, series_specs
from flowline.analytics.rules import AssessmentRules, rules_for
from flowline.core.config import FlowlineConfig, HistorianConfig, load_config
from flowline.core.errors import ConfigError, FlowlineError
from flowline.core.points import TELEMETRY
from flowline.historian.errors import HistorianError, HistorianUnavailableError
from flowline.historian.query import HistorianReader, measurement_ref, quote_ident, quote_literal, to_ns
from flowline.historian.tiers import TIERS_BY_NAME
from flowline.inventory import Site, load_site

CONFIG_ENV = "FLOWLINE_CONFIG"
DEMO_CONFIG = Path(".flowline-demo") / "flowline.yaml"

Resolution: TypeAlias = Literal["raw", "1m", "1h"]
QualityMode: TypeAlias = Literal["good", "all"]
Layout: TypeAlias = Literal["long", "wide"]
TimeArg: TypeAlias = str | pd.Timestamp | Any

RESOLUTIONS: tuple[Resolution, ...] = ("raw", "1m", "1h")
STEP = {name: pd.Timedelta(seconds=tier.step_s) for name, tier in TIERS_BY_NAME.items()}
RAW_UP_TO = pd.Timedelta(days=2)
MINUTE_UP_TO = pd.Timedelta(days=31)
RAW_ROWS_PER_TAG_S = 1.0  # chunk sizing for raw reads: the simulator's (and a typical collector's) rate

LONG_COLUMNS = ["time", "asset", "tag", "value", "quality"]
ROLLUP_COLUMNS = [*LONG_COLUMNS, "min", "max", "count"]
_FLOAT = ("value", "min", "max")
_INT = ("quality", "count")


class NoStackError(ConfigError):
    """No config was given and none was found by the documented rule."""


def find_config(start: str | Path | None = None) -> Path:
    """The deployment config by the documented rule (module docstring), or `NoStackError` saying
    exactly what to run."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise NoStackError(f"{CONFIG_ENV}={named}: no such file")
        return path
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / DEMO_CONFIG
        if candidate.is_file():
            return candidate
    raise NoStackError(
        f"no Flowline config: set {CONFIG_ENV} to your flowline.yaml, or start the demo stack with "
        f"'scripts/demo --keep' (it writes {DEMO_CONFIG}; searched {here} and its parents)"
    )


def connect(config: str | Path | FlowlineConfig | None = None) -> DataSource:
    """A `DataSource` for a config file, a loaded config, or (None) the one `find_config` finds."""
    path: Path | None = None
    if not isinstance(config, FlowlineConfig):
        path = find_config() if config is None else Path(config)
        config = load_config(path)
    section = config.analytics.historian or config.historian
    if section is None:
        raise ConfigError(f"{path or 'config'}: no 'analytics.historian' or 'historian' section to read from")
    return DataSource(load_site(config.site_file), section, config, path)


def choose_resolution(start: pd.Timestamp, end: pd.Timestamp) -> Resolution:
    span = end - start
    if span <= RAW_UP_TO:
        return "raw"
    return "1m" if span <= MINUTE_UP_TO else "1h"


@dataclass(frozen=True)
class Window:
    start: pd.Timestamp
    end: pd.Timestamp


@dataclass(frozen=True)
class ReadPlan:
    """What a read covers: series, UTC range, resolution, and the windows it is streamed in."""

    site: str
    series: tuple[tuple[str, str], ...]  # (asset, tag)
    start: pd.Timestamp
    end: pd.Timestamp
    resolution: Resolution
    quality: QualityMode
    windows: tuple[Window, ...]
    tz: str = "UTC"  # of the returned times

    @property
    def columns(self) -> list[str]:
        return LONG_COLUMNS if self.resolution == "raw" else ROLLUP_COLUMNS


class DataSource:
    """Reads telemetry of a site from its historian; see the module docstring for the rules."""

    def __init__(
        self, site: Site, historian: HistorianConfig, config: FlowlineConfig | None = None, path: Path | None = None
    ) -> None:
        self.site = site
        self.historian = historian
        self.config = config
        self.config_path = path

    def __repr__(self) -> str:
        return f"DataSource(site={self.site.site!r}, historian={self.historian.url!r}, config={self.config_path})"

    # --- what there is ---------------------------------------------------------------------------

    def tags(self, assets: str | Sequence[str] | None = None) -> pd.DataFrame:
        """The site's tags (asset, tag, unit, alarm limits, forecast flag) for some or all assets."""
        wanted = _as_list(assets)
        forecast = {(a.id, t.name) for a, t in self.site.forecast_tags()}
        rows = [
            {
                "asset": asset.id,
                "tag": tag.name,
                "unit": tag.unit or "",
                "alarm_high": tag.alarm.high if tag.alarm else None,
                "alarm_low": tag.alarm.low if tag.alarm else None,
                "forecast": (asset.id, tag.name) in forecast,
            }
            for asset, tag in self.site.iter_tags()
            if wanted is None or asset.id in wanted
        ]
        return pd.DataFrame(rows, columns=["asset", "tag", "unit", "alarm_high", "alarm_low", "forecast"])

    def plan(
        self,
        assets: str | Sequence[str] | None = None,
        tags: str | Sequence[str] | None = None,
        *,
        start: TimeArg | None = None,
        end: TimeArg | None = None,
        days: float | None = None,
        resolution: Resolution | Literal["auto"] = "auto",
        quality: QualityMode = "good",
        tz: str = "UTC",
        chunk_rows: int = 500_000,
    ) -> ReadPlan:
        """Resolve a request into a `ReadPlan` (validates names, range and options)."""
        _check_tz(tz)
        known = {(a.id, t.name) for a, t in self.site.iter_tags()}
        asset_ids = _as_list(assets) or sorted({a for a, _ in known})
        missing = [a for a in asset_ids if a not in self.site.assets_by_id]
        if missing:
            raise ValueError(f"unknown asset(s) {', '.join(missing)} in site {self.site.site!r}")
        tag_names = _as_list(tags)
        series = tuple(sorted((a, t) for a, t in known if a in asset_ids and (tag_names is None or t in tag_names)))
        if not series:
            raise ValueError(f"no tag {', '.join(tag_names or [])} on asset(s) {', '.join(asset_ids)}")
        end_utc = to_utc(end, tz) if end is not None else pd.Timestamp.now(tz="UTC")
        if start is not None:
            start_utc = to_utc(start, tz)
        else:
            start_utc = end_utc - pd.Timedelta(days=14 if days is None else days)
        if start_utc >= end_utc:
            raise ValueError(f"start {start_utc} is not before end {end_utc}")
        if resolution == "auto":
            resolution = choose_resolution(start_utc, end_utc)
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be auto, raw, 1m or 1h, not {resolution!r}")
        if quality not in ("good", "all"):
            raise ValueError(f"quality must be 'good' or 'all', not {quality!r}")
        rows_per_s = RAW_ROWS_PER_TAG_S if resolution == "raw" else 1 / STEP[resolution].total_seconds()
        window_s = max(60.0, chunk_rows / (rows_per_s * len(series)))
        if resolution != "raw":  # whole rollup windows, so a window's aggregate is never split
            step_s = STEP[resolution].total_seconds()
            window_s = max(step_s, window_s // step_s * step_s)
        return ReadPlan(
            self.site.site, series, start_utc, end_utc, resolution, quality,
            _windows(start_utc, end_utc, pd.Timedelta(seconds=window_s), resolution), tz,
        )

    # --- reading ---------------------------------------------------------------------------------

    def iter_frames(self, plan: ReadPlan, *, progress: Callable[[int], None] | None = None) -> Iterator[pd.DataFrame]:
        """One long DataFrame per window of ``plan`` (same columns and dtypes every time, times in
        the plan's time zone)."""
        reader = HistorianReader.from_config(self.historian)
        try:
            for window in plan.windows:
                frame = _read_window(reader, plan, window)
                frame["time"] = frame["time"].dt.tz_convert(plan.tz)
                if progress is not None:
                    progress(1)
                yield frame
        except HistorianUnavailableError as exc:
            raise HistorianUnavailableError(f"{exc}; {self._hint()}") from exc
        finally:
            reader.close()

    def load(
        self,
        assets: str | Sequence[str] | None = None,
        tags: str | Sequence[str] | None = None,
        *,
        start: TimeArg | None = None,
        end: TimeArg | None = None,
        days: float | None = None,
        resolution: Resolution | Literal["auto"] = "auto",
        quality: QualityMode = "good",
        layout: Layout = "long",
        tz: str = "UTC",
        progress: bool | None = None,
        chunk_rows: int = 500_000,
    ) -> pd.DataFrame:
        """Tags of one or several assets in one DataFrame.

        ``long``: one row per (time, asset, tag) with ``value``, ``quality`` (and ``min``, ``max``,
        ``count`` for rollups). ``wide``: indexed by time, one column per (asset, tag) holding the
        value; with ``quality="all"`` the columns are (field, asset, tag) for value and quality.
        ``df.attrs`` records the resolution and range. ``progress`` (default: when the read takes
        more than 4 windows) shows a progress bar.
        """
        plan = self.plan(
            assets, tags, start=start, end=end, days=days, resolution=resolution, quality=quality, tz=tz,
            chunk_rows=chunk_rows,
        )
        with _read_bar(plan, progress) as advance:
            frames = list(self.iter_frames(plan, progress=advance))
        long = pd.concat(frames, ignore_index=True) if frames else _empty(plan)
        out = widen(long, plan) if layout == "wide" else long
        out.attrs.update(
            resolution=plan.resolution, start=plan.start.isoformat(), end=plan.end.isoformat(),
            quality=plan.quality, site=plan.site,
        )
        return out

    def export(
        self,
        path: str | Path,
        plan: ReadPlan,
        *,
        layout: Layout = "long",
        file_format: Literal["parquet", "csv"] | None = None,
        progress: bool | None = None,
    ) -> ExportResult:
        """Write what `load` would return for ``plan`` (`plan` takes the same selection) to Parquet or
        CSV, one window at a time, so memory stays bounded. The format follows the suffix
        (``.parquet``/``.csv``) unless ``file_format`` says.

            fl.export("p102.parquet", fl.plan("P-102", days=90, resolution="raw"))
        """
        path = Path(path)
        fmt = file_format or ("parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv")
        sink: _Sink = _ParquetSink(path) if fmt == "parquet" else _CsvSink(path)
        rows = 0
        try:
            with _read_bar(plan, progress) as advance:
                for frame in self.iter_frames(plan, progress=advance):
                    out = widen(frame, plan) if layout == "wide" else frame
                    sink.write(out.reset_index() if layout == "wide" else out)
                    rows += len(out)
            if rows == 0:
                empty = widen(_empty(plan), plan) if layout == "wide" else _empty(plan)
                sink.write(empty.reset_index() if layout == "wide" else empty)
        finally:
            sink.close()
        return ExportResult(path, fmt, rows, plan)

    # --- assessment and backtest -------------------------------------------------------------------

    def specs(
        self, assets: str | Sequence[str] | None = None, tags: str | Sequence[str] | None = None
    ) -> list[SeriesSpec]:
        """The job's series (forecast tags, with their alarm limits and consequence), filtered."""
        wanted_assets, wanted_tags = _as_list(assets), _as_list(tags)
        return [
            spec
            for spec in series_specs(self.site)
            if (wanted_assets is None or spec.asset in wanted_assets)
            and (wanted_tags is None or spec.tag in wanted_tags)
        ]

    def rules(self) -> AssessmentRules:
        """The install's assessment rules (``analytics.rules`` and ``analytics.horizon_hours``)."""
        return rules_for(self.config.analytics) if self.config is not None else AssessmentRules()

    def backtest(
        self,
        assets: str | Sequence[str] | None = None,
        tags: str | Sequence[str] | None = None,
        *,
        start: TimeArg | None = None,
        end: TimeArg | None = None,
        days: float = 14,
        every: str = "6h",
        rules: AssessmentRules | None = None,
        tz: str = "UTC",
        progress: bool | None = None,
    ) -> pd.DataFrame:
        """`backtest.replay` of every forecast tag of the assets (or the given tags) over [start, end]
        (default: the last ``days``), on 1-minute means of good values read from ``analytics.history``
        before ``start``; one row per (time, asset, tag). Score it with `backtest.score`."""
        rules = rules or self.rules()
        history = self.config.analytics.history if self.config is not None else "14d"
        lookback = parse_duration(history)
        _check_tz(tz)
        end_utc = to_utc(end, tz) if end is not None else pd.Timestamp.now(tz="UTC")
        start_utc = to_utc(start, tz) if start is not None else end_utc - pd.Timedelta(days=days)
        specs = self.specs(assets, tags)
        if not specs:
            raise ValueError(f"no forecast tag with alarm limits among {assets or 'the assets'} / {tags or 'all tags'}")
        times = len(pd.date_range(start_utc.ceil(every), end_utc, freq=every))
        frames = []
        with _progress_bar(f"replaying {len(specs)} tag(s)", times * len(specs), progress is not False) as advance:
            for spec in specs:
                values = self.load(
                    spec.asset, spec.tag, start=start_utc - lookback, end=end_utc, resolution="1m", progress=False
                ).set_index("time")["value"]
                replayed = replay(
                    values, spec, rules, start=start_utc, end=end_utc, every=every, window=history, progress=advance
                )
                frames.append(replayed.reset_index().assign(asset=spec.asset, tag=spec.tag))
        out = pd.concat(frames, ignore_index=True)[["time", "asset", "tag", *REPLAY_COLUMNS]]
        out["time"] = out["time"].dt.tz_convert(tz)
        return out

    def _hint(self) -> str:
        if self.config_path is not None and self.config_path.parent.name == DEMO_CONFIG.parent.name:
            workdir = self.config_path.parent
            return (
                f"is the demo stack up? 'flowline stack status --workdir {workdir}'; "
                f"start it with 'scripts/demo --keep'"
            )
        return f"check that InfluxDB runs and that {self.config_path or 'the config'} points at it"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    rows: int
    plan: ReadPlan


# --- internals --------------------------------------------------------------------------------------


def _check_tz(tz: str) -> None:
    try:
        pd.Timestamp(0, tz=tz)
    except (KeyError, ValueError) as exc:  # zoneinfo and pytz both raise KeyError subclasses
        raise ValueError(f"unknown time zone {tz!r} (use an IANA name such as UTC or Europe/Oslo)") from exc


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _windows(start: pd.Timestamp, end: pd.Timestamp, size: pd.Timedelta, resolution: Resolution) -> tuple[Window, ...]:
    if resolution != "raw":  # aligned to the rollup step, as the rollup job's windows are
        step = STEP[resolution]
        start = start.floor(step)
        end = end.ceil(step)
    count = max(1, math.ceil((end - start) / size))
    edges = [min(start + size * i, end) for i in range(count + 1)]
    return tuple(Window(a, b) for a, b in itertools.pairwise(edges) if a < b)


def _where(plan: ReadPlan, window: Window) -> list[str]:
    assets = sorted({a for a, _ in plan.series})
    tags = sorted({t for _, t in plan.series})
    return [
        f'"site" = {quote_literal(plan.site)}',
        "(" + " OR ".join(f'"asset" = {quote_literal(a)}' for a in assets) + ")",
        "(" + " OR ".join(f'"tag" = {quote_literal(t)}' for t in tags) + ")",
        f"time >= {to_ns(window.start)}",
        f"time < {to_ns(window.end)}",
    ]


def _rows(reader: HistorianReader, q: str, plan: ReadPlan, names: Sequence[str]) -> pd.DataFrame:
    """Run ``q`` (grouped by asset and tag) into long rows, keeping only the plan's series."""
    wanted = set(plan.series)
    frames = []
    for series in reader.query(q):
        key = (series.tags.get("asset", ""), series.tags.get("tag", ""))
        if key not in wanted or not series.values:
            continue
        frame = pd.DataFrame(series.values, columns=list(names))
        frame.insert(1, "asset", key[0])
        frame.insert(2, "tag", key[1])
        frames.append(frame)
    if not frames:
        return _empty(plan)
    return pd.concat(frames, ignore_index=True)


def _read_window(reader: HistorianReader, plan: ReadPlan, window: Window) -> pd.DataFrame:
    where = _where(plan, window)
    if plan.resolution == "raw":
        if plan.quality == "good":
            where.append('"quality" = 0')
        q = (
            f'SELECT "value", "quality" FROM {quote_ident(TELEMETRY)} WHERE {" AND ".join(where)} '
            'GROUP BY "asset", "tag"'
        )
        frame = _rows(reader, q, plan, ["time", "value", "quality"])
    else:
        frame = _read_rollup(reader, plan, window, where)
    return _typed(frame, plan)


def _read_rollup(reader: HistorianReader, plan: ReadPlan, window: Window, where: list[str]) -> pd.DataFrame:
    tier = TIERS_BY_NAME[plan.resolution]
    q = (
        'SELECT "mean", "last_quality", "min", "max", "count" FROM '
        f"{measurement_ref(reader.conn.database, tier.policy, tier.measurement)} WHERE {' AND '.join(where)} "
        'GROUP BY "asset", "tag"'
    )
    names = ["time", "value", "quality", "min", "max", "count"]
    try:
        rolled = _rows(reader, q, plan, names)
    except HistorianError as exc:
        if "retention policy not found" not in str(exc) and "not found" not in str(exc):
            raise
        rolled = _empty(plan)  # no rollup tiers on this install: computed from raw below
    # The rollup job runs behind real time (and may not run at all): what it has not covered yet
    # is aggregated from raw by the server, to the same definitions.
    covered = pd.Timestamp(int(rolled["time"].max()), tz="UTC") + STEP[plan.resolution] if len(rolled) else window.start
    if covered < window.end:
        rest = _aggregate_raw(reader, plan, Window(max(covered, window.start), window.end))
        rolled = pd.concat([rolled, rest], ignore_index=True) if len(rolled) else rest
    if plan.quality == "good":
        rolled = rolled[pd.to_numeric(rolled["count"]).fillna(0) > 0]
    return rolled


def _aggregate_raw(reader: HistorianReader, plan: ReadPlan, window: Window) -> pd.DataFrame:
    """A rollup tier's fields from raw data: mean/min/max/count of good samples, last quality."""
    where = " AND ".join(_where(plan, window))
    group = f'GROUP BY time({int(STEP[plan.resolution].total_seconds())}s), "asset", "tag" fill(none)'
    stats = _rows(
        reader,
        f'SELECT mean("value"), min("value"), max("value"), count("value") FROM {quote_ident(TELEMETRY)} '
        f'WHERE {where} AND "quality" = 0 {group}',
        plan,
        ["time", "value", "min", "max", "count"],
    )
    last = _rows(
        reader,
        f'SELECT last("quality") FROM {quote_ident(TELEMETRY)} WHERE {where} {group}',
        plan,
        ["time", "quality"],
    )
    keys = ["time", "asset", "tag"]
    merged = last[[*keys, "quality"]].merge(stats[[*keys, "value", "min", "max", "count"]], on=keys, how="left")
    merged["count"] = merged["count"].fillna(0)
    return merged


def _empty(plan: ReadPlan) -> pd.DataFrame:
    """No rows, with the plan's columns and dtypes."""
    frame = _typed(pd.DataFrame({c: pd.Series(dtype="float64") for c in plan.columns}), plan)
    frame["time"] = frame["time"].dt.tz_convert(plan.tz)
    return frame


def _typed(frame: pd.DataFrame, plan: ReadPlan) -> pd.DataFrame:
    """Fixed columns and dtypes for every window (a Parquet file needs one schema), sorted by time."""
    out = pd.DataFrame(
        {
            "time": pd.to_datetime(pd.to_numeric(frame["time"]).astype("int64"), unit="ns", utc=True),
            "asset": frame["asset"].astype("string"),
            "tag": frame["tag"].astype("string"),
        }
    )
    for column in plan.columns[3:]:
        values = pd.to_numeric(frame[column])
        out[column] = values.astype("Int64") if column in _INT else values.astype("float64")
    return out.sort_values(["time", "asset", "tag"], ignore_index=True)


def widen(long: pd.DataFrame, plan: ReadPlan) -> pd.DataFrame:
    """Long rows to one column per (asset, tag): values only, or (field, asset, tag) with quality."""
    fields = ["value"] if plan.quality == "good" else ["value", "quality"]
    columns = pd.MultiIndex.from_tuples(
        [(f, a, t) for f in fields for a, t in plan.series], names=["field", "asset", "tag"]
    )
    if long.empty:
        index = pd.DatetimeIndex([], tz=plan.tz, name="time")
        wide = pd.DataFrame(index=index, columns=columns, dtype="float64")
    else:
        wide = long.pivot_table(index="time", columns=["asset", "tag"], values=fields, aggfunc="last")
        wide.columns = wide.columns.set_names(["field", "asset", "tag"])
        wide = wide.reindex(columns=columns).astype("float64")
    if plan.quality == "good":
        wide = wide.droplevel("field", axis=1)
    return wide


class _Sink:
    def write(self, frame: pd.DataFrame) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _flat(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide columns as names a file can carry: ``P-102/vibration_rms``, or ``quality:P-102/…`` with
    the field level; ``time`` stays ``time``."""
    if not isinstance(frame.columns, pd.MultiIndex):
        return frame
    names = []
    for parts in frame.columns.to_flat_index():
        field, *series = [str(p) for p in parts] if len(parts) == 3 else ["", *(str(p) for p in parts)]
        if not any(series[1:]):  # the index column after reset_index(): ("time", "", ...)
            names.append(field or series[0])
        else:
            names.append(f"{field}:{'/'.join(series)}" if field else "/".join(series))
    out = frame.copy()
    out.columns = names
    return out


class _CsvSink(_Sink):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.header = True

    def write(self, frame: pd.DataFrame) -> None:
        _flat(frame).to_csv(self.handle, index=False, header=self.header, date_format="%Y-%m-%dT%H:%M:%S.%f%z")
        self.header = False

    def close(self) -> None:
        self.handle.close()


class ParquetUnavailableError(FlowlineError):
    """pyarrow is not installed."""


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ParquetUnavailableError(
            "Parquet needs pyarrow, which is not installed: uv sync --extra parquet "
            "(or pip install 'flowline-plant-analytics[parquet]') "
            "(or write CSV: --format csv / a .csv file name)"
        ) from exc
    return pyarrow


class _ParquetSink(_Sink):
    def __init__(self, path: Path) -> None:
        self.pa = _pyarrow()
        self.path = path
        self.writer: Any = None
        self.schema: Any = None

    def write(self, frame: pd.DataFrame) -> None:
        table = self.pa.Table.from_pandas(_flat(frame), preserve_index=False, schema=self.schema)
        if self.writer is None:
            self.schema = table.schema
            self.writer = self.pa.parquet.ParquetWriter(str(self.path), self.schema, compression="zstd")
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextmanager
def _progress_bar(description: str, total: int, show: bool) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar (also rendered in notebooks) while reading or replaying."""
    if not show:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _read_bar(plan: ReadPlan, show: bool | None) -> Any:
    """The progress bar of a read: by default when it takes more than 4 windows."""
    return _progress_bar(
        f"reading {len(plan.series)} tag(s), {plan.resolution}", len(plan.windows),
        len(plan.windows) > 4 if show is None else show,
    )
