"""Shared by the analytics tests: a small site, synthetic telemetry written through the historian
writer, and a config file pointing at the test InfluxDB."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import yaml

from flowline.analytics.synthetic import HIGH, Kind, make_series
from flowline.core.points import Quality, TagRef, telemetry_point
from flowline.historian.connection import Connection
from flowline.historian.writer import HistorianWriter
from flowline.lab.services import InfluxDServer

SITE = "test-field"
END = pd.Timestamp("2026-01-15T00:00:00Z")
# asset id -> kind of its one forecast tag
ASSETS: dict[str, Kind] = {"P-101": "degrading", "P-102": "healthy", "C-201": "daily", "K-301": "constant"}
PASSWORD_ENV = "FLOWLINE_TEST_INFLUX_PASSWORD"


def site_yaml(extra_assets: tuple[str, ...] = ()) -> str:
    assets = []
    for asset_id in [*ASSETS, *extra_assets]:
        assets.append(
            {
                "id": asset_id,
                "name": f"asset {asset_id}",
                "type": "centrifugal_pump",
                "criticality": "A",
                "consequence": {"safety": "high", "environment": "low", "production": "medium"},
                "tags": [
                    {
                        "name": "vibration_rms",
                        "unit": "mm/s",
                        "source": {"mqtt": {"topic": f"plant/{asset_id}/vibration"}},
                        "alarm": {"high": HIGH},
                        "forecast": True,
                    },
                ],
            }
        )
    return yaml.safe_dump({"site": SITE, "assets": assets}, sort_keys=False)


def write_config(folder: Path, influx: InfluxDServer, database: str, extra_assets: tuple[str, ...] = ()) -> Path:
    """Site + config files; the admin password goes through an environment variable (a SecretRef).
    ``extra_assets`` are in the site file but get no telemetry."""
    os.environ[PASSWORD_ENV] = influx.admin.password
    (folder / "site.yaml").write_text(site_yaml(extra_assets), encoding="utf-8")
    config = {
        "site_file": "site.yaml",
        "data_dir": str(folder / "data"),
        "historian": {
            "url": influx.url,
            "database": database,
            "username": influx.admin.name,
            "password": {"env": PASSWORD_ENV},
        },
        "analytics": {"workers": 1},
    }
    path = folder / "flowline.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def write_telemetry(influx: InfluxDServer, database: str, days: float = 14, end: pd.Timestamp = END) -> None:
    """Synthetic 10-minute telemetry for every asset; a few bad-quality samples the job must ignore."""
    conn = Connection(url=influx.url, database=database, username=influx.admin.name, password=influx.admin.password)
    points = []
    for i, (asset_id, kind) in enumerate(ASSETS.items()):
        ref = TagRef(site=SITE, asset=asset_id, tag="vibration_rms", unit="mm/s")
        series = make_series(kind, days=days, end=end, seed=i)
        for j, (ts, value) in enumerate(series.items()):
            bad = j % 97 == 0
            points.append(
                telemetry_point(ref, 1e6 if bad else float(value), int(ts.value), Quality.BAD if bad else Quality.GOOD)
            )
    with HistorianWriter(conn) as writer:
        writer.write(points)
