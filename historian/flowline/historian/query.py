"""InfluxQL read helpers that return pandas DataFrames.

Only the InfluxQL subset that InfluxDB 3 also serves is used in product paths: plain ``SELECT`` with
``WHERE`` on tags, fields and time, aggregates with ``GROUP BY time(…)``/tags and ``fill(none)``;
no subqueries, ``INTO`` or continuous queries. Requests are ``POST /query`` with ``epoch=ns``,
chunked so large results stream instead of building one huge JSON document.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import pandas as pd
import requests

from flowline.core.config import HistorianConfig
from flowline.core.points import TELEMETRY
from flowline.historian.connection import Connection, error_message, raise_for_access
from flowline.historian.errors import HistorianNotFoundError, HistorianQueryError, HistorianUnavailableError
from flowline.historian.tiers import TIERS_BY_NAME

TimeLike: TypeAlias = int | str | dt.datetime | pd.Timestamp
Step: TypeAlias = str | dt.timedelta | pd.Timedelta


def quote_ident(name: str) -> str:
    """A double-quoted InfluxQL identifier (measurement, tag or field key, database, policy)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def bind_params(q: str, params: Mapping[str, object]) -> str:
    """``$name`` placeholders replaced by InfluxQL literals (strings quoted, numbers and booleans as is)."""

    def literal(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in params:
            raise ValueError(f"query parameter ${name} has no value")
        value = params[name]
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        return quote_literal(str(value))

    return re.sub(r"\$(\w+)", literal, q)


def quote_literal(text: str) -> str:
    """A single-quoted InfluxQL string literal (tag values in ``WHERE``)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def to_ns(value: TimeLike) -> int:
    """Epoch nanoseconds from an int (already ns), an ISO string, a datetime or a Timestamp."""
    if isinstance(value, int):
        return value
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.value)


def duration_literal(step: Step) -> str:
    """An InfluxQL duration (``10m``, ``90s``) from a string or a timedelta."""
    if isinstance(step, str):
        return step
    seconds = pd.Timedelta(step).total_seconds()
    if seconds <= 0 or seconds != int(seconds):
        raise ValueError(f"step must be a positive whole number of seconds, not {step!r}")
    return f"{int(seconds)}s"


def measurement_ref(database: str, retention_policy: str | None, measurement: str) -> str:
    """``"db"."rp"."m"`` (or ``"db".."m"`` for the default policy)."""
    rp = quote_ident(retention_policy) if retention_policy else ""
    return f"{quote_ident(database)}.{rp}.{quote_ident(measurement)}"


@dataclass
class Series:
    name: str
    tags: dict[str, str]
    columns: list[str]
    values: list[list[Any]]


class HistorianReader:
    """Runs InfluxQL against one database. Build with `from_config` or from a `Connection`."""

    def __init__(self, conn: Connection, chunk_size: int = 10_000) -> None:
        self.conn = conn
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, config: HistorianConfig) -> HistorianReader:
        return cls(Connection.from_config(config))

    def close(self) -> None:
        self.conn.close()

    # --- generic ---------------------------------------------------------------------------------

    def query(self, q: str, params: Mapping[str, object] | None = None, database: str | None = None) -> list[Series]:
        """Run one statement; return its series (merged across chunks). ``$name`` binds ``params``.

        With a token (InfluxDB 2.x/3.x) only what the 1.x-compatible ``/query`` is documented to take
        is sent, in the URL: ``db``, ``rp``, ``q`` and ``epoch`` (not chunking, not bound parameters,
        which are then inlined as quoted literals); tests/test_influx_v2.py holds it to that.
        """
        token = self.conn.token is not None and self.conn.username is None
        form: dict[str, str] = {"q": bind_params(q, params) if token and params else q,
                                "db": database or self.conn.database, "epoch": "ns"}  # fmt: skip
        if not token:
            form.update(chunked="true", chunk_size=str(self.chunk_size))
            if params:
                form["params"] = json.dumps(dict(params))
        if self.conn.retention_policy:
            form["rp"] = self.conn.retention_policy
        try:
            response = self.conn.session.post(
                f"{self.conn.url}/query",
                params=form if token else None,
                data=None if token else form,
                # single values, as the 2.x description enumerates them (requests' default is a list)
                headers={"Accept": "application/json", "Accept-Encoding": "gzip"},
                timeout=self.conn.timeout_s,
                stream=True,
            )
        except requests.RequestException as exc:
            raise HistorianUnavailableError(f"InfluxDB at {self.conn.url} is unreachable: {exc}") from exc
        with response:
            if response.status_code != 200:
                message = error_message(response.content)
                raise_for_access(self.conn, response.status_code, message, "query")
                raise HistorianQueryError(f"InfluxDB answered {response.status_code} to {q!r}: {message}")
            return _merge(self._chunks(response, q))

    def _chunks(self, response: requests.Response, q: str) -> Iterator[dict[str, Any]]:
        # 64 KiB reads: the default (512 bytes) makes a large read spend most of its time in urllib3.
        for raw in response.iter_lines(chunk_size=1 << 16):
            if not raw:
                continue
            document = json.loads(raw)
            if "error" in document:
                raise HistorianQueryError(f"InfluxDB rejected {q!r}: {document['error']}")
            for result in document.get("results", []):
                if "error" in result:
                    message = str(result["error"])
                    if message.startswith("database not found"):
                        raise HistorianNotFoundError(f"InfluxDB at {self.conn.url}: {message}")
                    raise HistorianQueryError(f"InfluxDB rejected {q!r}: {message}")
                yield result

    def query_df(self, q: str, params: Mapping[str, object] | None = None, database: str | None = None) -> pd.DataFrame:
        """One row per point: ``time`` (UTC) first, then the series tags, then the selected columns."""
        frames = []
        for series in self.query(q, params, database):
            frame = pd.DataFrame(series.values, columns=series.columns)
            for key, value in series.tags.items():
                frame[key] = value
            frame.insert(0, "measurement", series.name)
            frames.append(frame)
        if not frames:
            return pd.DataFrame(columns=["time"])
        out = pd.concat(frames, ignore_index=True)
        if "time" in out:
            out["time"] = pd.to_datetime(out["time"], unit="ns", utc=True)
        return out

    # --- telemetry -------------------------------------------------------------------------------

    def read_tag_history(
        self,
        site: str,
        asset: str,
        tag: str,
        start: TimeLike,
        end: TimeLike,
        step: Step | None = None,
        good_only: bool = True,
        with_quality: bool = False,
        measurement: str = TELEMETRY,
        retention_policy: str | None = None,
    ) -> pd.DataFrame:
        """One tag's values in ``[start, end)``, indexed by UTC time, column ``value``.

        With ``step`` the server aggregates (``mean(value) … GROUP BY time(step) fill(none)``);
        without it the raw samples come back. ``good_only`` keeps quality 0 (good) samples only;
        ``with_quality`` adds a ``quality`` column (the worst quality in each step).
        """
        select = ['"value"'] + (['"quality"'] if with_quality else [])
        if step is not None:
            select = ['mean("value") AS "value"'] + (['max("quality") AS "quality"'] if with_quality else [])
        where = self._series_filter(site, asset, tag) + self._time_filter(start, end)
        if good_only:
            where.append('"quality" = 0')
        q = (
            f"SELECT {', '.join(select)} FROM "
            f"{measurement_ref(self.conn.database, retention_policy, measurement)} WHERE {' AND '.join(where)}"
        )
        if step is not None:
            q += f" GROUP BY time({duration_literal(step)}) fill(none)"
        frame = self.query_df(q)
        columns = ["value"] + (["quality"] if with_quality else [])
        if frame.empty or "value" not in frame:
            return pd.DataFrame(
                {c: pd.Series(dtype="float64") for c in columns}, index=pd.DatetimeIndex([], tz="UTC", name="time")
            )
        return frame.set_index("time")[columns]

    def read_rollup(
        self, site: str, asset: str, tag: str, start: TimeLike, end: TimeLike, tier: str = "1h"
    ) -> pd.DataFrame:
        """One tag's rollup rows (``tier`` "1m" or "1h"): mean, min, max, count, last_quality by UTC time."""
        if tier not in TIERS_BY_NAME:
            raise ValueError(f"tier must be one of {', '.join(TIERS_BY_NAME)}, not {tier!r}")
        spec = TIERS_BY_NAME[tier]
        columns = ["mean", "min", "max", "count", "last_quality"]
        where = self._series_filter(site, asset, tag) + self._time_filter(start, end)
        q = (
            f"SELECT {', '.join(quote_ident(c) for c in columns)} FROM "
            f"{measurement_ref(self.conn.database, spec.policy, spec.measurement)} WHERE {' AND '.join(where)}"
        )
        frame = self.query_df(q)
        if frame.empty:
            return pd.DataFrame(columns=columns, index=pd.DatetimeIndex([], tz="UTC", name="time"))
        return frame.set_index("time")[columns]

    def latest_values(self, site: str, asset: str | None = None) -> pd.DataFrame:
        """The newest sample of every tag of a site (or one asset): asset, tag, time, value, quality."""
        where = [f'"site" = {quote_literal(site)}']
        if asset is not None:
            where.append(f'"asset" = {quote_literal(asset)}')
        q = (
            'SELECT last("value") AS "value", last("quality") AS "quality" FROM '
            f'{quote_ident(TELEMETRY)} WHERE {" AND ".join(where)} GROUP BY "asset", "tag"'
        )
        frame = self.query_df(q)
        if frame.empty:
            return pd.DataFrame(columns=["asset", "tag", "time", "value", "quality"])
        return frame[["asset", "tag", "time", "value", "quality"]].sort_values(["asset", "tag"], ignore_index=True)

    # --- analytics output ------------------------------------------------------------------------

    def read_asset_health(
        self, site: str, start: TimeLike, end: TimeLike | None = None, asset: str | None = None
    ) -> pd.DataFrame:
        """Rows of ``asset_health`` (all fields, plus the asset, tag and criticality tags)."""
        return self._read_analytics("asset_health", site, start, end, asset, None)

    def read_forecast(
        self, site: str, asset: str, tag: str, start: TimeLike, end: TimeLike | None = None
    ) -> pd.DataFrame:
        """Rows of ``forecast`` for one tag: time, yhat, lower, upper."""
        return self._read_analytics("forecast", site, start, end, asset, tag)

    def _read_analytics(
        self, measurement: str, site: str, start: TimeLike, end: TimeLike | None, asset: str | None, tag: str | None
    ) -> pd.DataFrame:
        where = [f'"site" = {quote_literal(site)}', f"time >= {to_ns(start)}"]
        if end is not None:
            where.append(f"time < {to_ns(end)}")
        if asset is not None:
            where.append(f'"asset" = {quote_literal(asset)}')
        if tag is not None:
            where.append(f'"tag" = {quote_literal(tag)}')
        q = f"SELECT * FROM {quote_ident(measurement)} WHERE {' AND '.join(where)} GROUP BY *"
        frame = self.query_df(q)
        return frame.drop(columns=["measurement"], errors="ignore")

    @staticmethod
    def _series_filter(site: str, asset: str, tag: str) -> list[str]:
        return [f'"site" = {quote_literal(site)}', f'"asset" = {quote_literal(asset)}', f'"tag" = {quote_literal(tag)}']

    @staticmethod
    def _time_filter(start: TimeLike, end: TimeLike) -> list[str]:
        return [f"time >= {to_ns(start)}", f"time < {to_ns(end)}"]


def _merge(results: Iterator[dict[str, Any]]) -> list[Series]:
    """Join the partial series of a chunked response (same name and tags) in arrival order."""
    merged: dict[tuple[str, tuple[tuple[str, str], ...]], Series] = {}
    for result in results:
        for raw in result.get("series", []):
            tags = dict(raw.get("tags") or {})
            key = (raw.get("name", ""), tuple(sorted(tags.items())))
            if key in merged:
                merged[key].values.extend(raw.get("values", []))
            else:
                merged[key] = Series(raw.get("name", ""), tags, list(raw["columns"]), list(raw.get("values", [])))
    return list(merged.values())
