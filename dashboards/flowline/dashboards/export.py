"""Render the dashboards to Grafana JSON files (the committed copies live in ``dashboards/json``)."""

from __future__ import annotations

import json
from pathlib import Path

from flowline.dashboards.builder import JSON
from flowline.dashboards.definitions import DEFAULT_HORIZON_HOURS, all_dashboards
from flowline.inventory import Site

PACKAGED_JSON = Path(__file__).resolve().parent / "json"
PACKAGED_PROVISIONING = Path(__file__).resolve().parent / "provisioning"
# The committed dashboards and alert rules are rendered from the site the docker deployment uses by
# default (FLOWLINE_SITE_FILE in docker/compose.yaml, the lab's north-field example); a site of its
# own re-exports them with `flowline dashboards export --config ...`.
PACKAGED_ALERTING = "alerting.yaml"
PACKAGED_ALERTING_DIR = PACKAGED_PROVISIONING / "alerting"


def render_all(site: Site | None = None, horizon_hours: float = DEFAULT_HORIZON_HOURS) -> dict[str, JSON]:
    """``{file name: dashboard JSON}``. With a site file the operations centre gets its production
    streams, one panel per unit and the alarm-limit bands; without, a unit picker."""
    return {f"{d.uid}.json": d.to_json() for d in all_dashboards(site, horizon_hours)}


def dumps(dashboard: JSON) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def export(out: Path, site: Site | None = None, horizon_hours: float = DEFAULT_HORIZON_HOURS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dashboard in render_all(site, horizon_hours).items():
        path = out / name
        path.write_text(dumps(dashboard), encoding="utf-8")
        written.append(path)
    return written
