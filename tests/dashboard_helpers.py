"""Pipeline data for the dashboard query tests, written by the pipeline's own code where it exists.

`load_pipeline_data` is the single place that decides what is in the database: telemetry from the
plant simulator model of the example site, written by the historian writer into the database,
retention tiers and read-only Grafana account made by the historian's set-up, rolled up by the
historian's rollup job (``telemetry_1m``/``telemetry_1h``); a real analytics pass
(`flowline.analytics.job.run_pass`) for ``asset_health``, ``forecast``, ``events`` and
``inventory``; ``flowline_*`` from `Metrics` snapshots of every stage; ``security_event`` from the
DMZ acceptor and the relay writer. To test the dashboards against a short real demo run instead, replace its body with
that run (same signature) and keep the returned `PipelineData`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests

from flowline.analytics.job import run_pass
from flowline.core.config import AnalyticsConfig, FlowlineConfig, HistorianConfig
from flowline.core.metrics import Metrics
from flowline.core.points import Point, TagRef, telemetry_point
from flowline.core.secrets import SecretRef
from flowline.core.spool import SpoolWriter
from flowline.historian.connection import Connection
from flowline.historian.rollups import Checkpoint, RollupJob
from flowline.historian.setup import Account, setup_v1
from flowline.historian.writer import HistorianWriter
from flowline.inventory import load_site
from flowline.lab.services import InfluxDServer
from flowline.lab.sim.plant import Plant
from flowline.relay.body import encode_body
from flowline.relay.dmz.acceptor import BatchAcceptor
from flowline.relay.dmz.writer import Forwarder
from flowline.relay.frames import FrameType, decode_wire, encode_frame

MINUTE_NS = 60 * 10**9
# How the committed dashboards and alerting file are made (rendered with the docker default site).
EXPORT_COMMAND = (
    "flowline dashboards export --out dashboards/flowline/dashboards/json "
    "--provisioning-out dashboards/flowline/dashboards/provisioning "
    "--site lab/flowline/lab/examples/north-field.yaml "
    "--alerting-out dashboards/flowline/dashboards/provisioning/alerting"
)
HISTORY_DAYS = 7
FORECAST_DAYS = 3


@dataclass(frozen=True)
class PlantState:
    """A known plant for the "what a person sees" tests: the simulator's faults (seed 3: P-102
    vibration_rms, E-201 approach_temp, F-401 differential_pressure degrading), one asset silent
    for two hours, one tag beyond its high alarm limit now, one spool past half its capacity, and a
    dead letter in the last minutes."""

    epoch_ns: int
    silent_asset: str = "WH-03"
    beyond_tag: tuple[str, str] = ("PL-01", "temperature")  # high alarm 60 degC
    beyond_value: float = 64.5
    full_spool_bytes: float = 600 * 2**20  # of the 1 GiB default

    @property
    def silent_since_ns(self) -> int:
        return self.epoch_ns - 2 * 3600 * 10**9

    @property
    def beyond_since_ns(self) -> int:
        return self.epoch_ns - 5 * 60 * 10**9


@dataclass(frozen=True)
class PipelineData:
    url: str
    database: str
    auth: tuple[str, str]  # a read-only user, as Grafana's datasource would use
    start_ms: int
    end_ms: int  # after the last forecast point


class InfluxReader:
    """InfluxQL over HTTP GET /query, like Grafana's InfluxDB datasource in GET mode."""

    def __init__(self, data: PipelineData) -> None:
        self.data = data

    def results(self, query: str) -> list[dict[str, Any]]:
        response = requests.get(
            f"{self.data.url}/query",
            params={"db": self.data.database, "q": query, "epoch": "ms"},
            auth=self.data.auth,
            timeout=30,
        )
        response.raise_for_status()
        results: list[dict[str, Any]] = response.json()["results"]
        for result in results:
            if "error" in result:
                raise AssertionError(f"InfluxDB error for {query!r}: {result['error']}")
        return results

    def series(self, query: str) -> list[dict[str, Any]]:
        return [s for r in self.results(query) for s in r.get("series", [])]

    def values(self, query: str, column: int = 0) -> list[str]:
        return [str(row[column]) for s in self.series(query) for row in s.get("values", [])]

    def measurements(self) -> set[str]:
        return set(self.values("SHOW MEASUREMENTS"))

    def field_keys(self, source: str) -> set[str]:
        """``source`` as in a FROM clause: ``"m"`` or ``"rp"."m"``."""
        return set(self.values(f"SHOW FIELD KEYS FROM {source}"))

    def tag_keys(self, source: str) -> set[str]:
        return set(self.values(f"SHOW TAG KEYS FROM {source}"))


def _telemetry(
    site_file: Path, now_ns: int, step_ns: int, start_ns: int | None = None, silent: PlantState | None = None
) -> list[Point]:
    """The plant model's values of every tag from ``start_ns`` (default: the history) to ``now_ns``;
    with a `PlantState`, its silent asset stops and its beyond-limit tag jumps as it describes."""
    site = load_site(site_file)
    plant = Plant(site, seed=3, epoch_ns=silent.epoch_ns if silent else now_ns)
    start = start_ns if start_ns is not None else now_ns - HISTORY_DAYS * 86400 * 10**9
    times = np.arange(start, now_ns, step_ns, dtype=np.int64)
    points: list[Point] = []
    for asset, tag in site.iter_tags():
        ref = TagRef(site.site, asset.id, tag.name, tag.unit)
        values = plant.series(asset.id, tag.name, times)
        for t, v in zip(times, values, strict=True):
            if silent is not None and asset.id == silent.silent_asset and t > silent.silent_since_ns:
                continue
            if silent is not None and (asset.id, tag.name) == silent.beyond_tag and t > silent.beyond_since_ns:
                v = silent.beyond_value
            points.append(telemetry_point(ref, float(v), int(t)))
    return points


def _stage_metrics(site: str, now_ns: int) -> list[Point]:
    """Six hours of every stage's metrics at one-minute snapshots, counters growing."""
    stages = {
        name: Metrics(name, site, "test")
        for name in ("collector-opcua", "collector-mqtt", "relay-ot", "relay-dmz", "historian")
    }
    points: list[Point] = []
    for minute in range(360, 0, -1):
        for name, m in stages.items():
            m.inc("points_in_total", 600)
            m.inc("points_out_total", 598)
            m.set("lag_seconds", 1.5 + (minute % 7) / 10)
            m.set("connected", 1.0, target="upstream")
            if minute % 60 == 0:
                m.inc("reconnects_total", target="upstream")
            if name.startswith("collector"):
                m.inc("rejected_total", 2, reason="invalid_json" if name.endswith("mqtt") else "unknown_node")
                m.inc(
                    "unknown_sources_total",
                    source=name.removeprefix("collector-"),
                    address="plant/north-field/X-9/temp",
                )
                m.set("spool_bytes", 4096.0 * (minute % 5), spool=name.removeprefix("collector-"))
            if name == "relay-dmz":
                m.inc("sequence_gaps_total", 1 if minute % 90 == 0 else 0, sender="ot-north-1")
                m.inc("diode_lost_total", 1 if minute % 45 == 0 else 0)
                m.inc("diode_datagrams_total", 60, kind="received")
                m.inc("diode_datagrams_total", 1, kind="recovered")
                m.set("spool_bytes", 1024.0, spool="dmz")
            if name == "historian":
                m.inc("dead_letter_total", 1 if minute % 120 == 0 else 0, reason="type_conflict")
                m.inc("write_errors_total", 1 if minute % 100 == 0 else 0, status="503")
            points += m.snapshot(now_ns - minute * MINUTE_NS)
    return points


def _security_events(config: FlowlineConfig) -> None:
    """Security events through the real DMZ path: signed batches into the acceptor, which records
    an unapproved flow and a sequence gap, then the ``relay writer`` forwarder into InfluxDB."""
    site = load_site(config.site_file)
    key = b"dashboard-test-key"
    sender = "ot-north-1"
    acceptor = BatchAcceptor(
        site,
        SpoolWriter(config.spool_dir("dmz")),
        Metrics("relay-dmz", site.site, "test"),
        config.data_dir / "dmz",
        1 << 20,
    )
    stray = telemetry_point(TagRef(site.site, "X-9", "temp", "degC"), 21.5, time.time_ns())
    try:
        for sequence in (1, 3):  # batch 2 never arrives: a sequence gap
            wire = encode_frame(key, FrameType.BATCH, sender, sequence, 1, encode_body([stray]))
            acceptor.accept(decode_wire(wire, lambda _: key))
        acceptor.security_event("bad_signature", sender, "signature does not verify")
    finally:
        acceptor.close()
    forwarder = Forwarder(config)
    try:
        while forwarder.step():
            pass
    finally:
        forwarder.historian.close()


def load_pipeline_data(influx: InfluxDServer, database: str, site_file: Path, tmp: Path) -> PipelineData:
    now_ns = pd.Timestamp.now(tz="UTC").floor("10min").value
    admin = Connection(influx.url, database, username=influx.admin.name, password=influx.admin.password)
    password_file = tmp / "influx-admin-password"
    password_file.write_text(influx.admin.password)
    historian = HistorianConfig(
        url=influx.url, database=database, username=influx.admin.name, password=SecretRef(file=password_file)
    )
    # The historian's own set-up: database, retention tiers, and Grafana's read-only account.
    grafana = Account("grafana_" + database, "ro-" + database)
    setup_v1(admin, historian, {"grafana": grafana})
    site = load_site(site_file)
    with HistorianWriter(admin, precision="s") as writer:
        writer.write(_telemetry(site_file, now_ns, 10 * MINUTE_NS))
        writer.write(_stage_metrics(site.site, now_ns))
    _security_events(FlowlineConfig(site_file=site_file, data_dir=tmp / "data", historian=historian))
    rollup = RollupJob(admin, Checkpoint(tmp / "rollup-checkpoint.json"), lag_s=0)
    try:
        rollup.run_once(now_ns)
    finally:
        rollup.close()
    analytics = AnalyticsConfig(step="10m", history=f"{HISTORY_DAYS * 24}h", horizon_hours=FORECAST_DAYS * 24)
    metrics = Metrics("analytics", site.site, "test")
    # Two passes an hour apart, so flag changes (events) and a flag history exist.
    for hours_ago in (1, 0):
        run_pass(
            site,
            historian,
            analytics,
            now=pd.Timestamp(now_ns - hours_ago * 3600 * 10**9, tz="UTC"),
            metrics=metrics,
            workers=1,
        )
    return PipelineData(
        influx.url,
        database,
        (grafana.name, grafana.password),
        start_ms=(now_ns - HISTORY_DAYS * 86400 * 10**9) // 10**6,
        end_ms=(now_ns + FORECAST_DAYS * 86400 * 10**9) // 10**6,
    )


def _trouble_metrics(site: str, now_ns: int, state: PlantState) -> list[Point]:
    """A relay whose spool is past half full, and a writer that dead-lettered points, just now."""
    relay = Metrics("relay-ot", site, "live")
    writer = Metrics("historian", site, "live")
    points: list[Point] = []
    for seconds_ago in (240, 120, 10):
        relay.set("spool_bytes", state.full_spool_bytes, spool="opcua")
        writer.inc("dead_letter_total", 2, reason="field_type_conflict")
        points += relay.snapshot(now_ns - seconds_ago * 10**9) + writer.snapshot(now_ns - seconds_ago * 10**9)
    return points


def load_plant_state(
    influx: InfluxDServer, database: str, site_file: Path, tmp: Path
) -> tuple[PipelineData, PlantState]:
    """`load_pipeline_data`'s pipeline with `PlantState` applied, and live values up to now: 1-second
    samples for the last 3 minutes (the silent asset has none after its cut-off)."""
    admin = Connection(influx.url, database, username=influx.admin.name, password=influx.admin.password)
    password_file = tmp / "influx-admin-password"
    password_file.write_text(influx.admin.password)
    historian = HistorianConfig(
        url=influx.url, database=database, username=influx.admin.name, password=SecretRef(file=password_file)
    )
    grafana = Account("grafana_" + database, "ro-" + database)
    setup_v1(admin, historian, {"grafana": grafana})
    # Security events are stamped when the DMZ records them: before "now", so they are in the past.
    _security_events(FlowlineConfig(site_file=site_file, data_dir=tmp / "data", historian=historian))
    now_ns = time.time_ns()
    state = PlantState(now_ns)
    history_end = pd.Timestamp(now_ns - 3 * 60 * 10**9, tz="UTC").floor("10min").value
    site = load_site(site_file)
    with HistorianWriter(admin, precision="ms") as writer:
        writer.write(_telemetry(site_file, history_end, 10 * MINUTE_NS, silent=state))
        writer.write(_telemetry(site_file, now_ns, 10**9, start_ns=now_ns - 180 * 10**9, silent=state))
        writer.write(_stage_metrics(site.site, now_ns))
        writer.write(_trouble_metrics(site.site, now_ns, state))
    analytics = AnalyticsConfig(step="10m", history=f"{HISTORY_DAYS * 24}h")
    run_pass(
        site,
        historian,
        analytics,
        now=pd.Timestamp(now_ns, tz="UTC"),
        metrics=Metrics("analytics", site.site, "t"),
        workers=1,
    )
    data = PipelineData(
        influx.url,
        database,
        (grafana.name, grafana.password),
        start_ms=(now_ns - HISTORY_DAYS * 86400 * 10**9) // 10**6,
        end_ms=now_ns // 10**6,
    )
    return data, state


def regex_escape(value: str) -> str:
    """Grafana's InfluxDB regex escaping of a variable value."""
    return re.sub(r"[\\^$*+?.()|{}\[\]/-]", lambda m: "\\" + m.group(0), value)
