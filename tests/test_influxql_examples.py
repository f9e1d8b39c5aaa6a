"""The InfluxQL examples in docs/measurements.md run on a real InfluxDB; `tag` must be quoted there."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import requests

from flowline.core.points import TagRef, telemetry_point
from flowline.lab.services import InfluxDServer
from tests.conftest import REPO

DOC = REPO / "docs" / "measurements.md"


def _examples() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def _run(influx: InfluxDServer, db: str, q: str) -> Any:
    auth = (influx.admin.name, influx.admin.password)
    response = requests.post(f"{influx.url}/query", params={"q": q, "db": db}, auth=auth, timeout=10)
    return response.json()


def test_documented_influxql_examples_run_and_quote_the_tag_key(influx: InfluxDServer, influx_db: str) -> None:
    examples = _examples()
    assert any('"tag"' in q for q in examples), "docs/measurements.md shows no InfluxQL example that selects by tag"
    now = time.time_ns()
    points = [
        telemetry_point(TagRef("s", "P-101", "flow", "m3/h"), 12.5, now - 60 * 10**9),
        telemetry_point(TagRef("s", "P-101", "state", value_type="string"), "RUNNING", now - 60 * 10**9),
    ]
    auth = (influx.admin.name, influx.admin.password)
    body = "\n".join(p.to_line() for p in points)
    requests.post(f"{influx.url}/write", params={"db": influx_db}, data=body, auth=auth, timeout=10).raise_for_status()
    for q in examples:
        result = _run(influx, influx_db, q)["results"][0]
        assert "error" not in result and result.get("series"), f"{q}: {result}"


@pytest.mark.parametrize("q", ['SELECT "value" FROM "telemetry" WHERE tag = \'flow\''])
def test_unquoted_tag_is_the_keyword_error_the_docs_warn_about(influx: InfluxDServer, influx_db: str, q: str) -> None:
    error = _run(influx, influx_db, q)["error"]
    assert "found TAG, expected identifier" in error
    assert "found TAG, expected identifier" in DOC.read_text(encoding="utf-8")
