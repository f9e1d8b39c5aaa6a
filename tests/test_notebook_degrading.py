"""Execute notebooks/degrading-asset.ipynb against the test InfluxDB loaded with simulator data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flowline.core.points import Quality, telemetry_point
from flowline.historian.connection import Connection
from flowline.historian.writer import HistorianWriter
from flowline.inventory import load_site
from flowline.lab.services import InfluxDServer
from flowline.lab.sim.plant import Plant
from tests.conftest import EXAMPLE_SITE, REPO

NOTEBOOK = REPO / "notebooks" / "degrading-asset.ipynb"
EPOCH = pd.Timestamp("2026-01-15T00:00:00Z")


def test_notebook_runs_and_finds_the_degrading_asset(
    influx: InfluxDServer, influx_db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import nbformat
    from nbclient import NotebookClient

    site = load_site(EXAMPLE_SITE)
    plant = Plant(site, seed=3, epoch_ns=int(EPOCH.value))
    asset, tag = "P-102", "vibration_rms"
    fault = plant.fault(asset, tag)
    assert fault is not None, "the simulator's degrading asset moved: update the notebook"
    end = pd.Timestamp(fault.crossing_ns, tz="UTC").floor("1h") - pd.Timedelta(hours=48)  # two days ahead
    times = pd.date_range(end - pd.Timedelta(days=14), end, freq="1min", inclusive="left")
    values = plant.series(asset, tag, times.as_unit("ns").asi8)
    ref = site.tag_ref(site.assets_by_id[asset], site.tag(asset, tag))  # type: ignore[arg-type]
    bad = np.arange(len(times)) % 500 == 0  # stored bad values the notebook must leave out
    points = [
        telemetry_point(ref, float(v), int(t), Quality.BAD if b else Quality.GOOD)
        for t, v, b in zip(times.as_unit("ns").asi8, values, bad, strict=True)
    ]
    conn = Connection(url=influx.url, database=influx_db, username=influx.admin.name, password=influx.admin.password)
    with HistorianWriter(conn) as writer:
        writer.write(points)

    # The notebook finds its stack through FLOWLINE_CONFIG (tests/test_data_route.py runs it on
    # the demo stack without it); this config points at the test InfluxDB.
    config = {
        "site_file": str(EXAMPLE_SITE),
        "data_dir": str(tmp_path / "data"),
        "analytics": {
            "historian": {
                "url": influx.url,
                "database": influx_db,
                "username": influx.admin.name,
                "password": {"env": "FLOWLINE_TEST_NOTEBOOK_PASSWORD"},
            }
        },
    }
    (tmp_path / "flowline.yaml").write_text(yaml.safe_dump(config))
    for key, value in {
        "FLOWLINE_CONFIG": str(tmp_path / "flowline.yaml"),
        "FLOWLINE_TEST_NOTEBOOK_PASSWORD": influx.admin.password,
        "FLOWLINE_ASSET": asset,
        "FLOWLINE_TAG": tag,
        "FLOWLINE_END": end.isoformat(),
    }.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]
    resources = {"metadata": {"path": str(NOTEBOOK.parent)}}
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources=resources)
    client.execute()

    outputs = [
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    ]
    result = next(text for text in outputs if "RESULT" in text)
    assert "RESULT P-102/vibration_rms: DEGRADING" in result or "CRITICAL" in result
    assert any(
        "image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
