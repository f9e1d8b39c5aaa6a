"""Render the dashboards to Grafana JSON files (the committed copies live in ``dashboards/json``)."""

from __future__ import annotations

import json
from pathlib import Path

from flowline.dashboards.builder import JSON
from flowline.dashboards.definitions import all_dashboards
from flowline.inventory import Site

PACKAGED_JSON = Path(__file__).resolve().parent / "json"
PACKAGED_PROVISIONING = Path(__file__).resolve().parent / "provisioning"


def render_all(site: Site | None = None) -> dict[str, JSON]:
    """``{file name: dashboard JSON}``; with a site file, alarm limits become threshold bands."""
    return {f"{d.uid}.json": d.to_json() for d in all_dashboards(site)}


def dumps(dashboard: JSON) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def export(out: Path, site: Site | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dashboard in render_all(site).items():
        path = out / name
        path.write_text(dumps(dashboard), encoding="utf-8")
        written.append(path)
    return written
